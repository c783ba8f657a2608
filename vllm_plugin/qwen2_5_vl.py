"""Qwen2.5-VL with question-aware image-token pruning, as subclasses of vLLM's own classes.

The processor and the selection are LLaVA's (``PruneProcessorMixin``, ``PruneModelMixin``: the
model-independent part, written to move into one module shared by every family). What Qwen2.5-VL
adds is M-RoPE: every token has a (t, h, w) position, an image's tokens sit on its grid of
rows x cols (after the 2x2 merger), and the text after an image starts at the image's base
position + max(rows, cols). A pruned image must keep those: each kept token its own original
(t, h, w), the text after it the position it has without pruning.

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
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalHashes, MultiModalInput
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalKwargsItems,
    PlaceholderRange,
)
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import ProcessorInputs, PromptUpdate, TimingContext
from vllm.multimodal.processing.processor import MultiModalIsCached

from lvlm_prune.kernels import PRUNE_METHODS, Selection, keep_count, select_tokens

from . import diagnostics, options
from .accounting import LEDGER, RequestCounts
from .llava import (
    DIAGNOSTICS_FIELD,
    FIELDS,
    KEEP_FIELD,
    MERGE_FIELD,
    METHOD_FIELD,
    QUERY_FIELD,
    SEED_FIELD,
    _per_image,
    _per_image_tensors,
    _shorten,
)
from .options import PruneOptionError, PruneOptions

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
    keep_columns: list[torch.Tensor] = []
    shift = 0  # placeholders added so far by widening
    at = 0  # next prompt index not yet in keep_columns
    for i in order:
        feature = mm_features[i]
        offset, length = feature.mm_position.offset, feature.mm_position.length
        full = grids[i][0] * grids[i][1] * grids[i][2]
        keep_columns.append(torch.arange(at, offset + length) + shift)
        if length < full:
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
    positions, delta = stock(range(len(input_tokens) + shift), widened)
    positions = positions[:, torch.cat(keep_columns)]
    for i in order:
        feature = mm_features[i]
        offset, length = feature.mm_position.offset, feature.mm_position.length
        if length < grids[i][0] * grids[i][1] * grids[i][2]:
            positions[:, offset : offset + length] = positions[0, offset]
    # The first generated token goes where it goes without pruning.
    return positions, int(delta) + shift


# ---- processor: the model-independent part ------------------------------------------------------


class PruneProcessorMixin:
    """Pruning for a vLLM multimodal processor: K placeholders per image, the options and each
    image's query as per-image fields, and each image hashed with its own query.

    Model-independent; a family supplies :meth:`_image_token_counts` (N of each processed image),
    :meth:`_num_image_tokens` (N of an input image, for the request's counts) and
    :meth:`_check_options`.
    """

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        merged = self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs)
        opts = PruneOptions.from_kwargs(merged)
        opts.check_layers(self.info.get_hf_config().text_config.num_hidden_layers)
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
        counts = [keep_count(n, opts.keep_ratio) for n in self._image_token_counts(processed)]
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
        for name in FIELDS:
            if name not in processed:  # the flow method's fields, unused here
                processed[name] = torch.zeros((num,), dtype=torch.int64)
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
        # Ours stripped first: a family may build its HF processor from these kwargs, and the
        # query ids would make a new (lru-cached) HF processor per question.
        updates = super()._get_prompt_updates(
            mm_items, options.without_own_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        ratio = PruneOptions.from_kwargs(hf_processor_mm_kwargs).keep_ratio
        if ratio >= 1.0:
            return updates
        return [
            _shorten(update, ratio) if update.modality == "image" else update for update in updates
        ]

    # -- what a family supplies --

    def _placeholder_ids(self) -> set[int]:
        raise NotImplementedError

    def _image_token_counts(self, processed: BatchFeature) -> list[int]:
        raise NotImplementedError

    def _num_image_tokens(
        self,
        result: MultiModalInput,
        mm_items: MultiModalDataItems,
        item_idx: int,
        hf_kwargs: Mapping[str, object],
    ) -> int:
        """N of image ``item_idx`` of a processed request, before pruning."""
        raise NotImplementedError

    def _check_options(self, opts: PruneOptions) -> None:
        pass


class Qwen2_5_VLPruneMultiModalProcessor(PruneProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    def _placeholder_ids(self) -> set[int]:
        config = self.info.get_hf_config()
        return {config.image_token_id, config.video_token_id}

    def _merge_size(self) -> int:
        return self.info.get_hf_config().vision_config.spatial_merge_size

    def _image_token_counts(self, processed: BatchFeature) -> list[int]:
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
        if opts.method == "flow":
            raise PruneOptionError(
                options.METHOD,
                "prune_method 'flow' is not available for Qwen2.5-VL; use one of "
                f"{[m for m in PRUNE_METHODS if m != 'flow']}",
            )
        evs = self.info.ctx.get_mm_config().video_pruning_rate
        if opts.active and evs:
            # vLLM's video pruning (EVS) rewrites every media row's positions in the runner.
            raise PruneOptionError(
                options.KEEP_RATIO,
                "image pruning is not available while vLLM's video pruning is on "
                f"(video_pruning_rate={evs})",
            )


# ---- model: the model-independent part ----------------------------------------------------------


class PruneModelMixin:
    """The worker side: K rows of each image kept by ``select_tokens``, diagnostics recorded."""

    def _select_images(
        self, images: list[torch.Tensor], fields: Mapping[str, object]
    ) -> list[Selection] | None:
        """The selection of every image, or None when no image prunes or reports."""
        keep, diag_ids = _per_image(fields[KEEP_FIELD]), _per_image(fields[DIAGNOSTICS_FIELD])
        if all(k >= image.shape[0] for k, image in zip(keep, images)) and not any(diag_ids):
            return None
        # NOTE: with LoRA, embed_tokens is a wrapper whose indices belong to the current batch.
        embed_tokens = self.get_language_model().model.embed_tokens
        embed_tokens = getattr(embed_tokens, "base_layer", embed_tokens)
        device = images[0].device
        query_ids = _per_image_tensors(fields[QUERY_FIELD])
        all_ids = torch.cat(list(query_ids)).to(device)
        if all_ids.numel():
            lengths = [ids.numel() for ids in query_ids]
            queries = list(torch.split(embed_tokens(all_ids), lengths))
        else:
            queries = [image.new_empty((0, image.shape[1])) for image in images]
        timer = diagnostics.STORE.start_timer(device)
        selections = select_tokens(
            images,
            queries,
            keep,
            methods=[PRUNE_METHODS[m] for m in _per_image(fields[METHOD_FIELD])],
            merge=[bool(m) for m in _per_image(fields[MERGE_FIELD])],
            seeds=_per_image(fields[SEED_FIELD]),
            need_scores=any(diag_ids),
        )
        diagnostics.STORE.stop_timer(timer, num_images=len(images))
        for sel, diag_id, ids, image, query in zip(
            selections, diag_ids, query_ids, images, queries
        ):
            if diag_id:
                diagnostics.STORE.put(diag_id, sel, image=image, query=query, query_ids=ids)
        return selections


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLPruneMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class Qwen2_5_VLPruneForConditionalGeneration(PruneModelMixin, Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` whose images are pruned to K rows each, every kept
    row at its original M-RoPE position (see the module's docstring for how)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._carrier_width = self.config.text_config.hidden_size + POSITION_CHANNELS
        # (rows of the flattened batch, [3, R] offsets) from embed_input_ids for the next forward.
        self._pending_offsets: tuple[torch.Tensor, torch.Tensor] | None = None

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

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        fields = {name: kwargs.pop(name, None) for name in FIELDS}
        grid_thw = kwargs.get("image_grid_thw")
        embeds = super().embed_multimodal(**kwargs)
        if fields[KEEP_FIELD] is None or len(embeds) == 0:
            return embeds
        images = list(embeds)
        selections = self._select_images(images, fields)
        if selections is None:
            return embeds
        merge = self.config.vision_config.spatial_merge_size
        out = []
        for sel, image, thw in zip(selections, images, grid_thw.tolist()):
            if sel.kept.numel() == image.shape[0]:
                out.append(sel.rows)  # unpruned: vLLM's own positions
                continue
            thw_kept = grid_positions(thw[1] // merge, thw[2] // merge, sel.kept)
            out.append(torch.cat([sel.rows, encode_positions(thw_kept, sel.rows.dtype)], dim=1))
        return out

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
        """Rows without the position channels, and (batch rows, [3, R] offsets) of the rows
        that carried them. The multimodal rows fill ``is_multimodal``'s true entries in order."""
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
        return stripped, (torch.cat(carried_rows), torch.cat(offsets, dim=1))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        pending, self._pending_offsets = self._pending_offsets, None
        if pending is not None and positions.ndim == 2:
            rows, offsets = pending
            # In place: the runner's positions buffer is what CUDA graphs replay from, and what
            # a drafter reads after this pass; it is rewritten from the request's positions
            # before every step, so nothing accumulates.
            positions[:, rows.to(positions.device)] += offsets.to(positions.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
