"""The pruning options: one declaration each (``OPTIONS``), and everything that follows from it.

A request's options arrive through two doors: the offline engine (``mm_processor_kwargs``, also
vLLM's ``--mm-processor-kwargs``) and our HTTP server (the ``pruning`` object, or raw
``mm_processor_kwargs``). Both check values with the same :class:`Option` and the same
cross-option rules (``check_query_count``, ``check_prune_layer``, flow needs diagnostics), so a
bad value gets the same answer at either door: a ``ValueError`` (``PruneOptionError``) naming the
option and what it accepts, which the server turns into an HTTP 400 naming the field.

From the declarations come: :class:`PruneOptions` and its parser (``from_kwargs``), the kwargs
that go into vLLM's multimodal hash, the per-image tensor fields the processor hands the model
(``image_fields`` / ``read_image_fields``), the server's ``pruning`` schema
(``server/schemas.py``), the ``lvlm-prune serve`` flags (``server/cli.py``) and the options table
in ``docs/serving.md`` (``python -m lvlm_prune.vllm_plugin.options --write docs/serving.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from lvlm_prune.kernels import PRUNE_METHODS, check_keep_ratio

MAX_QUERY_TOKENS = 512
"""The relevance query is cut to its last this-many tokens: a query is [T, D] per image in the
worker, and T must not be the client's to choose without bound."""
MAX_QUERY_CHARS = 20_000
"""A query string is at most this long at every door: only its last ``MAX_QUERY_TOKENS`` tokens
are used, and tokenising a longer one is work the client should not be able to ask for."""

DEFAULT_PRUNE_LAYER = 2
"""Decoder layers the ``flow`` method's scout runs (see vllm_plugin/worker/flow.py), unless the
checkpoint declares its own (``CHECKPOINT_DEFAULTS``)."""
MAX_PRUNE_LAYER = 1024
"""A bound for parsing; the model's own layer count is checked where the model is known
(``check_prune_layer``)."""


class PruneOptionError(ValueError):
    """A bad pruning option; the message names the option and the allowed values."""

    def __init__(self, kwarg: str, message: str) -> None:
        super().__init__(message)
        self.kwarg = kwarg


# ---- kinds of values ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
    """What values an option accepts (``rule``, in words), and how one is stored in an int64
    element of a per-image tensor."""

    rule: str
    """Completes "NAME must be ...": the message of every refused value, at every door."""

    def normalise(self, value: object) -> object:
        """The accepted value, normalised; raises ValueError (any message) when refused."""
        raise NotImplementedError

    def from_text(self, text: str) -> object:
        """A command-line value, before ``normalise``."""
        return text

    def invalid_examples(self) -> tuple[object, ...]:
        """Values this kind refuses (wrong type, out of range): the doors tests send them."""
        raise NotImplementedError

    def encode(self, value: object) -> int:
        return 0 if value is None else int(value)

    def decode(self, element: int) -> object:
        return element


@dataclasses.dataclass(frozen=True)
class Ratio(Kind):
    rule: str = "a number in (0, 1]"

    def normalise(self, value):
        return check_keep_ratio(value)  # the kernels' own rule, the one keep_count relies on

    def from_text(self, text):
        return float(text)

    def invalid_examples(self):
        return ("0.5", True, 0, -1, 1.5)


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[object, ...] = ()

    def normalise(self, value):
        # By type as well as value: True is not 1, 1 is not True.
        if not any(type(value) is type(c) and value == c for c in self.choices):
            raise ValueError(value)
        return value

    def invalid_examples(self):
        return ("no-such-choice", 0)

    def encode(self, value):
        return self.choices.index(value)

    def decode(self, element):
        return self.choices[element]


@dataclasses.dataclass(frozen=True)
class Flag(Kind):
    rule: str = "true or false"

    def normalise(self, value):
        if not isinstance(value, bool):
            raise ValueError(value)
        return value

    def from_text(self, text):
        return {"true": True, "false": False}.get(text.lower(), text)

    def invalid_examples(self):
        return (1, "true")

    def decode(self, element):
        return bool(element)


