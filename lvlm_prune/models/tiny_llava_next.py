"""LLaVA-NeXT- and LLaVA-OneVision-shaped models with random weights, built offline (the AnyRes
counterparts of ``tiny_llava``).

Same rules as the other tiny models: no model hub, only token ids, counts and logprobs are
compared, and every model is cached on disk under a content key (spec + builder version).

Both families cut an image into a base view plus a grid of crops chosen from
``image_grid_pinpoints``; N per image = base + the unpadded crop features + one ``image_newline``
per feature row (:func:`image_token_counts`). OneVision (``anyres_max_9``) also shrinks a crop
grid larger than 9 crops' worth of features by bilinear interpolation.

``NEXT_BENCH`` and ``ONEVISION_BENCH`` keep the towers' real geometry (so N is the 7B models' N)
and LLaVA-NeXT-7B's / LLaVA-OneVision-7B's vision : language-model prefill cost proportion at
672x672 and 672x448, by the FLOP count of :func:`prefill_flops`, so TTFT ratios measured on
them mean something; nothing about their answers does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .tiny_llava import BOS_ID, EOS_ID, PAD_ID, build_cached, save_llava, spec_key
from .tiny_llava import CHAT_TEMPLATE as LLAVA_CHAT_TEMPLATE
from .tiny_llava import IMAGE_TOKEN_ID as LLAVA_IMAGE_TOKEN_ID
from .tiny_llava import _build_tokenizer as build_llava_tokenizer
from .tiny_qwen import _QWEN_CORPUS

# Bump when the files this module writes change in any way.
BUILDER_VERSION = 1

NEXT = "next"
ONEVISION = "onevision"

# OneVision's Qwen2 tokenizer: the control tokens its template and processor use, first.
ONEVISION_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
OV_PAD_ID, OV_IM_START_ID, OV_IM_END_ID, OV_IMAGE_TOKEN_ID, OV_VIDEO_TOKEN_ID = range(5)

# llava-hf/llava-onevision-qwen2-7b-ov-hf's template (images, then videos, then text; no default
# system message), without its `{% generation %}` tags; string content accepted too.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'in', ['image', 'image_url']) %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_ONEVISION_CORPUS = (
    _QWEN_CORPUS
    + """\
<|im_start|>user <image>
What is shown in this image?<|im_end|>
<|im_start|>assistant
A dog on the grass.<|im_end|>
"""
)

NEXT_CROP_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
"""llava-v1.6's pinpoints, in tower images (rows, cols): [[336, 672], [672, 336], ...] at 336."""

ONEVISION_CROP_GRIDS = tuple((r, c) for r in range(1, 7) for c in range(1, 7))
"""llava-onevision's pinpoints, in tower images: every grid up to 6x6 (384 ... 2304 px at 384)."""


@dataclasses.dataclass(frozen=True)
class TinyLlavaNextSpec:
    """Shapes of a LLaVA-NeXT model (CLIP tower, ``default`` features from the second-to-last
    layer, Llama) or, ``family="onevision"``, a LLaVA-OneVision one (SigLIP tower, ``full``
    features from the last layer, ``anyres_max_9``, Qwen2)."""

    family: str = NEXT
    image_size: int = 112
    patch_size: int = 14
    crop_grids: tuple[tuple[int, int], ...] = NEXT_CROP_GRIDS
    """The pinpoints as (rows, cols) of tower images: pinpoint = (rows, cols) x ``image_size``."""
    vision_hidden: int = 32
    vision_intermediate: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 2
    vocab_size: int = 320
    text_init_std: float = 0.15
    """As ``tiny_qwen``: at transformers' 0.02 attention is nearly uniform, so kept tokens at
    wrong positions would barely move the logprobs."""
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in (NEXT, ONEVISION):
            raise ValueError(f"family {self.family!r}: {NEXT!r} or {ONEVISION!r}")

    @property
    def architecture(self) -> str:
        return (
            "LlavaNextForConditionalGeneration"
            if self.family == NEXT
            else "LlavaOnevisionForConditionalGeneration"
        )

    @property
    def grid(self) -> int:
        """Feature rows (= cols) of one tower image: SigLIP's valid convolution drops a remainder,
        as 384 px / patch 14 -> 27 does in the real OneVision."""
        return self.image_size // self.patch_size

    @property
    def vision_feature_layer(self) -> int:
        return -2 if self.family == NEXT else -1

    @property
    def pinpoints(self) -> list[list[int]]:
        """``image_grid_pinpoints``: [height, width] in pixels."""
        return [[r * self.image_size, c * self.image_size] for r, c in self.crop_grids]

    def key(self) -> str:
        return spec_key(self, BUILDER_VERSION)


