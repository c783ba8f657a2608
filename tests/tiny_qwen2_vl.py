"""A tiny random-weight Qwen2-VL, built offline: a model of an architecture lvlm-prune does not
prune (``Qwen2VLForConditionalGeneration`` is not in ``vllm_plugin.MODELS``), for the tests of how
the server says so. Test-only; it reuses the tiny Qwen2.5-VL's tokenizer and shapes, and is cached
like every built-in model (``tiny_llava.build_cached``)."""

from __future__ import annotations

import json
from pathlib import Path

from lvlm_prune.models import tiny_qwen
from lvlm_prune.models.tiny_llava import build_cached

ARCHITECTURE = "Qwen2VLForConditionalGeneration"
BUILDER_VERSION = 1
SPEC = tiny_qwen.TINY_QWEN


def build_tiny_qwen2_vl(*, root: Path | None = None) -> Path:
    """The model's folder, built first if absent."""
    return build_cached(f"qwen2_vl-{SPEC.key()}-v{BUILDER_VERSION}", _write_model, root=root)


def _write_model(out: Path) -> None:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = SPEC
    tokenizer = tiny_qwen._build_tokenizer(spec)
    config = Qwen2VLConfig(
        vision_config={
            "depth": spec.vision_layers,
            "embed_dim": spec.vision_hidden,
            "hidden_size": spec.text_hidden,  # the merger's output: the LLM's width
            "mlp_ratio": 2,
            "num_heads": spec.vision_heads,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "temporal_patch_size": spec.temporal_patch_size,
        },
        text_config=tiny_qwen.text_config(spec),
        **tiny_qwen.special_token_ids(),
    )
    config.architectures = [ARCHITECTURE]
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = tiny_qwen.IM_END_ID
    model.generation_config.pad_token_id = tiny_qwen.PAD_ID
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    common = {
        "patch_size": spec.patch_size,
        "merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        # NOTE(transformers 5.19): the processor needs a video processor even for images.
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        tokenizer=tokenizer,
        chat_template=tiny_qwen.CHAT_TEMPLATE,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lvlm_prune_spec.json").write_text(
        json.dumps({"architecture": ARCHITECTURE, "builder": BUILDER_VERSION}, indent=2)
    )
