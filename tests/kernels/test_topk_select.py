"""Top-K, merge and the dispatch: Triton against the torch references, indices compared exactly."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    DEVICE,
    ROW_TOLS,
    SCORE_TOLS,
    assert_close,
    assert_equal,
    clear_margin_ks,
    needs_cuda,
    relevance_f64,
    requires_triton,
)

from lvlm_prune.kernels import (
    BACKEND_ENV,
    keep_count,
    merge_dropped_ref,
    merge_dropped_triton,
    resolve_backend,
    select_tokens,
    topk_select_batched_ref,
    topk_select_batched_triton,
    topk_select_ref,
    topk_select_triton,
)

TOPK = [
    pytest.param(topk_select_ref, id="torch"),
    pytest.param(topk_select_triton, id="triton", marks=requires_triton),
]
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]


def _oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The rule spelled out: highest score first, the lower index on ties; kept ascending."""
    values = scores.float().cpu().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return torch.tensor(sorted(order[:k]), dtype=torch.int64)


def _ks(n):
    return sorted({1, max(1, n // 9), max(1, n - 1), n})


# ---- top-K ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", TOPK)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 100, 577], ids=lambda n: f"N{n}")
def test_topk_random_scores(impl, n, dtype, seed):
    """bf16 and fp16 scores have many exact ties by themselves."""
    scores = torch.randn(n, device=DEVICE).to(dtype)
    for k in _ks(n):
        got = impl(scores, k)
        assert got.dtype == torch.int64
        assert_equal(got, _oracle(scores, k), f"N={n} K={k}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", TOPK)
@pytest.mark.parametrize("n", [100, 577], ids=lambda n: f"N{n}")
def test_topk_constructed_ties(impl, n, seed):
    """Four distinct values only: every K cuts through a group of equal scores."""
    scores = torch.randint(0, 4, (n,), device=DEVICE).float()
    for k in range(1, n + 1, max(1, n // 11)):
        assert_equal(impl(scores, k), _oracle(scores, k), f"N={n} K={k}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", TOPK)
def test_topk_special_values_follow_torch_sort(impl, seed):
    """NaN ranks above +inf (as torch.sort), -0.0 ties with +0.0."""
    scores = torch.randn(300, device=DEVICE)
    scores[torch.randint(0, 300, (40,))] = float("nan")
    scores[torch.randint(0, 300, (20,))] = float("inf")
    scores[torch.randint(0, 300, (20,))] = float("-inf")
    scores[torch.randint(0, 300, (30,))] = 0.0
    scores[torch.randint(0, 300, (30,))] = -0.0
    for k in [1, 10, 37, 64, 150, 299, 300]:
        want = torch.sort(torch.sort(scores.cpu(), descending=True, stable=True).indices[:k]).values
        assert_equal(impl(scores, k), want, f"K={k}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize(
    "impl",
    [
        pytest.param(topk_select_batched_ref, id="torch"),
        pytest.param(topk_select_batched_triton, id="triton", marks=requires_triton),
    ],
)
def test_topk_batched(impl, seed):
    lengths = [577, 0, 100, 1, 64]
    ks = [64, 0, 0, 1, 64]  # K = 0: image skipped
    scores = torch.randn(sum(lengths), device=DEVICE).to(torch.bfloat16)
    got = impl(scores, lengths, ks)
    start = 0
    for b, (n, k) in enumerate(zip(lengths, ks)):
        assert_equal(got[b], _oracle(scores[start : start + n], k), f"image {b}", seed)
        start += n


@pytest.mark.parametrize("impl", TOPK)
def test_topk_bad_k_raises(impl):
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        impl(torch.zeros(5, device=DEVICE), 0)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        impl(torch.zeros(5, device=DEVICE), 6)


@pytest.mark.parametrize(
    "impl",
    [topk_select_batched_ref, pytest.param(topk_select_batched_triton, marks=requires_triton)],
)
def test_topk_batched_bad_arguments_raise(impl):
    with pytest.raises(ValueError, match=r"ks\[1\] must be in \[0, 2\]"):
        impl(torch.zeros(5, device=DEVICE), [3, 2], [1, 3])
    with pytest.raises(ValueError, match="sum\\(lengths\\)"):
        impl(torch.zeros(5, device=DEVICE), [3, 3], [1, 1])


# ---- the selection end to end: relevance + top-K ----------------------------------------------


def _random_images(shapes, d, dtype):
    images = [torch.randn(n, d, device=DEVICE).to(dtype) for n, _ in shapes]
    queries = [torch.randn(t, d, device=DEVICE).to(dtype) for _, t in shapes]
    return images, queries


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tols", SCORE_TOLS)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
def test_select_tokens_kept_sets(backend, d, tols, seed):
    """Kept sets equal the float64 top-K wherever the K-th and (K+1)-th scores are apart by more
    than the tolerance (closer than that, rounding may legitimately pick either)."""
    dtype, atol, _ = tols
    shapes = [(577, 7), (100, 300), (1, 1), (100, 0)]
    images, queries = _random_images(shapes, d, dtype)
    checked = 0
    for ratio in [0.05, 0.11, 0.5, 0.9]:
        keep = [keep_count(n, ratio) for n, _ in shapes]
        got = select_tokens(
            images,
            queries,
            keep,
            methods=["simignore"] * 4,
            merge=[False] * 4,
            seeds=[0] * 4,
            backend=backend,
        )
        for b, (sel, scores64) in enumerate(zip(got, relevance_f64(images, queries))):
            k = keep[b]
            assert sel.kept.shape == (k,) and sel.rows.shape == (k, d)
            assert_equal(sel.rows, images[b][sel.kept], f"rows of image {b}", seed)
            if shapes[b][1] == 0:
                assert sel.method == "uniform" and sel.scores is None
                continue
            if clear_margin_ks(scores64, [k], 4 * atol):
                assert_equal(sel.kept, _oracle(scores64, k), f"image {b} ratio {ratio}", seed)
                checked += 1
    # 4 of the 12 are the 1-row image; the others have a clear margin ~85% of the time each.
    assert checked >= 6, f"only {checked} kept sets had a clear margin; seed={seed}"


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_tokens_ties_from_duplicate_rows(backend, dtype, seed):
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
        got = select_tokens(
            images,
            [query] * 3,
            keep,
            methods=["simignore"] * 3,
            merge=[False] * 3,
            seeds=[0] * 3,
            need_scores=True,
            backend=backend,
        )
        flat = torch.cat([sel.scores for sel in got]).cpu()
        groups_flat = torch.cat(groups).cpu()
        for g in range(5):
            tied = flat[groups_flat == g].unique()
            assert tied.numel() <= 1, f"group {g} scores {tied.tolist()}; seed={seed}"
        for b, sel in enumerate(got):
            want = _oracle(pool_scores[groups[b].cpu()], keep[b])  # exact ties by construction
            assert_equal(sel.kept, want, f"image {b} ratio {ratio}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_select_tokens_same_kept_set_on_every_run(backend, seed):
    """The same embeddings give the same kept rows and bit-identical scores, call after call."""
    images, queries = _random_images([(577, 7), (100, 70)], 64, torch.bfloat16)
    kw = dict(methods=["simignore"] * 2, merge=[False] * 2, seeds=[0] * 2, backend=backend)
    first = select_tokens(images, queries, [64, 11], **kw)
    for _ in range(2):
        again = select_tokens(images, queries, [64, 11], **kw)
        for b, (x, y) in enumerate(zip(first, again)):
            assert_equal(y.kept, x.kept, f"image {b}", seed)
            assert torch.equal(y.scores, x.scores), f"image {b} scores; seed={seed}"


# ---- merge ------------------------------------------------------------------------------------


def _unambiguous_positions(image, kept, margin=1e-4):
    """Kept positions whose merged row does not depend on a near-tie in the assignment."""
    keep = torch.zeros(image.shape[0], dtype=torch.bool)
    keep[kept.cpu()] = True
    unit = torch.nn.functional.normalize
    x = image.cpu().double()
    sim = unit(x[~keep], dim=-1) @ unit(x[kept.cpu()], dim=-1).T
    ok = torch.ones(kept.shape[0], dtype=torch.bool)
    if sim.shape[1] >= 2 and sim.shape[0] > 0:
        top = sim.topk(2, dim=1)
        close = (top.values[:, 0] - top.values[:, 1]) < margin
        ok[top.indices[close].flatten()] = False
    return ok


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize(
    "n,k,d",
    [(100, 11, 64), (100, 37, 128), (577, 64, 128), (5, 5, 64), (1, 1, 64)],
    ids=lambda v: str(v),
)
def test_merge_matches_reference(n, k, d, dtype, seed):
    image = torch.randn(n, d, device=DEVICE).to(dtype)
    kept = torch.sort(torch.randperm(n, device=DEVICE)[:k]).values
    got = merge_dropped_triton(image, kept)
    want = merge_dropped_ref(image, kept)
    assert got.dtype == dtype and got.shape == (k, d)
    ok = _unambiguous_positions(image, kept)
    assert int(ok.sum()) >= k // 2, f"too many near-ties; seed={seed}"
    atol, rtol = ROW_TOLS[dtype]
    assert_close(got[ok.to(got.device)], want[ok.to(want.device)], atol, rtol, "merged rows", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize(
    "impl", [merge_dropped_ref, pytest.param(merge_dropped_triton, marks=requires_triton)]
)
def test_merge_tie_goes_to_lower_kept_position(impl, seed):
    """Kept rows 0 and 1 are identical: rows near them all merge into position 0; position 1
    stays exactly itself."""
    d = 64
    a = torch.randn(d, device=DEVICE)
    rest = torch.randn(40, d, device=DEVICE)
    near_a = a + 0.01 * torch.randn(10, d, device=DEVICE)
    image = torch.cat([a[None], a[None], rest, near_a])
    kept = torch.arange(0, 42, 2, device=DEVICE)
    kept[1] = 1  # kept = [0, 1, 4, 6, ...]: positions 0 and 1 hold the same row
    got = impl(image, kept)
    assert_equal(got[1], a, "duplicate at the higher kept position", seed)
    assert not torch.equal(got[0], a), f"rows near a were not merged into position 0; seed={seed}"


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
def test_select_tokens_merge_triton_matches_torch(seed):
    shapes = [(100, 7), (64, 0)]
    while True:  # no near-tie at the cut: then both backends must keep the same rows
        images, queries = _random_images(shapes, 64, torch.float32)
        if clear_margin_ks(relevance_f64(images[:1], queries[:1])[0], [20], 1e-4):
            break
    kw = dict(methods=["simignore", "uniform"], merge=[True, True], seeds=[0, 0])
    got = select_tokens(images, queries, [20, 16], backend="triton", **kw)
    want = select_tokens(images, queries, [20, 16], backend="torch", **kw)
    for b, (g, w) in enumerate(zip(got, want)):
        assert_equal(g.kept, w.kept, f"image {b} kept", seed)
        ok = _unambiguous_positions(images[b], g.kept).to(g.rows.device)
        assert_close(g.rows[ok], w.rows[ok], 1e-5, 1e-5, f"image {b} rows", seed)


# ---- dispatch ---------------------------------------------------------------------------------


def test_dispatch_picks_backend_by_device(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend(torch.device("cuda", 1)) == "triton"
    assert resolve_backend(torch.device("cuda"), "torch") == "torch"
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"


@pytest.mark.parametrize("forced", ["torch", "triton"])
def test_dispatch_env_var_forces_backend(monkeypatch, forced):
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
    import lvlm_prune.kernels.relevance as relevance
    import lvlm_prune.kernels.selection as selection
    import lvlm_prune.kernels.topk_select as topk

    calls = []

    def spy(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))

    spy(relevance, "relevance_triton")
    spy(topk, "topk_select_batched_triton")
    spy(topk, "merge_dropped_triton")
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
@pytest.mark.parametrize("n", [576, 2880, 20000], ids=lambda n: f"N{n}")
def test_gpu_topk_large(n, seed):
    scores = torch.randn(n, device="cuda").to(torch.bfloat16)  # many ties
    for k in _ks(n):
        assert_equal(topk_select_triton(scores, k), _oracle(scores, k), f"N={n} K={k}", seed)


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("d", [4096, 5120], ids=lambda d: f"D{d}")
def test_gpu_select_and_merge_model_shapes(d, seed):
    shapes = [(576, 32), (576, 512), (2880, 77)]
    images, queries = _random_images(shapes, d, torch.bfloat16)
    keep = [keep_count(n, 0.11) for n, _ in shapes]
    kw = dict(methods=["simignore"] * 3, merge=[True] * 3, seeds=[0] * 3)
    got = select_tokens(images, queries, keep, backend="triton", **kw)
    for b, (sel, scores64) in enumerate(zip(got, relevance_f64(images, queries))):
        assert_close(sel.scores, scores64, 2e-5, 1e-4, f"image {b} scores", seed)
        if clear_margin_ks(scores64, [keep[b]], 1e-4):
            assert_equal(sel.kept, _oracle(scores64, keep[b]), f"image {b} kept", seed)
        want = merge_dropped_ref(images[b], sel.kept)
        ok = _unambiguous_positions(images[b], sel.kept).to(want.device)
        assert_close(sel.rows[ok], want[ok], *ROW_TOLS[torch.bfloat16], f"image {b} rows", seed)
