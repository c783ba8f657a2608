"""The model half of pruning, for any vLLM multimodal family. Runs in the worker (GPU) process.

A family's module subclasses vLLM's model class with :class:`PruneModelMixin` first. The mixin
runs the stock vision encoder, then keeps K rows per image with ``select_tokens`` (K was decided by
the processor half, ``vllm_plugin/processing/processor.py``, and arrives as a per-image field), and
records diagnostics in the worker's store. A family may supply its own scout scores (the ``flow``
method), image grids, the rows that compete in the selection (LLaVA-NeXT: not its newline rows)
and the embeddings handed back to vLLM (Qwen2.5-VL: M-RoPE offsets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from vllm.model_executor.models.interfaces import MultiModalEmbeddings

from lvlm_prune.kernels import Selection, select_tokens

from ..options import (
    DIAGNOSTICS_FIELD,
    FLOW_FIELD,
    KEEP_FIELD,
    LAYER_FIELD,
    MERGE_FIELD,
    METHOD_FIELD,
    QUERY_FIELD,
    SEED_FIELD,
    read_image_fields,
)
from . import diagnostics, flow


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
        fields = read_image_fields(kwargs)  # decoded per image, as the processor encoded them
        embeds = super().embed_multimodal(**kwargs)
        if fields is None or len(embeds) == 0:
            return embeds
        images = list(embeds)  # [B, N, D] tensor or tuple of [N_b, D]
        selections = self._select_images(images, fields, kwargs)
        if selections is None:
            return embeds
        return self._pruned_embeddings(selections, images, kwargs)

    def _select_images(
        self,
        images: list[torch.Tensor],
        fields: Mapping[str, list],
        kwargs: Mapping[str, object],
    ) -> list[Selection] | None:
        """The selection of every image, or None when no image prunes or reports."""
        keep, diag_ids = fields[KEEP_FIELD], fields[DIAGNOSTICS_FIELD]
        if all(k >= image.shape[0] for k, image in zip(keep, images)) and not any(diag_ids):
            return None
        # NOTE: with LoRA, embed_tokens is a wrapper whose indices belong to the current batch.
        embed_tokens = self.get_language_model().model.embed_tokens
        embed_tokens = getattr(embed_tokens, "base_layer", embed_tokens)
        device = images[0].device
        query_ids = fields[QUERY_FIELD]
        methods = fields[METHOD_FIELD]
        # One embedding call (one all-reduce under tensor parallelism) for the whole batch.
        all_ids = torch.cat(list(query_ids)).to(device)
        if all_ids.numel():
            lengths = [ids.numel() for ids in query_ids]
            queries = list(torch.split(embed_tokens(all_ids), lengths))
        else:
            queries = [image.new_empty((0, image.shape[1])) for image in images]
        timer = diagnostics.STORE.start_timer(device)
        # Unpruned images keep every row (LLaVA-NeXT's newline rows too); the others select
        # among the rows that compete, and the kept indices come back in the image's own rows.
        prunable = [
            None if k >= image.shape[0] else rows
            for k, image, rows in zip(keep, images, self._prunable_rows(images, kwargs))
        ]
        competing = [
            image if rows is None else image[rows.to(image.device)]
            for image, rows in zip(images, prunable)
        ]
        scores = self._scout_scores(competing, queries, methods, keep, diag_ids, fields)
        selections = select_tokens(
            competing,
            queries,
            keep,
            methods=methods,
            merge=fields[MERGE_FIELD],
            seeds=fields[SEED_FIELD],
            need_scores=any(diag_ids),
            scores=scores,
        )
        selections = [
            sel if rows is None else in_image_rows(sel, rows, image.shape[0])
            for sel, rows, image in zip(selections, prunable, images)
        ]
        diagnostics.STORE.stop_timer(timer, num_images=len(images))
        flows = fields[FLOW_FIELD]
        grids = self._image_grids(images, kwargs) if any(diag_ids) else [None] * len(images)
        views = self._image_views(images, kwargs) if any(diag_ids) else [None] * len(images)
        for b, (sel, diag_id, ids, image, query, grid, view) in enumerate(
            zip(selections, diag_ids, query_ids, images, queries, grids, views)
        ):
            if diag_id:
                diagnostics.STORE.put(
                    diag_id, sel, image=image, query=query, query_ids=ids, grid=grid, views=view
                )
                if b < len(flows) and flows[b]:
                    diagnostics.STORE.put_flow(diag_id, sel, num_tokens=image.shape[0], grid=grid)
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

    def _prunable_rows(
        self, images: list[torch.Tensor], kwargs: Mapping[str, object]
    ) -> list[torch.Tensor | None]:
        """Per image, the indices of the rows that compete in the selection (int64, ascending),
        None: all of them. Rows left out are dropped when the image prunes and kept when it
        does not (LLaVA-NeXT's newline rows); K was taken from the competing count."""
        return [None] * len(images)

    def _image_views(
        self, images: list[torch.Tensor], kwargs: Mapping[str, object]
    ) -> list[list[dict] | None]:
        """Per image, its views for the diagnostics (``{"view", "grid", "offset"}`` each, offsets
        into the image's rows; LLaVA-NeXT: the base view and the crops), None: one view, the
        ``grid``."""
        return [None] * len(images)

    def _scout_scores(
        self,
        images: list[torch.Tensor],
        queries: list[torch.Tensor],
        methods: list[str],
        keep: list[int],
        diag_ids: list[int],
        fields: Mapping[str, list],
    ) -> list[torch.Tensor | None]:
        """Per image, scores computed by the model itself (the ``flow`` method's scout), or None
        where ``select_tokens`` scores the image on its own. The scout runs the model's first
        decoder layers over ``[head] + image + question`` (``flow.family_scout_scores``); a family
        says how that sequence starts (``_scout_head_id``) and where its tokens sit
        (``_scout_inputs``). On a language model the flow pass does not support, the processor
        refuses the ``flow`` method, so no image asks for a scout."""
        return flow.family_scout_scores(
            self,
            images,
            queries,
            methods,
            keep,
            diag_ids,
            fields[LAYER_FIELD],
            head_id=self._scout_head_id(),
            inputs=self._scout_inputs(images),
        )

    def _scout_head_id(self) -> int | None:
        """The token the scout's sequence starts with: the language model's BOS by default."""
        return getattr(self.config.get_text_config(), "bos_token_id", None)

    def _scout_inputs(self, images: list[torch.Tensor]) -> flow.ScoutInputs | None:
        """Per image, the scout sequence's (positions, DeepStack levels); None: 1-D positions
        0, 1, 2, ... and no DeepStack."""
        return None

    def _pruned_embeddings(
        self,
        selections: list[Selection],
        images: list[torch.Tensor],
        kwargs: Mapping[str, object],
    ) -> MultiModalEmbeddings:
        """What goes back to vLLM for each image: its K kept rows."""
        return [sel.rows for sel in selections]


def in_image_rows(sel: Selection, rows: torch.Tensor, num_tokens: int) -> Selection:
    """A selection made among ``rows`` of an image of ``num_tokens`` rows, told in the image's
    own rows: the kept indices mapped back, the scores of the rows that did not compete NaN."""
    rows = rows.to(sel.kept.device)
    scores = sel.scores
    if scores is not None:
        full = scores.new_full((num_tokens,), float("nan"))
        scores = full.index_copy_(0, rows.to(scores.device), scores)
    return dataclasses.replace(sel, kept=rows[sel.kept], scores=scores)


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
