"""The pruning options a request (or the server-wide default) passes in ``mm_processor_kwargs``.

One parser for every way the options arrive (``--mm-processor-kwargs``, per-request
``mm_processor_kwargs``, our server's ``pruning`` object), so every path rejects the same bad values
with the same message: the kwarg's name and what it accepts. vLLM's OpenAI server turns the
``ValueError`` into an HTTP 400.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

from lvlm_prune.kernels import PRUNE_METHODS, check_keep_ratio

KEEP_RATIO = "keep_ratio"
METHOD = "prune_method"
MERGE = "prune_merge"
QUERY = "prune_query"
SEED = "prune_seed"
DIAGNOSTICS = "prune_diagnostics"
FLOW = "prune_flow"
PRUNE_LAYER = "prune_layer"

USER_KWARGS = (KEEP_RATIO, METHOD, MERGE, QUERY, SEED, DIAGNOSTICS, FLOW, PRUNE_LAYER)
"""The kwargs users set."""

TAG = "prune_tag"
"""Set by our server to read back the request's token counts (accounting.COUNTS); never hashed."""

QUERY_IDS = "prune_query_ids"
"""Set by the processor, never by users: each image's query token ids, one tuple per image in
prompt order. The processor hashes every image with its own entry only, so an image's processor,
encoder and prefix cache entries are keyed by its own question, and a later image with another
question leaves them alone."""

OWN_KWARGS = frozenset((*USER_KWARGS, TAG, QUERY_IDS))
"""Everything of ours that must never reach the HF processor."""

MAX_QUERY_TOKENS = 512
"""The relevance query is cut to its last this-many tokens: a query is [T, D] per image in the
worker, and T must not be the client's to choose without bound."""

DEFAULT_PRUNE_LAYER = 2
"""Decoder layers the ``flow`` method's scout runs (see vllm_plugin/worker/flow.py), unless the
checkpoint declares its own (``CHECKPOINT_DEFAULTS``)."""
CHECKPOINT_DEFAULTS = "lvlm_prune"
"""A checkpoint's config.json may carry ``{"lvlm_prune": {"prune_layer": N}}``: the scout depth
that suits that model, since a scout past the model's cliff layer ranks by attention that no
longer reads the image (lvlm-prune-shapes declares 1). Server-wide and per-request values win."""
CHECKPOINT_KWARGS = (PRUNE_LAYER,)
"""What a checkpoint may declare: settings of the model, not the serving policy (how much to keep
stays the operator's and the client's)."""
MAX_PRUNE_LAYER = 1024
"""A bound for parsing; the model's own layer count is checked where the model is known."""


# Per-image fields the processor adds for the model. Every processed image carries all of them
# (keep_ratio 1.0 included), so items of different requests batch together in the worker.
KEEP_FIELD = "prune_keep"
QUERY_FIELD = "prune_query_ids"
METHOD_FIELD = "prune_method_id"
MERGE_FIELD = "prune_merge"
SEED_FIELD = "prune_seed"
DIAGNOSTICS_FIELD = "prune_diagnostics_id"
FLOW_FIELD = "prune_flow"
LAYER_FIELD = "prune_layer"
FIELDS = (
    KEEP_FIELD,
    QUERY_FIELD,
    METHOD_FIELD,
    MERGE_FIELD,
    SEED_FIELD,
    DIAGNOSTICS_FIELD,
    FLOW_FIELD,
    LAYER_FIELD,
)