TINY_NEXT = TinyLlavaNextSpec()
"""The LLaVA-NeXT test model: 8x8 features per tower image, at most 336 tokens per image."""

TINY_ONEVISION = TinyLlavaNextSpec(
    family=ONEVISION,
    image_size=104,  # 7 features a side, with a remainder, as 384 / 14
    crop_grids=ONEVISION_CROP_GRIDS,
    text_kv_heads=1,
)
"""The LLaVA-OneVision test model: 7x7 features per tower image, at most ~620 tokens per image
(``anyres_max_9`` caps the crops near 9 x 49 features)."""

NEXT_7B = TinyLlavaNextSpec(
    image_size=336,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_layers=24,
    vision_heads=16,
    text_hidden=4096,
    text_intermediate=11008,
    text_layers=32,
    text_heads=32,
    text_kv_heads=32,
    vocab_size=32064,
    text_init_std=0.02,
)
"""llava-hf/llava-v1.6-vicuna-7b-hf's shapes (CLIP ViT-L/14-336 + Vicuna-7B), never built: the
model whose vision : LLM cost proportion ``NEXT_BENCH`` claims to keep, beside that claim so the
two change together; tests/test_llava_next_models.py checks it with :func:`prefill_flops`."""

ONEVISION_7B = TinyLlavaNextSpec(
    family=ONEVISION,
    image_size=384,
    crop_grids=ONEVISION_CROP_GRIDS,
    vision_hidden=1152,
    vision_intermediate=4304,
    vision_layers=26,  # SigLIP-so400m's 27 less the last, as the released config has it
    vision_heads=16,
    text_hidden=3584,
    text_intermediate=18944,
    text_layers=28,
    text_heads=28,
    text_kv_heads=4,
    vocab_size=152128,
    text_init_std=0.02,
    max_position_embeddings=32768,
)
"""llava-hf/llava-onevision-qwen2-7b-ov-hf's shapes (SigLIP-so400m-384 + Qwen2-7B), never
built: the model whose proportion ``ONEVISION_BENCH`` claims to keep."""

NEXT_BENCH = TinyLlavaNextSpec(
    image_size=336,
    vision_hidden=512,
    vision_intermediate=2560,
    vision_layers=5,  # vision_feature_layer=-2: vLLM runs 4 of them
    vision_heads=8,
    text_hidden=2048,
    text_intermediate=5632,
    text_layers=8,
    text_heads=16,
    text_kv_heads=16,
    text_init_std=0.02,
)
"""Bench-sized LLaVA-NeXT: the 7B's N and vision : LLM prefill FLOPs at 672x672 and 672x448."""

ONEVISION_BENCH = TinyLlavaNextSpec(
    family=ONEVISION,
    image_size=384,
    crop_grids=ONEVISION_CROP_GRIDS,
    vision_hidden=576,
    vision_intermediate=2304,
    vision_layers=8,
    vision_heads=9,
    text_hidden=2048,
    text_intermediate=10752,
    text_layers=8,
    text_heads=16,
    text_kv_heads=2,
    text_init_std=0.02,
    max_position_embeddings=32768,  # Qwen2-7B's: a 1344x896 image alone is ~8000 tokens
)
"""Bench-sized LLaVA-OneVision: the 7B's N and vision : LLM prefill FLOPs at 672x672 and
672x448."""

