"""The processor half of pruning, for any vLLM multimodal family. Runs in the API process.

A family's module (``vllm_plugin/llava.py``, ``vllm_plugin/qwen2_5_vl.py``) subclasses vLLM's own
processor with :class:`PruneProcessorMixin` first and supplies only what differs between families:
how many tokens an image has and which token ids are placeholders.

The mixin decides K = keep_count(N, keep_ratio) per image (of the N tokens that compete: LLaVA-NeXT
leaves its newline rows out), emits K placeholders instead of N, and
hands the model each image's query token ids and the options as per-image fields
(``options.image_fields``, from the options' declarations). Each image is hashed with the options
and its own query only, so vLLM's processor, encoder and prefix caches are keyed by that image's
question: in a conversation, an image keeps its hash, its selection and its place in the prefix
cache turn after turn. The worker half is ``vllm_plugin/worker/model.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalHashes, MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.multimodal.processing.processor import MultiModalIsCached

from lvlm_prune.kernels import keep_count

from .. import options, vllm_internals
from ..options import CPU_FIELDS, FIELDS, ImageInfo, PruneOptions
from ..worker import flow
from .accounting import LEDGER, RequestCounts


class PruneProcessorMixin:
    """Pruning for a vLLM multimodal processor (put it before vLLM's class in the bases).

    A family supplies :meth:`_placeholder_ids`, :meth:`_image_token_counts` (N of each image the
    HF processor processed), :meth:`_num_image_tokens` (N of an image of a processed request, for
    the server's counts) and, optionally, :meth:`_check_options`.
    """

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        # The one parse of the request in this process. The hooks vLLM calls below (the HF
        # processor's fields, prompt updates, hashes) get the normalised options that
        # ``hashed_kwargs`` writes into ``hf_processor_mm_kwargs`` and read them back with
        # ``PruneOptions.from_hashed``, unchecked.
        merged = {
            **self._checkpoint_defaults,
            **self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs),
        }
        opts = PruneOptions.from_kwargs(merged)
        # prune_layer against the model's layers: in check_supported (options.check_prune_layer).
        flow.check_supported(opts, self.info.get_hf_config().get_text_config())
        self._check_options(opts)
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
            before = [
                self._num_image_tokens(result, mm_items, i, kwargs) for i in range(len(after))
            ]
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
            skip = set(tokenizer.all_special_ids) | self._placeholder_ids()
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
        hashes["image"] = [
            vllm_internals.rehash_image(self.info.ctx, item_hash, {options.QUERY_IDS: ids})
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
        opts = PruneOptions.from_hashed(hf_kwargs)  # parsed in apply
        num = len(images)
        query_ids = hf_kwargs.get(options.QUERY_IDS) or [()] * num
        assert len(query_ids) == num, (len(query_ids), num)
        tokens = self._image_token_counts(processed, mm_items)
        assert len(tokens) == num, (len(tokens), num)
        images = [
            ImageInfo(self._kept_count(mm_items, i, n, opts.keep_ratio), tuple(ids), n)
            for i, (n, ids) in enumerate(zip(tokens, query_ids))
        ]
        processed.update(options.image_fields(opts, images))
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        config.update(
            {
                name: MultiModalFieldConfig.batched("image", keep_on_cpu=name in CPU_FIELDS)
                for name in FIELDS
            }
        )
        return config

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        # Ours stripped first: a family may build its HF processor from these kwargs (Qwen2.5-VL
        # does), and the query ids would load a new (lru-cached) HF processor per question.
        updates = super()._get_prompt_updates(
            mm_items, options.without_own_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        ratio = PruneOptions.from_hashed(hf_processor_mm_kwargs).keep_ratio  # parsed in apply
        if ratio >= 1.0:
            return updates
        return [
            self._pruned_replacement(update, mm_items, ratio)
            if update.modality == "image"
            else update
            for update in updates
        ]

    def _kept_count(
        self, mm_items: MultiModalDataItems, item_idx: int, num_tokens: int, ratio: float
    ) -> int:
        """K of image ``item_idx`` (N tokens): all N unpruned (newline rows included), else
        ``keep_count`` of the tokens the budget is taken from (``_budget_tokens``). The one
        rule, for the placeholders and for the K the model receives."""
        if ratio >= 1.0:
            return num_tokens
        return keep_count(self._budget_tokens(mm_items, item_idx, num_tokens), ratio)

    def _pruned_replacement(
        self, update: PromptReplacement, mm_items: MultiModalDataItems, ratio: float
    ) -> PromptReplacement:
        """vLLM's replacement for an image with K placeholders instead of N: its first K
        tokens. Right when the replacement is N placeholders; a family whose replacement wraps
        them in text (``<img>`` ... ``</img>``) overrides this to shorten the placeholders and
        keep the wrapper."""
        stock = update.replacement

        def replacement(item_idx: int):
            tokens = stock(item_idx) if callable(stock) else stock
            return tokens[: self._kept_count(mm_items, item_idx, len(tokens), ratio)]

        return PromptReplacement(
            modality=update.modality, target=update.target, replacement=replacement
        )

    @functools.cached_property
    def _checkpoint_defaults(self) -> dict[str, object]:
        """The checkpoint's declared kwargs, validated once (the engine's start-up profiling run
        is the first call, so a bad declaration stops the engine there)."""
        return options.checkpoint_defaults(self.info.get_hf_config())

    # -- what a family supplies --

    def _placeholder_ids(self) -> set[int]:
        """Token ids that stand for media in a prompt (left out of the default query)."""
        raise NotImplementedError

    def _image_token_counts(
        self, processed: BatchFeature, mm_items: MultiModalDataItems
    ) -> list[int]:
        """N of each image the HF processor just processed, in order."""
        raise NotImplementedError

    def _num_image_tokens(
        self,
        result: MultiModalInput,
        mm_items: MultiModalDataItems,
        item_idx: int,
        hf_kwargs: Mapping[str, object],
    ) -> int:
        """N of image ``item_idx`` of a processed request, before pruning (also on a
        processor-cache hit, where the HF processor did not run)."""
        raise NotImplementedError

    def _budget_tokens(self, mm_items: MultiModalDataItems, item_idx: int, num_tokens: int) -> int:
        """How many of image ``item_idx``'s N tokens compete in the selection: the count K is
        taken from. All N by default; LLaVA-NeXT leaves its newline rows out."""
        return num_tokens

    def _check_options(self, opts: PruneOptions) -> None:
        """Refuse what this family cannot run (``PruneOptionError``, naming the kwarg)."""
