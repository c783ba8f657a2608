"""LLaVA-NeXT and LLaVA-OneVision (AnyRes) with question-aware image-token pruning, as subclasses
of vLLM's own classes.

AnyRes turns an image into a base view (the image resized to the tower's square) and a grid of
crops at the best-fitting resolution. vLLM's ``embed_multimodal`` returns per image ``[N, D]``:
the base view's g x g rows, then the crops' features as one grid of r x c (unpadded; OneVision
shrinks a grid larger than ``anyres_max_9`` allows by bilinear interpolation), row by row, each
row closed by the ``image_newline`` vector: N = g^2 + r (c + 1). :class:`AnyResLayout` is that
layout, computed from the image's size with the functions vLLM's merge calls.

The choices, and why:

- **Newline rows do not compete.** The r newline rows are one and the same vector: scored like
  patches they tie, and keeping some of them would keep row breaks of rows whose tokens are
  dropped. The selection runs over the g^2 + r c content rows (``_prunable_rows``); a pruned
  image drops its newline rows, an unpruned one (keep 1.0) keeps all N, as stock vLLM.
  Re-emitting one newline per kept row is not possible: the placeholders (K of them) are
  decided in the API process before the selection, and such a count depends on the selection.
- **One budget per image, across the views.** K = keep_count(g^2 + r c, keep_ratio)
  (``_budget_tokens``): the newline rows are not in the count, so a pruned image holds exactly
  the share of its content the ratio says. The base view and the crops compete for the same K
  (the question decides where the tokens go; a floor per view would keep base tokens that
  duplicate the crops' content at a coarser scale); docs/models.md has the measured split.
- **Positions: original by default**, as LLaVA-1.5's (``positions.py``'s two mixins, 1-D RoPE
  through vLLM's M-RoPE hook): an image spans its N positions, newline rows included, so a kept
  row sits at base + its index among all N rows and the text after the image where it is
  unpruned (N - K later than compact); ``positions: "compact"`` per request gives the K kept
  rows consecutive positions. Llama (NeXT) and Qwen2 (OneVision) have a plain rope, so vLLM's
  config hook switches both on; a checkpoint with another rope type stays compact.
- **N of an image sent by uuid only** (a processor-cache hit without the image) is the N counted
  when its hash was processed with the image, kept per hash in this process; LLaVA-1.5's "the
  maximum" fallback would be wrong (N depends on the size), and the cache keeps no size here.
- Images given as embeddings (``image_embeds``) have no known layout: all their rows compete.
- OneVision's videos are served stock (not pruned).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from transformers import BatchFeature
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)
from vllm.inputs import MultiModalInput
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems

from . import options
from .bounded import BoundedStore
from .llava import LlavaPruneProcessorMixin
from .positions import OriginalPositionsModelMixin

_COUNTED: BoundedStore[str, int] = BoundedStore(4096)
"""N of each image hash counted in this process, for the same image sent again by uuid only."""

ONEVISION_MAX_CROPS = 9
"""OneVision's ``anyres_max_9``, as vLLM's merge fixes it (it does not read the config)."""


@dataclasses.dataclass(frozen=True)
class AnyResLayout:
    """Where an AnyRes image's rows come from: ``base`` x ``base`` rows of the base view, then
    ``rows`` x ``cols`` crop features, row by row, each row followed by one newline row."""

    base: int
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.base**2 + self.rows * (self.cols + 1)

    @property
    def newline_rows(self) -> torch.Tensor:
        return self.base**2 + torch.arange(self.rows) * (self.cols + 1) + self.cols

    @property
    def content_rows(self) -> torch.Tensor:
        """Every row but the newlines, ascending: the rows that compete in the selection."""
        keep = torch.ones(self.tokens, dtype=torch.bool)
        keep[self.newline_rows] = False
        return keep.nonzero().flatten()

    def views(self) -> list[dict]:
        """The diagnostics' views: offsets into the image's rows; the crops' rows each end
        in a newline row (``newline``), so that view spans rows x (cols + 1) rows."""
        return [
            {"view": "base", "grid": [self.base, self.base], "offset": 0},
            {
                "view": "crops",
                "grid": [self.rows, self.cols],
                "offset": self.base**2,
                "newline": True,
            },
        ]


def anyres_layout(config, height: int, width: int, *, max_crops: int | None) -> AnyResLayout:
    """The layout vLLM's ``_merge_image_patch_embeddings`` gives an image of ``height`` x
    ``width`` px: the crop grid from the same transformers functions it calls, on an empty
    tensor of the crops' feature size, then OneVision's cap (``max_crops`` crops' worth of
    features, None: no cap)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    grid_rows, grid_cols = get_anyres_image_grid_shape(
        (height, width), config.image_grid_pinpoints, vision.image_size
    )
    feature = torch.empty(0, grid_rows * side, grid_cols * side)
    rows, cols = unpad_image(feature, (height, width)).shape[1:]
    if max_crops is not None:
        ratio = math.sqrt(rows * cols / (max_crops * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return AnyResLayout(side, int(rows), int(cols))


# ---- processor ----------------------------------------------------------------------------------


class AnyResPruneProcessorMixin(LlavaPruneProcessorMixin):
    """N per image from vLLM's own count (as LLaVA-1.5's); the budget from its content rows (no
    newlines); an image sent by uuid only counted from its hash."""

    _max_crops: int | None = None

    def _num_image_tokens(
        self,
        result: MultiModalInput,
        mm_items: MultiModalDataItems,
        item_idx: int,
        hf_kwargs: Mapping[str, object],
    ) -> int:
        hashes = result["mm_hashes"].get("image") or ()
        key = hashes[item_idx] if item_idx < len(hashes) else None
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems) or images.get(item_idx) is not None:
            # With the image: its size (never LLaVA-1.5's one-size fallback, wrong for AnyRes).
            num = self._tokens_of(mm_items, item_idx)
            if key is not None:
                _COUNTED.put(key, num)
            return num
        # Sent by uuid only: a processor-cache hit, so the same hash was processed before, with
        # its data; its N was counted then (this process keeps no other trace of its size).
        num = _COUNTED.get(key) if key is not None else None
        if num is None:
            raise ValueError(
                "lvlm-prune cannot count the tokens of an image sent by uuid only whose size "
                "it has not seen: send the image itself"
            )
        return num

    def _budget_tokens(self, mm_items: MultiModalDataItems, item_idx: int, num_tokens: int) -> int:
        layout = self._layout(mm_items, item_idx)
        if layout is None or layout.tokens != num_tokens:
            return num_tokens  # no known layout: every row competes (as in the worker)
        return num_tokens - layout.rows

    def _layout(self, mm_items: MultiModalDataItems, item_idx: int) -> AnyResLayout | None:
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            return None
        size = images.get_image_size(item_idx)
        return anyres_layout(
            self.info.get_hf_config(), size.height, size.width, max_crops=self._max_crops
        )


class LlavaNextPruneMultiModalProcessor(AnyResPruneProcessorMixin, LlavaNextMultiModalProcessor):
    pass


class _OnevisionProcessorWithoutOwnKwargs(LlavaOnevisionMultiModalProcessor):
    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # NOTE(vLLM 0.32): OneVision's own _apply_hf_processor_main loads and calls the HF
        # processor itself (info.get_hf_processor(**kwargs), ctx.call_hf_processor), not through
        # self._call_hf_processor where PruneProcessorMixin strips our kwargs: stripped here, or
        # each new question (prune_query_ids) would load another HF processor.
        return super()._apply_hf_processor_main(mm_items, options.without_own_kwargs(hf_kwargs))


class LlavaOnevisionPruneMultiModalProcessor(
    AnyResPruneProcessorMixin, _OnevisionProcessorWithoutOwnKwargs
):
    _max_crops = ONEVISION_MAX_CROPS

    def _placeholder_ids(self) -> set[int]:
        return {*super()._placeholder_ids(), self.info.get_hf_config().video_token_index}


# ---- model --------------------------------------------------------------------------------------


class AnyResPruneModelMixin(OriginalPositionsModelMixin):
    """The selection over each image's content rows; diagnostics on the base view's grid, with
    both views (see the module's docstring)."""

    _max_crops: int | None = None

    def _prunable_rows(self, images, kwargs):
        return [
            None if layout is None else layout.content_rows.to(image.device)
            for image, layout in zip(images, self._layouts(images, kwargs))
        ]

    def _image_grids(self, images, kwargs):
        return [
            grid if layout is None else (layout.base, layout.base)
            for grid, layout in zip(
                super()._image_grids(images, kwargs), self._layouts(images, kwargs)
            )
        ]

    def _image_views(self, images, kwargs):
        return [
            None if layout is None else layout.views() for layout in self._layouts(images, kwargs)
        ]

    def _layouts(
        self, images: list[torch.Tensor], kwargs: Mapping[str, object]
    ) -> list[AnyResLayout | None]:
        """Per image its layout, from the ``image_sizes`` vLLM's merge read; None for images
        given as embeddings, or where the rows do not add up to the layout."""
        sizes = kwargs.get("image_sizes")
        if sizes is None or kwargs.get("pixel_values") is None:
            return [None] * len(images)
        out: list[AnyResLayout | None] = []
        for image, size in zip(images, sizes, strict=True):
            height, width = (int(x) for x in size.tolist())
            layout = anyres_layout(self.config, height, width, max_crops=self._max_crops)
            out.append(layout if layout.tokens == image.shape[0] else None)
        return out


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextPruneMultiModalProcessor,
    info=LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class LlavaNextPruneForConditionalGeneration(
    AnyResPruneModelMixin, LlavaNextForConditionalGeneration
):
    """``LlavaNextForConditionalGeneration`` whose images keep K content rows each."""


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionPruneMultiModalProcessor,
    info=LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class LlavaOnevisionPruneForConditionalGeneration(
    AnyResPruneModelMixin, LlavaOnevisionForConditionalGeneration
):
    """``LlavaOnevisionForConditionalGeneration`` whose images keep K content rows each (videos
    stock)."""

    _max_crops = ONEVISION_MAX_CROPS
