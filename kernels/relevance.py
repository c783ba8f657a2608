"""Relevance scores: how much each image token has to do with the question (Simignore).

``score_i = max_j cos(image_i, query_j)`` (or the mean over j), computed in float32 from model-dtype
embeddings. Batched over images of different lengths with offsets, so one call serves a whole
``embed_multimodal`` batch. ``relevance_triton`` is the same in one Triton launch: each image row
is read once per tile of query tokens, the norms come out of the same pass, only scores are written.
"""

from __future__ import annotations

import torch

from ._triton_utils import HAS_TRITON, interpreter_active, require_triton, tl, triton

REDUCTIONS = ("max", "mean")
_EPS = 1e-12  # as torch.nn.functional.normalize: a zero row scores 0 everywhere


def relevance_ref(
    image: torch.Tensor,
    image_offsets: torch.Tensor,
    query: torch.Tensor,
    query_offsets: torch.Tensor,
    *,
    reduce: str = "max",
) -> torch.Tensor:
    """Torch reference.

    Args:
        image: [sum N_b, D] image embeddings (projector output), any float dtype.
        image_offsets: [B + 1] int, image b is rows ``image_offsets[b]:image_offsets[b+1]``.
        query: [sum T_b, D] query embeddings (rows of ``embed_tokens``).
        query_offsets: [B + 1] int, likewise for the query.
        reduce: ``"max"`` or ``"mean"`` over the query tokens.

    Returns:
        [sum N_b] float32 scores. An image whose query is empty scores 0 everywhere
        (the selection then falls back to uniform).
    """
    _check(image, image_offsets, query, query_offsets, reduce)
    scores = torch.zeros(image.shape[0], dtype=torch.float32, device=image.device)
    img_off = image_offsets.tolist()
    q_off = query_offsets.tolist()
    for b in range(len(img_off) - 1):
        i0, i1, q0, q1 = img_off[b], img_off[b + 1], q_off[b], q_off[b + 1]
        if i1 == i0 or q1 == q0:
            continue
        img = torch.nn.functional.normalize(image[i0:i1].float(), dim=-1, eps=_EPS)
        q = torch.nn.functional.normalize(query[q0:q1].float(), dim=-1, eps=_EPS)
        sim = img @ q.T  # [N_b, T_b]
        scores[i0:i1] = sim.amax(dim=1) if reduce == "max" else sim.mean(dim=1)
    return scores


def _check(image, image_offsets, query, query_offsets, reduce) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if image.dim() != 2 or query.dim() != 2:
        raise ValueError(
            f"image and query must be 2-D [rows, D], got {tuple(image.shape)} and "
            f"{tuple(query.shape)}"
        )
    if image.shape[1] != query.shape[1]:
        raise ValueError(f"hidden sizes differ: image D={image.shape[1]}, query D={query.shape[1]}")
    if image_offsets.numel() != query_offsets.numel():
        raise ValueError("image_offsets and query_offsets must both have B + 1 entries")


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

# Tile sizes for the interpreter (CPU): big tiles mean few Python-level steps; still smaller than
# the test shapes (N=577, T=300, D=128) so the multi-tile and ragged-edge paths run.
_INTERPRET_CONFIG = {"BLOCK_N": 64, "BLOCK_T": 64, "BLOCK_D": 64}

