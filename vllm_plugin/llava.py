"""LLaVA-1.5 with question-aware image-token pruning, as subclasses of vLLM's own classes.

Processor (API process): decides K = keep_count(N, keep_ratio) per image, emits K placeholders
instead of N, and hands the model each image's query token ids and the options as per-image fields.
Each image is hashed with the options and its own query only, so vLLM's processor, encoder and
prefix caches are keyed by that image's question: in a conversation, an image keeps its hash, its
selection and its place in the prefix cache turn after turn. Model (worker): runs the stock vision
tower + projector, then keeps K rows per image with ``select_tokens``. LLaVA uses 1-D RoPE, so a
shorter image run needs no position fix-up.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature, LlavaConfig, PixtralVisionConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalHashes, MultiModalInput
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import (
    BaseLlavaProcessingInfo,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseMultiModalProcessor,
    InputProcessingContext,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.multimodal.processing.processor import MultiModalIsCached

from lvlm_prune.kernels import PRUNE_METHODS, keep_count, select_tokens

from . import diagnostics, flow, options
from .accounting import LEDGER, RequestCounts
from .options import PruneOptions

logger = logging.getLogger(__name__)

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


class LlavaPruneMultiModalProcessor(LlavaMultiModalProcessor):
    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        merged = self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs)
        opts = PruneOptions.from_kwargs(merged)
        flow.check_supported(opts, self.info.get_hf_config().text_config)
        tag = merged.get(options.TAG)
        kwargs = options.without_own_kwargs(inputs.hf_processor_mm_kwargs)
        mm_items = inputs.mm_data_items
        num_images = mm_items.get_all_counts().get("image", 0)
        queries = opts.queries_for(num_images)  # a list of the wrong length raises here
        # keep_ratio 1.0 without diagnostics is stock vLLM: no query in the hash, so one image
        # is still cached across questions.
        if opts.active:
            query_ids = self.query_token_ids(inputs.prompt, queries, num_images)
        else:
            query_ids = [[] for _ in range(num_images)]
        kwargs.update(opts.hashed_kwargs(query_ids))
        result = super().apply(
            dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx
        )
        if isinstance(tag, str) and "image" in mm_items:
            after = [p.length for p in result["mm_placeholders"].get("image", [])]
            before = [self._num_image_tokens(mm_items, i) for i in range(len(after))]
            # The flow pass reruns the prompt as the engine ran it: its ids go to the server.
            prompt_ids = list(result["prompt_token_ids"]) if opts.flow else None
            LEDGER.add(
                tag,
                RequestCounts(
                    opts.keep_ratio,
                    opts.method,
                    opts.merge,
                    list(zip(before, after)),
                    prompt_token_ids=prompt_ids,
                ),
            )
        return result

    def get_dummy_inputs(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> ProcessorInputs:
        # Profiling must see the unpruned maximum (as vLLM's own video pruning, EVS, does), even
        # when the server-wide default prunes.
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        return dataclasses.replace(inputs, hf_processor_mm_kwargs={options.KEEP_RATIO: 1.0})

    def query_token_ids(
        self, prompt: Sequence[int], queries: Sequence[str] | None, num_images: int
    ) -> list[list[int]]:
        """Each image's relevance query: its ``prune_query``, else the prompt's text tokens (the
        last ``MAX_QUERY_TOKENS`` of either: in a long conversation, the latest question)."""
        tokenizer = self.info.get_tokenizer()
        if queries is None:
            skip = set(tokenizer.all_special_ids) | {self.info.get_hf_config().image_token_index}
            ids = [t for t in prompt if t not in skip][-options.MAX_QUERY_TOKENS :]
            return [list(ids) for _ in range(num_images)]
        encoded: dict[str, list[int]] = {}
        for query in queries:
            if query not in encoded:
                ids = tokenizer.encode(query, add_special_tokens=False)
                encoded[query] = list(ids[-options.MAX_QUERY_TOKENS :])
        return [list(encoded[query]) for query in queries]

    def _get_mm_hashes(self, inputs: ProcessorInputs) -> MultiModalHashes:
        # vLLM hashes every item with all of the request's kwargs; with one query per image, image
        # 1's hash would change when image 2 arrives with another question in a later turn. So:
        # vLLM's hash of each image with the shared options, then rehashed with its own query.
        kwargs = inputs.hf_processor_mm_kwargs
        per_image = kwargs.get(options.QUERY_IDS)
        shared = {k: v for k, v in kwargs.items() if k != options.QUERY_IDS}
        hashes = dict(
            super()._get_mm_hashes(dataclasses.replace(inputs, hf_processor_mm_kwargs=shared))
        )
        if per_image is None or "image" not in hashes:
            return hashes
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        hashes["image"] = [
            MultiModalHasher.hash_kwargs(algorithm, image=item_hash, **{options.QUERY_IDS: ids})
            for item_hash, ids in zip(hashes["image"], per_image, strict=True)
        ]
        return hashes

    def _get_cache_missing_processor_kwargs(
        self, inputs: ProcessorInputs, mm_is_cached: MultiModalIsCached
    ) -> Mapping[str, object]:
        # The per-image entries follow the images that go through the HF processor: the misses.
        kwargs = super()._get_cache_missing_processor_kwargs(inputs, mm_is_cached)
        missing = [i for i, cached in enumerate(mm_is_cached.get("image", ())) if not cached]
        return options.select_images(kwargs, missing)

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # NOTE(vLLM 0.32): InputProcessingContext.call_hf_processor merges the server-wide
        # --mm-processor-kwargs back in; strip ours after that merge, right before HF sees them.
        hf_processor = self.info.get_hf_processor(**options.without_own_kwargs(hf_kwargs))

        def call_without_prune_kwargs(**kwargs):
            return hf_processor(**options.without_own_kwargs(kwargs))

        return self.info.ctx.call_hf_processor(call_without_prune_kwargs, hf_data, hf_kwargs)

    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        images = mm_items.get("image")
        if images is None or len(images) == 0:
            return processed
        opts = PruneOptions.from_kwargs(hf_kwargs)
        num = len(images)
        query_ids = hf_kwargs.get(options.QUERY_IDS) or [()] * num
        assert len(query_ids) == num, (len(query_ids), num)
        counts = [
            keep_count(self._num_image_tokens(mm_items, i), opts.keep_ratio) for i in range(num)
        ]
        processed[KEEP_FIELD] = torch.tensor(counts, dtype=torch.int64)
        processed[QUERY_FIELD] = [torch.tensor(ids, dtype=torch.int64) for ids in query_ids]
        processed[METHOD_FIELD] = torch.full((num,), PRUNE_METHODS.index(opts.method))
        processed[MERGE_FIELD] = torch.full((num,), opts.merge, dtype=torch.bool)
        processed[SEED_FIELD] = torch.tensor(
            [opts.seed_for(ids) for ids in query_ids], dtype=torch.int64
        )
        processed[DIAGNOSTICS_FIELD] = torch.full(
            (num,), opts.diagnostics_id or 0, dtype=torch.int64
        )
        processed[FLOW_FIELD] = torch.full((num,), opts.flow, dtype=torch.bool)
        processed[LAYER_FIELD] = torch.full((num,), opts.prune_layer, dtype=torch.int64)
        return processed

    def _num_image_tokens(self, mm_items: MultiModalDataItems, item_idx: int) -> int:
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

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        config.update({name: MultiModalFieldConfig.batched("image") for name in FIELDS})
        return config

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        ratio = PruneOptions.from_kwargs(hf_processor_mm_kwargs).keep_ratio
        if ratio >= 1.0:
            return updates
        return [_shorten(update, ratio) for update in updates]


def _shorten(update: PromptReplacement, ratio: float) -> PromptReplacement:
    """The same replacement with K = keep_count(N, ratio) placeholders instead of N."""
    stock = update.replacement

    def replacement(item_idx: int):
        tokens = stock(item_idx) if callable(stock) else stock
        return tokens[: keep_count(len(tokens), ratio)]

    return PromptReplacement(
        modality=update.modality, target=update.target, replacement=replacement
    )


def _build_info(ctx: InputProcessingContext) -> BaseLlavaProcessingInfo:
    # Pixtral-HF checkpoints share the LLaVA architecture name (as vLLM's own factory tells).
    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return LlavaProcessingInfo(ctx)


def _build_processor(
    info: BaseLlavaProcessingInfo, dummy_inputs: LlavaDummyInputsBuilder
) -> BaseMultiModalProcessor:
    # Pixtral-HF checkpoints are served unpruned.
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    assert isinstance(info, LlavaProcessingInfo), type(info)
    return LlavaPruneMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor,
    info=_build_info,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class LlavaPruneForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose image embeddings are pruned to K rows per image."""

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        fields = {name: kwargs.pop(name, None) for name in FIELDS}
        embeds = super().embed_multimodal(**kwargs)
        if fields[KEEP_FIELD] is None or len(embeds) == 0:
            return embeds
        images = list(embeds)  # [B, N, D] tensor or tuple of [N_b, D]
        keep, diag_ids = _per_image(fields[KEEP_FIELD]), _per_image(fields[DIAGNOSTICS_FIELD])
        if all(k >= image.shape[0] for k, image in zip(keep, images)) and not any(diag_ids):
            return embeds

        # NOTE: with LoRA, embed_tokens is a wrapper whose indices belong to the current batch.
        embed_tokens = self.language_model.model.embed_tokens
        embed_tokens = getattr(embed_tokens, "base_layer", embed_tokens)
        device = images[0].device
        query_ids = _per_image_tensors(fields[QUERY_FIELD])
        methods = [PRUNE_METHODS[m] for m in _per_image(fields[METHOD_FIELD])]
        # The flow scout runs for flow images that prune or report scores, and have a question.
        scouted = [
            b
            for b, (m, ids) in enumerate(zip(methods, query_ids))
            if m == "flow" and ids.numel() and (keep[b] < images[b].shape[0] or diag_ids[b])
        ]
        bos_id = getattr(self.config.text_config, "bos_token_id", None) if scouted else None
        # One embedding call (one all-reduce under tensor parallelism) for the whole batch.
        id_lists = list(query_ids)
        if bos_id is not None:
            id_lists.append(torch.tensor([bos_id], dtype=torch.int64, device=id_lists[0].device))
        all_ids = torch.cat(id_lists).to(device)
        if all_ids.numel():
            embedded = embed_tokens(all_ids)
            lengths = [ids.numel() for ids in query_ids]
            queries = list(torch.split(embedded[: sum(lengths)], lengths))
        else:
            queries = [image.new_empty((0, image.shape[1])) for image in images]
        timer = diagnostics.STORE.start_timer(device)
        scores: list[torch.Tensor | None] = [None] * len(images)
        if scouted:
            layers = _per_image(fields[LAYER_FIELD])
            try:
                found = flow.scout_scores(
                    self,
                    [images[b] for b in scouted],
                    [queries[b] for b in scouted],
                    [layers[b] for b in scouted],
                    bos=embedded[-1] if bos_id is not None else None,
                )
            except flow.FlowUnavailable as err:
                # The processor refuses what it can see; what only the worker sees (pipeline
                # parallelism) must not stop the engine: the selection falls back to uniform
                # and says so in its method. Every rank raises here, before any collective.
                logger.warning("lvlm-prune: flow method unavailable, uniform instead: %s", err)
                found = [None] * len(scouted)
            for b, s in zip(scouted, found):
                scores[b] = s
        selections = select_tokens(
            images,
            queries,
            keep,
            methods=methods,
            merge=[bool(m) for m in _per_image(fields[MERGE_FIELD])],
            seeds=_per_image(fields[SEED_FIELD]),
            need_scores=any(diag_ids),
            scores=scores,
        )
        diagnostics.STORE.stop_timer(timer, num_images=len(images))
        flows = _per_image(fields[FLOW_FIELD]) if fields[FLOW_FIELD] is not None else []
        for b, (sel, diag_id, ids, image, query) in enumerate(
            zip(selections, diag_ids, query_ids, images, queries)
        ):
            if diag_id:
                diagnostics.STORE.put(diag_id, sel, image=image, query=query, query_ids=ids)
                if b < len(flows) and flows[b]:
                    diagnostics.STORE.put_flow(diag_id, sel, num_tokens=image.shape[0])
        return [sel.rows for sel in selections]


def _per_image(field) -> list[int]:
    if isinstance(field, torch.Tensor):
        return [int(x) for x in field.reshape(-1).tolist()]
    return [int(torch.as_tensor(x).reshape(-1)[0]) for x in field]


def _per_image_tensors(field) -> list[torch.Tensor]:
    # Batched fields of equal shape arrive stacked [B, T]; of different T, as a list of [T].
    return [t.reshape(-1) for t in field]
