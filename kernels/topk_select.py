"""Choose the K image tokens to keep, and optionally fold the dropped ones into them.

The rule every backend follows exactly: the K highest scores win, ties go to the lower index, the
kept indices come back ascending (the LLM learned the spatial order of image tokens). Deterministic,
so a re-run of the encoder after a partial prefix-cache hit, or another tensor-parallel rank,
keeps the same rows.
"""

from __future__ import annotations

import torch


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
