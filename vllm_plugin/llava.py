"""LLaVA-1.5 with question-aware image-token pruning, as subclasses of vLLM's own classes.

The pruning itself is the shared mixins' (``processing/processor.py``, ``worker/model.py``); LLaVA
supplies N per image (one fixed size: CLIP resizes every image) and the ``flow`` method's scout,
which reruns the first decoder layers of its Llama language model (``flow.py``).

Positions: LLaVA's language model uses 1-D RoPE. By default (``positions: "original"``) each
kept token sits at its unpruned position and the text after the image, and decoding, where they
are unpruned; ``"compact"`` gives the kept tokens consecutive positions (vLLM's own for the
shorter prompt). Both come from ``positions.py``'s two mixins, which run LLaVA through vLLM's
M-RoPE position hook with three identical rows (1-D RoPE exactly; the module says why and how).
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import BatchFeature
from vllm.inputs import MultiModalInput
from vllm.model_executor.models.llava import (
    BaseLlavaProcessingInfo,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor

from .positions import OriginalPositionsModelMixin, OriginalPositionsProcessorMixin


class LlavaPruneProcessorMixin(OriginalPositionsProcessorMixin):
    """The processor half of the LLaVA line (1.5 here, NeXT / OneVision in ``llava_next.py``): N
    of an image is vLLM's own count from its size."""

    def _placeholder_ids(self) -> set[int]:
        return {self.info.get_hf_config().image_token_index}

    def _image_token_counts(
        self, processed: BatchFeature, mm_items: MultiModalDataItems
    ) -> list[int]:
        return [self._tokens_of(mm_items, i) for i in range(len(mm_items.get("image")))]

    def _num_image_tokens(
        self,
        result: MultiModalInput,
        mm_items: MultiModalDataItems,
        item_idx: int,
        hf_kwargs: Mapping[str, object],
    ) -> int:
        return self._tokens_of(mm_items, item_idx)

    def _tokens_of(self, mm_items: MultiModalDataItems, item_idx: int) -> int:
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            return images.get_feature_size(item_idx)
        try:
            size = images.get_image_size(item_idx)
        except (ValueError, AssertionError):
            # An image sent by uuid only (already cached) has no size here; LLaVA-1.5's CLIP
            # resizes every image to one size, so N is the same for all of them.
            return self.info.get_max_image_tokens()
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)


class LlavaPruneMultiModalProcessor(LlavaPruneProcessorMixin, LlavaMultiModalProcessor):
    pass


def _build_processor(
    info: BaseLlavaProcessingInfo, dummy_inputs: LlavaDummyInputsBuilder
) -> BaseMultiModalProcessor:
    """vLLM's ``_build_llava_or_pixtral_hf_processor`` with our processor for LLaVA (copied code,
    pinned in tests/test_vllm_internals.py). Pixtral-HF checkpoints share LLaVA's architecture
    name (vLLM's info factory, used as is, tells them apart) and are served unpruned."""
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    if isinstance(info, LlavaProcessingInfo):
        return LlavaPruneMultiModalProcessor(info, dummy_inputs)
    raise NotImplementedError(type(info))


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor,
    info=_build_llava_or_pixtral_hf_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class LlavaPruneForConditionalGeneration(
    OriginalPositionsModelMixin, LlavaForConditionalGeneration
):
    """``LlavaForConditionalGeneration`` whose image embeddings are pruned to K rows per image,
    each kept row at its original position unless the request asks for compact ones."""
