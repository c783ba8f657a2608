"""Choose the K image tokens to keep, and optionally fold the dropped ones into them.

The rule every backend follows exactly: the K highest scores win, ties go to the lower index, the
kept indices come back ascending (the LLM learned the spatial order of image tokens). Deterministic,
so a re-run of the encoder after a partial prefix-cache hit, or another tensor-parallel rank,
keeps the same rows.

What runs where on the Triton path: the top-K is a Triton kernel, one launch for a whole batch
(the torch reference launches two sorts per image); ``merge`` is two Triton kernels per image
(assign, then a deterministic per-row reduction, no atomics). Gathering the kept rows stays torch
(``image[kept]``): it is one memory-bound gather kernel already, and there is nothing to fuse it
with. ``lvlm-prune bench kernels`` times both paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton_utils import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    HAS_TRITON,
    Launch,
    dot_rows,
    interpreter_active,
    require_triton,
    tl,
    to_device,
    triton,
    unit_stride,
)
from .relevance import cosine_matrix


def check_k(k: int, n: int, *, low: int = 1, name: str = "k") -> None:
    """The one rule for how many rows to keep out of ``n``: ``low <= k <= n`` (``low`` 0 where
    K = 0 means "select nothing"), else a ``ValueError`` naming the range."""
    if not low <= k <= n:
        raise ValueError(f"{name} must be in [{low}, {n}], got {k}")


def topk_select_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Torch reference: [N] scores -> [k] int64 kept indices, ascending."""
    check_k(k, scores.shape[0])
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def merge_dropped_ref(image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Torch reference for ``merge``: average every dropped row into its most similar kept row.

    Similarity is the cosine between image rows (float32); ties go to the lower kept position.
    Each kept row becomes the plain mean of itself and the rows assigned to it, so no image
    content is discarded outright (From Redundancy to Relevance: aggregate redundant tokens).

    Returns:
        [K, D] rows in ``image.dtype``, in the order of ``kept``.
    """
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


def topk_select_batched_ref(
    scores: torch.Tensor, lengths: Sequence[int], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Torch reference for a ragged batch: ``topk_select_ref`` on each image.

    Args:
        scores: [sum N_b] scores, image b's are the next ``lengths[b]`` entries.
        lengths: N_b per image (host ints: sizes are known without a device sync).
        ks: K_b per image, in [0, N_b]; 0 selects nothing (an image not pruned by score).

    Returns:
        Per image, [K_b] int64 indices into that image's rows, ascending.
    """
    _check_batched(scores, lengths, ks)
    out, start = [], 0
    for n, k in zip(lengths, ks):
        if k == 0:
            out.append(torch.empty(0, dtype=torch.int64, device=scores.device))
        else:
            out.append(topk_select_ref(scores[start : start + n], k))
        start += n
    return out


def _check_batched(scores, lengths, ks) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [sum N_b], got shape {tuple(scores.shape)}")
    if len(lengths) != len(ks):
        raise ValueError(
            f"lengths and ks must have one entry per image, got {len(lengths)} and {len(ks)}"
        )
    if sum(lengths) != scores.shape[0]:
        raise ValueError(
            f"sum(lengths) must be scores.shape[0] = {scores.shape[0]}, got {sum(lengths)}"
        )
    for b, (n, k) in enumerate(zip(lengths, ks)):
        check_k(k, n, low=0, name=f"ks[{b}]")


def _check_merge(image, kept) -> None:
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
_TOPK_CONFIG = {
    "gpu": {"BLOCK_N": 1024, "num_warps": 4, "num_stages": 1},
    "interpret": {"BLOCK_N": 256, "num_warps": 4, "num_stages": 1},
}
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

    @triton.jit
    def _order_key(s):
        """Scores as int64 keys in [0, 2^32] ordered as torch's sort: NaN on top, -0 == +0."""
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(bits >= 0, bits + 2147483648, 2147483647 - (bits & 2147483647))
        key = tl.where(key == 2147483647, 2147483648, key)  # -0.0 ties with +0.0
        return tl.where(s != s, 4294967296, key)

    @triton.jit
    def _topk_select_kernel(
        scores_ptr, offsets_ptr, ks_ptr, out_offsets_ptr, out_ptr, BLOCK_N: tl.constexpr
    ):
        """One program per image: exact K-th largest key by bisection, then kept in index order.

        33 counting passes over the N scores find the K-th largest key ``thr``; a last pass keeps
        every key above it and the first ``K - #above`` keys equal to it (ties to the lower index),
        writing each kept index at its rank among kept ones, so the output is ascending.
        Chunked over N, so any N works with one compiled kernel.
        """
        b = tl.program_id(0).to(tl.int64)
        n0 = tl.load(offsets_ptr + b).to(tl.int64)  # grid = B: b never overruns
        n1 = tl.load(offsets_ptr + b + 1).to(tl.int64)
        k = tl.load(ks_ptr + b).to(tl.int64)
        o0 = tl.load(out_offsets_ptr + b).to(tl.int64)
        n1 = tl.where(k > 0, n1, n0)  # K = 0: nothing to select, skip every pass
        zero = n0 * 0
        thr = zero
        step = zero + 4294967296
        for _ in range(33):
            cand = thr + step
            count = zero
            for start in range(n0, n1, BLOCK_N):
                idx = start + tl.arange(0, BLOCK_N)
                m = idx < n1
                key = _order_key(tl.load(scores_ptr + idx, mask=m, other=0.0).to(tl.float32))
                count += tl.sum((m & (key >= cand)).to(tl.int64), axis=0)
            thr = tl.where(count >= k, cand, thr)
            step = step // 2
        above = zero
        for start in range(n0, n1, BLOCK_N):
            idx = start + tl.arange(0, BLOCK_N)
            m = idx < n1
            key = _order_key(tl.load(scores_ptr + idx, mask=m, other=0.0).to(tl.float32))
            above += tl.sum((m & (key > thr)).to(tl.int64), axis=0)
        ties_wanted = k - above
        ties_seen = zero
        written = zero
        for start in range(n0, n1, BLOCK_N):
            idx = start + tl.arange(0, BLOCK_N)
            m = idx < n1
            key = _order_key(tl.load(scores_ptr + idx, mask=m, other=0.0).to(tl.float32))
            tie = (m & (key == thr)).to(tl.int64)
            tie_rank = ties_seen + tl.cumsum(tie, axis=0)  # 1-based, in index order
            keep = (m & (key > thr)) | ((tie > 0) & (tie_rank <= ties_wanted))
            pos = written + tl.cumsum(keep.to(tl.int64), axis=0) - 1
            tl.store(out_ptr + o0 + pos, idx - n0, mask=keep)
            ties_seen += tl.sum(tie, axis=0)
            written += tl.sum(keep.to(tl.int64), axis=0)

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

        Cosines as in the relevance kernel (``dot_rows``): identical kept rows give identical
        similarities wherever they sit, so a tie goes to the lower kept position."""
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
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            x_sq = tl.zeros([BLOCK_N], tl.float32)
            k_sq = tl.zeros([BLOCK_K], tl.float32)
            for d_start in range(0, D, BLOCK_D):
                d = d_start + tl.arange(0, BLOCK_D)
                d_mask = d < D
                x = tl.load(
                    image_ptr + rows[:, None] * stride_n + d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                y = tl.load(
                    image_ptr + kept_rows[:, None] * stride_n + d[None, :],
                    mask=pos_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                acc = dot_rows(x, y, acc, USE_DOT)
                xf = x.to(tl.float32)
                yf = y.to(tl.float32)
                x_sq += tl.sum(xf * xf, axis=1)
                k_sq += tl.sum(yf * yf, axis=1)
            cos = acc / tl.maximum(tl.sqrt(x_sq), 1e-12)[:, None]
            cos = cos / tl.maximum(tl.sqrt(k_sq), 1e-12)[None, :]
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


def topk_select_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Triton version of ``topk_select_ref`` (same arguments, same result, bit for bit)."""
    check_k(k, scores.shape[0])
    return topk_select_batched_triton(scores, [scores.shape[0]], [k])[0]


def topk_select_batched_triton(
    scores: torch.Tensor, lengths: Sequence[int], ks: Sequence[int]
) -> list[torch.Tensor]:
    """Triton version of ``topk_select_batched_ref``: one launch, one program per image."""
    _check_batched(scores, lengths, ks)
    require_triton(scores.device)
    lengths, ks = [int(n) for n in lengths], [int(k) for k in ks]
    out = torch.empty(sum(ks), dtype=torch.int64, device=scores.device)
    if not lengths or not out.numel():
        return list(torch.split(out, ks))
    # offsets, K and output offsets in one host-built tensor: one small copy, no sync.
    table = torch.zeros(3, len(lengths) + 1, dtype=torch.int64)
    table[0, 1:] = torch.tensor(lengths).cumsum(0)
    table[1, :-1] = torch.tensor(ks)
    table[2, 1:] = torch.tensor(ks).cumsum(0)
    table = to_device(table, scores.device)
    _topk_launch(scores.contiguous(), table, out, interpret=interpreter_active())()
    return list(torch.split(out, ks))


def _topk_launch(scores, table, out, *, interpret):
    """The top-K kernel's arguments and grid: the launcher's and the compile check's."""
    return Launch(
        kernel=_topk_select_kernel,
        grid=(table.shape[1] - 1,),
        args=(scores, table[0], table[1], table[2], out),
        meta=dict(_TOPK_CONFIG["interpret" if interpret else "gpu"]),
        label=f"{DTYPE_NAMES[scores.dtype]} scores",
    )


def merge_dropped_triton(image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Triton version of ``merge_dropped_ref`` (same arguments, same result within rounding).

    Two launches: assign every dropped row to its most similar kept row, then one program per
    (kept row, D chunk) sums its rows in a fixed order: deterministic, no atomics.
    """
    _check_merge(image, kept)
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
    """Every GPU variant the launchers ship (kernel x dtype), on ``meta`` tensors."""
    cases = []
    for dtype in FLOAT_DTYPES:
        scores = torch.empty(n, dtype=dtype, device="meta")
        table = torch.empty(3, 2, dtype=torch.int64, device="meta")
        out = torch.empty(k, dtype=torch.int64, device="meta")
        cases.append(_topk_launch(scores, table, out, interpret=False))
    for dtype in FLOAT_DTYPES:
        image = torch.empty(n, d, dtype=dtype, device="meta")
        kept = torch.empty(k, dtype=torch.int64, device="meta")
        target = torch.empty(n, dtype=torch.int32, device="meta")
        out = torch.empty(k, d, dtype=dtype, device="meta")
        cases.extend(_merge_launches(image, kept, target, out, interpret=False))
    return cases
