"""Merge: fold every dropped image row into the kept row it is most similar to.

Each kept row becomes the plain mean of itself and the dropped rows assigned to it, so no image
content is discarded outright (From Redundancy to Relevance: aggregate redundant tokens).
Similarity is the cosine between image rows (``cosine.py``: the same row-invariant cosines as the
relevance scores); ties go to the lower kept position.

``merge_dropped_triton`` is two launches per image: assign every row to its kept position, then
one program per (kept row, D chunk) sums its rows in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch

from ._triton_utils import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    HAS_TRITON,
    Launch,
    interpreter_active,
    require_triton,
    tl,
    triton,
    unit_stride,
)
from .cosine import cosine_matrix


def merge_dropped_ref(image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Torch reference: average every dropped row into its most similar kept row.

    Args:
        image: [N, D] image rows, any float dtype.
        kept: [K] int32/int64 indices of the kept rows, 1 <= K <= N, distinct.

    Returns:
        [K, D] rows in ``image.dtype``, in the order of ``kept``.
    """
    _check(image, kept)
    n = image.shape[0]
    keep_mask = torch.zeros(n, dtype=torch.bool, device=image.device)
    keep_mask[kept] = True
    rows = image[kept].float()
    if bool(keep_mask.all()):
        return image[kept]
    dropped = image[~keep_mask].float()
    # Row-invariant cosines: equal kept rows tie exactly, so the lower position wins.
    target = cosine_matrix(dropped, rows).argmax(dim=1)  # [N-K]: the first maximum
    sums = rows.index_add(0, target, dropped)
    counts = torch.ones(rows.shape[0], device=image.device).index_add(
        0, target, torch.ones_like(target, dtype=torch.float32)
    )
    return (sums / counts[:, None]).to(image.dtype)


def _check(image, kept) -> None:
    if image.dim() != 2:
        raise ValueError(f"image must be 2-D [N, D], got shape {tuple(image.shape)}")
    if kept.dim() != 1 or kept.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"kept must be 1-D int32/int64, got {kept.dtype} shape {tuple(kept.shape)}"
        )
    if not 0 < kept.shape[0] <= image.shape[0]:
        raise ValueError(f"kept must hold 1 to {image.shape[0]} indices, got {kept.shape[0]}")


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

# One fixed tiling per kernel and dtype (BLOCK_D and BLOCK_K set the order of the fp32 sums;
# fp32 dots run on FMA units and need more warps for their registers). Each compiles without
# register spills for sm_80, sm_90 and sm_100 (tests/kernels/test_compile.py). The interpreter
# sizes are below the test sizes (N=577, D=128) so chunk carries run.
_ASSIGN_16BIT = {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3}
_ASSIGN_CONFIGS = {
    "gpu": {
        torch.bfloat16: _ASSIGN_16BIT,
        torch.float16: _ASSIGN_16BIT,
        torch.float32: {
            "BLOCK_N": 64,
            "BLOCK_K": 64,
            "BLOCK_D": 32,
            "num_warps": 8,
            "num_stages": 3,
        },
    },
    "interpret": {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1},
}
_REDUCE_CONFIG = {
    "gpu": {"BLOCK_R": 32, "BLOCK_DR": 256, "num_warps": 4, "num_stages": 1},
    "interpret": {"BLOCK_R": 256, "BLOCK_DR": 64, "num_warps": 4, "num_stages": 1},
}

