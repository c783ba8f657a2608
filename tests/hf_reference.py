"""The transformers side of the end-to-end comparisons: same model, same prompt, computed without
vLLM, with the image rows chosen by the torch reference selection."""

from __future__ import annotations

import functools

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvlm_prune.kernels.reference import merge_dropped_ref, relevance_ref, topk_select_ref
from lvlm_prune.kernels.selection import uniform_indices
from lvlm_prune.models.tiny_llava import IMAGE_TOKEN_ID


@functools.lru_cache(maxsize=2)
def load(model_dir: str):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@torch.no_grad()
def image_features(model_dir: str, image) -> torch.Tensor:
    """[N, D] projector output for one image."""
    model, processor = load(model_dir)
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    feats = model.get_image_features(
        pixel_values=pixels.to(torch.float32),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats
    return feats.reshape(-1, feats.shape[-1])


@torch.no_grad()
def embed(model_dir: str, ids) -> torch.Tensor:
    model, _ = load(model_dir)
    return model.get_input_embeddings()(torch.as_tensor(list(ids), dtype=torch.int64))


def query_ids(model_dir: str, prompt_ids) -> list[int]:
    """The default query: the prompt's text tokens (no specials, no image placeholders)."""
    _, processor = load(model_dir)
    skip = set(processor.tokenizer.all_special_ids) | {IMAGE_TOKEN_ID}
    return [t for t in prompt_ids if t not in skip]


def reference_kept(model_dir: str, image, q_ids, k: int, method: str = "simignore") -> torch.Tensor:
    feats = image_features(model_dir, image)
    if method == "uniform":
        return uniform_indices(feats.shape[0], k)
    q = embed(model_dir, q_ids)
    scores = relevance_ref(
        feats, torch.tensor([0, feats.shape[0]]), q, torch.tensor([0, q.shape[0]])
    )
    return topk_select_ref(scores, k)


def pruned_rows(model_dir: str, image, kept: torch.Tensor, *, merge: bool = False) -> torch.Tensor:
    feats = image_features(model_dir, image)
    return merge_dropped_ref(feats, kept) if merge else feats[kept]


@torch.no_grad()
def greedy(model_dir: str, prompt_ids, image_rows: list[torch.Tensor], max_tokens: int):
    """Greedy decode from ``prompt_ids`` whose image placeholders take ``image_rows`` in order.

    Returns (token ids, per-step log-softmax [max_tokens, vocab]).
    """
    model, _ = load(model_dir)
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
    embeds = embed(model_dir, ids)
    mask = ids == IMAGE_TOKEN_ID
    rows = torch.cat(image_rows) if image_rows else embeds[:0]
    assert int(mask.sum()) == rows.shape[0], (int(mask.sum()), rows.shape)
    embeds[mask] = rows.to(embeds.dtype)
    out, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(inputs_embeds=embeds[None]).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        nxt = int(lp.argmax())
        out.append(nxt)
        logprobs.append(lp)
        embeds = torch.cat([embeds, embed(model_dir, [nxt])])
    return out, torch.stack(logprobs)


@torch.no_grad()
def stock_generate(model_dir: str, prompt: str, images, max_tokens: int):
    """transformers' own generate on the unpruned model: (expanded prompt ids, output ids)."""
    model, processor = load(model_dir)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()
