"""Relevance scores: how much each image token has to do with the question (Simignore).

``score_i = max_j cos(image_i, query_j)`` (or the mean over j), computed in float32 from model-dtype
embeddings. Batched over images of different lengths with offsets, so one call serves a whole
``embed_multimodal`` batch.
"""

from __future__ import annotations

import torch

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
