"""select_tokens, the dispatch: every method, merge, K at its edges, the backend choice, and the
determinism the model relies on (ties to the lower index, kept ascending, same rows every run)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import (
    DEVICE,
    DTYPES,
    ROW_TOLS,
    SCORE_TOLS,
    assert_close,
    assert_equal,
    clear_margin_ks,
    needs_cuda,
    random_inputs,
    relevance_f64,
    requires_triton,
    topk_oracle,
    unambiguous_positions,
)

from lvlm_prune.kernels import PRUNE_METHODS, keep_count, select_tokens
from lvlm_prune.kernels.reference import merge_dropped_ref
from lvlm_prune.kernels.selection import BACKEND_ENV, resolve_backend, uniform_indices

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


def _select(images, queries, keep, method, *, merge=False, seeds=None, **kw):
    b = len(images)
    return select_tokens(
        images,
        queries,
        keep,
        methods=[method] * b,
        merge=[merge] * b,
        seeds=seeds if seeds is not None else [0] * b,
        **kw,
    )


def _assert_ascending_and_distinct(kept, n, what):
    assert kept.dtype == torch.int64, what
    assert bool((kept[1:] > kept[:-1]).all()), f"{what}: not strictly ascending {kept.tolist()}"
    assert kept.numel() == 0 or (int(kept[0]) >= 0 and int(kept[-1]) < n), f"{what}: range"


# ---- simignore: relevance + top-K -------------------------------------------------------------


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tols", SCORE_TOLS)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
def test_simignore_kept_sets(backend, d, tols, seed):
    """Kept sets equal the float64 top-K wherever the K-th and (K+1)-th scores are apart by more
    than the tolerance (closer than that, rounding may legitimately pick either)."""
    dtype, atol, _ = tols
    shapes = [(577, 7), (100, 300), (1, 1), (100, 0)]
    images, queries = random_inputs(shapes, d, dtype)
    checked = 0
    for ratio in [0.05, 0.11, 0.5, 0.9]:
        keep = [keep_count(n, ratio) for n, _ in shapes]
        got = _select(images, queries, keep, "simignore", backend=backend)
        for b, (sel, scores64) in enumerate(zip(got, relevance_f64(images, queries))):
            k = keep[b]
            assert sel.kept.shape == (k,) and sel.rows.shape == (k, d)
            _assert_ascending_and_distinct(sel.kept, shapes[b][0], f"image {b}")
            assert_equal(sel.rows, images[b][sel.kept], f"rows of image {b}", seed)
            if shapes[b][1] == 0:  # empty query: uniform, no scores
                assert sel.method == "uniform" and sel.scores is None
                assert_equal(sel.kept, uniform_indices(shapes[b][0], k), f"image {b}", seed)
                continue
            assert sel.method == "simignore"
            if clear_margin_ks(scores64, [k], 4 * atol):
                assert_equal(sel.kept, topk_oracle(scores64, k), f"image {b} ratio {ratio}", seed)
                checked += 1
    # 4 of the 12 are the 1-row image; the others have a clear margin ~85% of the time each.
    assert checked >= 6, f"only {checked} kept sets had a clear margin; seed={seed}"


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_from_duplicate_rows_go_to_the_lower_index(backend, dtype, seed):
    """Three images with the same question, made of 5 distinct rows repeated (at tile boundaries,
    ragged edges, everywhere): scores tie exactly within each group across the whole batch, and
    each image keeps the lower indices of the group at its cut."""
    shapes, d = [300, 1, 65], 96
    device = "cpu" if backend == "torch" else DEVICE  # the torch path serves CPU tensors
    while True:  # groups whose scores are clearly apart, so only the tie rule decides
        pool = torch.randn(5, d, device=device).to(dtype)
        query = torch.randn(70, d, device=device).to(dtype)
        pool_scores = relevance_f64([pool], [query])[0]
        if clear_margin_ks(pool_scores, [1, 2, 3, 4], 1e-3) == [1, 2, 3, 4]:
            break
    groups = [torch.randint(0, 5, (n,), device=device) for n in shapes]
    groups[0][[62, 63, 64, 65, 127, 128]] = int(groups[0][0])  # one group across tile edges
    images = [pool[g] for g in groups]
    for ratio in [0.004, 0.03, 0.22, 0.5, 0.997]:
        keep = [keep_count(n, ratio) for n in shapes]
        got = _select(images, [query] * 3, keep, "simignore", need_scores=True, backend=backend)
        flat = torch.cat([sel.scores for sel in got]).cpu()
        groups_flat = torch.cat(groups).cpu()
        for g in range(5):
            tied = flat[groups_flat == g].unique()
            assert tied.numel() <= 1, f"group {g} scores {tied.tolist()}; seed={seed}"
        for b, sel in enumerate(got):
            want = topk_oracle(pool_scores[groups[b].cpu()], keep[b])  # exact ties by design
            assert_equal(sel.kept, want, f"image {b} ratio {ratio}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_kept_set_on_every_run(backend, seed):
    """The same embeddings give the same kept rows and bit-identical scores, call after call."""
    images, queries = random_inputs([(577, 7), (100, 70)], 64, torch.bfloat16)
    first = _select(images, queries, [64, 11], "simignore", backend=backend)
    for _ in range(2):
        again = _select(images, queries, [64, 11], "simignore", backend=backend)
        for b, (x, y) in enumerate(zip(first, again)):
            assert_equal(y.kept, x.kept, f"image {b}", seed)
            assert torch.equal(y.scores, x.scores), f"image {b} scores; seed={seed}"


# ---- the other methods --------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_keeps_one_row_per_stretch(backend, seed):
    """K evenly spaced rows: the i-th kept row within one row of the centre of the i-th 1/K
    stretch of the image. Scores
    only with ``need_scores``, and then the cosine relevance (the diagnostics' heatmap)."""
    shapes = [(100, 5), (577, 3), (7, 2)]
    images, queries = random_inputs(shapes, 32, torch.float32)
    keep = [int(torch.randint(1, n, ())) for n, _ in shapes]
    plain = _select(images, queries, keep, "uniform", backend=backend)
    scored = _select(images, queries, keep, "uniform", need_scores=True, backend=backend)
    for b, ((n, _), k) in enumerate(zip(shapes, keep)):
        for sel in (plain[b], scored[b]):
            assert sel.method == "uniform" and sel.kept.shape == (k,)
            _assert_ascending_and_distinct(sel.kept, n, f"image {b} N={n} K={k}")
            centres = (torch.arange(k) + 0.5) * n / k  # of the K stretches of N / K rows
            off = (sel.kept.cpu() - centres).abs().max()
            assert off < 1, f"image {b} N={n} K={k}: {sel.kept.tolist()}; seed={seed}"
            assert_equal(sel.rows, images[b][sel.kept], f"rows of image {b}", seed)
        assert plain[b].scores is None
        want = relevance_f64(images[b : b + 1], queries[b : b + 1])[0]
        assert_close(scored[b].scores, want, 2e-5, 1e-4, f"image {b} scores", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_is_seeded_by_the_request(backend, seed):
    """Same seed, same rows (whatever the embeddings); another seed, other rows."""
    images, queries = random_inputs([(100, 4), (100, 4)], 16, torch.float32)
    s = int(torch.randint(0, 2**62, ()))
    got = _select(images, queries, [10, 10], "random", seeds=[s, s + 1], backend=backend)
    again = _select(
        [torch.randn_like(x) for x in images], queries, [10, 10], "random", seeds=[s, s + 1]
    )
    for b in range(2):
        assert got[b].method == "random" and got[b].scores is None
        _assert_ascending_and_distinct(got[b].kept, 100, f"image {b}")
        assert_equal(got[b].kept, again[b].kept, f"image {b}, same seed", seed)
    # Two draws of 10 of 100 agree by chance once in 1.7e13.
    assert not torch.equal(got[0].kept, got[1].kept), f"seeds {s}, {s + 1} drew alike; seed={seed}"


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_ranks_by_the_scores_handed_in(backend, seed):
    """``flow`` keeps the top-K of its given scores (ties included, no cosine computed), and
    without scores falls back to uniform."""
    shapes = [(100, 5), (65, 0), (40, 3)]
    images, queries = random_inputs(shapes, 32, torch.float32)
    given = [
        torch.randint(0, 6, (100,), device=DEVICE).float(),  # many ties
        torch.rand(65, device=DEVICE),  # no query: flow does not need one
        None,
    ]
    keep = [23, 9, 8]
    got = _select(images, queries, keep, "flow", scores=given, need_scores=True, backend=backend)
    for b in range(2):
        assert got[b].method == "flow" and got[b].scores is given[b]
        assert_equal(got[b].kept, topk_oracle(given[b], keep[b]), f"image {b}", seed)
    assert got[2].method == "uniform" and got[2].scores is None
    assert_equal(got[2].kept, uniform_indices(40, 8), "image 2, no scores", seed)


# ---- merge ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_flag_per_image(backend, seed):
    """Per image: merged rows are merge_dropped_ref of the kept set; unmerged ones the kept rows
    themselves; an image that keeps every row comes back unchanged, merge or not."""
    images, queries = random_inputs([(60, 5), (60, 5), (12, 3)], 32, torch.float32)
    kw = dict(methods=["simignore"] * 3, seeds=[0] * 3, backend=backend)
    got = select_tokens(images, queries, [9, 9, 12], merge=[True, False, True], **kw)
    want = merge_dropped_ref(images[0], got[0].kept)
    ok = unambiguous_positions(images[0], got[0].kept).to(want.device)
    assert int(ok.sum()) >= 4, f"too many near-ties; seed={seed}"
    assert_close(got[0].rows[ok], want[ok], 1e-5, 1e-5, "merged rows", seed)
    assert not torch.equal(got[0].rows, images[0][got[0].kept]), f"nothing merged; seed={seed}"
    assert_equal(got[1].rows, images[1][got[1].kept], "unmerged rows", seed)
    assert_equal(got[2].kept, torch.arange(12), "K = N kept", seed)
    assert_equal(got[2].rows, images[2], "K = N rows", seed)


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
def test_merge_triton_matches_torch(seed):
    shapes = [(100, 7), (64, 0)]
    while True:  # no near-tie at the cut: then both backends must keep the same rows
        images, queries = random_inputs(shapes, 64, torch.float32)
        if clear_margin_ks(relevance_f64(images[:1], queries[:1])[0], [20], 1e-4):
            break
    kw = dict(methods=["simignore", "uniform"], merge=[True, True], seeds=[0, 0])
    got = select_tokens(images, queries, [20, 16], backend="triton", **kw)
    want = select_tokens(images, queries, [20, 16], backend="torch", **kw)
    for b, (g, w) in enumerate(zip(got, want)):
        assert_equal(g.kept, w.kept, f"image {b} kept", seed)
        ok = unambiguous_positions(images[b], g.kept).to(g.rows.device)
        assert_close(g.rows[ok], w.rows[ok], 1e-5, 1e-5, f"image {b} rows", seed)


# ---- K at its edges, arguments ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_keep_count_edges_through_every_method(backend, method, seed):
    """K = 1, K = N - 1 and K = N (nothing pruned: every row, in order) for a 1-row, a 2-row and
    a 9-row image; keep_count's K (ceil, at least min_keep, at most N) is what comes back."""
    shapes = [(1, 2), (2, 2), (9, 2)]
    images, queries = random_inputs(shapes, 16, torch.float32)
    scores = [torch.randn(n, device=DEVICE) for n, _ in shapes] if method == "flow" else None
    expected = {  # (ratio, min_keep): K per image
        (1e-9, 1): [1, 1, 1],
        (0.5, 1): [1, 1, 5],
        (0.8, 1): [1, 2, 8],
        (1.0, 1): [1, 2, 9],
        (0.1, 5): [1, 2, 5],
    }
    for (ratio, min_keep), want in expected.items():
        keep = [keep_count(n, ratio, min_keep=min_keep) for n, _ in shapes]
        assert keep == want, f"ratio {ratio} min_keep {min_keep}"
        got = _select(images, queries, keep, method, scores=scores, merge=True, backend=backend)
        for b, ((n, _), sel) in enumerate(zip(shapes, got)):
            assert sel.kept.shape == (keep[b],) and sel.rows.shape == (keep[b], 16)
            _assert_ascending_and_distinct(sel.kept, n, f"{method} image {b} ratio {ratio}")
            if keep[b] == n:
                assert_equal(sel.kept, torch.arange(n), f"image {b} kept all", seed)
                assert_equal(sel.rows, images[b], f"image {b} rows", seed)


def test_keep_count_is_the_ceiling_within_bounds(seed):
    """Fresh (N, ratio) pairs: K = ceil(N * ratio) (float noise below 1e-9 forgiven), clamped to
    [min(min_keep, N), N], and never decreasing in the ratio."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n = int(torch.randint(0, 3000, (1,), generator=gen))
        ratio = float(torch.rand(1, generator=gen)) or 1.0
        min_keep = int(torch.randint(1, 40, (1,), generator=gen))
        k = keep_count(n, ratio, min_keep=min_keep)
        what = f"N={n} ratio={ratio} min_keep={min_keep}: K={k}; seed={seed}"
        assert min(min_keep, n) <= k <= n, what
        assert min(n, math.ceil(n * ratio - 1e-6)) <= k <= max(min_keep, math.ceil(n * ratio)), what
        assert keep_count(n, min(1.0, ratio * 1.5), min_keep=min_keep) >= k


def test_bad_arguments_raise():
    image, query = torch.randn(10, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="prune_method must be one of"):
        _select([image], [query], [5], "topk")
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        _select([image], [query], [0], "simignore")
    assert _select([], [], [], "simignore") == []


# ---- the backend choice ------------------------------------------------------------------------


def test_backend_by_device(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend(torch.device("cuda", 1)) == "triton"
    assert resolve_backend(torch.device("cuda"), "torch") == "torch"
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(torch.device("cpu"), "cuda")


@pytest.mark.parametrize("forced", ["torch", "triton"])
def test_env_var_forces_backend(monkeypatch, forced):
    monkeypatch.setenv(BACKEND_ENV, forced)
    assert resolve_backend(torch.device("cpu")) == forced
    assert resolve_backend(torch.device("cuda")) == forced
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize("forced", ["torch", pytest.param("triton", marks=requires_triton)])
def test_select_tokens_runs_the_forced_backend(monkeypatch, forced):
    """The env var reaches select_tokens: each backend's functions are the ones called."""
    import lvlm_prune.kernels.merge as merge
    import lvlm_prune.kernels.relevance as relevance
    import lvlm_prune.kernels.selection as selection
    import lvlm_prune.kernels.topk as topk

    calls = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))

    spy(relevance, "relevance_triton")
    spy(topk, "topk_select_batched_triton")
    spy(merge, "merge_dropped_triton")
    spy(selection, "relevance_ref")
    spy(selection, "topk_select_batched_ref")
    spy(selection, "merge_dropped_ref")
    monkeypatch.setenv(BACKEND_ENV, forced)
    images, queries = [torch.randn(20, 16)], [torch.randn(3, 16)]
    select_tokens(images, queries, [5], methods=["simignore"], merge=[True], seeds=[0])
    if forced == "triton":
        assert calls == ["relevance_triton", "topk_select_batched_triton", "merge_dropped_triton"]
    else:
        assert calls == ["relevance_ref", "topk_select_batched_ref", "merge_dropped_ref"]