class PruneOptionError(ValueError):
    """A bad pruning option; the message names the kwarg and the allowed values."""

    def __init__(self, kwarg: str, message: str) -> None:
        super().__init__(message)
        self.kwarg = kwarg


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    keep_ratio: float = 1.0
    method: str = "simignore"
    merge: bool = False
    query: str | tuple[str, ...] | None = None
    """One query for every image, or one per image in prompt order; None: the prompt's text."""
    seed: int | None = None
    diagnostics_id: int | None = None
    flow: bool = False
    """Keep what the flow diagnostics pass needs (the kept rows) under ``diagnostics_id``."""
    prune_layer: int = DEFAULT_PRUNE_LAYER
    """``flow`` method: decoder layers the scout runs; it ranks by the last one's attention."""

    @property
    def prunes(self) -> bool:
        return self.keep_ratio < 1.0

    @property
    def active(self) -> bool:
        """Whether the request needs the selection at all (pruning, or diagnostics of it)."""
        return self.prunes or self.diagnostics_id is not None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> PruneOptions:
        """Validate our kwargs out of merged ``mm_processor_kwargs`` (others are ignored)."""
        opts = cls()
        if (v := kwargs.get(KEEP_RATIO)) is not None:
            try:
                opts = dataclasses.replace(opts, keep_ratio=check_keep_ratio(v))
            except ValueError as err:
                raise PruneOptionError(KEEP_RATIO, str(err)) from None
        if (v := kwargs.get(METHOD)) is not None:
            if v not in PRUNE_METHODS:
                raise PruneOptionError(
                    METHOD, f"{METHOD} must be one of {list(PRUNE_METHODS)}, got {v!r}"
                )
            opts = dataclasses.replace(opts, method=v)
        if (v := kwargs.get(MERGE)) is not None:
            if not isinstance(v, bool):
                raise PruneOptionError(MERGE, f"{MERGE} must be true or false, got {v!r}")
            opts = dataclasses.replace(opts, merge=v)
        if (v := kwargs.get(QUERY)) is not None:
            if isinstance(v, (list, tuple)) and all(isinstance(q, str) for q in v):
                v = tuple(v)
            elif not isinstance(v, str):
                raise PruneOptionError(
                    QUERY,
                    f"{QUERY} must be a string or a list of strings (one per image), got {v!r}",
                )
            opts = dataclasses.replace(opts, query=v)
        if (v := kwargs.get(SEED)) is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not -(2**63) <= v < 2**63:
                raise PruneOptionError(SEED, f"{SEED} must be a 64-bit integer, got {v!r}")
            opts = dataclasses.replace(opts, seed=v)
        if (v := kwargs.get(DIAGNOSTICS)) is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**63:
                raise PruneOptionError(
                    DIAGNOSTICS, f"{DIAGNOSTICS} must be a positive 63-bit integer id, got {v!r}"
                )
            opts = dataclasses.replace(opts, diagnostics_id=v)
        if (v := kwargs.get(FLOW)) is not None:
            if not isinstance(v, bool):
                raise PruneOptionError(FLOW, f"{FLOW} must be true or false, got {v!r}")
            if v and opts.diagnostics_id is None:
                raise PruneOptionError(
                    FLOW, f"{FLOW} needs {DIAGNOSTICS}: the id its flow diagnostics are fetched by"
                )
            opts = dataclasses.replace(opts, flow=v)
        if (v := kwargs.get(PRUNE_LAYER)) is not None:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PRUNE_LAYER:
                raise PruneOptionError(
                    PRUNE_LAYER,
                    f"{PRUNE_LAYER} must be an integer in [1, {MAX_PRUNE_LAYER}] (decoder layers "
                    f"the flow method's scout runs), got {v!r}",
                )
            opts = dataclasses.replace(opts, prune_layer=v)
        return opts

    def check_layers(self, num_layers: int) -> None:
        """``prune_layer`` against the served model's decoder layers (``flow`` method only).

        Raises:
            PruneOptionError: the scout would need more layers than the model has.
        """
        if self.method == "flow" and self.prune_layer > num_layers:
            raise PruneOptionError(
                PRUNE_LAYER,
                f"{PRUNE_LAYER} must be at most the model's {num_layers} decoder layers, got "
                f"{self.prune_layer}",
            )

    def queries_for(self, num_images: int) -> tuple[str, ...] | None:
        """The query of each image (None: the prompt's text, for every image).

        Raises:
            PruneOptionError: a list of queries whose length is not the number of images.
        """
        if self.query is None or isinstance(self.query, str):
            return None if self.query is None else (self.query,) * num_images
        if len(self.query) != num_images:
            raise PruneOptionError(
                QUERY,
                f"{QUERY} has {len(self.query)} queries for {num_images} image(s): give one "
                "string for every image, or one string per image in prompt order",
            )
        return self.query

    def hashed_kwargs(self, query_ids: Sequence[Sequence[int]]) -> dict[str, object]:
        """The normalised kwargs that go into vLLM's multimodal hash: the options every image
        shares, and each image's query ids (``query_ids[i]`` for image i)."""
        out: dict[str, object] = {KEEP_RATIO: self.keep_ratio, METHOD: self.method}
        if self.merge:
            out[MERGE] = True
        out[QUERY_IDS] = tuple(tuple(ids) for ids in query_ids)
        if self.seed is not None:
            out[SEED] = self.seed
        if self.diagnostics_id is not None:
            out[DIAGNOSTICS] = self.diagnostics_id
        if self.flow:
            out[FLOW] = True
        if self.method == "flow":
            out[PRUNE_LAYER] = self.prune_layer
        return out

    def seed_for(self, query_ids: Sequence[int]) -> int:
        """The ``random`` method's seed for an image: ``prune_seed``, else drawn from its query."""
        return self.seed if self.seed is not None else query_seed(query_ids)


def checkpoint_defaults(hf_config) -> dict[str, object]:
    """The kwargs the checkpoint's config declares (``CHECKPOINT_DEFAULTS``), validated.

    Raises:
        PruneOptionError: a key outside ``CHECKPOINT_KWARGS`` or a bad value.
    """
    declared = getattr(hf_config, CHECKPOINT_DEFAULTS, None) or {}
    unknown = set(declared) - set(CHECKPOINT_KWARGS) if isinstance(declared, Mapping) else None
    if unknown is None or unknown:
        raise PruneOptionError(
            CHECKPOINT_DEFAULTS,
            f"the model's config.json {CHECKPOINT_DEFAULTS!r} may set only "
            f"{list(CHECKPOINT_KWARGS)}, got {declared!r}",
        )
    try:
        declared_opts = PruneOptions.from_kwargs(declared)
        dataclasses.replace(declared_opts, method="flow").check_layers(
            hf_config.get_text_config().num_hidden_layers
        )
    except PruneOptionError as err:
        raise PruneOptionError(
            CHECKPOINT_DEFAULTS, f"the model's config.json {CHECKPOINT_DEFAULTS!r}: {err}"
        ) from None
    return dict(declared)


def default_prune_layer(hf_config) -> int:
    """The flow scout's depth when a request names none: the checkpoint's, else the default."""
    return checkpoint_defaults(hf_config).get(PRUNE_LAYER, DEFAULT_PRUNE_LAYER)


def select_images(hashed: Mapping[str, object], indices: Sequence[int]) -> dict[str, object]:
    """The hashed kwargs for a subset of the images (the processor-cache misses), in order."""
    out = dict(hashed)
    if QUERY_IDS in out:
        out[QUERY_IDS] = tuple(out[QUERY_IDS][i] for i in indices)
    return out


def query_seed(query_ids: Sequence[int]) -> int:
    """A per-question seed for ``random``: the same request always draws the same tokens."""
    digest = hashlib.sha256(",".join(map(str, query_ids)).encode()).hexdigest()
    return int(digest[:15], 16)


def without_own_kwargs(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in OWN_KWARGS}
