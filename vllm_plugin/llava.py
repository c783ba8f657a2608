"""LLaVA-1.5 with question-aware image-token pruning, as subclasses of vLLM's own classes.

The pruning itself is the shared mixins' (``processing/processor.py``, ``worker/model.py``); LLaVA
supplies N per image (one fixed size: CLIP resizes every image) and the ``flow`` method's scout,
which reruns the first decoder layers of its Llama language model (``flow.py``). LLaVA uses 1-D
RoPE, so a shorter image run needs no position fix-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
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

from .options import LAYER_FIELD
from .processing.processor import PruneProcessorMixin
from .worker import flow
from .worker.model import PruneModelMixin

logger = logging.getLogger(__name__)


class LlavaPruneMultiModalProcessor(PruneProcessorMixin, LlavaMultiModalProcessor):
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
class LlavaPruneForConditionalGeneration(PruneModelMixin, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose image embeddings are pruned to K rows per image."""

    def _scout_scores(
        self,
        images: list[torch.Tensor],
        queries: list[torch.Tensor],
        methods: list[str],
        keep: list[int],
        diag_ids: list[int],
        fields: Mapping[str, object],
    ) -> list[torch.Tensor | None]:
        scores: list[torch.Tensor | None] = [None] * len(images)
        # The flow scout runs for flow images that prune or report scores, and have a question.
        scouted = [
            b
            for b, (m, q) in enumerate(zip(methods, queries))
            if m == "flow" and q.shape[0] and (keep[b] < images[b].shape[0] or diag_ids[b])
        ]
        if not scouted:
            return scores
        bos = None
        bos_id = getattr(self.config.text_config, "bos_token_id", None)
        if bos_id is not None:
            embed_tokens = self.language_model.model.embed_tokens
            embed_tokens = getattr(embed_tokens, "base_layer", embed_tokens)
            bos = embed_tokens(torch.tensor([bos_id], device=images[0].device))[0]
        layers = fields[LAYER_FIELD]
        try:
            found = flow.scout_scores(
                self,
                [images[b] for b in scouted],
                [queries[b] for b in scouted],
                [layers[b] for b in scouted],
                bos=bos,
            )
        except flow.FlowUnavailable as err:
            # The processor refuses what it can see; what only the worker sees (pipeline
            # parallelism) must not stop the engine: the selection falls back to uniform
            # and says so in its method. Every rank raises here, before any collective.
            logger.warning("lvlm-prune: flow method unavailable, uniform instead: %s", err)
            found = [None] * len(scouted)
        for b, s in zip(scouted, found):
            scores[b] = s
        return scores
