"""The shared cosine: ``cosine_matrix`` (torch) and ``cosine_tile`` (the Triton helper the
relevance and merge kernels call) against float64, and independent of where a row sits."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import CUDA, DEVICE, DTYPES, assert_close, requires_triton

from lvlm_prune.kernels._triton_utils import HAS_TRITON
from lvlm_prune.kernels.cosine import cosine_matrix


def _cosines_f64(a, b):
    unit = torch.nn.functional.normalize
    return unit(a.cpu().double(), dim=-1, eps=1e-12) @ unit(b.cpu().double(), dim=-1, eps=1e-12).T


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_matrix_matches_float64(dtype, seed):
    a = torch.randn(70, 130).to(dtype)
    b = torch.randn(9, 130).to(dtype)
    a[3] = 0
    got = cosine_matrix(a, b)
    assert got.dtype == torch.float32 and got.shape == (70, 9)
    assert_close(got, _cosines_f64(a, b), 2e-6, 1e-5, "cosine_matrix", seed)
    assert cosine_matrix(a[:0], b).shape == (0, 9)


def test_cosine_matrix_is_row_invariant(monkeypatch, seed):
    """Each entry depends on its two rows only: not on the chunking, the other rows, the thread
    count or the memory offset of its row."""
    import lvlm_prune.kernels.cosine as cosine

    a = torch.randn(70, 4096)
    b = torch.randn(33, 4096)
    full = cosine_matrix(a, b)
    assert torch.equal(cosine_matrix(a[17:18], b)[0], full[17]), f"one row; seed={seed}"
    assert torch.equal(cosine_matrix(a, b[5:6])[:, 0], full[:, 5]), f"one column; seed={seed}"
    assert torch.equal(cosine_matrix(torch.cat([a[:1], a])[1:], b), full), f"offset; seed={seed}"
    monkeypatch.setitem(cosine._CHUNK_BYTES, "cpu", 4 * 4096 * 5)  # 1 row x 5 columns a chunk
    assert torch.equal(cosine_matrix(a, b), full), f"chunking; seed={seed}"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cosine_matrix(a, b), full), f"one thread; seed={seed}"
    finally:
        torch.set_num_threads(threads)


if HAS_TRITON:
    from lvlm_prune.kernels._triton_utils import tl, triton
    from lvlm_prune.kernels.cosine import cosine_tile

    @triton.jit
    def _cosine_tile_probe(
        a_ptr,
        b_ptr,
        out_ptr,
        M,
        P,
        D,
        stride_a,
        stride_b,
        USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One tile of ``cosine_tile``, written out: [M, P] with M <= BLOCK_M, P <= BLOCK_P."""
        rows = tl.arange(0, BLOCK_M).to(tl.int64)
        cols = tl.arange(0, BLOCK_P).to(tl.int64)
        a_mask = rows < M
        b_mask = cols < P
        cos = cosine_tile(
            a_ptr, rows, a_mask, stride_a, b_ptr, cols, b_mask, stride_b, D,
            USE_DOT, BLOCK_M, BLOCK_P, BLOCK_D,
        )  # fmt: skip
        mask = a_mask[:, None] & b_mask[None, :]
        tl.store(out_ptr + rows[:, None] * P + cols[None, :], cos, mask=mask)


@pytest.mark.usefixtures("poison_outputs")
@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_tile_matches_float64_and_ties_duplicates(dtype, seed):
    """Masked rows beyond M and P, a ragged last BLOCK_D chunk (D = 130), strided rows and a
    zero row (cosine 0); a row copied to another place of the tile gets the same bits."""
    m, p, d = 70, 9, 130
    a = torch.randn(m, 2 * d, device=DEVICE).to(dtype)[:, :d]  # row stride 2D
    b = torch.randn(p, d, device=DEVICE).to(dtype)
    a[3] = 0
    a[[20, 61, 69]] = a[5]
    out = torch.empty(m, p, dtype=torch.float32, device=DEVICE)
    _cosine_tile_probe[(1,)](
        a, b, out, m, p, d, a.stride(0), b.stride(0),
        USE_DOT=CUDA, BLOCK_M=128, BLOCK_P=16, BLOCK_D=32,
    )  # fmt: skip
    assert_close(out, _cosines_f64(a, b), 2e-6, 1e-5, "cosine_tile", seed)
    assert bool((out[3] == 0).all()), f"zero row: {out[3].tolist()}; seed={seed}"
    for r in (20, 61, 69):
        assert torch.equal(out[r], out[5]), f"row {r} != row 5; seed={seed}"
