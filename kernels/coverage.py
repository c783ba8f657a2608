"""Coverage: the ``cover`` method's selection. Half of the K tokens by relevance to the question,
the other half by coverage of the rest of the image (farthest-point sampling), in index order.

Why: a text-guided selection (``simignore``) keeps what the question names; a question that names
a place, not a thing ("the object in the top left"), or a landmark while it asks about something
else, gives it no cue, and it keeps noise. The diversity-aware methods (DivPrune: max-min
diversity; CDPruner: a DPP conditioned on the question) keep a spread of what the image holds.
``cover`` does both, each with half the budget: the top ceil(K / 2) by relevance score, then, one
at a time, the token farthest (cosine distance) from every token kept so far, until K. Where the
question has a cue, the first half holds it; where it has none, the second half still keeps a
token of every distinct thing in the image before a second of any.

The rule every backend follows: relevance ranks as ``topk_select_ref`` (ties to the lower index);
each coverage pick is the first index of the largest distance to the kept set; the kept indices
come back ascending. Without scores (no query) all K are by coverage, with the image's mean
direction counted as kept (so the tokens most like the image as a whole, its background, come
last).

There is one implementation, in torch: on CPU tensors it is the CPU path, on CUDA tensors the
same ops run on the GPU (K / 2 small steps of one matrix-vector product each; no Triton kernel yet:
none could be checked on a GPU when this was written; see benchmarks/results/kernels-cpu.md for
its cost beside the other ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .topk import check_k, topk_select_ref

RELEVANCE_SHARE = 0.5
"""The share of K kept by relevance (rounded up); the rest by coverage."""


def relevance_count(k: int) -> int:
    """How many of ``k`` the relevance half keeps."""
    return math.ceil(k * RELEVANCE_SHARE)


def coverage_select_ref(image: torch.Tensor, scores: torch.Tensor | None, k: int) -> torch.Tensor:
    """[N, D] rows, [N] relevance scores (or None) -> [k] int64 kept indices, ascending."""
    n = image.shape[0]
    check_k(k, n)
    rows = F.normalize(image.float(), dim=-1)
    kept = torch.zeros(n, dtype=torch.bool, device=image.device)
    by_relevance = 0 if scores is None else relevance_count(k)
    if by_relevance:
        first = topk_select_ref(scores, by_relevance)
        kept[first] = True
        distance = (1 - rows @ rows[first].T).amin(dim=1)
    else:
        distance = 1 - rows @ F.normalize(rows.mean(dim=0), dim=0)
    for _ in range(k - by_relevance):
        # Kept rows never win again (-inf); argmax returns the first maximum: ties to the lower.
        # The pick stays a device tensor: no host sync per step on a GPU.
        pick = torch.argmax(distance.masked_fill(kept, float("-inf")))
        kept.index_fill_(0, pick.view(1), True)
        distance = torch.minimum(distance, 1 - rows @ rows[pick])
    return kept.nonzero().flatten()
