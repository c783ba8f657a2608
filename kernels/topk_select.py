"""Choose the K image tokens to keep, and optionally fold the dropped ones into them.

The rule every backend follows exactly: the K highest scores win, ties go to the lower index, the
kept indices come back ascending (the LLM learned the spatial order of image tokens). Deterministic,
so a re-run of the encoder after a partial prefix-cache hit, or another tensor-parallel rank,
keeps the same rows.

What runs where on the Triton path: the top-K is a Triton kernel, one launch for a whole batch
(the torch reference launches two sorts per image); ``merge``
is two Triton kernels per image (assign, then a deterministic per-row reduction, no atomics).
Gathering the kept rows stays torch (``image[kept]``): it is one memory-bound gather kernel
already, and there is nothing to fuse it with. ``benchmarks/bench_kernels.py`` times both paths;
GPU numbers were not measured when this was written (no GPU in that session).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton_utils import HAS_TRITON, interpreter_active, require_triton, tl, to_device, triton


def topk_select_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Torch reference: [N] scores -> [k] int64 kept indices, ascending."""
    n = scores.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
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
    unit = torch.nn.functional.normalize
    sim = unit(dropped, dim=-1, eps=1e-12) @ unit(rows, dim=-1, eps=1e-12).T  # [N-K, K]
    target = sim.argmax(dim=1)  # first maximum: the lower kept position wins ties
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
        if not 0 <= k <= n:
            raise ValueError(f"ks[{b}] must be in [0, {n}], got {k}")


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

# Chunk sizes. The interpreter ones are below the test sizes (N=577, D=128) so chunk carries run.
_TOPK_BLOCK = {"gpu": 1024, "interpret": 256}
_MERGE_CONFIG = {
    "gpu": {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 64, "BLOCK_R": 32, "BLOCK_DR": 256},
    "interpret": {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64, "BLOCK_R": 256, "BLOCK_DR": 64},
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
        stride_d,
        DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """target[i] = kept position most similar to row i (first maximum), or -1 for kept rows."""
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
                    image_ptr + rows[:, None] * stride_n + d[None, :] * stride_d,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                y = tl.load(
                    image_ptr + kept_rows[:, None] * stride_n + d[None, :] * stride_d,
                    mask=pos_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION)
                x_sq += tl.sum(x * x, axis=1)
                k_sq += tl.sum(y * y, axis=1)
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
        stride_d,
        stride_out_k,
        stride_out_d,
        BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """out[p] = mean of kept row p and the rows assigned to it, summed in a fixed order."""
        p = tl.program_id(0).to(tl.int64)  # grid dim 0 = K: p never overruns
        d = tl.program_id(1).to(tl.int64) * BLOCK_DR + tl.arange(0, BLOCK_DR)
        d_mask = d < D
        row = tl.load(kept_ptr + p).to(tl.int64)
        acc = tl.load(image_ptr + row * stride_n + d * stride_d, mask=d_mask, other=0.0).to(
            tl.float32
        )
        count = tl.sum(tl.full([1], 1.0, tl.float32), axis=0)
        for start in range(0, N, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            match = tl.load(target_ptr + r, mask=r < N, other=-1).to(tl.int64) == p
            x = tl.load(
                image_ptr + r[:, None] * stride_n + d[None, :] * stride_d,
                mask=match[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x, axis=0)
            count += tl.sum(match.to(tl.float32), axis=0)
        out = acc / count
        tl.store(
            out_ptr + p * stride_out_k + d * stride_out_d,
            out.to(out_ptr.dtype.element_ty),
            mask=d_mask,
        )


def topk_select_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Triton version of ``topk_select_ref`` (same arguments, same result, bit for bit)."""
    n = scores.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return topk_select_batched_triton(scores, [n], [k])[0]


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
    block = _TOPK_BLOCK["interpret" if interpreter_active() else "gpu"]
    _topk_select_kernel[(len(lengths),)](
        scores.contiguous(), table[0], table[1], table[2], out, BLOCK_N=block, num_warps=4
    )
    return list(torch.split(out, ks))


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
    kept = kept.to(image.device).contiguous()
    cfg = _MERGE_CONFIG["interpret" if interpreter_active() else "gpu"]
    precision = "ieee" if image.dtype == torch.float32 else "tf32"  # bf16/fp16 are exact in tf32
    target = torch.empty(n, dtype=torch.int32, device=image.device)
    _merge_assign_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        image,
        kept,
        target,
        n,
        k,
        d,
        image.stride(0),
        image.stride(1),
        DOT_PRECISION=precision,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=4,
    )
    out = torch.empty(k, d, dtype=image.dtype, device=image.device)
    _merge_reduce_kernel[(k, triton.cdiv(d, cfg["BLOCK_DR"]))](
        image,
        kept,
        target,
        out,
        n,
        d,
        image.stride(0),
        image.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_DR=cfg["BLOCK_DR"],
        num_warps=4,
    )
    return out