@dataclasses.dataclass(frozen=True)
class Integer(Kind):
    low: int = 0
    high: int = 0

    def normalise(self, value):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not self.low <= value <= self.high
        ):
            raise ValueError(value)
        return value

    def from_text(self, text):
        return int(text)

    def invalid_examples(self):
        return (str(self.low), float(self.low), True, self.low - 1, self.high + 1)


@dataclasses.dataclass(frozen=True)
class Queries(Kind):
    """One string for every image, or a list with one per image (normalised to a tuple)."""

    rule: str = (
        f"a string or a list of strings (one per image), each at most {MAX_QUERY_CHARS} characters"
    )
    max_chars: int | None = MAX_QUERY_CHARS

    def normalise(self, value):
        if isinstance(value, (list, tuple)) and all(isinstance(q, str) for q in value):
            value = tuple(value)
        elif not isinstance(value, str):
            raise ValueError(value)
        if self.max_chars is not None:
            for query in (value,) if isinstance(value, str) else value:
                if len(query) > self.max_chars:
                    raise ValueError(f"at most {self.max_chars} characters per string")
        return value

    def invalid_examples(self):
        return (5, ["a", 5]) + (("x" * (self.max_chars + 1),) if self.max_chars else ())


# ---- the declarations -----------------------------------------------------------------------


class ImageInfo(NamedTuple):
    """What the processor knows of one image when it builds the per-image fields."""

    keep: int
    """K, the image's kept token count."""
    query_ids: tuple[int, ...]
    tokens: int = 0
    """N, the image's token count before pruning."""


@dataclasses.dataclass(frozen=True)
class ImageField:
    """A per-image tensor the processor hands the model (batched over images; vLLM batches
    items of different requests together, so every processed image carries every field)."""

    name: str
    of: Callable[[PruneOptions, ImageInfo], object] | None = None
    """The image's value; None: the option's value."""
    ragged: bool = False
    """One int64 tensor per image (token ids) rather than one int64 element per image."""
    integer: bool = False
    """The value is an int stored as is, not in the option's own encoding (a count)."""
    keep_on_cpu: bool = False
    """Kept with the request when the scheduler strips a prefix-cached image's data: a field
    ``get_mrope_input_positions`` reads (vLLM keeps only such fields for M-RoPE models)."""


def _always(opts) -> bool:
    return True


def _when_set(name: str) -> Callable[[PruneOptions], bool]:
    def when_set(opts) -> bool:
        return getattr(opts, name) != _BY_NAME[name].default

    return when_set


@dataclasses.dataclass(frozen=True)
class Option:
    """One pruning option: everything every door and every process needs to know about it."""

    name: str
    """Its attribute of ``PruneOptions`` (or, for server-only ones, an internal name)."""
    kind: Kind | None
    """Its values; None: set by our own code, never parsed from a client."""
    default: object
    doc: str
    kwarg: str | None = None
    """Its key in ``mm_processor_kwargs`` (offline engine, raw kwargs over HTTP)."""
    api: str | None = None
    """Its key in the server's ``pruning`` object."""
    who_sets: Literal["client", "server"] = "client"
    """Over HTTP: "server" means a client's own value is refused (vLLM's gate, server/plugin.py)."""
    hashed: Callable[[PruneOptions], bool] | None = None
    """When the value goes into vLLM's multimodal hash (the normalised kwargs the processor's
    later hooks read); None: never."""
    field: ImageField | None = None
    flag: str | None = None
    """The ``lvlm-prune serve`` flag that sets it server-wide."""
    default_doc: str | None = None
    """The default in words, for the docs table (else ``default``)."""

    def parse(self, value: object, *, name: str | None = None) -> object:
        """The normalised value.

        Args:
            name: what the message calls the option (default: its kwarg).

        Raises:
            PruneOptionError: naming the option and stating the rule.
        """
        kind = self.kind
        try:
            return kind.normalise(value)
        except (TypeError, ValueError, OverflowError):
            name = name or self.kwarg or self.api
            raise PruneOptionError(
                self.kwarg or self.api, f"{name} must be {kind.rule}, got {_short(value)}"
            ) from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-12:]


