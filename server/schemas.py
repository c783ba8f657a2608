"""The ``pruning`` object: what a client may ask for, and what it gets back.

Requests validate strictly (no "0.5" for a number, no unknown keys), so a typo is a 400 that names
the field instead of a silently unpruned request. pydantic checks the types; the value rules are
``PruneOptions``', the same for this object, raw ``mm_processor_kwargs`` and the offline engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from lvlm_prune.kernels import PRUNE_METHODS
from lvlm_prune.vllm_plugin import options

QueryText = Annotated[StrictStr, Field(max_length=20_000)]


class PruningRequest(BaseModel):
    """``extra_body={"pruning": {...}}`` on /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="forbid")

    keep_ratio: Annotated[float, Field(strict=True)] | None = None
    """Share of each image's tokens kept, in (0, 1]; default: the server's (1.0 unless set)."""
    method: Annotated[StrictStr, Field(json_schema_extra={"enum": list(PRUNE_METHODS)})] | None = (
        None
    )
    merge: StrictBool | None = None
    diagnostics: bool | Literal["heatmap", "flow"] = False
    """True: scores, kept indices and top query tokens per image. "heatmap": also a PNG. "flow":
    what true gives, and the information flow through the language model (``flow``)."""
    query: QueryText | list[QueryText] | None = None
    """Relevance query: one string for every image, or one per image in prompt order. Default:
    each image's own question, the text of the user message that carries it (else of the next
    user message with text). The last 512 tokens of each are used."""
    requery: StrictBool = False
    """Re-select every image for the latest user message's text. The image's hash, kept tokens
    and prompt then change, so the vision tower runs again and the prefix cache misses from the
    first image on."""
    seed: StrictInt | None = None
    prune_layer: StrictInt | None = None
    """``method: "flow"``: decoder layers the scout runs (default: the model's declared depth,
    else 2); it ranks the image tokens by the attention the question pays them in the last of
    them."""

    @field_validator("keep_ratio", "method", "seed", "prune_layer")
    @classmethod
    def _in_range(cls, value, info):
        kwarg = {
            "keep_ratio": options.KEEP_RATIO,
            "method": options.METHOD,
            "seed": options.SEED,
            "prune_layer": options.PRUNE_LAYER,
        }[info.field_name]
        try:
            options.PruneOptions.from_kwargs({kwarg: value})
        except options.PruneOptionError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("diagnostics", mode="before")
    @classmethod
    def _diagnostics(cls, value):
        if value is True or value is False or value in ("heatmap", "flow"):
            return value
        raise ValueError(f'must be true, false, "heatmap" or "flow", got {value!r}')

    def mm_processor_kwargs(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.keep_ratio is not None:
            out[options.KEEP_RATIO] = float(self.keep_ratio)
        if self.method is not None:
            out[options.METHOD] = self.method
        if self.merge is not None:
            out[options.MERGE] = self.merge
        if self.query is not None:
            out[options.QUERY] = self.query
        if self.seed is not None:
            out[options.SEED] = self.seed
        if self.prune_layer is not None:
            out[options.PRUNE_LAYER] = self.prune_layer
        if self.diagnostics == "flow":
            out[options.FLOW] = True
        return out


class QueryToken(BaseModel):
    token: str
    id: int
    votes: int
    """Kept image tokens for which this query token is the most similar one."""


class ImagePruning(BaseModel):
    tokens_before: int
    tokens_after: int
    method: str | None = None
    grid: list[int] | None = None
    scores: list[list[float]] | list[float] | None = None
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
    per_image: list[ImagePruning]
    flow: Flow | None = None
    """With ``diagnostics: "flow"``: the information flow through the language model."""
    flow_error: str | None = None
    """Why ``flow`` is missing when it was asked for and could not be computed."""
