"""Qwen3-VL-shaped models with random weights, built offline: dense and MoE (the counterparts of
``tiny_qwen`` for the DeepStack family).

Same rules as the other tiny models: no model hub, only token ids, counts and logprobs are
compared, and every model is cached on disk under a content key (spec + builder version).

``QWEN3_BENCH`` keeps Qwen3-VL-8B's vision : language-model prefill cost proportion at the two
resolutions the benchmarks use (672x448 -> 294 image tokens, 1344x896 -> 1176), by the FLOP
count of :func:`prefill_flops`, so TTFT ratios measured on it mean something; nothing about its
answers does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .tiny_llava import build_cached, spec_key
from .tiny_qwen import (
    IM_END_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    VIDEO_TOKEN_ID,
    image_grid,
)
from .tiny_qwen import _build_tokenizer as build_qwen_tokenizer

# Bump when the files this module writes change in any way.
BUILDER_VERSION = 1

# Qwen3-VL's chat template (Qwen/Qwen3-VL-8B-Instruct's, without its tool-calling branches): no
# default system message, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PIXELS_PER_TOKEN = 32 * 32
"""One image token after the 2x2 merger covers 32x32 pixels (patch 16)."""


@dataclasses.dataclass(frozen=True)
class TinyQwen3Spec:
    """Shapes of a Qwen3-VL model (ViT with learned + rotary positions, 2x2 merger, DeepStack
    mergers, Qwen3 LM with interleaved M-RoPE; MoE when ``num_experts`` > 0)."""

    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    """Vision blocks whose outputs feed the DeepStack levels; level i is added to the hidden
    states after decoder layer i."""
    num_position_embeddings: int = 256
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 3
    text_heads: int = 2
    text_kv_heads: int = 1
    head_dim: int = 32
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    """Halves of the rotary dims given to t, h, w (interleaved); sums to head_dim / 2."""
    num_experts: int = 0
    """0: dense (``Qwen3VLForConditionalGeneration``); else ``Qwen3VLMoeForConditionalGeneration``."""
    num_experts_per_tok: int = 2
    moe_intermediate: int = 96
    """vLLM's CPU MoE kernel wants hidden and expert sizes in multiples of 32; neither this nor
    twice this may equal ``text_hidden`` (see :func:`_write_experts_in_hub_layout`)."""
    vocab_size: int = 320
    text_init_std: float = 0.15
    """As ``tiny_qwen``: at transformers' 0.02 attention is nearly uniform and wrong positions or
    misaligned DeepStack rows would barely move the logprobs."""
    min_pixels: int = 4 * PIXELS_PER_TOKEN
    max_pixels: int = 1024 * PIXELS_PER_TOKEN
    """Largest image the processor keeps unscaled (also what vLLM profiles with)."""
    max_position_embeddings: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to {self.head_dim // 2}")
        if len(self.deepstack_visual_indexes) > self.text_layers:
            raise ValueError("every DeepStack level needs a decoder layer to feed")
        if self.num_experts and self.text_hidden in (
            self.moe_intermediate,
            2 * self.moe_intermediate,
        ):
            raise ValueError("square expert weights: transformers could not tell their layout")

    @property
    def architecture(self) -> str:
        moe = "Moe" if self.num_experts else ""
        return f"Qwen3VL{moe}ForConditionalGeneration"

    def key(self) -> str:
        return spec_key(self, BUILDER_VERSION)


TINY_QWEN3 = TinyQwen3Spec()
"""The dense test model: well under 1 MB, builds in seconds."""

TINY_QWEN3_MOE = TinyQwen3Spec(num_experts=4)
"""The MoE test model (4 experts, 2 per token)."""

QWEN3_BENCH = TinyQwen3Spec(
    vision_hidden=512,
    vision_intermediate=3584,
    vision_layers=3,
    vision_heads=8,
    deepstack_visual_indexes=(0, 1, 2),
    num_position_embeddings=2304,
    text_hidden=1536,
    text_intermediate=6144,
    text_layers=10,
    text_heads=12,
    text_kv_heads=2,
    head_dim=128,
    mrope_section=(24, 20, 20),
    text_init_std=0.02,
    max_pixels=1536 * PIXELS_PER_TOKEN,
)
"""Bench-sized: vision : LLM prefill FLOPs as Qwen3-VL-8B's at 672x448 and 1344x896."""

QWEN3_8B = TinyQwen3Spec(
    vision_hidden=1152,
    vision_intermediate=4304,
    vision_layers=27,
    vision_heads=16,
    deepstack_visual_indexes=(8, 16, 24),
    num_position_embeddings=2304,
    text_hidden=4096,
    text_intermediate=12288,
    text_layers=36,
    text_heads=32,
    text_kv_heads=8,
    head_dim=128,
    mrope_section=(24, 20, 20),
    vocab_size=151936,
    text_init_std=0.02,
    max_pixels=16777216,
)
"""Qwen/Qwen3-VL-8B-Instruct's shapes (its config.json), never built: the model whose vision :
LLM cost proportion ``QWEN3_BENCH`` claims to keep, beside that claim so the two change together;
tests/test_qwen3_vl.py checks the claim with :func:`prefill_flops`."""