NEXT_SPECS = {
    "next-tiny": TINY_NEXT,
    "next-bench": NEXT_BENCH,
    "onevision-tiny": TINY_ONEVISION,
    "onevision-bench": ONEVISION_BENCH,
}


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """An image's placeholder count N = ``base + crops + newlines``, and the crop grid."""

    base: int
    crops: int
    """Feature rows x cols of the crops, laid out as one grid, unpadded (and, OneVision,
    interpolated down)."""
    newlines: int
    """One per feature row of the crops."""
    crop_grid: tuple[int, int]
    """(rows, cols) of tower images the pinpoint cuts the image into."""

    @property
    def total(self) -> int:
        return self.base + self.crops + self.newlines


def image_token_counts(spec: TinyLlavaNextSpec, width: int, height: int) -> ImageTokens:
    """N of one ``width`` x ``height`` image, written from transformers'
    ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor._get_number_of_features`` (vLLM's count;
    transformers gives OneVision images base-only when a sample's images come as one list)."""
    from transformers.image_processing_utils import select_best_resolution

    best_height, best_width = select_best_resolution((height, width), spec.pinpoints)
    rows, cols = best_height // spec.image_size, best_width // spec.image_size
    grid = spec.grid
    feat_h, feat_w = grid * rows, grid * cols
    if width / height > feat_w / feat_h:
        new_height = int(round(height * (feat_w / width), 7))
        feat_h -= (feat_h - new_height) // 2 * 2
    else:
        new_width = int(round(width * (feat_h / height), 7))
        feat_w -= (feat_w - new_width) // 2 * 2
    if spec.family == ONEVISION:
        ratio = math.sqrt(feat_h * feat_w / (9 * grid * grid))
        if ratio > 1.1:
            feat_h, feat_w = int(feat_h // ratio), int(feat_w // ratio)
    return ImageTokens(grid * grid, feat_h * feat_w, feat_h, (rows, cols))


def prefill_flops(spec: TinyLlavaNextSpec, width: int, height: int, text_tokens: int = 32):
    """Multiply-add FLOPs (2 per MAC) of one prefill with one ``width`` x ``height`` image:
    ``(vision, llm)``.

    Vision: the tower runs on the base view and every crop (T tokens each: the patches, plus
    CLIP's class token) through the layers the feature layer needs (CLIP's -2: all but the
    last); per token the patch embedding (3 p^2 -> d_v), per layer qkv + out (4 d_v^2), the MLP
    (2 d_v I_v, not gated) and attention (2 d_v T); the projector (d_v -> d -> d) on every
    patch feature. LLM, per prompt token L = N + text: q, o (2 d H h), k, v (2 d K h), the gated
    MLP (3 d I), causal attention (d L, on average over the prompt); the LM head runs for the
    last token only and is left out.
    """
    tokens = image_token_counts(spec, width, height)
    images = 1 + tokens.crop_grid[0] * tokens.crop_grid[1]
    per_image = spec.grid**2 + (1 if spec.family == NEXT else 0)
    layers = spec.vision_layers + 1 + spec.vision_feature_layer
    dv, iv, d = spec.vision_hidden, spec.vision_intermediate, spec.text_hidden
    vision_macs = images * (
        per_image * 3 * spec.patch_size**2 * dv
        + layers * per_image * (4 * dv * dv + 2 * dv * iv + 2 * per_image * dv)
        + spec.grid**2 * (dv * d + d * d)
    )
    head_dim = d // spec.text_heads
    kv_dim = spec.text_kv_heads * head_dim
    length = tokens.total + text_tokens
    per_token = 2 * d * d + 2 * d * kv_dim + 3 * d * spec.text_intermediate
    llm_macs = spec.text_layers * (length * per_token + length * length * d)
    return 2 * vision_macs, 2 * llm_macs


def build_tiny_llava_next(spec: TinyLlavaNextSpec = TINY_NEXT, *, root: Path | None = None) -> Path:
    """Return the directory of the model for ``spec``, building it first if absent."""
    name = f"llava_{spec.family}-{spec.key()}"
    return build_cached(name, lambda out: _write_model(spec, out), root=root)


def _build_onevision_tokenizer(spec: TinyLlavaNextSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full 256-byte initial alphabet: lone byte tokens made random generations detokenize to "".
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - 16,
        special_tokens=ONEVISION_SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_ONEVISION_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Qwen2 adds no BOS.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>",
            "video_token": "<video>",
            "im_start_token": "<|im_start|>",
        },
        model_max_length=spec.max_position_embeddings,
    )


