"""Pruning for any vLLM multimodal model family: the processor half and the model half.

A family's module (``llava.py``, ``qwen2_5_vl.py``) subclasses vLLM's own processor and model
class with these mixins first, and supplies only what differs between families: how many tokens
an image has, which token ids are placeholders, what it refuses, and (Qwen2.5-VL) how kept rows
keep their positions.

Processor (API process, :class:`PruneProcessorMixin`): decides K = keep_count(N, keep_ratio) per
image, emits K placeholders instead of N, and hands the model each image's query token ids and
the options as per-image fields. Each image is hashed with the options and its own query only, so
vLLM's processor, encoder and prefix caches are keyed by that image's question: in a
conversation, an image keeps its hash, its selection and its place in the prefix cache turn after
turn. Model (worker, :class:`PruneModelMixin`): runs the stock vision encoder, then keeps K rows per
image with ``select_tokens``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalHashes, MultiModalInput
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.multimodal.processing.processor import MultiModalIsCached

from lvlm_prune.kernels import PRUNE_METHODS, Selection, keep_count, select_tokens

from . import diagnostics, flow, options
from .accounting import LEDGER, RequestCounts
from .options import PruneOptions

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


# ---- processor ------------------------------------------------------------------------------


class PruneProcessorMixin:
    """Pruning for a vLLM multimodal processor (put it before vLLM's class in the bases).

    A family supplies :meth:`_placeholder_ids`, :meth:`_image_token_counts` (N of each image the
    HF processor processed), :meth:`_num_image_tokens` (N of an image of a processed request, for
    the server's counts) and, optionally, :meth:`_check_options`.
    """

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        merged = {
            **self._checkpoint_defaults,
            **self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs),
        }
        opts = PruneOptions.from_kwargs(merged)
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
            keep_count(n, opts.keep_ratio) for n in self._image_token_counts(processed, mm_items)
        ]
        assert len(counts) == num, (len(counts), num)
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
        # Ours stripped first: a family may build its HF processor from these kwargs (Qwen2.5-VL
        # does), and the query ids would load a new (lru-cached) HF processor per question.
        updates = super()._get_prompt_updates(
            mm_items, options.without_own_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        ratio = PruneOptions.from_kwargs(hf_processor_mm_kwargs).keep_ratio
        if ratio >= 1.0:
            return updates
        return [
            _shorten(update, ratio) if update.modality == "image" else update for update in updates
        ]

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

    def _check_options(self, opts: PruneOptions) -> None:
        """Refuse what this family cannot run (``PruneOptionError``, naming the kwarg)."""


def _shorten(update: PromptReplacement, ratio: float) -> PromptReplacement:
    """The same replacement with K = keep_count(N, ratio) placeholders instead of N."""
    stock = update.replacement

    def replacement(item_idx: int):
        tokens = stock(item_idx) if callable(stock) else stock
        return tokens[: keep_count(len(tokens), ratio)]

    return PromptReplacement(
        modality=update.modality, target=update.target, replacement=replacement
    )


# ---- model ----------------------------------------------------------------------------------


class PruneModelMixin:
    """The worker side (put it before vLLM's model class in the bases): K rows of each image kept
    by ``select_tokens``, diagnostics recorded.

    A family may supply :meth:`_scout_scores` (scores computed by the model itself, for the
    ``flow`` method) and :meth:`_pruned_embeddings` (what goes back to vLLM for the kept rows).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        refuse_unsupported(type(self), vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    @classmethod
    def unsupported_engine_config(cls, vllm_config) -> list[str]:
        """What of this engine's configuration pruning cannot serve, one phrase each (empty:
        all of it). Checked when the model is built, so the engine refuses to start."""
        lora = vllm_config.lora_config
        if lora is not None and lora.enable_tower_connector_lora:
            return [
                "LoRA on the vision tower and connector (enable_tower_connector_lora): vLLM "
                "sizes those adapters' token mappings by each image's placeholder count, "
                "which pruning shortens"
            ]
        return []

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        fields = {name: kwargs.pop(name, None) for name in FIELDS}
        embeds = super().embed_multimodal(**kwargs)
        if fields[KEEP_FIELD] is None or len(embeds) == 0:
            return embeds
        images = list(embeds)  # [B, N, D] tensor or tuple of [N_b, D]
        selections = self._select_images(images, fields, kwargs)
        if selections is None:
            return embeds
        return self._pruned_embeddings(selections, images, kwargs)

    def _select_images(
        self,
        images: list[torch.Tensor],
        fields: Mapping[str, object],
        kwargs: Mapping[str, object],
    ) -> list[Selection] | None:
        """The selection of every image, or None when no image prunes or reports."""
        keep, diag_ids = per_image(fields[KEEP_FIELD]), per_image(fields[DIAGNOSTICS_FIELD])
        if all(k >= image.shape[0] for k, image in zip(keep, images)) and not any(diag_ids):
            return None
        # NOTE: with LoRA, embed_tokens is a wrapper whose indices belong to the current batch.
        embed_tokens = self.get_language_model().model.embed_tokens
        embed_tokens = getattr(embed_tokens, "base_layer", embed_tokens)
        device = images[0].device
        query_ids = per_image_tensors(fields[QUERY_FIELD])
        methods = [PRUNE_METHODS[m] for m in per_image(fields[METHOD_FIELD])]
        # One embedding call (one all-reduce under tensor parallelism) for the whole batch.
        all_ids = torch.cat(list(query_ids)).to(device)
        if all_ids.numel():
            lengths = [ids.numel() for ids in query_ids]
            queries = list(torch.split(embed_tokens(all_ids), lengths))
        else:
            queries = [image.new_empty((0, image.shape[1])) for image in images]
        timer = diagnostics.STORE.start_timer(device)
        scores = self._scout_scores(images, queries, methods, keep, diag_ids, fields)
        selections = select_tokens(
            images,
            queries,
            keep,
            methods=methods,
            merge=[bool(m) for m in per_image(fields[MERGE_FIELD])],
            seeds=per_image(fields[SEED_FIELD]),
            need_scores=any(diag_ids),
            scores=scores,
        )
        diagnostics.STORE.stop_timer(timer, num_images=len(images))
        flows = per_image(fields[FLOW_FIELD]) if fields[FLOW_FIELD] is not None else []
        grids = self._image_grids(images, kwargs) if any(diag_ids) else [None] * len(images)
        for b, (sel, diag_id, ids, image, query, grid) in enumerate(
            zip(selections, diag_ids, query_ids, images, queries, grids)
        ):
            if diag_id:
                diagnostics.STORE.put(
                    diag_id, sel, image=image, query=query, query_ids=ids, grid=grid
                )
                if b < len(flows) and flows[b]:
                    diagnostics.STORE.put_flow(diag_id, sel, num_tokens=image.shape[0])
        return selections

    def _image_grids(
        self, images: list[torch.Tensor], kwargs: Mapping[str, object]
    ) -> list[tuple[int, int] | None]:
        """Per image, its tokens' (rows, cols) for the diagnostics' heatmap, None when unknown.
        LLaVA-style towers: a square grid (the image is resized to the tower's square input)."""
        grids: list[tuple[int, int] | None] = []
        for image in images:
            side = math.isqrt(image.shape[0])
            grids.append((side, side) if side * side == image.shape[0] else None)
        return grids

    def _scout_scores(
        self,
        images: list[torch.Tensor],
        queries: list[torch.Tensor],
        methods: list[str],
        keep: list[int],
        diag_ids: list[int],
        fields: Mapping[str, object],
    ) -> list[torch.Tensor | None]:
        """Per image, scores computed by the model itself (the ``flow`` method's scout), or None
        where ``select_tokens`` scores the image on its own. Families without a scout: all None
        (the processor refuses the ``flow`` method for them)."""
        return [None] * len(images)

    def _pruned_embeddings(
        self,
        selections: list[Selection],
        images: list[torch.Tensor],
        kwargs: Mapping[str, object],
    ) -> MultiModalEmbeddings:
        """What goes back to vLLM for each image: its K kept rows."""
        return [sel.rows for sel in selections]


def refuse_unsupported(model_cls: type, vllm_config) -> None:
    """Raise at engine start when ``model_cls`` cannot prune under ``vllm_config``.

    Raises:
        ValueError: naming each unsupported setting and how to serve anyway.
    """
    problems = model_cls.unsupported_engine_config(vllm_config)
    if problems:
        stock = next(c.__name__ for c in model_cls.__mro__ if c.__module__.startswith("vllm."))
        raise ValueError(
            f"lvlm-prune cannot prune {stock} with " + "; nor with ".join(problems) + ". Start "
            "the engine without it, or serve the model unpruned with lvlm-prune's plugin left "
            "out (VLLM_PLUGINS naming the plugins to load, without lvlm_prune)."
        )


def per_image(field) -> list[int]:
    """A batched per-image scalar field as a list of ints."""
    if isinstance(field, torch.Tensor):
        return [int(x) for x in field.reshape(-1).tolist()]
    return [int(torch.as_tensor(x).reshape(-1)[0]) for x in field]


def per_image_tensors(field) -> list[torch.Tensor]:
    # Batched fields of equal shape arrive stacked [B, T]; of different T, as a list of [T].
    return [t.reshape(-1) for t in field]
