"""merge_dropped_triton against merge_dropped_ref and the rule spelled out on constructed rows."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    DEVICE,
    DTYPES,
    ROW_TOLS,
    assert_close,
    assert_equal,
    requires_triton,
    unambiguous_positions,
)

from lvlm_prune.kernels.merge import merge_dropped_triton
from lvlm_prune.kernels.reference import merge_dropped_ref

IMPLS = [
    pytest.param(merge_dropped_ref, id="torch"),
    pytest.param(merge_dropped_triton, id="triton", marks=requires_triton),
]


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize(
    "n,k,d",
    [(100, 11, 64), (100, 37, 128), (577, 64, 128), (5, 5, 64), (1, 1, 64)],
    ids=lambda v: str(v),
)
def test_matches_reference(n, k, d, dtype, seed):
    image = torch.randn(n, d, device=DEVICE).to(dtype)
    kept = torch.sort(torch.randperm(n, device=DEVICE)[:k]).values
    got = merge_dropped_triton(image, kept)
    want = merge_dropped_ref(image, kept)
    assert got.dtype == dtype and got.shape == (k, d)
    ok = unambiguous_positions(image, kept)
    assert int(ok.sum()) >= k // 2, f"too many near-ties; seed={seed}"
    atol, rtol = ROW_TOLS[dtype]
    assert_close(got[ok.to(got.device)], want[ok.to(want.device)], atol, rtol, "merged rows", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
def test_rows_merge_into_their_nearest_kept_row(impl, seed):
    """Three kept rows far apart, each with its own cluster of dropped rows around it (spread
    over tiles, in any order): each kept row becomes the mean of itself and its cluster."""
    d, sizes = 48, [0, 7, 70]
    centres = torch.nn.functional.one_hot(torch.tensor([0, 16, 32]), d).float() * 4
    clusters = [c + 0.05 * torch.randn(s, d) for c, s in zip(centres, sizes)]
    image = torch.cat([centres, *clusters])
    order = torch.randperm(image.shape[0])
    image = image[order].to(DEVICE)
    kept = torch.sort(torch.argsort(order)[:3]).values.to(DEVICE)  # where the centres went
    got = impl(image, kept)
    for p, row in enumerate(kept.tolist()):
        c = next(i for i in range(3) if torch.equal(image[row].cpu(), centres[i]))
        want = torch.cat([centres[c : c + 1], clusters[c]]).mean(dim=0)
        assert_close(got[p], want, 1e-5, 1e-5, f"kept position {p} (cluster of {sizes[c]})", seed)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("impl", IMPLS)
def test_tie_goes_to_lower_kept_position(impl, seed):
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
@pytest.mark.parametrize("impl", IMPLS)
def test_every_row_kept_returns_the_rows(impl, seed):
    image = torch.randn(9, 16, device=DEVICE).to(torch.bfloat16)
    kept = torch.arange(9, device=DEVICE)
    assert_equal(impl(image, kept), image, "K = N", seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise(impl):
    image = torch.zeros(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        impl(image[0], torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="int32/int64"):
        impl(image, torch.tensor([0.0], device=DEVICE))
    with pytest.raises(ValueError, match="1 to 5 indices"):
        impl(image, torch.arange(6, device=DEVICE))
    with pytest.raises(ValueError, match="1 to 5 indices"):
        impl(image, torch.empty(0, dtype=torch.int64, device=DEVICE))
