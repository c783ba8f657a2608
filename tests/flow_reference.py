"""The transformers side of the information-flow comparisons: the same model with eager attention
and ``output_attentions=True``, float32, fed the reference-pruned input embeddings. Written from
the definitions (docs/flow.md), not from lvlm_prune's code."""

from __future__ import annotations

import functools

import hf_reference as ref
import torch
from transformers import LlavaForConditionalGeneration

from lvlm_prune.models.tiny_llava import BOS_ID, IMAGE_TOKEN_ID


@functools.lru_cache(maxsize=1)
def eager_model(model_dir: str):
    return LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@torch.no_grad()
def prompt_flow(
    model_dir: str, prompt_ids, image_rows: list[torch.Tensor], kept, *, map_rows="question"
):
    """Per layer (system, image, question) shares of the last position's head-mean attention,
    and per layer the head- and row-mean attention of the positions after the last image token to
    each image token, split per image: ``(shares [layers][3], maps [layers][images] tensors)``
    (``map_rows="last"``: the last position's row alone, for the negative control). The prompt
    sits at LLaVA's original positions (each image's ``kept`` indices)."""
    model = eager_model(model_dir)
    ids = torch.as_tensor(list(prompt_ids))
    embeds = model.get_input_embeddings()(ids)
    image = ids == IMAGE_TOKEN_ID
    embeds[image] = torch.cat(image_rows)
    llava = ref.reference(ref.LlavaReference, model_dir)
    kept = [list(map(int, k)) for k in kept]
    positions = llava.positions(list(prompt_ids), [llava.grid(None)] * len(kept), kept)
    # NOTE(transformers 5.19): gapped positions need the explicit mask (hf_reference.greedy).
    out = model(
        inputs_embeds=embeds[None],
        position_ids=positions[None],
        attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
        output_attentions=True,
    )
    at = image.nonzero().flatten()
    first, last = int(at[0]), int(at[-1])
    system = torch.arange(len(ids)) < first
    question = ~system & ~image
    shares, maps = [], []
    for attentions in out.attentions:
        mean = attentions[0].double().mean(dim=0)  # [L, L], heads averaged
        row = mean[-1]
        shares.append(
            [float(row[system].sum()), float(row[image].sum()), float(row[question].sum())]
        )
        paid = mean[last + 1 if map_rows == "question" else -1 :][:, image].mean(dim=0)
        maps.append(list(torch.split(paid, [r.shape[0] for r in image_rows])))
    return shares, maps


@torch.no_grad()
def scout_scores(model_dir: str, image, q_ids, prune_layer: int, *, last_row_only=False):
    """[N] attention the question tokens pay each image token in decoder layer prune_layer - 1 of
    a pass over [BOS] + image features + question embeddings, mean over heads and question tokens
    (``last_row_only``: the last question token alone, for the negative control)."""
    model = eager_model(model_dir)
    feats = ref.image_features(model_dir, image)
    embed = model.get_input_embeddings()
    seq = torch.cat([embed(torch.tensor([BOS_ID])), feats, embed(torch.as_tensor(list(q_ids)))])
    out = model.model.language_model(inputs_embeds=seq[None], output_attentions=True)
    probs = out.attentions[prune_layer - 1][0].double()  # [H, L, L]
    n = feats.shape[0]
    rows = probs[:, -1:] if last_row_only else probs[:, 1 + n :]
    return rows[:, :, 1 : 1 + n].mean(dim=(0, 1)).float()


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The K highest scores' indices, ties to the lower index, ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


# ---- the M-RoPE families (Qwen2.5-VL, Qwen3-VL dense and MoE) --------------------------------


@functools.lru_cache(maxsize=1)
def eager_reference(cls: type[ref.Reference], model_dir: str) -> ref.Reference:
    """The family's reference (``hf_reference``) with eager attention, so that
    ``output_attentions=True`` returns the probabilities."""
    family = cls(model_dir)
    family.model.set_attn_implementation("eager")
    return family


def _text_attentions(family: ref.Reference, ids, image_rows, positions):
    """Per layer [H, L, L] attention of transformers' language model over ``ids`` whose image
    placeholders take ``image_rows`` (in order; Qwen3-VL: full width, the DeepStack levels'
    columns after the main embedding's) at ``positions`` ([3, L]; [L] for a 1-D family)."""
    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    width = family.model.config.text_config.hidden_size
    embeds = family.embed(ids)
    mask = ids == family.image_token_id
    rows = torch.cat(image_rows)
    embeds[mask] = rows[:, :width]
    extra = {}
    if rows.shape[1] > width:
        extra = {
            "visual_pos_masks": mask[None],
            "deepstack_visual_embeds": list(rows[:, width:].split(width, dim=1)),
        }
    out = family.model.model.language_model(
        inputs_embeds=embeds[None],
        position_ids=torch.as_tensor(positions).unsqueeze(-2),
        attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
        output_attentions=True,
        **extra,
    )
    return [a[0].double() for a in out.attentions]


@torch.no_grad()
def mrope_prompt_flow(family: ref.Reference, prompt_ids, image_rows, positions):
    """``prompt_flow`` for any family's reference at ``positions`` (M-RoPE [3, L], or [L]):
    (shares [layers][3], maps [layers][images])."""
    ids = torch.as_tensor(list(prompt_ids))
    image = ids == family.image_token_id
    at = image.nonzero().flatten()
    system = torch.arange(len(ids)) < int(at[0])
    question = ~system & ~image
    shares, maps = [], []
    for probs in _text_attentions(family, prompt_ids, image_rows, positions):
        mean = probs.mean(dim=0)
        row = mean[-1]
        shares.append(
            [float(row[system].sum()), float(row[image].sum()), float(row[question].sum())]
        )
        paid = mean[int(at[-1]) + 1 :][:, image].mean(dim=0)
        maps.append(list(torch.split(paid, [r.shape[0] for r in image_rows])))
    return shares, maps


@torch.no_grad()
def mrope_scout_scores(family: ref.Reference, image, q_ids, prune_layer: int) -> torch.Tensor:
    """[N] the flow method's scout for an M-RoPE family: transformers' language model over
    ``<|vision_start|>`` + the image's rows (all of them; DeepStack levels too) + the question
    embeddings, at the positions ``get_rope_index`` gives that sequence; the attention the
    question tokens pay each image token in layer ``prune_layer - 1``, mean over heads and
    question tokens."""
    n = family.image_features(image).shape[0]
    everything = torch.arange(n)
    ids = [family.model.config.vision_start_token_id, *[family.image_token_id] * n, *q_ids]
    positions = family.positions(ids, [family.grid(image)], [everything])
    rows = family.pruned_rows(image, everything)
    probs = _text_attentions(family, ids, [rows], positions)[prune_layer - 1]
    return probs[:, 1 + n :, 1 : 1 + n].mean(dim=(0, 1)).float()
