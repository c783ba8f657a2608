"""Where a pruned image's kept tokens sit: the M-RoPE position carrier, and original positions for
the 1-D RoPE families through it.

vLLM 0.32 computes a request's positions before the encoder runs; its only per-request position
hook is M-RoPE's (``get_mrope_input_positions`` once per request, ``mrope_position_delta`` for
decode), taken when ``model_config.uses_mrope``. The kept set is known only later, inside
``embed_multimodal``. So, for every family that keeps original positions:

1. ``get_mrope_input_positions`` gives every token the position it has in the *unpruned* prompt
   (``pruned_mrope_positions``: the family's own rule run on the unpruned layout, the dropped
   columns then removed): the text after an image and the decode offset are exact integers
   decided up front. Each kept image token gets the image's base position (b, b, b).
2. ``embed_multimodal`` returns, for a pruned image, the K kept rows with each one's position
   within the image appended as 6 extra channels (three coordinates as two base-256 digits,
   exact in bf16 / fp16 / fp32 and through any copy). They travel with the rows through vLLM's
   encoder cache and its per-chunk slicing, so every prefill chunk carries the offsets of exactly
   the image rows it holds.
3. ``embed_input_ids`` (called by the runner right before the forward pass, with the mask of the
   multimodal rows in the flattened batch) strips the channels and keeps (rows, offsets);
   ``forward`` adds the offsets to those rows of the positions buffer in place, before the
   language model runs.

The M-RoPE families (Qwen2.5-VL, Qwen3-VL; ``qwen2_5_vl.py``) use this as it is: an offset is the
kept token's (t, h, w) on its grid.

The 1-D RoPE families (LLaVA-1.5; LLaVA-NeXT and OneVision add the same two mixins) have no M-RoPE
of their own; vLLM gives their prompt ``num_computed_tokens + arange`` positions, so the K kept
rows would take consecutive positions and the text after the image would move up by N - K
(*compact*). *Original* positions (kept token j at its index kept[j] in the image, the text after
the image and decoding where they are unpruned) take the M-RoPE path with three identical
position rows, which is 1-D RoPE exactly: ``MRotaryEmbedding`` looks each row up in the same
cos/sin cache and takes one section of the rotary dimensions from each row, so with equal rows
every dimension gets the 1-D value. The model's ``forward`` hands its language model one of the
three rows (``MRotaryEmbedding`` computes 1-D RoPE from one row too): vLLM's compiled
``LlamaModel`` takes positions' dim 0 as the token count. How it is switched on, and why this way:

- ``model_config.uses_mrope`` reads ``mrope_section`` in the text config's rope parameters; the
  runner, the scheduler and vLLM's Llama / Mistral / Qwen2 (``get_rope``) all read it there. We
  add it to vLLM's in-memory config when the ``ModelConfig`` is built, through vLLM's own
  per-architecture config hook (``MODELS_CONFIG_MAP``, ``vllm_internals.add_model_config_hooks``,
  installed by ``register()`` before any engine config exists; the ``VllmConfig`` with the
  changed config is what the engine core and workers receive). The checkpoint stays as it is:
  transformers, and any tool that reads the checkpoint, sees its own 1-D config.
- Not the checkpoint's config.json (transformers would then run the model with M-RoPE, and a
  stock checkpoint would need editing), not ``--hf-overrides`` (every user would have to know
  it, and vLLM without our plugin would then serve the model M-RoPE-shaped but without our
  position hook), not a runner patch (a second position path beside vLLM's own).
- Only for a text model whose rope is plain (``rope_type`` "default": the one for which
  ``get_rope`` builds ``MRotaryEmbedding``); any other leaves the model 1-D and its kept tokens
  compact, and a pruned request that asks for original positions is refused by name
  (``OriginalPositionsProcessorMixin``).

Compact stays per request: the processor's per-image field ``prune_position_span`` (options.py)
is N under original positions and K under compact, and ``get_mrope_input_positions`` gives an
image whose span equals its placeholder count vLLM's own consecutive positions; its rows carry no
channels. The field is kept on the CPU with the request, so a prefix-cached image (whose data the
scheduler strips) still says how many positions it spans.

Why not vLLM's own path for pruned media (EVS, ``recompute_mrope_positions``): the runner takes
it only when ``video_pruning_rate > 0``, which switches on video pruning for every user (and
vLLM's CPU runner never sets the flag); it carries positions as floats in the embedding's dtype
(bf16: exact only to 256) and restarts the text after the media at base + cols instead of
base + max(rows, cols). Why not decide the kept positions up front: simignore's kept set depends
on the image's embeddings, which exist only after the vision tower ran, in the encoder step.
Prefix caching and chunked prefill need nothing more: positions of tokens before, after and in
an image never depend on which chunk the encoder ran in, and a re-encoded image (partial
prefix-cache hit) selects the same rows (the selection is deterministic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from vllm.inputs import MultiModalInput
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.multimodal.processing import ProcessorInputs, TimingContext

from lvlm_prune.kernels import Selection

from . import options
from .options import (
    DIAGNOSTICS_FIELD,
    FLOW_FIELD,
    POSITION_SPAN_FIELD,
    PruneOptionError,
)
from .processing.processor import PruneProcessorMixin
from .worker import diagnostics
from .worker.model import PruneModelMixin

POSITION_CHANNELS = 6
"""Extra channels of a pruned image's rows between ``embed_multimodal`` and ``embed_input_ids``:
the three coordinates // 256, then the three % 256."""