if HAS_TRITON:

    @triton.jit(do_not_specialize=["num_images", "t_hint"])
    def _relevance_kernel(
        image_ptr,
        image_offsets_ptr,
        query_ptr,
        query_offsets_ptr,
        out_ptr,
        num_images,
        D,
        t_hint,  # mean query length, bucketed: an autotuning key only
        stride_img_n,
        stride_img_d,
        stride_q_t,
        stride_q_d,
        REDUCE_MAX: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program scores BLOCK_N rows of one image against all of that image's query.

        Programs are laid out image after image, cdiv(N_b, BLOCK_N) each; a program finds its
        image from the offsets (cumulative block counts), so one launch serves the whole ragged
        batch. The norms are accumulated in the same pass over D as the dot products, so no
        normalised copy of anything is written.
        """
        pid = tl.program_id(0).to(tl.int64)
        b_range = tl.arange(0, BLOCK_B)
        b_mask = b_range < num_images
        starts = tl.load(image_offsets_ptr + b_range, mask=b_mask, other=0).to(tl.int64)
        ends = tl.load(image_offsets_ptr + b_range + 1, mask=b_mask, other=0).to(tl.int64)
        n_blocks = (ends - starts + BLOCK_N - 1) // BLOCK_N
        b = tl.sum((tl.cumsum(n_blocks, axis=0) <= pid).to(tl.int64), axis=0)
        block = pid - tl.sum(tl.where(b_range < b, n_blocks, 0), axis=0)
        live = b < num_images  # the grid is an upper bound; spare programs store nothing
        i0 = tl.load(image_offsets_ptr + b, mask=live, other=0).to(tl.int64)
        i1 = tl.load(image_offsets_ptr + b + 1, mask=live, other=0).to(tl.int64)
        q0 = tl.load(query_offsets_ptr + b, mask=live, other=0).to(tl.int64)
        q1 = tl.load(query_offsets_ptr + b + 1, mask=live, other=0).to(tl.int64)

        rows = i0 + block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < i1
        if REDUCE_MAX:
            best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        else:
            best = tl.zeros([BLOCK_N], tl.float32)
        for t_start in range(q0, q1, BLOCK_T):
            cols = t_start + tl.arange(0, BLOCK_T)
            col_mask = cols < q1
            acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
            img_sq = tl.zeros([BLOCK_N], tl.float32)
            q_sq = tl.zeros([BLOCK_T], tl.float32)
            for d_start in range(0, D, BLOCK_D):
                d = d_start + tl.arange(0, BLOCK_D)
                d_mask = d < D
                # Upcast on load: exact for bf16/fp16 (they fit tf32), and the interpreter's
                # bf16 arithmetic is wrong.
                x = tl.load(
                    image_ptr + rows[:, None] * stride_img_n + d[None, :] * stride_img_d,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                q = tl.load(
                    query_ptr + cols[:, None] * stride_q_t + d[None, :] * stride_q_d,
                    mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc = tl.dot(x, tl.trans(q), acc, input_precision=DOT_PRECISION)
                img_sq += tl.sum(x * x, axis=1)
                q_sq += tl.sum(q * q, axis=1)
            # cos = x.q / (max(|x|, eps) max(|q|, eps)), as torch.nn.functional.normalize.
            img_norm = tl.maximum(tl.sqrt(img_sq), 1e-12)
            q_norm = tl.maximum(tl.sqrt(q_sq), 1e-12)
            cos = acc / img_norm[:, None] / q_norm[None, :]
            if REDUCE_MAX:
                cos = tl.where(col_mask[None, :], cos, float("-inf"))
                best = tl.maximum(best, tl.max(cos, axis=1))
            else:
                best += tl.sum(tl.where(col_mask[None, :], cos, 0.0), axis=1)
        num_q = q1 - q0
        if REDUCE_MAX:
            score = tl.where(num_q > 0, best, 0.0)  # empty query: 0, as the reference
        else:
            score = best / tl.maximum(num_q, 1).to(tl.float32)
        tl.store(out_ptr + rows, score, mask=row_mask)


# One fixed tiling, not autotuned: the selection must be bit-identical on every tensor-parallel
# rank and when the encoder re-runs after a partial prefix-cache hit in another batch. Autotuning
# picks configs per process from noisy timings, and BLOCK_D / BLOCK_T set the order of the fp32
# sums; with them fixed, a row's score does not depend on the batch it ran in. (Tuning BLOCK_N,
# warps and stages, which leave that order alone, is open for a GPU session.)
_GPU_CONFIG = {"BLOCK_N": 64, "BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3}


def relevance_triton(
    image: torch.Tensor,
    image_offsets: torch.Tensor,
    query: torch.Tensor,
    query_offsets: torch.Tensor,
    *,
    reduce: str = "max",
) -> torch.Tensor:
    """Triton version of ``relevance_ref`` (same arguments, same result): one launch per batch.

    Offsets must be non-decreasing and end at the row counts; they are not read on the host
    (that would synchronise), so they are not checked beyond their length.
    """
    _check(image, image_offsets, query, query_offsets, reduce)
    require_triton(image.device)
    num_images = image_offsets.numel() - 1
    out = torch.empty(image.shape[0], dtype=torch.float32, device=image.device)
    if image.shape[0] == 0 or num_images <= 0:
        return out
    image_offsets = image_offsets.to(image.device)
    query_offsets = query_offsets.to(image.device)
    query = query.to(image.device)
    # fp32 inputs need IEEE dots (tf32 would round them); bf16/fp16 are exact in tf32.
    precision = "ieee" if torch.float32 in (image.dtype, query.dtype) else "tf32"
    t_hint = triton.next_power_of_2(max(1, query.shape[0] // num_images))
    args = (
        image,
        image_offsets,
        query,
        query_offsets,
        out,
        num_images,
        image.shape[1],
        t_hint,
        image.stride(0),
        image.stride(1),
        query.stride(0),
        query.stride(1),
    )
    meta = dict(
        REDUCE_MAX=reduce == "max",
        DOT_PRECISION=precision,
        BLOCK_B=max(16, triton.next_power_of_2(num_images)),
    )

    def grid(cfg):
        # sum_b cdiv(N_b, BLOCK_N) < cdiv(sum_b N_b, BLOCK_N) + B: an upper bound needing no sync.
        return (triton.cdiv(image.shape[0], cfg["BLOCK_N"]) + num_images,)

    config = _INTERPRET_CONFIG if interpreter_active() else _GPU_CONFIG
    _relevance_kernel[grid](*args, **meta, **config)
    return out
