"""Qwen2.5-VL with question-aware image-token pruning, as subclasses of vLLM's own classes.

The processor and the selection are every family's (``processing/processor.py``,
``worker/model.py``); Qwen2.5-VL supplies N per image from its own grid (dynamic resolution:
N = rows x cols after the 2x2 merger) and adds M-RoPE: every token has a (t, h, w) position, an
image's tokens sit on its grid of rows x cols (after the 2x2 merger), and the text after an image
starts at the image's base position + max(rows, cols). A pruned image must keep those: each kept
token its own original (t, h, w), the text after it the position it has without pruning.

How the positions get there. The kept set is known only in the worker, inside
``embed_multimodal``; vLLM computes a request's positions earlier, when the worker first sees the
request (``get_mrope_input_positions``), and copies the scheduled slice of them into the
runner's positions buffer before the encoder runs. So:

1. ``get_mrope_input_positions`` gives every token the position it has in the *unpruned* prompt
   (vLLM's own function run on the unpruned layout, the dropped columns then removed): text
   after an image, and the decode offset, are exact integers decided up front, since they depend
   on the image's grid only. Each kept image token gets the image's base position (b, b, b).
2. ``embed_multimodal`` returns, for a pruned image, the K kept rows with their (t, h, w) within
   the image appended as 6 extra channels (each coordinate as two base-256 digits, exact in
   bf16 / fp16 / fp32 and through any copy). They travel with the rows through vLLM's encoder
   cache and its per-chunk slicing, so every prefill chunk carries the offsets of exactly the
   image rows it holds.
3. ``embed_input_ids`` (called by the runner right before the forward pass, with the mask of
   the multimodal rows in the flattened batch) strips the channels and keeps (rows, offsets);
   ``forward`` adds the offsets to those rows of the positions buffer in place, before the
   language model runs: b + (t, h, w), the original position.

Why not vLLM's own path for pruned media (EVS, ``recompute_mrope_positions``): the runner takes
it only when ``multimodal_config.is_multimodal_pruning_enabled()``, i.e. ``video_pruning_rate >
0``, which would switch on video pruning for every user (and vLLM's CPU runner never sets the
flag: its ``load_model`` does not); it carries positions as floats in the embedding's dtype
(bf16: exact only to 256) and starts the text after the media at base + cols instead of
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
from transformers import BatchFeature
from vllm.inputs import MultiModalInput
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFeatureSpec,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems

from lvlm_prune.kernels import Selection

from . import options
from .options import PruneOptionError, PruneOptions
from .processing.processor import PruneProcessorMixin
from .worker.model import PruneModelMixin

POSITION_CHANNELS = 6
"""Extra channels of a pruned image's rows between ``embed_multimodal`` and ``embed_input_ids``:
(t, h, w) // 256, then (t, h, w) % 256."""

_DIGIT = 256  # integers in [0, 256] are exact in bf16 (8 significant bits)
MAX_GRID = _DIGIT * _DIGIT
"""Coordinates within an image must be below this (a 65536-token-wide image)."""


# ---- positions ---------------------------------------------------------------------------------


