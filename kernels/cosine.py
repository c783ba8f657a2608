"""Cosines that depend on their two rows alone: ``cosine_matrix`` (torch) and ``cosine_tile``
(the Triton helper every kernel that compares rows calls: relevance, merge).

A cosine must come out the same for a row wherever it sits (its tile, its image, the batch, the
thread count): identical rows then score bit-identically and the tie rules (lower index, lower
kept position) decide between them, and an image scored again in another batch keeps the same
rows. Both sides compute ``x.y / max(|x|, eps) / max(|y|, eps)`` with fp32 sums over D taken in
an order that does not depend on the row's position.
"""

from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, tl, triton

EPS = 1e-12
"""As ``torch.nn.functional.normalize``: a zero row has cosine 0 with everything."""
# fp32 products cosine_matrix holds at once: on CPU within the last-level cache, so the multiply
# and the sum run from cache, and few enough chunks that Python's loop does not dominate; on a GPU
# (the torch path forced there) large enough that kernel launches do not.
_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, D] and [P, D] -> [M, P] float32 cosines, each from its two rows alone.

    Not ``a @ b.T``: a BLAS matmul picks kernels and blocking by shape, thread count and memory
    alignment and rounds a row by its place in a micro-tile, so equal rows can come out an ulp
    apart and an image can rank differently inside another batch. Here each dot product is an
    elementwise multiply and a sum over D, which torch reduces the same way for every output
    element (one vectorised pass per contiguous row, never split across threads unless a whole
    reduction is a single output of 32768+ elements). Products are chunked (``_CHUNK_BYTES``).
    """
    a, b = a.float(), b.float()
    m, d = a.shape
    p = b.shape[0]
    out = torch.zeros(m, p, dtype=torch.float32, device=a.device)
    if m == 0 or p == 0 or d == 0:
        return out
    a, b = a.contiguous(), b.contiguous()
    budget = _CHUNK_BYTES.get(a.device.type, _CHUNK_BYTES["cpu"])
    pairs = max(1, budget // (4 * d))  # (row, column) products per chunk
    cols = min(p, pairs)
    rows = max(1, min(m, pairs // cols))
    products = torch.empty(rows, cols, d, dtype=torch.float32, device=a.device)
    for i in range(0, m, rows):
        r = min(rows, m - i)
        for j in range(0, p, cols):
            c = min(cols, p - j)
            torch.mul(a[i : i + r, None, :], b[None, j : j + c, :], out=products[:r, :c])
            torch.sum(products[:r, :c], dim=-1, out=out[i : i + r, j : j + c])
    out /= _norms(a)[:, None]
    out /= _norms(b)[None, :]
    return out


def _norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=-1).sqrt().clamp_min(EPS)


if HAS_TRITON:

    @triton.jit
    def dot_rows(x, y, acc, USE_DOT: tl.constexpr):
        """``acc + x @ y.T`` for row tiles x [M, BLOCK_D] and y [P, BLOCK_D], fp32 accumulate.

        ``USE_DOT`` (GPU): ``tl.dot`` on the operands' own dtype, the tensor-core path for
        bf16/fp16 (IEEE for fp32: tf32 would round the inputs). One fixed tiling without split-K
        accumulates every output element over D in the same order, whatever its position.
        Otherwise (the interpreter): a broadcast multiply and a sum over D in fp32. The
        interpreter's ``tl.dot`` is numpy's BLAS matmul, which rounds a row by where it sits in
        its micro-tile, and its bf16 arithmetic is wrong; numpy's sum treats every output alike.
        """
        if USE_DOT:
            if x.dtype == tl.float32:
                acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(y), acc)
        else:
            xf = x.to(tl.float32)
            yf = y.to(tl.float32)
            acc += tl.sum(xf[:, None, :] * yf[None, :, :], axis=2)
        return acc

    @triton.jit
    def cosine_tile(
        a_ptr,
        a_rows,
        a_mask,
        stride_a,
        b_ptr,
        b_rows,
        b_mask,
        stride_b,
        D,
        USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """[BLOCK_M, BLOCK_P] fp32 cosines between rows ``a_rows`` of ``a`` and ``b_rows`` of
        ``b`` (int64 row indices; masked rows read as zeros), as ``cosine_matrix``.

        One pass over D in BLOCK_D chunks gives the dot products (``dot_rows``) and both rows'
        squared norms, so no normalised copy of anything is written; rows are read with unit
        stride along D. The order of every fp32 sum is set by BLOCK_D alone.
        """
        acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
        a_sq = tl.zeros([BLOCK_M], tl.float32)
        b_sq = tl.zeros([BLOCK_P], tl.float32)
        for d_start in range(0, D, BLOCK_D):
            d = d_start + tl.arange(0, BLOCK_D)
            d_mask = d < D
            x = tl.load(
                a_ptr + a_rows[:, None] * stride_a + d[None, :],
                mask=a_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            y = tl.load(
                b_ptr + b_rows[:, None] * stride_b + d[None, :],
                mask=b_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            acc = dot_rows(x, y, acc, USE_DOT)
            xf = x.to(tl.float32)
            yf = y.to(tl.float32)
            a_sq += tl.sum(xf * xf, axis=1)
            b_sq += tl.sum(yf * yf, axis=1)
        a_norm = tl.maximum(tl.sqrt(a_sq), 1e-12)  # EPS
        b_norm = tl.maximum(tl.sqrt(b_sq), 1e-12)
        return acc / a_norm[:, None] / b_norm[None, :]
