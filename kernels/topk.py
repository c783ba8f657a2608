"""Top-K: the K image tokens with the highest scores, kept in index order.

The rule every backend follows exactly: the K highest scores win, ties go to the lower index, the
kept indices come back ascending (the LLM learned the spatial order of image tokens). NaN ranks
above +inf and -0.0 ties with +0.0, as ``torch.sort``. Deterministic, so a re-run of the encoder
after a partial prefix-cache hit, or another tensor-parallel rank, keeps the same rows.

``topk_select_batched_triton`` is one launch, one program per image, for a whole ragged batch
(the torch reference launches two sorts per image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._triton_utils import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    HAS_TRITON,
    Launch,
    interpreter_active,
    require_triton,
    tl,
    to_device,
    triton,
)


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


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

# Compiles without register spills for sm_80, sm_90 and sm_100 (tests/kernels/test_compile.py).
# The interpreter's BLOCK_N is below the test sizes (N=577) so chunk carries run.
_TOPK_CONFIG = {
    "gpu": {"BLOCK_N": 1024, "num_warps": 4, "num_stages": 1},
    "interpret": {"BLOCK_N": 256, "num_warps": 4, "num_stages": 1},
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


def compile_cases(n: int = 576, k: int = 144) -> list[Launch]:
    """Every GPU variant the launcher ships (one per scores dtype), on ``meta`` tensors."""
    cases = []
    for dtype in FLOAT_DTYPES:
        scores = torch.empty(n, dtype=dtype, device="meta")
        table = torch.empty(3, 2, dtype=torch.int64, device="meta")
        out = torch.empty(k, dtype=torch.int64, device="meta")
        cases.append(_topk_launch(scores, table, out, interpret=False))
    return cases
