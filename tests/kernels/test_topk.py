"""topk_select_triton against topk_select_ref and the rule spelled out, indices compared exactly."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_equal, needs_cuda, requires_triton, topk_oracle

from lvlm_prune.kernels.reference import topk_select_batched_ref, topk_select_ref
from lvlm_prune.kernels.topk import topk_select_batched_triton, topk_select_triton

TOPK = [
    pytest.param(topk_select_ref, id="torch"),
    pytest.param(topk_select_triton, id="triton", marks=requires_triton),
]
BATCHED = [
    pytest.param(topk_select_batched_ref, id="torch"),
    pytest.param(topk_select_batched_triton, id="triton", marks=requires_triton),
]


def _ks(n):
    return sorted({1, max(1, n // 9), max(1, n - 1), n})


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", TOPK)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 100, 577], ids=lambda n: f"N{n}")
def test_random_scores(impl, n, dtype, seed):
    """bf16 and fp16 scores have many exact ties by themselves."""
    scores = torch.randn(n, device=DEVICE).to(dtype)
    for k in _ks(n):
        got = impl(scores, k)
        assert got.dtype == torch.int64
        assert_equal(got, topk_oracle(scores, k), f"N={n} K={k}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", TOPK)
@pytest.mark.parametrize("n", [100, 577], ids=lambda n: f"N{n}")
def test_constructed_ties(impl, n, seed):
    """Four distinct values only: every K cuts through a group of equal scores."""
    scores = torch.randint(0, 4, (n,), device=DEVICE).float()
    for k in range(1, n + 1, max(1, n // 11)):
        assert_equal(impl(scores, k), topk_oracle(scores, k), f"N={n} K={k}", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", TOPK)
def test_special_values_follow_torch_sort(impl, seed):
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
@pytest.mark.parametrize("impl", BATCHED)
def test_batched(impl, seed):
    lengths = [577, 0, 100, 1, 64]
    ks = [64, 0, 0, 1, 64]  # K = 0: image skipped
    scores = torch.randn(sum(lengths), device=DEVICE).to(torch.bfloat16)
    got = impl(scores, lengths, ks)
    assert len(got) == len(lengths)
    start = 0
    for b, (n, k) in enumerate(zip(lengths, ks)):
        assert_equal(got[b], topk_oracle(scores[start : start + n], k), f"image {b}", seed)
        start += n


@pytest.mark.parametrize("impl", TOPK)
def test_bad_k_raises(impl):
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        impl(torch.zeros(5, device=DEVICE), 0)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        impl(torch.zeros(5, device=DEVICE), 6)


@pytest.mark.parametrize("impl", BATCHED)
def test_batched_bad_arguments_raise(impl):
    with pytest.raises(ValueError, match=r"ks\[1\] must be in \[0, 2\]"):
        impl(torch.zeros(5, device=DEVICE), [3, 2], [1, 3])
    with pytest.raises(ValueError, match="sum\\(lengths\\)"):
        impl(torch.zeros(5, device=DEVICE), [3, 3], [1, 1])
    with pytest.raises(ValueError, match="one entry per image"):
        impl(torch.zeros(5, device=DEVICE), [5], [1, 1])
    with pytest.raises(ValueError, match="1-D"):
        impl(torch.zeros(5, 1, device=DEVICE), [5], [1])


# ---- GPU only ---------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@requires_triton
@pytest.mark.parametrize("n", [576, 2880, 20000], ids=lambda n: f"N{n}")
def test_gpu_large(n, seed):
    scores = torch.randn(n, device="cuda").to(torch.bfloat16)  # many ties
    for k in _ks(n):
        assert_equal(topk_select_triton(scores, k), topk_oracle(scores, k), f"N={n} K={k}", seed)
