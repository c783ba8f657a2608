"""relevance_triton (and relevance_ref) against a float64 computation, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    DEVICE,
    DTYPES,
    SCORE_TOLS,
    assert_close,
    needs_cuda,
    offsets,
    random_inputs,
    relevance_f64,
    requires_triton,
)

from lvlm_prune.kernels.reference import relevance_ref
from lvlm_prune.kernels.relevance import relevance_triton

IMPLS = [
    pytest.param(relevance_ref, id="torch"),
    pytest.param(relevance_triton, id="triton", marks=requires_triton),
]


def _run(impl, images, queries, reduce):
    return impl(
        torch.cat(images),
        offsets([x.shape[0] for x in images]),
        torch.cat(queries),
        offsets([q.shape[0] for q in queries]),
        reduce=reduce,
    )


def _check(impl, shapes, d, tols, reduce, seed):
    dtype, atol, rtol = tols
    images, queries = random_inputs(shapes, d, dtype)
    got = _run(impl, images, queries, reduce)
    assert got.dtype == torch.float32 and got.shape == (sum(n for n, _ in shapes),)
    want = torch.cat(relevance_f64(images, queries, reduce))
    assert_close(got, want, atol, rtol, f"{impl.__name__} {shapes} D={d} {reduce}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tols", SCORE_TOLS)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("t", [0, 1, 7, 300], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("n", [1, 100, 577], ids=lambda n: f"N{n}")
def test_single_image(impl, n, t, d, tols, seed):
    _check(impl, [(n, t)], d, tols, "max", seed)


BATCHES = {
    # Different N and T per image, an empty query and a 1-row image among them.
    "B3-N577T7-N1T0-N100T300": [(577, 7), (1, 0), (100, 300)],
    "B3-N100T1-N577T300-N1T7": [(100, 1), (577, 300), (1, 7)],
}


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("tols", SCORE_TOLS)
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("shapes", list(BATCHES.values()), ids=list(BATCHES))
def test_batch(impl, shapes, d, tols, reduce, seed):
    _check(impl, shapes, d, tols, reduce, seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1, 7, 300], ids=lambda t: f"T{t}")
def test_mean_single_image(impl, t, seed):
    _check(impl, [(577, t)], 128, (torch.float32, 2e-5, 1e-4), "mean", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_and_float64_inputs_score_in_fp32(impl, seed):
    """bf16 image with an fp16 or fp32 query, and float64: promoted or upcast exactly as the
    reference's fp32."""
    for image_dtype, query_dtype in [
        (torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ]:
        image = torch.randn(70, 96, device=DEVICE).to(image_dtype)
        query = torch.randn(9, 96, device=DEVICE).to(query_dtype)
        got = impl(image, offsets([70]), query, offsets([9]))
        want = relevance_f64([image], [query])[0]
        assert_close(got, want, 2e-5, 1e-4, f"{image_dtype} x {query_dtype}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_rows_and_strided_input(impl, seed):
    """A zero image row scores 0 (as F.normalize's eps), and a non-contiguous image is read by
    its strides."""
    wide = torch.randn(150, 2 * 64, device=DEVICE)
    image = wide[:, ::2]  # stride (128, 2)
    image[3] = 0
    query = torch.randn(5, 64, device=DEVICE)
    query[1] = 0
    got = impl(image, offsets([150]), query, offsets([5]))
    want = relevance_f64([image], [query])[0]
    assert_close(got, want, 2e-5, 1e-4, "strided", seed)
    assert float(got[3]) == 0.0


# ---- a row's score depends on the row alone ------------------------------------------------
#
# Duplicate rows (flat image backgrounds) must score bit-identically, or the top-K tie rule (the
# lower index wins) would be decided by rounding; and an image must score the same alone, inside
# any batch, at any offset, or a re-run of the encoder in another batch (a partial prefix-cache
# hit) or another tensor-parallel rank could keep other rows.

# Rows on both sides of every BLOCK_N (64) boundary, a ragged last row, a one-row image. D = 96
# leaves a ragged BLOCK_D tile; T = 70 crosses BLOCK_T (64).
_SHAPES = [(130, 70), (1, 70), (65, 70)]
_SPOTS = {0: [0, 5, 62, 63, 64, 65, 127, 128, 129], 1: [0], 2: [0, 31, 63, 64]}
_D = 96
TILINGS = [
    pytest.param((relevance_ref, None), id="torch"),
    pytest.param((relevance_triton, "interpret"), id="triton", marks=requires_triton),
    pytest.param((relevance_triton, "gpu"), id="triton-gpu-tiles", marks=requires_triton),
]


@pytest.fixture
def scorer(request, monkeypatch):
    """The implementation under test; ``gpu`` runs the GPU launch's tiles and grid in the
    interpreter (its dots stay the interpreter's: tl.dot on bf16 needs a GPU), the real GPU
    launch on a GPU."""
    import lvlm_prune.kernels.relevance as relevance

    impl, tiling = request.param

    def score(images, queries, reduce="max"):
        if impl is relevance_ref:  # promised where the torch path serves: on CPU tensors
            images, queries = [x.cpu() for x in images], [q.cpu() for q in queries]
        if tiling == "gpu":
            config = dict(relevance.GPU_CONFIGS[images[0].dtype])
            monkeypatch.setattr(relevance, "_INTERPRET_CONFIG", config)
        return _run(impl, images, queries, reduce)

    return score


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("scorer", TILINGS, indirect=True)
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicate_rows_score_identically_anywhere(scorer, dtype, reduce, seed):
    """One row copied across tile boundaries, ragged edges and three images with the same
    question scores, bit for bit, what it scores alone."""
    row = torch.randn(1, _D, device=DEVICE).to(dtype)
    query = torch.randn(_SHAPES[0][1], _D, device=DEVICE).to(dtype)
    images = [torch.randn(n, _D, device=DEVICE).to(dtype) for n, _ in _SHAPES]
    for b, spots in _SPOTS.items():
        images[b][spots] = row
    scores = torch.split(scorer(images, [query] * 3, reduce), [n for n, _ in _SHAPES])
    alone = scorer([row], [query], reduce)
    for b, spots in _SPOTS.items():
        got = scores[b][spots]
        assert torch.equal(got, alone.expand_as(got)), (
            f"image {b} rows {spots}: {got.tolist()} vs alone {alone.item()}; seed={seed}"
        )


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("scorer", TILINGS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_image_scores_do_not_depend_on_the_batch(scorer, dtype, seed):
    """An image's scores alone == inside a batch == after another image == shifted by rows
    prepended to its buffer, bit for bit."""
    images, queries = random_inputs([(100, 7), (1, 0), (130, 70)], _D, dtype)
    target, question = images[2], queries[2]
    alone = scorer([target], [question])
    batched = scorer(images, queries)[101:]
    first = scorer([target, images[0]], [question, queries[0]])[:130]
    shifted_buffer = torch.cat([torch.randn(3, _D, device=DEVICE).to(dtype), target])[3:]
    shifted = scorer([images[0][:5], shifted_buffer], [queries[0], question])[5:]
    for what, got in [("in a batch", batched), ("first", first), ("shifted", shifted)]:
        assert torch.equal(got, alone), f"{what}: {_first_diff(got, alone)}; seed={seed}"


def _first_diff(got, want):
    i = int((got != want).nonzero()[0, 0])
    return f"row {i}: {got[i].item()!r} != {want[i].item()!r}"


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise_value_error(impl):
    image, query, off = torch.zeros(4, 8), torch.zeros(2, 8), torch.tensor([0, 4])
    with pytest.raises(ValueError, match="reduce"):
        impl(image, off, query, torch.tensor([0, 2]), reduce="sum")
    with pytest.raises(ValueError, match="hidden sizes"):
        impl(image, off, torch.zeros(2, 6), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="B \\+ 1"):
        impl(image, off, query, torch.tensor([0, 1, 2]))


# ---- GPU only: the model's real sizes -------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize(
    "shapes,d",
    [
        ([(576, 32)], 4096),
        ([(576, 512), (576, 0), (2880, 77)], 4096),
        ([(2880, 128), (576, 1)], 5120),
    ],
    ids=["LLaVA1.5-7B", "LLaVA1.5-7B-B3", "LLaVA-NeXT-13B-B2"],
)
def test_gpu_model_shapes(shapes, d, dtype, reduce, seed):
    _check(relevance_triton, shapes, d, (dtype, 2e-5, 1e-4), reduce, seed)


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
def test_gpu_duplicates_and_batches_at_model_shapes(dtype, seed):
    """The tensor-core path: a row copied to 64 places of a 576 x 4096 image scores what it
    scores alone, and the image scores the same inside a batch of three."""
    images, queries = random_inputs([(2880, 77), (576, 512), (576, 512)], 4096, dtype)
    queries[2] = queries[1]
    row = images[1][7:8].clone()
    spots = torch.randperm(576, device=DEVICE)[:64]
    images[1][spots] = row
    images[2][spots] = row
    batched = _run(relevance_triton, images, queries, "max")
    alone = _run(relevance_triton, [row], queries[1:2], "max")
    image_alone = _run(relevance_triton, images[1:2], queries[1:2], "max")
    assert torch.equal(batched[2880:3456], image_alone), f"batch changed scores; seed={seed}"
    for got in (batched[2880:3456][spots], batched[3456:][spots]):
        assert torch.equal(got, alone.expand_as(got)), f"duplicates differ; seed={seed}"