KEEP_RATIO = "keep_ratio"
METHOD = "prune_method"
MERGE = "prune_merge"
QUERY = "prune_query"
SEED = "prune_seed"
DIAGNOSTICS = "prune_diagnostics"
FLOW = "prune_flow"
PRUNE_LAYER = "prune_layer"
TAG = "prune_tag"
QUERY_IDS = "prune_query_ids"
POSITIONS = "prune_positions"

KEEP_FIELD = "prune_keep"
QUERY_FIELD = "prune_query_ids"
METHOD_FIELD = "prune_method_id"
MERGE_FIELD = "prune_merge"
SEED_FIELD = "prune_seed"
DIAGNOSTICS_FIELD = "prune_diagnostics_id"
FLOW_FIELD = "prune_flow"
LAYER_FIELD = "prune_layer"
POSITION_SPAN_FIELD = "prune_position_span"
"""Positions an image's tokens span in the prompt: N under original positions, K under compact
(``vllm_plugin/positions.py``)."""

POSITION_RULES = ("original", "compact")

OPTIONS: tuple[Option, ...] = (
    Option(
        "keep_ratio",
        Ratio(),
        1.0,
        "Share of each image's tokens kept; 1.0 is stock vLLM.",
        kwarg=KEEP_RATIO,
        api="keep_ratio",
        hashed=_always,
        field=ImageField(KEEP_FIELD, of=lambda opts, image: image.keep),
        flag="--keep-ratio",
        default_doc="1.0 (or the server's)",
    ),
    Option(
        "method",
        Choice(f"one of {list(PRUNE_METHODS)}", choices=PRUNE_METHODS),
        "simignore",
        "`simignore` (question-relevant), `uniform` (evenly spaced), `random` (seeded baseline), "
        "`flow` (the tokens the question attends to most in a shallow decoder layer), `cover` "
        "(half question-relevant, half covering the rest of the image: for questions that name "
        "a place, not a thing).",
        kwarg=METHOD,
        api="method",
        hashed=_always,
        field=ImageField(METHOD_FIELD),
        flag="--prune-method",
        default_doc="`simignore` (or the server's)",
    ),
    Option(
        "merge",
        Flag(),
        False,
        "Fold each dropped token into its most similar kept token.",
        kwarg=MERGE,
        api="merge",
        hashed=_when_set("merge"),
        field=ImageField(MERGE_FIELD),
    ),
    Option(
        "positions",
        Choice('"original" or "compact"', choices=POSITION_RULES),
        "original",
        "1-D RoPE families (LLaVA-1.5, NeXT, OneVision): `original` puts each kept token at its unpruned position and "
        "the text after the image where it is unpruned; `compact` gives the kept tokens "
        "consecutive positions. M-RoPE families (Qwen) are always original: a request's "
        "`compact` is refused there, the server-wide value applies to 1-D families only.",
        kwarg=POSITIONS,
        api="positions",
        # Positions move the KV of every later token; with nothing dropped both rules agree.
        hashed=lambda opts: opts.prunes,
        field=ImageField(
            POSITION_SPAN_FIELD,
            of=lambda opts, image: image.tokens if opts.positions == "original" else image.keep,
            integer=True,
            keep_on_cpu=True,
        ),
        flag="--prune-positions",
        default_doc='`"original"` (or the server\'s)',
    ),
    Option(
        "diagnostics",
        Choice('true, false, "heatmap" or "flow"', choices=(False, True, "heatmap", "flow")),
        False,
        'true: scores, kept indices and top query tokens per image; `"heatmap"`: also a PNG; '
        '`"flow"`: also the information flow through the language model.',
        api="diagnostics",
    ),
    Option(
        "query",
        Queries(),
        None,
        "Relevance query: one string for every image, or a list with one per image in prompt "
        f"order; the last {MAX_QUERY_TOKENS} tokens of each are used.",
        kwarg=QUERY,
        api="query",
        default_doc="each image's own question (server); the prompt's text (offline)",
    ),
    Option(
        "requery",
        Flag(),
        False,
        "Re-select every image for the latest user message's text (the prefix cache then "
        "misses from the first image on).",
        api="requery",
    ),
    Option(
        "seed",
        Integer("a 64-bit integer", low=-(2**63), high=2**63 - 1),
        None,
        "Seed of the `random` method.",
        kwarg=SEED,
        api="seed",
        hashed=_when_set("seed"),
        field=ImageField(SEED_FIELD, of=lambda opts, image: opts.seed_for(image.query_ids)),
        default_doc="derived from the query",
    ),
    Option(
        "prune_layer",
        Integer(
            f"an integer in [1, {MAX_PRUNE_LAYER}] (decoder layers the flow method's scout runs)",
            low=1,
            high=MAX_PRUNE_LAYER,
        ),
        None,
        "`flow` method: decoder layers its scout runs, at most the model's.",
        kwarg=PRUNE_LAYER,
        api="prune_layer",
        hashed=lambda opts: opts.method == "flow",
        field=ImageField(LAYER_FIELD, of=lambda opts, image: opts.scout_layers),
        default_doc=f"the model's declared depth, else {DEFAULT_PRUNE_LAYER}",
    ),
    Option(
        "diagnostics_id",
        Integer("a positive 63-bit integer id", low=1, high=2**63 - 1),
        None,
        "Offline: an id of yours to fetch the selection's diagnostics by. Through the server "
        "it is set from `diagnostics`.",
        kwarg=DIAGNOSTICS,
        who_sets="server",
        hashed=_when_set("diagnostics_id"),
        field=ImageField(DIAGNOSTICS_FIELD),
    ),
    Option(
        "flow",
        Flag(),
        False,
        "Keep what flow diagnostics need, under the diagnostics id (offline: needs "
        f"`{DIAGNOSTICS}`; the server supplies the id).",
        kwarg=FLOW,
        hashed=_when_set("flow"),
        field=ImageField(FLOW_FIELD),
    ),
    Option(
        "tag",
        None,
        None,
        "The server's key to read back the request's token counts; never hashed.",
        kwarg=TAG,
        who_sets="server",
    ),
    Option(
        "query_ids",
        None,
        None,
        "Each image's query token ids, set by the processor: each image is hashed with its own "
        "entry only, so its cache entries are keyed by its own question.",
        kwarg=QUERY_IDS,
        who_sets="server",
        hashed=_always,
        field=ImageField(QUERY_FIELD, of=lambda opts, image: image.query_ids, ragged=True),
    ),
)
_BY_NAME = {opt.name: opt for opt in OPTIONS}