def grid_positions(rows: int, cols: int, kept: torch.Tensor) -> torch.Tensor:
    """[K, 3] (t, h, w) of image tokens ``kept`` (row-major indices) on a rows x cols grid."""
    if max(rows, cols) >= MAX_GRID:
        raise ValueError(f"an image grid of {rows}x{cols} tokens is over {MAX_GRID} a side")
    kept = kept.to(torch.int64)
    return torch.stack([torch.zeros_like(kept), kept // cols, kept % cols], dim=1)


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

    ``stock(tokens, features)`` is vLLM's ``get_mrope_input_positions``; it runs on the unpruned
    layout (each shortened image widened back to t*h*w placeholders), so every text token and the
    decode offset are exactly what they are without pruning. The columns of dropped tokens are
    then removed; each kept image token is left at its image's base position (b, b, b), to which
    ``forward`` adds the kept token's own (t, h, w).

    Args:
        stock: vLLM's position function (the unpruned computation).
        input_tokens: the prompt as the engine runs it (K placeholders per pruned image).
        mm_features: the request's multimodal items.
        grids: per item of ``mm_features``, its (t, h, w) in tokens after the merger.
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


# ---- processor ----------------------------------------------------------------------------------


class MRopePruneProcessorMixin(PruneProcessorMixin):
    """The processor half for the Qwen-VL families (Qwen2.5-VL, Qwen3-VL): N from each image's
    grid of merged patches."""

    def _placeholder_ids(self) -> set[int]:
        config = self.info.get_hf_config()
        return {config.image_token_id, config.video_token_id}

    def _merge_size(self) -> int:
        return self.info.get_hf_config().vision_config.spatial_merge_size

    def _image_token_counts(
        self, processed: BatchFeature, mm_items: MultiModalDataItems
    ) -> list[int]:
        grids = processed["image_grid_thw"]
        return [int(g.prod()) // self._merge_size() ** 2 for g in grids]

    def _num_image_tokens(
        self,
        result: MultiModalInput,
        mm_items: MultiModalDataItems,
        item_idx: int,
        hf_kwargs: Mapping[str, object],
    ) -> int:
        # The processed grid where the request carries it, else from the image's size (the
        # processor's own resize rule, with the request's min / max pixels).
        items = result["mm_kwargs"].get("image") or []
        item = items[item_idx] if item_idx < len(items) else None
        if item is not None and "image_grid_thw" in item:
            return int(item["image_grid_thw"].data.prod()) // self._merge_size() ** 2
        images = mm_items.get_items("image", ImageProcessorItems)
        size = images.get_image_size(item_idx)
        return self.info.get_num_image_tokens(
            image_width=size.width,
            image_height=size.height,
            image_processor=self.info.get_image_processor(),
            mm_kwargs=options.without_own_kwargs(hf_kwargs),
        )

    def _check_options(self, opts: PruneOptions) -> None:
        evs = self.info.ctx.get_mm_config().video_pruning_rate
        if opts.active and evs:
            # vLLM's video pruning (EVS) rewrites every media row's positions in the runner.
            raise PruneOptionError(
                options.KEEP_RATIO,
                "image pruning is not available while vLLM's video pruning is on "
                f"(video_pruning_rate={evs})",
            )


class Qwen2_5_VLPruneMultiModalProcessor(MRopePruneProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


# ---- model --------------------------------------------------------------------------------------


class MRopePruneModelMixin(PruneModelMixin):
    """The model half for the Qwen-VL families: images pruned to K rows each, every kept row at
    its original M-RoPE position (see the module's docstring for how)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._carrier_width = self._image_row_width() + POSITION_CHANNELS
        # From embed_input_ids for the next forward: (rows of the flattened batch, [3, R]
        # offsets, tokens in the batch).
        self._pending_offsets: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # The flow pass and scout run vLLM's layers outside the runner (MoE needs the context).
        self.flow_vllm_config = vllm_config
        # Each image's (rows, cols), while _select_images runs, for the flow method's scout.
        self._scout_grids: list[tuple[int, int]] | None = None

    def _image_row_width(self) -> int:
        """Width of one image row as the stock ``embed_multimodal`` returns it."""
        return self.config.text_config.hidden_size

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

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        merge = self.config.vision_config.spatial_merge_size
        grids = []
        for feature in mm_features:
            thw = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            grids.append((thw[0], thw[1] // merge, thw[2] // merge))
        stock = super().get_mrope_input_positions
        return pruned_mrope_positions(stock, input_tokens, mm_features, grids)

    def _image_grids(self, images, kwargs) -> list[tuple[int, int]]:
        """Dynamic resolution: each image's own rows x cols of tokens after the merger."""
        merge = self.config.vision_config.spatial_merge_size
        return [(h // merge, w // merge) for _, h, w in kwargs["image_grid_thw"].tolist()]

    def _pruned_embeddings(
        self,
        selections: list[Selection],
        images: list[torch.Tensor],
        kwargs: Mapping[str, object],
    ) -> MultiModalEmbeddings:
        merge = self.config.vision_config.spatial_merge_size
        out = []
        for sel, image, thw in zip(selections, images, kwargs["image_grid_thw"].tolist()):
            if sel.kept.numel() == image.shape[0]:
                out.append(sel.rows)  # unpruned: vLLM's own positions
                continue
            thw_kept = grid_positions(thw[1] // merge, thw[2] // merge, sel.kept)
            out.append(torch.cat([sel.rows, encode_positions(thw_kept, sel.rows.dtype)], dim=1))
        return out

    # ---- information flow (worker/flow.py): the served positions ----

    def served_positions(
        self,
        prompt_ids: Sequence[int],
        grids: Sequence[tuple[int, int]],
        kept: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """[3, L] positions of a prompt as the served request had them: image i (in prompt order,
        ``grids[i]`` rows x cols) with the K placeholders of its ``kept[i]`` tokens, through
        ``get_mrope_input_positions`` (the unpruned layout's positions) and then each pruned
        image's kept (t, h, w) added, as ``forward`` adds them."""
        image_token = self.config.image_token_id
        merge = self.config.vision_config.spatial_merge_size
        ids = list(prompt_ids)
        features, at = [], 0
        for i, ((rows, cols), kept_i) in enumerate(zip(grids, kept, strict=True)):
            at = ids.index(image_token, at)
            thw = torch.tensor([1, rows * merge, cols * merge])
            item = MultiModalKwargsItem(
                {"image_grid_thw": MultiModalFieldElem(data=thw, field=MultiModalBatchedField())}
            )
            span = PlaceholderRange(offset=at, length=len(kept_i))
            features.append(MultiModalFeatureSpec(item, "image", f"flow-{i}", span))
            at += len(kept_i)
        positions, _ = self.get_mrope_input_positions(ids, features)
        positions = positions.to(torch.int64)
        for feature, (rows, cols), kept_i in zip(features, grids, kept):
            if len(kept_i) < rows * cols:
                start, k = feature.mm_position.offset, len(kept_i)
                thw = grid_positions(rows, cols, torch.as_tensor(list(kept_i)))
                positions[:, start : start + k] += thw.T
        return positions

    def flow_inputs(self, prompt_ids: Sequence[int], entry: dict):
        """The flow pass's (positions, after-layer hook): the served positions; no DeepStack."""
        return self.served_positions(prompt_ids, entry["grids"], entry["kept"]), None

    def _select_images(self, images, fields, kwargs):
        self._scout_grids = self._image_grids(images, kwargs)
        try:
            return super()._select_images(images, fields, kwargs)
        finally:
            self._scout_grids = None

    def _scout_head_id(self) -> int:
        return self.config.vision_start_token_id

    def _scout_inputs(self, images):
        """The scout's sequence is ``<|vision_start|>`` + image + question, at the positions it
        has as a prompt: the start token at 0, the image on its grid from base 1, the question
        after it at 1 + max(rows, cols)."""
        head_id, grids = self._scout_head_id(), self._scout_grids

        def inputs(b: int, length: int):
            n = images[b].shape[0]
            ids = [head_id] + [self.config.image_token_id] * n + [0] * (length - 1 - n)
            positions = self.served_positions(ids, [grids[b]], [range(n)])
            return positions.to(images[b].device), self._scout_deepstack(b)

        return inputs

    def _scout_deepstack(self, b: int) -> list[torch.Tensor] | None:
        """Image b's DeepStack levels for the scout (Qwen3-VL's mixin), None without."""
        return None

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
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLPruneMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class Qwen2_5_VLPruneForConditionalGeneration(
    MRopePruneModelMixin, Qwen2_5_VLForConditionalGeneration
):
    """``Qwen2_5_VLForConditionalGeneration`` whose images are pruned to K rows each, every kept
    row at its original M-RoPE position."""