if HAS_TRITON:
    from .cosine import cosine_tile

    @triton.jit(do_not_specialize=["N", "K"])
    def _merge_assign_kernel(
        image_ptr,
        kept_ptr,
        target_ptr,
        N,
        K,
        D,
        stride_n,
        USE_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """target[i] = kept position most similar to row i (first maximum), or -1 for kept rows.

        Cosines from ``cosine_tile``, as the relevance kernel's: identical kept rows give
        identical similarities wherever they sit, so a tie goes to the lower kept position."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_pos = tl.zeros([BLOCK_N], tl.int64)
        is_kept = tl.zeros([BLOCK_N], tl.int32)
        for k_start in range(0, K, BLOCK_K):
            pos = k_start + tl.arange(0, BLOCK_K)
            pos_mask = pos < K
            kept_rows = tl.load(kept_ptr + pos, mask=pos_mask, other=-1).to(tl.int64)
            cos = cosine_tile(
                image_ptr,
                rows,
                row_mask,
                stride_n,
                image_ptr,
                kept_rows,
                pos_mask,
                stride_n,
                D,
                USE_DOT,
                BLOCK_N,
                BLOCK_K,
                BLOCK_D,
            )
            cos = tl.where(pos_mask[None, :], cos, float("-inf"))
            tile_best, tile_arg = tl.max(
                cos, axis=1, return_indices=True, return_indices_tie_break_left=True
            )
            better = tile_best > best  # strict: an earlier tile (lower position) keeps a tie
            best = tl.where(better, tile_best, best)
            best_pos = tl.where(better, k_start + tile_arg, best_pos)
            same = (rows[:, None] == kept_rows[None, :]).to(tl.int32)
            is_kept = tl.maximum(is_kept, tl.max(same, axis=1))
        target = tl.where(is_kept > 0, -1, best_pos)
        tl.store(target_ptr + rows, target.to(tl.int32), mask=row_mask)

    @triton.jit(do_not_specialize=["N"])
    def _merge_reduce_kernel(
        image_ptr,
        kept_ptr,
        target_ptr,
        out_ptr,
        N,
        D,
        stride_n,
        stride_out_k,
        BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """out[p] = mean of kept row p and the rows assigned to it, summed in a fixed order."""
        p = tl.program_id(0).to(tl.int64)  # grid dim 0 = K: p never overruns
        d = tl.program_id(1).to(tl.int64) * BLOCK_DR + tl.arange(0, BLOCK_DR)
        d_mask = d < D
        row = tl.load(kept_ptr + p).to(tl.int64)
        acc = tl.load(image_ptr + row * stride_n + d, mask=d_mask, other=0.0).to(tl.float32)
        count = tl.sum(tl.full([1], 1.0, tl.float32), axis=0)
        for start in range(0, N, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            match = tl.load(target_ptr + r, mask=r < N, other=-1).to(tl.int64) == p
            x = tl.load(
                image_ptr + r[:, None] * stride_n + d[None, :],
                mask=match[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x, axis=0)
            count += tl.sum(match.to(tl.float32), axis=0)
        out = acc / count
        tl.store(out_ptr + p * stride_out_k + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def merge_dropped_triton(image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Triton version of ``merge_dropped_ref`` (same arguments, same result within rounding):
    the assign launch, then the reduce launch."""
    _check(image, kept)
    require_triton(image.device)
    n, d = image.shape
    k = kept.shape[0]
    if k == n:
        return image[kept]
    if image.dtype not in FLOAT_DTYPES:  # float64: in fp32, as the reference
        return merge_dropped_triton(image.float(), kept).to(image.dtype)
    image = unit_stride(image)
    kept = kept.to(image.device).contiguous()
    target = torch.empty(n, dtype=torch.int32, device=image.device)
    out = torch.empty(k, d, dtype=image.dtype, device=image.device)
    assign, reduce = _merge_launches(image, kept, target, out, interpret=interpreter_active())
    assign()
    reduce()
    return out


def _merge_launches(image, kept, target, out, *, interpret):
    """The two merge kernels' arguments and grids: the launcher's and the compile check's."""
    n, d = image.shape
    k = kept.shape[0]
    assign = _ASSIGN_CONFIGS["interpret"] if interpret else _ASSIGN_CONFIGS["gpu"][image.dtype]
    reduce = _REDUCE_CONFIG["interpret" if interpret else "gpu"]
    name = DTYPE_NAMES[image.dtype]
    return (
        Launch(
            kernel=_merge_assign_kernel,
            grid=(triton.cdiv(n, assign["BLOCK_N"]),),
            args=(image, kept, target, n, k, d, image.stride(0)),
            meta=dict(USE_DOT=not interpret, **assign),
            label=name,
        ),
        Launch(
            kernel=_merge_reduce_kernel,
            grid=(k, triton.cdiv(d, reduce["BLOCK_DR"])),
            args=(image, kept, target, out, n, d, image.stride(0), out.stride(0)),
            meta=dict(reduce),
            label=name,
        ),
    )


def compile_cases(n: int = 576, k: int = 144, d: int = 4096) -> list[Launch]:
    """Every GPU variant the launcher ships (kernel x dtype), on ``meta`` tensors."""
    cases = []
    for dtype in FLOAT_DTYPES:
        image = torch.empty(n, d, dtype=dtype, device="meta")
        kept = torch.empty(k, dtype=torch.int64, device="meta")
        target = torch.empty(n, dtype=torch.int32, device="meta")
        out = torch.empty(k, d, dtype=dtype, device="meta")
        cases.extend(_merge_launches(image, kept, target, out, interpret=False))
    return cases
