"""Qwen2.5-VL with question-aware image-token pruning, as subclasses of vLLM's own classes.

The processor and the selection are every family's (``processing/processor.py``,
``worker/model.py``); Qwen2.5-VL supplies N per image from its own grid (dynamic resolution:
N = rows x cols after the 2x2 merger) and adds M-RoPE: every token has a (t, h, w) position, an
image's tokens sit on its grid of rows x cols (after the 2x2 merger), and the text after an image
starts at the image's base position + max(rows, cols). A pruned image must keep those: each kept
token its own original (t, h, w), the text after it the position it has without pruning.

How the positions get there: ``positions.py`` (the carrier every family with original positions
shares): ``get_mrope_input_positions`` on the unpruned layout with the dropped columns removed
(text and decode exact), each kept row's (t, h, w) on its grid carried in extra channels through
``embed_multimodal`` -> ``embed_input_ids`` -> ``forward``. Positions are always original here:
a request's ``positions: "compact"`` is refused by name; a server-wide compact (meant for the 1-D
families) is not applied.
"""

from __future__ import annotations

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
from vllm.multimodal.processing import ProcessorInputs, TimingContext

from lvlm_prune.kernels import Selection

from . import options
from .options import PruneOptionError, PruneOptions
from .positions import (  # noqa: F401 - re-exported: the Qwen modules and tests import them here
    MAX_GRID,
    POSITION_CHANNELS,
    PositionCarrierMixin,
    decode_positions,
    encode_positions,
    pruned_mrope_positions,
)
from .processing.processor import PruneProcessorMixin

# ---- positions ---------------------------------------------------------------------------------


def grid_positions(rows: int, cols: int, kept: torch.Tensor) -> torch.Tensor:
    """[K, 3] (t, h, w) of image tokens ``kept`` (row-major indices) on a rows x cols grid."""
    if max(rows, cols) >= MAX_GRID:
        raise ValueError(f"an image grid of {rows}x{cols} tokens is over {MAX_GRID} a side")
    kept = kept.to(torch.int64)
    return torch.stack([torch.zeros_like(kept), kept // cols, kept % cols], dim=1)


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

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        # The request's own kwargs, before the server-wide ones are merged in (the mixin's
        # apply): a server-wide compact is for the 1-D families and is not applied here.
        if inputs.hf_processor_mm_kwargs.get(options.POSITIONS) == "compact":
            raise PruneOptionError(
                options.POSITIONS,
                f"{options.POSITIONS} 'compact' is not available for M-RoPE models: their kept "
                "tokens always keep their original (t, h, w) positions",
            )
        return super().apply(inputs, timing_ctx)

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


class MRopePruneModelMixin(PositionCarrierMixin):
    """The model half for the Qwen-VL families: images pruned to K rows each, every kept row at
    its original M-RoPE position (see ``positions.py`` for how)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # The flow pass and scout run vLLM's layers outside the runner (MoE needs the context).
        self.flow_vllm_config = vllm_config
        # Each image's (rows, cols), while _select_images runs, for the flow method's scout.
        self._scout_grids: list[tuple[int, int]] | None = None

    def _image_row_width(self) -> int:
        """Width of one image row as the stock ``embed_multimodal`` returns it."""
        return self.config.text_config.hidden_size

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
