"""The selection math: torch references, Triton kernels and the dispatch between them."""

from ._triton_utils import HAS_TRITON
from .relevance import cosine_matrix, relevance_ref, relevance_triton
from .selection import (
    BACKEND_ENV,
    PRUNE_METHODS,
    Selection,
    check_keep_ratio,
    keep_count,
    random_indices,
    resolve_backend,
    row_offsets,
    select_tokens,
    uniform_indices,
)
from .topk_select import (
    merge_dropped_ref,
    merge_dropped_triton,
    topk_select_batched_ref,
    topk_select_batched_triton,
    topk_select_ref,
    topk_select_triton,
)

__all__ = [
    "BACKEND_ENV",
    "HAS_TRITON",
    "PRUNE_METHODS",
    "Selection",
    "check_keep_ratio",
    "cosine_matrix",
    "keep_count",
    "merge_dropped_ref",
    "merge_dropped_triton",
    "random_indices",
    "relevance_ref",
    "relevance_triton",
    "resolve_backend",
    "row_offsets",
    "select_tokens",
    "topk_select_batched_ref",
    "topk_select_batched_triton",
    "topk_select_ref",
    "topk_select_triton",
    "uniform_indices",
]