def _config(spec: TinyLlavaNextSpec):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = {
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
    }
    text = {
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.text_init_std,
        "tie_word_embeddings": False,
    }
    common = {
        "image_grid_pinpoints": spec.pinpoints,
        "vision_feature_layer": spec.vision_feature_layer,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
    }
    if spec.family == NEXT:
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision, projection_dim=spec.vision_hidden),
            text_config=LlamaConfig(
                **text, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
            ),
            image_token_index=LLAVA_IMAGE_TOKEN_ID,
            image_seq_length=spec.grid**2,
            vision_feature_select_strategy="default",
            use_image_newline_parameter=True,
            **common,
        )
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision, vision_use_head=False),
            text_config=Qwen2Config(
                **text,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=None,
                eos_token_id=OV_IM_END_ID,
                pad_token_id=OV_PAD_ID,
            ),
            image_token_index=OV_IMAGE_TOKEN_ID,
            video_token_index=OV_VIDEO_TOKEN_ID,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            **common,
        )
    config.architectures = [spec.architecture]
    return config


def _processor(spec: TinyLlavaNextSpec, tokenizer):
    """The family's processor, configured as the released checkpoint's (scaled to the tower)."""
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    size = spec.image_size
    if spec.family == NEXT:
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
                image_grid_pinpoints=spec.pinpoints,
            ),
            tokenizer=tokenizer,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    siglip = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=spec.pinpoints, **siglip
        ),
        tokenizer=tokenizer,
        # NOTE(transformers 5.19): the processor needs a video processor even for images.
        video_processor=LlavaOnevisionVideoProcessor(
            size={"height": size, "width": size}, **siglip
        ),
        num_image_tokens=spec.grid**2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


def _write_model(spec: TinyLlavaNextSpec, out: Path) -> None:
    import torch
    import transformers

    if spec.family == NEXT:
        tokenizer = build_llava_tokenizer(spec)
        assert tokenizer.convert_tokens_to_ids("<image>") == LLAVA_IMAGE_TOKEN_ID
    else:
        tokenizer = _build_onevision_tokenizer(spec)
        for token_id, token in enumerate(ONEVISION_SPECIAL_TOKENS):
            assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    assert len(tokenizer) <= spec.vocab_size, (len(tokenizer), spec.vocab_size)

    config = _config(spec)
    torch.manual_seed(spec.seed)
    model = getattr(transformers, spec.architecture)(config).to(torch.bfloat16).eval()
    if spec.family == ONEVISION:
        model.generation_config.eos_token_id = OV_IM_END_ID
        model.generation_config.pad_token_id = OV_PAD_ID
        model.generation_config.bos_token_id = None
    # save_llava renames the tower to vLLM's `vision_tower.vision_model.*` (CLIP and SigLIP alike).
    save_llava(model, _processor(spec, tokenizer), out)
    (out / "lvlm_prune_spec.json").write_text(
        json.dumps({**dataclasses.asdict(spec), "builder": BUILDER_VERSION}, indent=2)
    )
