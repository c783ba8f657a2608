"""Every op's torch reference, in one namespace: what the Triton kernels are tested against and
what the torch backend runs (``select_tokens`` on CPU tensors).

Each ``<op>_ref`` lives beside its kernel (``relevance.py``, ``topk.py``, ``merge.py``, ``coverage.py``) and
takes the same arguments as the Triton function it stands for (``<op>_triton``).
"""

from .cosine import cosine_matrix
from .coverage import coverage_select_ref
from .merge import merge_dropped_ref
from .relevance import relevance_ref
from .topk import topk_select_batched_ref, topk_select_ref

__all__ = [
    "cosine_matrix",
    "coverage_select_ref",
    "merge_dropped_ref",
    "relevance_ref",
    "topk_select_batched_ref",
    "topk_select_ref",
]
