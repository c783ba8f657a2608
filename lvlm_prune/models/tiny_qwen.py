"""Qwen2.5-VL-shaped models with random weights, built offline (the counterpart of
``tiny_llava`` for the M-RoPE family).

Same rules as the LLaVA ones: no model hub, only token ids, counts and logprobs are compared, and
every model is cached on disk under a content key (spec + builder version).

``QWEN_BENCH`` keeps Qwen2.5-VL-7B's vision : language-model prefill cost proportion at the two
resolutions the benchmarks use (672x448 -> 384 image tokens, 1344x896 -> 1536), by the FLOP
count of :func:`prefill_flops`, so TTFT ratios measured on it mean something; nothing about
its answers does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .tiny_llava import _CORPUS, build_cached, spec_key

# Bump when the files this module writes change in any way.
BUILDER_VERSION = 1

# Qwen2's special tokens that the processor and chat template use, first in the vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
(
    PAD_ID,
    IM_START_ID,
    IM_END_ID,
    VISION_START_ID,
    VISION_END_ID,
    VISION_PAD_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
) = range(len(SPECIAL_TOKENS))

# Qwen2-VL / Qwen2.5-VL's own chat template (as shipped with Qwen/Qwen2.5-VL-7B-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_CORPUS = (
    _CORPUS
    + """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is in the picture?<|im_end|>
