"""Qwen3-VL, dense and MoE, with question-aware image-token pruning, as subclasses of vLLM's own
classes.

Everything Qwen2.5-VL needs, Qwen3-VL needs too (``qwen2_5_vl.py``: N per image from its grid,
M-RoPE positions of the unpruned prompt, each kept row's (t, h, w) carried in extra channels and
added in ``forward``); this module adds DeepStack. Qwen3-VL's vision tower returns, per merged
token, the main embedding (what the language model reads as the token) followed by one slice
per DeepStack level (features of intermediate vision blocks, added to the hidden states after
the first decoder layers at the image's positions): width D x (1 + levels). So:

- the selection scores the main embedding only (the first D columns), as on every other family;
- the kept rows are taken across the full width, so every level keeps exactly the main
  embedding's rows: vLLM's ``_compute_deepstack_embeds`` then splits the columns into per-level
  buffers row for row, and a level can never add one token's features to another token;
- the position channels go after all of it, and are stripped before that split;
- information flow (``worker/flow.py``) adds each level's kept rows after decoder layer i, as
  vLLM's ``Qwen3LLMModel.forward`` does: the flow pass from the levels kept with the request's
  rows, the scout from the image's.

``prune_merge`` is refused: the merge assigns each dropped row to its nearest kept row, and the
DeepStack levels would have to follow the main embedding's assignment, which the merge kernel
does not expose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from transformers import BatchFeature
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import MultiModalDataItems

from lvlm_prune.kernels import Selection

from . import options
from .options import DIAGNOSTICS_FIELD, FLOW_FIELD, PruneOptionError, PruneOptions
from .qwen2_5_vl import MRopePruneModelMixin, MRopePruneProcessorMixin
from .worker import diagnostics, flow

# ---- processor ----------------------------------------------------------------------------------


class _Qwen3VLProcessorWithoutOwnKwargs(Qwen3VLMultiModalProcessor):
    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # NOTE(vLLM 0.32): Qwen3-VL's own _apply_hf_processor_main loads and calls the HF
        # processor itself (info.get_hf_processor(**kwargs), ctx.call_hf_processor), not through
        # self._call_hf_processor where PruneProcessorMixin strips our kwargs: stripped here, or
        # each new question (prune_query_ids) would load another HF processor. A server-wide
        # --mm-processor-kwargs still reaches the HF call (vLLM merges it back in there); the HF
        # processor ignores keys it does not know (transformers 5.19, checked).
        return super()._apply_hf_processor_main(mm_items, options.without_own_kwargs(hf_kwargs))


class Qwen3VLPruneMultiModalProcessor(MRopePruneProcessorMixin, _Qwen3VLProcessorWithoutOwnKwargs):
    def _check_options(self, opts: PruneOptions) -> None:
        super()._check_options(opts)
        if opts.prunes and opts.merge:
            raise PruneOptionError(
                options.MERGE,
                "prune_merge is not available for Qwen3-VL: its DeepStack features would have "
                "to follow the main embedding's merge, which is not implemented",
            )


# ---- model --------------------------------------------------------------------------------------


class DeepStackPruneModelMixin(MRopePruneModelMixin):
    """Selection on the main embedding, kept rows across every DeepStack level (see the
    module's docstring)."""

    _scout_levels: list[torch.Tensor] | None = None
    """Each image's DeepStack columns, while ``_select_images`` runs (the flow method's scout)."""

    def _image_row_width(self) -> int:
        return self.visual_dim + self.multiscale_dim

    def _select_images(
        self,
        images: list[torch.Tensor],
        fields: Mapping[str, list],
        kwargs: Mapping[str, object],
    ) -> list[Selection] | None:
        # The rows the language model reads as tokens; the DeepStack columns follow in
        # _pruned_embeddings.
        main = [image[:, : self.visual_dim].contiguous() for image in images]
        self._scout_levels = [image[:, self.visual_dim :] for image in images]
        try:
            selections = super()._select_images(main, fields, kwargs)
        finally:
            self._scout_levels = None
        if selections is not None:
            flows = fields[FLOW_FIELD]
            for b, (sel, diag_id) in enumerate(zip(selections, fields[DIAGNOSTICS_FIELD])):
                if diag_id and b < len(flows) and flows[b]:  # after put_flow's rows
                    levels = images[b][sel.kept.to(images[b].device), self.visual_dim :]
                    diagnostics.STORE.put_flow_levels(diag_id, levels)
        return selections

    def _scout_deepstack(self, b: int) -> list[torch.Tensor] | None:
        return list(self._scout_levels[b].split(self.visual_dim, dim=1))

    def flow_inputs(self, prompt_ids, entry: dict):
        positions, _ = super().flow_inputs(prompt_ids, entry)
        device = next(self.parameters()).device
        ids = torch.as_tensor(list(prompt_ids), device=device)
        at = (ids == self.config.image_token_id).nonzero().flatten()
        if len(entry.get("levels", ())) != len(entry["rows"]):
            raise flow.FlowUnavailable("the request's DeepStack rows were not kept")
        levels = torch.cat(entry["levels"]).to(device).split(self.visual_dim, dim=1)
        return positions, flow.deepstack_adder(at, levels)

    def _pruned_embeddings(
        self,
        selections: list[Selection],
        images: list[torch.Tensor],
        kwargs: Mapping[str, object],
    ) -> MultiModalEmbeddings:
        # The main embedding's kept rows, every level's columns with them (merge is refused by
        # the processor, so the kept rows are the image's own rows).
        full = [dataclasses.replace(s, rows=image[s.kept]) for s, image in zip(selections, images)]
        return super()._pruned_embeddings(full, images, kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    Qwen3VLPruneMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class Qwen3VLPruneForConditionalGeneration(
    DeepStackPruneModelMixin, Qwen3VLForConditionalGeneration
):
    """``Qwen3VLForConditionalGeneration`` whose images are pruned to K rows each, every
    DeepStack level with the same rows, every kept row at its original M-RoPE position."""


@MULTIMODAL_REGISTRY.register_processor(
    Qwen3VLPruneMultiModalProcessor,
    info=Qwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class Qwen3VLMoePruneForConditionalGeneration(
    DeepStackPruneModelMixin, Qwen3VLMoeForConditionalGeneration
):
    """The MoE variant: the same vision path and pruning, registered with its own processing
    info (its config class) as vLLM registers it."""