BY_KWARG: dict[str, Option] = {opt.kwarg: opt for opt in OPTIONS if opt.kwarg}
BY_API: dict[str, Option] = {opt.api: opt for opt in OPTIONS if opt.api}
PARSED = tuple(opt for opt in OPTIONS if opt.kwarg and opt.kind)
"""The kwargs ``PruneOptions.from_kwargs`` reads (the attributes of ``PruneOptions``)."""
OWN_KWARGS = frozenset(BY_KWARG)
"""Everything of ours that must never reach the HF processor."""
IMAGE_FIELDS = tuple(opt for opt in OPTIONS if opt.field)
FIELDS = tuple(opt.field.name for opt in IMAGE_FIELDS)
CPU_FIELDS = frozenset(opt.field.name for opt in IMAGE_FIELDS if opt.field.keep_on_cpu)
FLAGS = tuple(opt for opt in OPTIONS if opt.flag)

CHECKPOINT_DEFAULTS = "lvlm_prune"
"""A checkpoint's config.json may carry ``{"lvlm_prune": {"prune_layer": N}}``: the scout depth
that suits that model, since a scout past the model's cliff layer ranks by attention that no
longer reads the image (lvlm-prune-shapes declares 1). Server-wide and per-request values win."""
CHECKPOINT_KWARGS = (PRUNE_LAYER,)
"""What a checkpoint may declare: settings of the model, not the serving policy (how much to keep
stays the operator's and the client's)."""