def test_concatenation_of_adjacent_slices_is_a_view():
    from lvlm_prune.kernels.selection import _cat_rows

    base = torch.randn(30, 8)
    parts = list(torch.split(base, [10, 0, 15, 5]))
    joined = _cat_rows(parts)
    assert joined.data_ptr() == base.data_ptr() and torch.equal(joined, base)
    shuffled = _cat_rows([parts[2], parts[0]])
    assert torch.equal(shuffled, torch.cat([parts[2], parts[0]]))
    assert shuffled.data_ptr() != base.data_ptr() + 10 * 8 * 4


# ---- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("d", [4096, 5120], ids=lambda d: f"D{d}")
def test_gpu_select_and_merge_model_shapes(d, seed):
    shapes = [(576, 32), (576, 512), (2880, 77)]
    images, queries = random_inputs(shapes, d, torch.bfloat16)
    keep = [keep_count(n, 0.11) for n, _ in shapes]
    got = _select(images, queries, keep, "simignore", merge=True, backend="triton")
    for b, (sel, scores64) in enumerate(zip(got, relevance_f64(images, queries))):
        assert_close(sel.scores, scores64, 2e-5, 1e-4, f"image {b} scores", seed)
        if clear_margin_ks(scores64, [keep[b]], 1e-4):
            assert_equal(sel.kept, topk_oracle(scores64, keep[b]), f"image {b} kept", seed)
        want = merge_dropped_ref(images[b], sel.kept)
        ok = unambiguous_positions(images[b], sel.kept).to(want.device)
        assert_close(sel.rows[ok], want[ok], *ROW_TOLS[torch.bfloat16], f"image {b} rows", seed)
