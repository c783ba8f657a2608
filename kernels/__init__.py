"""The selection math: which image tokens a question keeps, and how many.

The public API is what the model, the processor and the server call. The ops live one per module
(``relevance``, ``topk``, ``merge``; each Triton kernel beside its torch reference), their
references together in ``lvlm_prune.kernels.reference``, the backend dispatch
(``resolve_backend``, ``BACKEND_ENV``) in ``lvlm_prune.kernels.selection``.
"""

from .cosine import cosine_matrix
from .selection import PRUNE_METHODS, Selection, check_keep_ratio, keep_count, select_tokens

__all__ = [
    "PRUNE_METHODS",
    "Selection",
    "check_keep_ratio",
    "cosine_matrix",
    "keep_count",
    "select_tokens",
]