<|im_start|>assistant
A picture of a cat.<|im_end|>
"""
)

PIXELS_PER_TOKEN = 28 * 28
"""One image token after the 2x2 merger covers 28x28 pixels (patch 14)."""


@dataclasses.dataclass(frozen=True)
class TinyQwenSpec:
    """Shapes of a Qwen2.5-VL model (windowed ViT + 2x2 patch merger + Qwen2 with M-RoPE)."""

    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    fullatt_block_indexes: tuple[int, ...] = (1,)
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    """Halves of the rotary dims given to t, h, w; sums to head_dim / 2."""
    vocab_size: int = 320
    text_init_std: float = 0.15
    """Std of the language model's random weights. transformers' 0.02 leaves attention nearly
    uniform, so positions would barely move the logprobs; at 0.15 putting the kept tokens at
    wrong M-RoPE positions moves them ~40x the tests' tolerance."""
    min_pixels: int = 4 * PIXELS_PER_TOKEN
    max_pixels: int = 1024 * PIXELS_PER_TOKEN
    """Largest image the processor keeps unscaled (also what vLLM profiles with)."""
    max_position_embeddings: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        head_dim = self.text_hidden // self.text_heads
        if sum(self.mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to {head_dim // 2}")

    def key(self) -> str:
        return spec_key(self, BUILDER_VERSION)


TINY_QWEN = TinyQwenSpec()
"""The test model: ~0.2 MB, builds in seconds."""

QWEN_BENCH = TinyQwenSpec(
    vision_hidden=512,
    vision_intermediate=1368,
    vision_layers=10,
    vision_heads=8,
    fullatt_block_indexes=(9,),
    text_hidden=2048,
    text_intermediate=5632,
    text_layers=8,
    text_heads=16,
    text_kv_heads=2,
    mrope_section=(16, 24, 24),
    text_init_std=0.02,
    max_pixels=1536 * PIXELS_PER_TOKEN,
)
"""Bench-sized: vision : LLM prefill FLOPs as Qwen2.5-VL-7B's at 672x448 and 1344x896."""

QWEN_7B = TinyQwenSpec(
    vision_hidden=1280,
    vision_intermediate=3420,
    vision_layers=32,
    vision_heads=16,
    fullatt_block_indexes=(7, 15, 23, 31),
    text_hidden=3584,
    text_intermediate=18944,
    text_layers=28,
    text_heads=28,
    text_kv_heads=4,
    mrope_section=(16, 24, 24),
    vocab_size=152064,
    text_init_std=0.02,
    max_pixels=12845056,
)
"""Qwen/Qwen2.5-VL-7B-Instruct's shapes (its config.json), never built: the model whose vision :
LLM cost proportion ``QWEN_BENCH`` claims to keep. It stays beside that claim so the two change
together; tests/test_qwen2_5_vl.py checks the claim with :func:`prefill_flops`."""

QWEN_SPECS = {"qwen-tiny": TINY_QWEN, "qwen-bench": QWEN_BENCH}


def image_grid(spec: TinyQwenSpec, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of image tokens after the merger for an image the processor keeps at its
    size (both sides multiples of patch x merge: 28 px for Qwen2.5-VL, 32 for Qwen3-VL; within
    min/max pixels). Any spec with those four fields (``tiny_qwen3`` uses it too)."""
    unit = spec.patch_size * spec.spatial_merge_size
    if width % unit or height % unit:
        raise ValueError(f"{width}x{height} is not a multiple of {unit} on both sides")
    if not spec.min_pixels <= width * height <= spec.max_pixels:
        raise ValueError(f"{width}x{height} is outside [min_pixels, max_pixels]")
    return height // unit, width // unit


def prefill_flops(spec: TinyQwenSpec, width: int, height: int, text_tokens: int = 32):
    """Multiply-add FLOPs (2 per MAC) of one prefill with one ``width`` x ``height`` image:
    ``(vision, llm)``.

    Vision, per patch P = 4N (N image tokens): patch embedding (3*2*14*14 -> d_v), per block
    the qkv + out projections (4 d_v^2) and the gated MLP (3 d_v I_v), plus attention scores
    and values (2 d_v x attended patches: the window's 64 patches in windowed blocks, all P in
    the ``fullatt_block_indexes`` ones); then the merger MLP per image token (4 d_v -> 4 d_v ->
    d). LLM, per prompt token L = N + text: q, o (2 d^2), k, v (2 d d_kv), gated MLP (3 d I),
    causal attention (d L, on average over the prompt); the LM head runs for the last token
    only and is left out.
    """
    rows, cols = image_grid(spec, width, height)
    n = rows * cols
    patches = n * spec.spatial_merge_size**2
    dv, iv = spec.vision_hidden, spec.vision_intermediate
    window = (spec.window_size // spec.patch_size) ** 2
    full = len(spec.fullatt_block_indexes)
    windowed = spec.vision_layers - full
    in_dim = 3 * spec.temporal_patch_size * spec.patch_size**2
    merged = dv * spec.spatial_merge_size**2
    vision_macs = (
        patches * in_dim * dv
        + spec.vision_layers * patches * (4 * dv * dv + 3 * dv * iv)
        + windowed * 2 * patches * min(window, patches) * dv
        + full * 2 * patches * patches * dv
        + n * (merged * merged + merged * spec.text_hidden)
    )
    d, head_dim = spec.text_hidden, spec.text_hidden // spec.text_heads
    d_kv = spec.text_kv_heads * head_dim
    length = n + text_tokens
    per_token = 2 * d * d + 2 * d * d_kv + 3 * d * spec.text_intermediate
    llm_macs = spec.text_layers * (length * per_token + length * length * d)
    return 2 * vision_macs, 2 * llm_macs


def build_tiny_qwen(spec: TinyQwenSpec = TINY_QWEN, *, root: Path | None = None) -> Path:
    """Return the directory of the model for ``spec``, building it first if absent."""
    return build_cached(f"qwen2_5_vl-{spec.key()}", lambda out: _write_model(spec, out), root=root)


def _build_tokenizer(spec: TinyQwenSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full 256-byte initial alphabet: lone byte tokens made random generations detokenize to "".
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - 16, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_QWEN_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Qwen2 adds no BOS; every control token is special (as in Qwen's own tokenizer), so
    # ``all_special_ids`` leaves them out of the default relevance query.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")
        ],
        model_max_length=spec.max_position_embeddings,
    )


def make_qwen_processor(tokenizer, spec: TinyQwenSpec):
    """Qwen2.5-VL's processor (image + video processors + tokenizer) with :data:`CHAT_TEMPLATE`."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    common = {
        "patch_size": spec.patch_size,
        "merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        # NOTE(transformers 5.19): the processor needs a video processor even for images.
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def text_config(spec: TinyQwenSpec) -> dict:
    """The language model of a Qwen2-VL-style config (Qwen2.5-VL's and Qwen2-VL's alike)."""
    return {
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(spec.mrope_section),
        },
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
        "pad_token_id": PAD_ID,
    }


def special_token_ids() -> dict:
    """The config's media token ids (this tokenizer's), and untied embeddings."""
    return {
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": False,
    }


def _write_model(spec: TinyQwenSpec, out: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _build_tokenizer(spec)
    assert len(tokenizer) <= spec.vocab_size, (len(tokenizer), spec.vocab_size)
    for token, token_id in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token

    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_heads": spec.vision_heads,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "temporal_patch_size": spec.temporal_patch_size,
            "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes),
            "out_hidden_size": spec.text_hidden,
            "tokens_per_second": 2,
        },
        text_config={**text_config(spec), "initializer_range": spec.text_init_std},
        **special_token_ids(),
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = IM_END_ID
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor = make_qwen_processor(tokenizer, spec)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lvlm_prune_spec.json").write_text(
        json.dumps({**dataclasses.asdict(spec), "builder": BUILDER_VERSION}, indent=2)
    )