_DIGIT = 256  # integers in [0, 256] are exact in bf16 (8 significant bits)
MAX_GRID = _DIGIT * _DIGIT
"""Offsets within an image must be below this (a 65536-token-wide image)."""


# ---- the carried offsets ------------------------------------------------------------------------


def encode_positions(thw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[K, 3] non-negative int positions -> [K, 6] channels of ``dtype``, exactly."""
    return torch.cat([thw // _DIGIT, thw % _DIGIT], dim=1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """[K, 6] channels -> [3, K] int64 positions."""
    digits = channels.to(torch.int64)
    return (digits[:, :3] * _DIGIT + digits[:, 3:]).T


def pruned_mrope_positions(
    stock,
    input_tokens: Sequence[int],
    mm_features: Sequence[MultiModalFeatureSpec],
    grids: Sequence[tuple[int, int, int]],
) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of a prompt whose images may have fewer placeholders than their grid.

    ``stock(tokens, features)`` is the family's unpruned position function (vLLM's
    ``get_mrope_input_positions``); it runs on the unpruned layout (each shortened image widened
    back to t*h*w placeholders), so every text token and the decode offset are exactly what they
    are without pruning. The columns of dropped tokens are then removed; each kept image token is
    left at its image's base position (b, b, b), to which ``forward`` adds the kept token's own
    offset.

    Args:
        stock: the unpruned computation.
        input_tokens: the prompt as the engine runs it (K placeholders per pruned image).
        mm_features: the request's multimodal items.
        grids: per item of ``mm_features``, its (t, h, w) in tokens (1-D: (1, 1, span)).
    """
    order = sorted(range(len(mm_features)), key=lambda i: mm_features[i].mm_position.offset)
    widened: list[MultiModalFeatureSpec] = []
    widened_tokens: list[int] = []
    keep_columns: list[torch.Tensor] = []
    shift = 0  # placeholders added so far by widening
    at = 0  # next prompt index not yet in keep_columns
    for i in order:
        feature = mm_features[i]
        offset, length = feature.mm_position.offset, feature.mm_position.length
        full = grids[i][0] * grids[i][1] * grids[i][2]
        keep_columns.append(torch.arange(at, offset + length) + shift)
        widened_tokens += input_tokens[at : offset + length]
        if length < full:
            # The stock function may read the ids (Qwen3-VL finds video frames by them).
            widened_tokens += [input_tokens[offset]] * (full - length)
            # Only the first `length` columns stay; they take the base position below.
            widened_range = PlaceholderRange(offset=offset + shift, length=full)
            shift += full - length
        else:
            widened_range = PlaceholderRange(offset=offset + shift, length=length)
        widened.append(dataclasses.replace(feature, mm_position=widened_range))
        at = offset + length
    keep_columns.append(torch.arange(at, len(input_tokens)) + shift)
    if shift == 0:
        return stock(input_tokens, list(mm_features))
    widened_tokens += input_tokens[at:]
    positions, delta = stock(widened_tokens, widened)
    positions = positions[:, torch.cat(keep_columns)]
    for i in order:
        feature = mm_features[i]
        offset, length = feature.mm_position.offset, feature.mm_position.length
        if length < grids[i][0] * grids[i][1] * grids[i][2]:
            positions[:, offset : offset + length] = positions[0, offset]
    # The first generated token goes where it goes without pruning.
    return positions, int(delta) + shift


class PositionCarrierMixin(PruneModelMixin):
    """The model half's carrier: a pruned image's rows may end in ``POSITION_CHANNELS`` offset
    channels, which ``embed_input_ids`` strips and ``forward`` adds to the positions of those
    rows (see the module's docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._carrier_width = self._image_row_width() + POSITION_CHANNELS
        # From embed_input_ids for the next forward: (rows of the flattened batch, [3, R]
        # offsets, tokens in the batch).
        self._pending_offsets: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def _image_row_width(self) -> int:
        """Width of one image row as the stock ``embed_multimodal`` returns it."""
        return self.config.get_text_config().hidden_size

    @classmethod
    def unsupported_engine_config(cls, vllm_config) -> list[str]:
        """The kept tokens' positions reach the language model through ``embed_input_ids``
        and then ``forward``, both called by the runner in Python on the whole batch. Refused
        here: configurations where one of the two does not run, or runs on part of the batch.

        Checked on CPU only as configuration (tests/test_qwen2_5_vl.py); on a GPU, unverified
        beyond vLLM's source: that piecewise CUDA graphs (vLLM's default, FULL_AND_PIECEWISE)
        replay the in-place patched positions buffer, with the V1 and the V2 runner alike.
        """
        from vllm.config.compilation import CUDAGraphMode

        problems = super().unsupported_engine_config(vllm_config)
        parallel, compilation = vllm_config.parallel_config, vllm_config.compilation_config
        if parallel.pipeline_parallel_size > 1:
            problems.append(
                f"pipeline parallelism (pipeline_parallel_size={parallel.pipeline_parallel_size}):"
                " only the first stage merges the image rows, so later stages never receive "
                "the kept tokens' positions"
            )
        if parallel.use_ubatching:
            problems.append(
                "micro-batching (enable_dbo, ubatch_size > 1): the forward runs on slices of "
                "the batch, the kept tokens' positions are taken for the whole of it"
            )
        if compilation.cudagraph_mm_encoder:
            problems.append(
                "the encoder CUDA graph (compilation_config.cudagraph_mm_encoder): it replays "
                "the vision encoder instead of calling embed_multimodal, where the kept tokens "
                "are chosen"
            )
        mode = compilation.cudagraph_mode
        if mode is not None and mode.mixed_mode() == CUDAGraphMode.FULL:
            problems.append(
                f"full CUDA graphs for prefill batches (cudagraph_mode {mode.name}): a replay "
                "skips the forward that places the kept tokens; FULL_AND_PIECEWISE (vLLM's "
                "default) and PIECEWISE run it"
            )
        spec = vllm_config.speculative_config
        if spec is not None and spec.use_eagle():
            problems.append(
                f"speculative decoding with a {spec.method} drafter: it embeds the image rows "
                "itself, and a pruned image's rows carry position channels it does not expect"
            )
        return problems

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._pending_offsets = None
        if multimodal_embeddings is not None and any(
            e.shape[-1] == self._carrier_width for e in multimodal_embeddings
        ):
            multimodal_embeddings, self._pending_offsets = self._split_offsets(
                multimodal_embeddings, is_multimodal
            )
        return super().embed_input_ids(
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal
        )

    def _split_offsets(self, embeddings: Sequence[torch.Tensor], is_multimodal: torch.Tensor):
        """Rows without the position channels, and (batch rows, [3, R] offsets, tokens in the
        batch) for the rows that carried them. The multimodal rows fill ``is_multimodal``'s true
        entries in order."""
        rows_at = torch.nonzero(is_multimodal, as_tuple=True)[0]
        stripped, carried_rows, offsets = [], [], []
        start = 0
        for e in embeddings:
            n = e.shape[0]
            if e.shape[-1] == self._carrier_width:
                stripped.append(e[:, :-POSITION_CHANNELS])
                carried_rows.append(rows_at[start : start + n])
                offsets.append(decode_positions(e[:, -POSITION_CHANNELS:]))
            else:
                stripped.append(e)
            start += n
        assert start == rows_at.numel(), (start, rows_at.numel())
        pending = (torch.cat(carried_rows), torch.cat(offsets, dim=1), is_multimodal.numel())
        return stripped, pending

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        pending, self._pending_offsets = self._pending_offsets, None
        if pending is not None:
            rows, offsets, num_tokens = pending
            if positions.ndim != 2 or positions.shape[-1] < num_tokens:
                # The configurations that split the batch are refused at engine start; this
                # catches any other runner path before it puts tokens at the wrong positions.
                raise RuntimeError(
                    f"lvlm-prune: the forward got positions of shape {tuple(positions.shape)} "
                    f"for a batch of {num_tokens} tokens whose pruned images carry positions"
                )
            # In place: the runner's positions buffer is what CUDA graphs replay from, and what
            # a drafter reads after this pass; it is rewritten from the request's positions
            # before every step, so nothing accumulates.
            positions[:, rows.to(positions.device)] += offsets.to(positions.device)
        positions = self._language_model_positions(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _language_model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The positions the language model reads: the runner's, as they are."""
        return positions


