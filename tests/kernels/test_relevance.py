"""relevance_triton (and relevance_ref) against a float64 computation, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    DEVICE,
    SCORE_TOLS,
    assert_close,
    needs_cuda,
    offsets,
    relevance_f64,
    requires_triton,
)

from lvlm_prune.kernels import relevance_ref, relevance_triton

IMPLS = [
    pytest.param(relevance_ref, id="torch"),
    pytest.param(relevance_triton, id="triton", marks=requires_triton),
]


def _inputs(shapes, d, dtype, device=DEVICE):
    images = [torch.randn(n, d, device=device).to(dtype) for n, _ in shapes]
    queries = [torch.randn(t, d, device=device).to(dtype) for _, t in shapes]
    return images, queries


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
    images, queries = _inputs(shapes, d, dtype)
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


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
def test_triton_identical_rows_score_identically(seed):
    """Duplicate rows must get bit-identical scores, or top-K ties would break by rounding."""
    pool = torch.randn(5, 128, device=DEVICE).to(torch.bfloat16)
    image = pool[torch.randint(0, 5, (300,), device=DEVICE)]
    query = torch.randn(9, 128, device=DEVICE).to(torch.bfloat16)
    scores = relevance_triton(image, offsets([300]), query, offsets([9]))
    for r in range(5):
        rows = (image == pool[r]).all(dim=1)
        assert scores[rows].unique().numel() <= 1, f"row {r}: {scores[rows].unique()}; seed={seed}"


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


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_gpu_launch_config_and_batch_independence(monkeypatch, seed, reduce):
    """The GPU launch path (its fixed tiling and grid) in the interpreter, and the property the
    fixed tiling is for: an image's scores are bit-identical alone or inside any batch, so a
    re-run of the encoder in another batch, or another tensor-parallel rank, keeps the same rows."""
    import lvlm_prune.kernels.relevance as relevance

    monkeypatch.setattr(relevance, "interpreter_active", lambda: False)
    shapes = [(100, 7), (1, 0), (130, 40)]
    images, queries = _inputs(shapes, 64, torch.bfloat16)
    batched = _run(relevance_triton, images, queries, reduce)
    assert_close(
        batched, torch.cat(relevance_f64(images, queries, reduce)), 2e-5, 1e-4, "GPU config", seed
    )
    alone = _run(relevance_triton, images[2:], queries[2:], reduce)
    assert torch.equal(alone, batched[101:]), f"batch changed the scores (seed {seed})"
