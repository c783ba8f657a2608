"""The selection: which image tokens one question keeps, and how many.

``keep_count`` is the one place K is decided; the vLLM processor (placeholder count) and the model
(rows returned) both call it, so the two can never disagree. ``select_tokens`` is the one entry the
model uses; it dispatches each op to Triton on CUDA tensors and to the torch reference elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from lvlm_prune import envs

from ._triton_utils import HAS_TRITON, to_device
from .coverage import coverage_select_ref
from .merge import merge_dropped_ref
from .relevance import relevance_ref
from .topk import check_k, topk_select_batched_ref

PRUNE_METHODS = ("simignore", "uniform", "random", "flow", "cover")
"""``simignore``: most question-relevant tokens (default). ``uniform``: evenly spaced tokens
(baseline; also the fallback when the query is empty). ``random``: seeded per request
(benchmark baseline). ``flow``: the tokens the question attends to most in a shallow decoder
layer (scores from the model's scout pass, ``vllm_plugin/worker/flow.py``, handed in as ``scores``).
``cover``: half by simignore's relevance, half by coverage of the rest of the image, for questions
that name no attribute of what they ask about (``coverage.py``)."""

SCORED_METHODS = ("simignore", "flow")
"""Methods that keep the top-K tokens by score."""

COSINE_METHODS = ("simignore", "cover")
"""Methods whose selection reads the cosine relevance to the query."""

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = envs.LVLM_PRUNE_BACKEND


def check_keep_ratio(keep_ratio: object) -> float:
    """The one rule for a keep ratio: a number in (0, 1]. Returns it as a float.

    Ints count (1 is a ratio), bools do not; checked without ``float()`` first, so ``10**400`` is
    a ``ValueError`` rather than an ``OverflowError``.
    """
    if (
        isinstance(keep_ratio, bool)
        or not isinstance(keep_ratio, (int, float))
        or keep_ratio != keep_ratio  # NaN
        or not 0 < keep_ratio <= 1
    ):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio)


def keep_count(num_tokens: int, keep_ratio: float, *, min_keep: int = 1) -> int:
    """K = ceil(N * keep_ratio), at least ``min_keep``, at most N.

    Ceil, so a ratio never rounds an image down to nothing and 0.11 of 576 keeps 64.
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    if num_tokens <= 0:
        return 0
    # The epsilon absorbs float noise such as 0.07 * 100 = 7.000000000000001.
    k = math.ceil(num_tokens * keep_ratio - 1e-9)
    return max(min(min_keep, num_tokens), min(num_tokens, k))


def uniform_indices(num_tokens: int, k: int, *, device=None) -> torch.Tensor:
    """K evenly spaced indices, each at the centre of its 1/K stretch of the sequence."""
    i = torch.arange(k, device=device, dtype=torch.int64)
    return ((2 * i + 1) * num_tokens) // (2 * k)


def random_indices(num_tokens: int, k: int, *, seed: int, device=None) -> torch.Tensor:
    """K distinct indices drawn with a generator seeded by the request (reproducible)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.sort(torch.randperm(num_tokens, generator=gen)[:k]).values.to(device)


@dataclasses.dataclass
class Selection:
    """What one image keeps.

    Attributes:
        kept: [K] int64 indices into the image's N rows, ascending.
        rows: [K, D] embeddings handed to the LLM (merged when ``merge`` was asked).
        scores: [N] float32 relevance scores, or None when they were not computed.
        method: the method actually applied (``uniform`` when simignore had no query).
    """

    kept: torch.Tensor
    rows: torch.Tensor
    scores: torch.Tensor | None
    method: str


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """``triton`` for CUDA tensors (if Triton is installed), ``torch`` elsewhere; ``backend`` or
    $LVLM_PRUNE_BACKEND force one."""
    choice = backend or envs.backend()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} / backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    return choice


def _relevance_flat(images, queries, reduce: str, backend: str) -> torch.Tensor:
    """[sum N_b] float32 scores of the images, back to back."""
    device = images[0].device
    image = _cat_rows(list(images))
    query = _cat_rows([q.to(image.dtype) for q in queries])
    image_offsets = row_offsets([x.shape[0] for x in images], device)
    query_offsets = row_offsets([q.shape[0] for q in queries], device)
    if backend == "triton":
        from .relevance import relevance_triton

        return relevance_triton(image, image_offsets, query, query_offsets, reduce=reduce)
    return relevance_ref(image, image_offsets, query, query_offsets, reduce=reduce)


def select_tokens(
    images: Sequence[torch.Tensor],
    queries: Sequence[torch.Tensor],
    keep: Sequence[int],
    *,
    methods: Sequence[str],
    merge: Sequence[bool],
    seeds: Sequence[int],
    need_scores: bool = False,
    scores: Sequence[torch.Tensor | None] | None = None,
    backend: str | None = None,
) -> list[Selection]:
    """Select K_b rows of each image b.

    Args:
        images: per image [N_b, D] projector output.
        queries: per image [T_b, D] query embeddings (T_b may be 0).
        keep: per image K_b (from ``keep_count``).
        methods: per image, one of ``PRUNE_METHODS``.
        merge: per image, fold dropped rows into kept ones.
        seeds: per image seed for ``random``.
        need_scores: compute relevance scores for every image (diagnostics), not only simignore.
        scores: per image precomputed [N_b] float32 scores, or None; the ``flow`` method ranks
            by them (without them it falls back to ``uniform``, as simignore without a query).
        backend: force ``torch`` or ``triton`` (default: by device, or $LVLM_PRUNE_BACKEND).
    """
    for m in methods:
        if m not in PRUNE_METHODS:
            raise ValueError(f"prune_method must be one of {PRUNE_METHODS}, got {m!r}")
    if not images:
        return []
    backend = resolve_backend(images[0].device, backend)
    if backend == "triton":
        from .merge import merge_dropped_triton
        from .topk import topk_select_batched_triton

        topk_batched, merge_dropped = topk_select_batched_triton, merge_dropped_triton
    else:
        topk_batched, merge_dropped = topk_select_batched_ref, merge_dropped_ref

    given = list(scores) if scores is not None else [None] * len(images)
    # Cosine relevance for simignore, and for diagnostics of every method without its own scores.
    want = [
        q.shape[0] > 0 and (m in COSINE_METHODS or (need_scores and m != "flow"))
        for q, m in zip(queries, methods)
    ]
    scored = [b for b, w in enumerate(want) if w]
    found: list[torch.Tensor | None] = [s if m == "flow" else None for s, m in zip(given, methods)]
    if scored:
        flat = _relevance_flat(
            [images[b] for b in scored], [queries[b] for b in scored], "max", backend
        )
        for b, s in zip(scored, torch.split(flat, [images[b].shape[0] for b in scored])):
            found[b] = s
    # Top-K of every image pruned by score in one batched call.
    ranked = [
        b
        for b, (m, s) in enumerate(zip(methods, found))
        if m in SCORED_METHODS and s is not None and keep[b] < images[b].shape[0]
    ]
    kept_by_score: dict[int, torch.Tensor] = {}
    if ranked:
        lengths = [images[b].shape[0] for b in ranked]
        ks = [keep[b] for b in ranked]
        for k, n in zip(ks, lengths):
            check_k(k, n)
        flat = found[ranked[0]] if len(ranked) == 1 else torch.cat([found[b] for b in ranked])
        for b, kept in zip(ranked, topk_batched(flat, lengths, ks)):
            kept_by_score[b] = kept

    out = []
    for b, image in enumerate(images):
        n, k, method = image.shape[0], keep[b], methods[b]
        if k >= n:
            kept, method_used = torch.arange(n, device=image.device), method
        elif b in kept_by_score:
            kept, method_used = kept_by_score[b], method
        elif method == "random":
            kept, method_used = random_indices(n, k, seed=seeds[b], device=image.device), method
        elif method == "cover":  # with no query, coverage alone
            kept, method_used = coverage_select_ref(image, found[b], k), method
        else:  # uniform, or simignore / flow without a query
            kept, method_used = uniform_indices(n, k, device=image.device), "uniform"
        rows = merge_dropped(image, kept) if merge[b] and k < n else image[kept]
        out.append(Selection(kept=kept, rows=rows, scores=found[b], method=method_used))
    return out


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack [n_b, D] tensors into [sum n_b, D]; a view, not a copy, when they already lie back
    to back in one buffer (the per-image slices of one projector output): the copy would move as
    many bytes as the whole relevance pass."""
    if len(tensors) == 1:
        return tensors[0]
    rows = [t for t in tensors if t.shape[0] > 0]
    if rows and all(t.dim() == 2 for t in tensors):
        first = rows[0]
        size = first.element_size()
        adjacent = all(
            t.dtype == first.dtype
            and t.device == first.device
            and t.stride() == first.stride()
            and t.shape[1] == first.shape[1]
            and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            for t in rows
        ) and all(
            nxt.data_ptr() == cur.data_ptr() + cur.shape[0] * cur.stride(0) * size
            for cur, nxt in zip(rows, rows[1:])
        )
        if adjacent:
            total = sum(t.shape[0] for t in rows)
            return first.as_strided((total, first.shape[1]), first.stride())
    return torch.cat(tensors)


def row_offsets(lengths: Sequence[int], device) -> torch.Tensor:
    """[B + 1] int64 offsets of back-to-back blocks of ``lengths`` rows, on ``device``."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return to_device(out, torch.device(device))