QWEN3_SPECS = {
    "qwen3-tiny": TINY_QWEN3,
    "qwen3-moe-tiny": TINY_QWEN3_MOE,
    "qwen3-bench": QWEN3_BENCH,
}


def prefill_flops(spec: TinyQwen3Spec, width: int, height: int, text_tokens: int = 32):
    """Multiply-add FLOPs (2 per MAC) of one prefill with one ``width`` x ``height`` image:
    ``(vision, llm)``.

    Vision, per patch P = 4N (N image tokens): patch embedding (3*2*16*16 -> d_v), per block
    the qkv + out projections (4 d_v^2), the MLP (2 d_v I_v, not gated) and full attention
    (2 d_v P); then the merger and each DeepStack merger per image token (4 d_v -> 4 d_v -> d).
    LLM, per prompt token L = N + text: q, o (2 d H h), k, v (2 d K h), the MLP (gated, 3 d I;
    MoE: the router d E plus 3 d I_e per routed expert), causal attention (H h L, on average
    over the prompt); the LM head runs for the last token only and is left out.
    """
    rows, cols = image_grid(spec, width, height)
    n = rows * cols
    patches = n * spec.spatial_merge_size**2
    dv, iv = spec.vision_hidden, spec.vision_intermediate
    in_dim = 3 * spec.temporal_patch_size * spec.patch_size**2
    merged = dv * spec.spatial_merge_size**2
    mergers = 1 + len(spec.deepstack_visual_indexes)
    vision_macs = (
        patches * in_dim * dv
        + spec.vision_layers * patches * (4 * dv * dv + 2 * dv * iv + 2 * patches * dv)
        + mergers * n * (merged * merged + merged * spec.text_hidden)
    )
    d, h = spec.text_hidden, spec.head_dim
    q_dim, kv_dim = spec.text_heads * h, spec.text_kv_heads * h
    if spec.num_experts:
        mlp = d * spec.num_experts + spec.num_experts_per_tok * 3 * d * spec.moe_intermediate
    else:
        mlp = 3 * d * spec.text_intermediate
    length = n + text_tokens
    per_token = 2 * d * q_dim + 2 * d * kv_dim + mlp
    llm_macs = spec.text_layers * (length * per_token + length * length * q_dim)
    return 2 * vision_macs, 2 * llm_macs


def build_tiny_qwen3(spec: TinyQwen3Spec = TINY_QWEN3, *, root: Path | None = None) -> Path:
    """Return the directory of the model for ``spec``, building it first if absent."""
    return build_cached(f"qwen3_vl-{spec.key()}", lambda out: _write_model(spec, out), root=root)


def make_qwen3_processor(tokenizer, spec: TinyQwen3Spec):
    """Qwen3-VL's processor (image + video processors + tokenizer) with :data:`CHAT_TEMPLATE`."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    common = {
        "patch_size": spec.patch_size,
        "merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        # NOTE(transformers 5.19): the processor needs a video processor even for images.
        video_processor=Qwen3VLVideoProcessor(size=size, **common),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def _config(spec: TinyQwen3Spec):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    text = {
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "initializer_range": spec.text_init_std,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(spec.mrope_section),
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
        "pad_token_id": PAD_ID,
    }
    if spec.num_experts:
        text.update(
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.num_experts_per_tok,
            moe_intermediate_size=spec.moe_intermediate,
            decoder_sparse_step=1,
            # vLLM reads it (as Qwen's released configs carry it); transformers always
            # renormalises the top-k weights.
            norm_topk_prob=True,
        )
    vision = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "out_hidden_size": spec.text_hidden,
        "num_position_embeddings": spec.num_position_embeddings,
        "deepstack_visual_indexes": list(spec.deepstack_visual_indexes),
    }
    config_cls = Qwen3VLMoeConfig if spec.num_experts else Qwen3VLConfig
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=SPECIAL_TOKENS.index("<|vision_start|>"),
        vision_end_token_id=SPECIAL_TOKENS.index("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config.architectures = [spec.architecture]
    return config


def _write_model(spec: TinyQwen3Spec, out: Path) -> None:
    import torch
    import transformers

    tokenizer = build_qwen_tokenizer(spec)
    assert len(tokenizer) <= spec.vocab_size, (len(tokenizer), spec.vocab_size)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token

    config = _config(spec)
    torch.manual_seed(spec.seed)
    model = getattr(transformers, spec.architecture)(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    if spec.num_experts:
        _write_experts_in_hub_layout(out)
    model.generation_config.save_pretrained(out)
    processor = make_qwen3_processor(tokenizer, spec)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lvlm_prune_spec.json").write_text(
        json.dumps({**dataclasses.asdict(spec), "builder": BUILDER_VERSION}, indent=2)
    )


def _write_experts_in_hub_layout(out: Path) -> None:
    """Rewrite the fused expert weights as Qwen's released checkpoints lay them out.

    NOTE(transformers 5.19): ``save_pretrained`` writes ``gate_up_proj`` as [E, 2I, H] and
    ``down_proj`` as [E, H, I]; Qwen3-VL-MoE checkpoints on the hub (and vLLM's loader, which
    transposes them) have [E, H, 2I] and [E, I, H]. transformers loads both, telling them apart
    by shape: a square one it takes as its own, hence the spec's check.
    """
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(path)
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
