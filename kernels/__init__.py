"""The selection math: torch references, Triton kernels and the dispatch between them."""

from .relevance import relevance_ref
from .selection import (
    BACKEND_ENV,
    PRUNE_METHODS,
    Selection,
    compute_relevance,
    keep_count,
    random_indices,
    resolve_backend,
    select_tokens,
    uniform_indices,
)
from .topk_select import merge_dropped_ref, topk_select_ref

__all__ = [
    "BACKEND_ENV",
    "PRUNE_METHODS",
    "Selection",
    "compute_relevance",
    "keep_count",
    "merge_dropped_ref",
    "random_indices",
    "relevance_ref",
    "resolve_backend",
    "select_tokens",
    "topk_select_ref",
    "uniform_indices",
]