# ---- the parsed options ---------------------------------------------------------------------


class _Methods:
    """What ``PruneOptions`` (generated from ``PARSED``) does beyond holding the values."""

    @property
    def prunes(self) -> bool:
        return self.keep_ratio < 1.0

    @property
    def active(self) -> bool:
        """Whether the request needs the selection at all (pruning, or diagnostics of it)."""
        return self.prunes or self.diagnostics_id is not None

    @property
    def scout_layers(self) -> int:
        """Decoder layers the ``flow`` method's scout runs."""
        return self.prune_layer if self.prune_layer is not None else DEFAULT_PRUNE_LAYER

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> PruneOptions:
        """Validate our kwargs out of merged ``mm_processor_kwargs`` (others are ignored).

        Raises:
            PruneOptionError: a value an option refuses, or a rule between options broken.
        """
        values = {
            opt.name: opt.parse(kwargs[opt.kwarg])
            for opt in PARSED
            if kwargs.get(opt.kwarg) is not None
        }
        opts = cls(**values)
        check_flow_has_diagnostics(opts)
        return opts

    @classmethod
    def from_hashed(cls, kwargs: Mapping[str, object]) -> PruneOptions:
        """The options of kwargs ``hashed_kwargs`` wrote (normalised in the processor's
        ``apply``): read, not checked again."""
        return cls(
            **{
                opt.name: kwargs.get(opt.kwarg, opt.default)
                for opt in PARSED
                if opt.hashed is not None
            }
        )

    def check_layers(self, num_layers: int) -> None:
        """``prune_layer`` (or, for the ``flow`` method, its default) against the model's
        decoder layers (``check_prune_layer``)."""
        check_prune_layer(
            self.scout_layers if self.method == "flow" else self.prune_layer, num_layers
        )

    def queries_for(self, num_images: int) -> tuple[str, ...] | None:
        """The query of each image (None: the prompt's text, for every image).

        Raises:
            PruneOptionError: a list of queries whose length is not the number of images.
        """
        if self.query is None or isinstance(self.query, str):
            return None if self.query is None else (self.query,) * num_images
        check_query_count(self.query, num_images)
        return self.query

    def hashed_kwargs(self, query_ids: Sequence[Sequence[int]]) -> dict[str, object]:
        """The normalised kwargs that go into vLLM's multimodal hash: the options every image
        shares, and each image's query ids (``query_ids[i]`` for image i)."""
        out = {
            opt.kwarg: getattr(self, opt.name)
            for opt in PARSED
            if opt.hashed is not None and opt.hashed(self)
        }
        out[QUERY_IDS] = tuple(tuple(ids) for ids in query_ids)
        return out

    def seed_for(self, query_ids: Sequence[int]) -> int:
        """The ``random`` method's seed for an image: ``prune_seed``, else drawn from its query."""
        return self.seed if self.seed is not None else query_seed(query_ids)


PruneOptions = dataclasses.make_dataclass(
    "PruneOptions",
    [(opt.name, object, dataclasses.field(default=opt.default)) for opt in PARSED],
    bases=(_Methods,),
    frozen=True,
    namespace={"__doc__": "A request's pruning options, checked (one attribute per ``PARSED``)."},
)
PruneOptions.__module__ = __name__


# ---- rules between options and the model ----------------------------------------------------


def check_flow_has_diagnostics(opts: PruneOptions) -> None:
    if opts.flow and opts.diagnostics_id is None:
        raise PruneOptionError(
            FLOW, f"{FLOW} needs {DIAGNOSTICS}: the id its flow diagnostics are fetched by"
        )


def check_query_count(query: Sequence[str], num_images: int, *, name: str = QUERY) -> None:
    """A list of queries has one per image in prompt order."""
    if len(query) != num_images:
        raise PruneOptionError(
            QUERY,
            f"{name} has {len(query)} queries for {num_images} image(s): give one string for "
            "every image, or one string per image in prompt order",
        )