# ---- original positions for 1-D RoPE families ---------------------------------------------------


def uniform_mrope_section(text_config) -> list[int] | None:
    """An ``mrope_section`` that makes vLLM's M-RoPE compute this text model's 1-D RoPE (three
    identical position rows), or None when its rope is not plain (another rope type, or already
    sectioned): ``get_rope`` builds ``MRotaryEmbedding`` only for the "default" type."""
    params = getattr(text_config, "rope_parameters", None)
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        return None
    if "mrope_section" in params or any(isinstance(v, dict) for v in params.values()):
        return None
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    rotary_dim = params.get("rope_dim") or int(head_dim * params.get("partial_rotary_factor", 1.0))
    half = rotary_dim // 2
    # Any split is exact with equal rows; three non-empty sections, as Qwen's, for the kernels.
    return [half - 2 * (half // 3), half // 3, half // 3]


def switch_on_original_positions(model_config) -> bool:
    """Make vLLM run this 1-D model through its M-RoPE path (``uses_mrope``), in its in-memory
    config only; whether it now does. Called when the ``ModelConfig`` is built (vLLM's
    per-architecture config hook, ``vllm_internals.add_model_config_hooks``)."""
    text_config = model_config.hf_config.get_text_config()
    section = uniform_mrope_section(text_config)
    if section is None:
        return False
    text_config.rope_parameters["mrope_section"] = section
    return True


def position_span(feature: MultiModalFeatureSpec) -> int:
    """Positions the item spans: its ``prune_position_span`` (N under original positions, K
    under compact), else its placeholder count (an item our processor did not process)."""
    data = feature.data
    elem = data.get(POSITION_SPAN_FIELD) if data is not None else None
    if elem is None:
        return feature.mm_position.length
    return int(torch.as_tensor(elem.data).reshape(-1)[0])


def _consecutive(tokens: Sequence[int], features) -> tuple[torch.Tensor, int]:
    """vLLM's 1-D positions as three identical M-RoPE rows, delta 0."""
    return torch.arange(len(tokens)).expand(3, -1).clone(), 0


def served_1d_positions(
    prompt_ids: Sequence[int],
    image_token_id: int,
    spans: Sequence[int],
    kept: Sequence[Sequence[int]],
) -> torch.Tensor:
    """[L] positions of a prompt as the served request had them: image i (in prompt order) with
    the K placeholders of its ``kept[i]`` tokens spanning ``spans[i]`` positions (N: each kept
    token at base + its index; K: consecutive), the text after it from base + span."""
    ids = list(prompt_ids)
    positions = torch.arange(len(ids))
    at = 0
    for span, kept_i in zip(spans, kept, strict=True):
        start, k = ids.index(image_token_id, at), len(kept_i)
        if span > k:
            base = int(positions[start])
            positions[start : start + k] = base + torch.as_tensor(list(kept_i))
            positions[start + k :] += span - k
        at = start + k
    return positions


class OriginalPositionsProcessorMixin(PruneProcessorMixin):
    """The processor half of a 1-D RoPE family. Where the text model's rope could not be switched
    to the M-RoPE path (see the module's docstring), every pruned image is compact: a request that
    asks for original positions itself is refused by name, and the default (the server's, or the
    declared one) becomes compact, so a stock client is served, not refused."""

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        if not self.info.ctx.model_config.uses_mrope:
            # The request's own kwargs, before the server-wide ones are merged in (the mixin's).
            if inputs.hf_processor_mm_kwargs.get(options.POSITIONS) == "original":
                rope = self.info.get_hf_config().get_text_config().rope_parameters or {}
                raise PruneOptionError(
                    options.POSITIONS,
                    f"{options.POSITIONS} 'original' is not available for this model's rope "
                    f"({rope.get('rope_type')!r}); ask for 'compact'",
                )
            kwargs = {**inputs.hf_processor_mm_kwargs, options.POSITIONS: "compact"}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)


class OriginalPositionsModelMixin(PositionCarrierMixin):
    """The model half of a 1-D RoPE family: each image at its ``prune_position_span`` (see the
    module's docstring). With the text model's rope left 1-D (``switch_on_original_positions``
    refused it), vLLM never calls the M-RoPE hooks and every pruned image is compact."""

    supports_mrope = True
    """vLLM's ``SupportsMRoPE`` (the runner asks before ``get_mrope_input_positions``); read
    only where ``uses_mrope`` is on."""

    _position_spans: list[int] | None = None
    """Each image's span, from ``_select_images`` to ``_pruned_embeddings``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._original_positions = vllm_config.model_config.uses_mrope

    @classmethod
    def update_model_config(cls, model_config) -> None:
        """vLLM's per-architecture config hook (``vllm_internals.add_model_config_hooks``)."""
        from .support import unpruned_reason

        # Pixtral-HF shares LLaVA's architecture name and is served unpruned, by vLLM's own.
        if unpruned_reason(model_config.architecture, model_config.hf_config) is None:
            switch_on_original_positions(model_config)

    @classmethod
    def unsupported_engine_config(cls, vllm_config) -> list[str]:
        if not vllm_config.model_config.uses_mrope:  # compact only: no carrier
            return super(PositionCarrierMixin, cls).unsupported_engine_config(vllm_config)
        return super().unsupported_engine_config(vllm_config)

    def _language_model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Row 0 of the runner's three: a 1-D family's rows are equal, and ``MRotaryEmbedding``
        given one row computes the same 1-D RoPE. One row because vLLM 0.32 compiles
        ``LlamaModel`` with positions' dim 0 as the token dimension (``support_torch_compile``'s
        ``dynamic_arg_dims``): a [3, T] tensor would tie the token count to 3 and fail the
        start-up compile (ConstraintViolationError on ``inputs_embeds.size()[0]``)."""
        return positions[0] if positions.ndim == 2 else positions

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        spans = [(1, 1, position_span(f)) for f in mm_features]
        return pruned_mrope_positions(_consecutive, input_tokens, mm_features, spans)

    def _select_images(self, images, fields: Mapping[str, list], kwargs):
        spans = self._position_spans = list(fields[POSITION_SPAN_FIELD])
        selections = super()._select_images(images, fields, kwargs)
        if selections is not None:
            flows = fields[FLOW_FIELD]
            for b, diag_id in enumerate(fields[DIAGNOSTICS_FIELD]):
                if diag_id and b < len(flows) and flows[b]:  # after put_flow's rows
                    diagnostics.STORE.put_flow_span(diag_id, spans[b])
        return selections

    def _pruned_embeddings(
        self,
        selections: list[Selection],
        images: list[torch.Tensor],
        kwargs: Mapping[str, object],
    ) -> MultiModalEmbeddings:
        rows = super()._pruned_embeddings(selections, images, kwargs)
        spans, self._position_spans = self._position_spans, None
        out = []
        for r, sel, image, span in zip(rows, selections, images, spans, strict=True):
            k = sel.kept.numel()
            if span <= k or not self._original_positions:
                # Compact or unpruned: vLLM's consecutive positions. (Without the M-RoPE path
                # the processor refuses original positions for a pruned image.)
                out.append(r)
                continue
            if span != image.shape[0] or span >= MAX_GRID:
                raise RuntimeError(
                    f"lvlm-prune: an image of {image.shape[0]} tokens spans {span} positions"
                )
            kept = sel.kept.to(torch.int64)[:, None].expand(-1, 3)
            out.append(torch.cat([r, encode_positions(kept, r.dtype).to(r.device)], dim=1))
        return out

    # ---- information flow (worker/flow.py): the served positions ----

    def flow_inputs(self, prompt_ids: Sequence[int], entry: dict):
        """The flow pass's (positions, after-layer hook): the served positions, no hook."""
        spans = entry.get("spans")
        if not spans:
            return None, None
        image_token = self.config.image_token_id
        return served_1d_positions(prompt_ids, image_token, spans, entry["kept"]), None
