"""The ``pruning`` object: what a client may ask for, and what it gets back.

Requests validate strictly (no "0.5" for a number, no unknown keys), so a typo is a 400 that names
the field instead of a silently unpruned request. The fields of ``pruning`` and their rules come
from the option declarations (``vllm_plugin/options.py``), the same for this object, raw
``mm_processor_kwargs`` and the offline engine.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from lvlm_prune.vllm_plugin import options


class _PruningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def mm_processor_kwargs(self) -> dict[str, object]:
        """The options the client gave, as ``mm_processor_kwargs`` (already normalised)."""
        out = {
            opt.kwarg: getattr(self, opt.api)
            for opt in options.BY_API.values()
            if opt.kwarg and getattr(self, opt.api) is not None
        }
        if self.diagnostics == "flow":
            out[options.FLOW] = True  # the server adds the diagnostics id it needs
        return out


def _checked(opt: options.Option):
    """The field of ``opt``: its value checked by the same ``Option.parse`` as raw kwargs."""

    def check(value: object) -> object:
        if value is None and default is None:
            return None
        try:
            return opt.parse(value, name=opt.api)
        except options.PruneOptionError as err:
            raise ValueError(str(err)) from None

    # An option the engine takes too is None when not given: the server-wide default applies.
    default = None if opt.kwarg else opt.default
    return Annotated[object, AfterValidator(check)], Field(default=default, description=opt.doc)


PruningRequest = create_model(
    "PruningRequest",
    __base__=_PruningRequest,
    __doc__="""``extra_body={"pruning": {...}}`` on /v1/chat/completions and /v1/completions; one
    field per ``options.OPTIONS`` entry with an API name.""",
    **{opt.api: _checked(opt) for opt in options.BY_API.values()},
)


class QueryToken(BaseModel):
    token: str
    id: int
    votes: int
    """Kept image tokens for which this query token is the most similar one."""


class ImageView(BaseModel):
    """A part of an image's rows laid out on its own grid (LLaVA-NeXT: the base view, then the
    crops), from ``offset`` in the image's rows."""

    view: str
    grid: list[int]
    offset: int
    newline: bool = False
    """Each grid row is followed by one newline row (which does not compete)."""


class ImagePruning(BaseModel):
    tokens_before: int
    tokens_after: int
    method: str | None = None
    grid: list[int] | None = None
    """(rows, cols) of the image's tokens; AnyRes (LLaVA-NeXT): of its base view."""
    scores: list[list[float]] | list[float | None] | None = None
    """On ``grid`` when it holds all N tokens, else flat over the N rows (null: a row that did
    not compete in the selection, AnyRes' newline rows)."""
    views: list[ImageView] | None = None
    """AnyRes: the parts of the image's rows, each on its own grid."""
    kept_indices: list[int] | None = None
    top_query_tokens: list[QueryToken] | None = None
    heatmap_png: str | None = None
    """Base64 PNG: relevance scores over the image, kept tokens outlined."""


class FlowLayer(BaseModel):
    """Shares of the last prompt token's attention (mean over heads) in one decoder layer."""

    system: float
    image: float
    question: float


class FlowMap(BaseModel):
    layer: int
    per_image: list[list[list[float | None]] | list[float | None]]
    """Per image, on its patch grid (as ``scores``): the attention the question tokens after the
    last image pay each kept image token (mean over heads and those tokens); null where dropped."""


class Flow(BaseModel):
    layers: list[FlowLayer]
    """One entry per decoder layer."""
    cliff_layer: int
    """The layer where the image's share falls most from the layer before (-1: it never falls)."""
    image_map_layers: list[FlowMap]


class PruningInfo(BaseModel):
    image_tokens_before: int
    image_tokens_after: int
    keep_ratio: float
    method: str
    merge: bool
    preset: str | None = None
    """The preset model name the request asked for (``lvlm-prune serve --preset``), if any."""
    per_image: list[ImagePruning]
    flow: Flow | None = None
    """With ``diagnostics: "flow"``: the information flow through the language model."""
    flow_error: str | None = None
    """Why ``flow`` is missing when it was asked for and could not be computed."""