def check_prune_layer(prune_layer: int | None, num_layers: int, *, name: str = PRUNE_LAYER) -> None:
    """A scout cannot run more decoder layers than the model has (whatever the method)."""
    if prune_layer is not None and prune_layer > num_layers:
        raise PruneOptionError(
            PRUNE_LAYER,
            f"{name} must be at most the model's {num_layers} decoder layers, got {prune_layer}",
        )


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
        PruneOptions.from_kwargs(declared).check_layers(
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


# ---- per-image fields -----------------------------------------------------------------------


def image_fields(opts: PruneOptions, images: Sequence[ImageInfo]) -> dict[str, object]:
    """The per-image tensors of ``IMAGE_FIELDS`` for the processor's output."""
    out: dict[str, object] = {}
    for opt in IMAGE_FIELDS:
        spec = opt.field
        values = [spec.of(opts, image) if spec.of else getattr(opts, opt.name) for image in images]
        if spec.ragged:
            out[spec.name] = [torch.tensor(v, dtype=torch.int64) for v in values]
        else:
            kind = opt.kind if opt.kind and not spec.integer else Kind("")
            out[spec.name] = torch.tensor([kind.encode(v) for v in values], dtype=torch.int64)
    return out


def read_image_fields(kwargs: dict[str, object]) -> dict[str, list] | None:
    """Pop ``IMAGE_FIELDS`` out of the model's kwargs, decoded per image (field name -> one value
    per image; ragged fields: one int64 tensor per image). None when the images carry none
    (processed without our processor)."""
    raw = {opt.field.name: kwargs.pop(opt.field.name, None) for opt in IMAGE_FIELDS}
    if raw[KEEP_FIELD] is None:
        return None
    out: dict[str, list] = {}
    for opt in IMAGE_FIELDS:
        field = raw[opt.field.name]
        if opt.field.ragged:
            # Batched fields of equal shape arrive stacked [B, T]; of different T, as a list.
            out[opt.field.name] = [t.reshape(-1) for t in field]
        else:
            kind = opt.kind if opt.kind and not opt.field.integer else Kind("")
            out[opt.field.name] = [kind.decode(x) for x in _elements(field)]
    return out


def _elements(field) -> list[int]:
    if isinstance(field, torch.Tensor):
        return [int(x) for x in field.reshape(-1).tolist()]
    return [int(torch.as_tensor(x).reshape(-1)[0]) for x in field]


# ---- helpers of the processor ---------------------------------------------------------------


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


# ---- the docs table -------------------------------------------------------------------------

TABLE_START = "<!-- options-table:start -->"
TABLE_END = "<!-- options-table:end -->"


def markdown_table() -> str:
    """The options table of docs/serving.md, generated from ``OPTIONS``."""

    def code(text: str | None) -> str:
        return f"`{text}`" if text else "—"

    def default(opt: Option) -> str:
        if opt.default_doc:
            return opt.default_doc
        return "—" if opt.default is None else f"`{json.dumps(opt.default)}`"

    lines = [
        "| `pruning` (server) | `mm_processor_kwargs` | `lvlm-prune serve` | values | default "
        "| what it does |",
        "|---|---|---|---|---|---|",
    ]
    for opt in OPTIONS:
        kwarg = code(opt.kwarg)
        if opt.kwarg and opt.who_sets == "server":
            kwarg += " (set by the server)" if opt.kind is None else " (offline only)"
        values = opt.kind.rule if opt.kind else "—"
        cells = [code(opt.api), kwarg, code(opt.flag), values, default(opt), opt.doc]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def with_table(text: str) -> str:
    """``text`` (a markdown document) with the table between its marker lines replaced."""
    pattern = re.compile(re.escape(TABLE_START) + r"\n.*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {TABLE_START} ... {TABLE_END} lines")
    return pattern.sub(lambda _: f"{TABLE_START}\n{markdown_table()}{TABLE_END}", text, count=1)


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table())
        return 0
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        path.write_text(with_table(path.read_text()))
        return 0
    print("usage: python -m lvlm_prune.vllm_plugin.options (--markdown | --write DOC.md)")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
