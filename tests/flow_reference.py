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
def prompt_flow(model_dir: str, prompt_ids, image_rows: list[torch.Tensor], *, map_rows="question"):
    """Per layer (system, image, question) shares of the last position's head-mean attention,
    and per layer the head- and row-mean attention of the positions after the last image token to
    each image token, split per image: ``(shares [layers][3], maps [layers][images] tensors)``
    (``map_rows="last"``: the last position's row alone, for the negative control)."""
    model = eager_model(model_dir)
    ids = torch.as_tensor(list(prompt_ids))
    embeds = model.get_input_embeddings()(ids)
    image = ids == IMAGE_TOKEN_ID
    embeds[image] = torch.cat(image_rows)
    out = model(inputs_embeds=embeds[None], output_attentions=True)
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
