"""Relevance scores: how much each image token has to do with the question (Simignore).

``score_i = max_j cos(image_i, query_j)`` (or the mean over j), in float32 from model-dtype
embeddings, batched over images of different lengths with offsets so one call serves a whole
``embed_multimodal`` batch. ``relevance_triton`` is the same in one Triton launch: each image row
is read once per tile of query tokens, the norms come out of the same pass, only scores are
written.

A row's score is computed from that row and the query alone, in an order that does not depend
on where the row sits (its tile, its image, the batch, the thread count): identical rows score
bit-identically, so the top-K tie rule (lower index) decides between them, and an image scored
again in another batch keeps the same rows (``cosine.py``: ``cosine_matrix`` in torch,
``cosine_tile`` in the kernel).
"""

from __future__ import annotations

import dataclasses

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

REDUCTIONS = ("max", "mean")


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
        sim = cosine_matrix(image[i0:i1], query[q0:q1])  # [N_b, T_b]
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
_INTERPRET_CONFIG = {"BLOCK_N": 64, "BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 1}

# One fixed tiling per dtype, not autotuned: BLOCK_D (and BLOCK_T for the mean) set the order of
# the fp32 sums, and a score must come out the same on every tensor-parallel rank and in every
# batch. Each compiles without register spills for sm_80, sm_90 and sm_100
# (tests/kernels/test_compile.py). BLOCK_T = 32: a typical question is one tile, so each image
# row is read once; fp32 dots run on FMA units and need 8 warps for their registers.
GPU_CONFIGS = {
    torch.bfloat16: {"BLOCK_N": 64, "BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3},
    torch.float16: {"BLOCK_N": 64, "BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3},
    torch.float32: {"BLOCK_N": 64, "BLOCK_T": 64, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3},
}

if HAS_TRITON:
    from .cosine import cosine_tile

    @triton.jit(do_not_specialize=["num_images"])
    def _relevance_kernel(
        image_ptr,
        image_offsets_ptr,
        query_ptr,
        query_offsets_ptr,
        out_ptr,
        num_images,
        D,
        stride_img_n,
        stride_q_t,
        REDUCE_MAX: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program scores BLOCK_N rows of one image against all of that image's query.

        Programs are laid out image after image, cdiv(N_b, BLOCK_N) each; a program finds its
        image from the offsets (cumulative block counts), so one launch serves the whole ragged
        batch. Each tile of cosines comes from ``cosine_tile`` (one pass over D, norms included).
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
            cos = cosine_tile(
                image_ptr,
                rows,
                row_mask,
                stride_img_n,
                query_ptr,
                cols,
                col_mask,
                stride_q_t,
                D,
                USE_DOT,
                BLOCK_N,
                BLOCK_T,
                BLOCK_D,
            )
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
    (that would synchronise), so they are not checked beyond their length. Mixed image / query
    dtypes are promoted to a common one (exactly, as the reference's fp32 upcast); others
    (float64) are computed in fp32, as the reference does.
    """
    _check(image, image_offsets, query, query_offsets, reduce)
    require_triton(image.device)
    out = torch.empty(image.shape[0], dtype=torch.float32, device=image.device)
    if image.shape[0] == 0 or image_offsets.numel() <= 1:
        return out
    dtype = torch.promote_types(image.dtype, query.dtype)
    dtype = dtype if dtype in FLOAT_DTYPES else torch.float32  # as the reference's upcast
    _relevance_launch(
        unit_stride(image.to(dtype)),
        image_offsets.to(image.device),
        unit_stride(query.to(image.device, dtype)),
        query_offsets.to(image.device),
        out,
        reduce=reduce,
        interpret=interpreter_active(),
    )()
    return out


def _relevance_launch(image, image_offsets, query, query_offsets, out, *, reduce, interpret):
    """The kernel's arguments, constexprs and grid: the launcher's and the compile check's."""
    num_images = image_offsets.numel() - 1
    config = _INTERPRET_CONFIG if interpret else GPU_CONFIGS[image.dtype]
    # sum_b cdiv(N_b, BLOCK_N) < cdiv(sum_b N_b, BLOCK_N) + B: an upper bound needing no sync.
    grid = (triton.cdiv(image.shape[0], config["BLOCK_N"]) + num_images,)
    return Launch(
        kernel=_relevance_kernel,
        grid=grid,
        args=(
            image,
            image_offsets,
            query,
            query_offsets,
            out,
            num_images,
            image.shape[1],
            image.stride(0),
            query.stride(0),
        ),
        meta=dict(
            REDUCE_MAX=reduce == "max",
            USE_DOT=not interpret,
            BLOCK_B=max(16, triton.next_power_of_2(num_images)),
            **config,
        ),
        label=f"{DTYPE_NAMES[image.dtype]} {reduce}",
    )


def compile_cases(n: int = 576, t: int = 32, d: int = 4096) -> list[Launch]:
    """Every GPU variant the launcher ships, on ``meta`` tensors: dtype x reduction for one
    image, and a 256-image batch (BLOCK_B, the offsets tile, grows with the batch)."""
    variants = [(dtype, reduce, 1) for dtype in FLOAT_DTYPES for reduce in REDUCTIONS]
    variants.append((torch.bfloat16, "max", 256))
    cases = []
    for dtype, reduce, images in variants:
        image = torch.empty(images * n, d, dtype=dtype, device="meta")
        query = torch.empty(images * t, d, dtype=dtype, device="meta")
        offsets = torch.empty(images + 1, dtype=torch.int64, device="meta")
        out = torch.empty(images * n, dtype=torch.float32, device="meta")
        launch = _relevance_launch(
            image, offsets, query, offsets, out, reduce=reduce, interpret=False
        )
        if images > 1:
            launch = dataclasses.replace(launch, label=f"{launch.label}, {images} images")
        cases.append(launch)
    return cases
