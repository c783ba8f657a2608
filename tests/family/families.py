"""The model families every family test runs on: one :class:`Family` entry each.

Adding a family to the suite is one entry here (plus its :class:`hf_reference.Reference`
subclass); every test in ``tests/family/`` and ``tests/server_api/test_family_api.py`` then runs on
it. See docs/adding-a-model-family.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import hf_reference


@dataclasses.dataclass(frozen=True)
class ImageCase:
    """An image size the family's processor handles, and the token grid it must give."""

    size: tuple[int, int]  # (width, height) px
    grid: tuple[int, int]  # (rows, cols) of image tokens

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    arch: str
    """The architecture name our class is registered under (``vllm_plugin.MODELS``)."""
    model_dir_fixture: str
    """The conftest fixture that builds the tiny random-weight checkpoint."""
    serve_name: str
    """Its built-in name for ``lvlm-prune serve`` (``lvlm_prune.models``)."""
    reference: type[hf_reference.Reference]
    """The transformers side: features, grid, and the positions of the family's rule."""
    prompt: Callable[[str, int], str]
    """(question, number of images) -> the prompt in the family's chat format."""
    images: tuple[ImageCase, ImageCase]
    """Two images of different sizes; the first is the tests' default."""
    large: ImageCase
    """An image whose rows, pruned to half, still cross a 128-token KV block (prefix caching)."""
    positions: str
    """The position rule, in words (the reference implements it)."""
    flow: bool = False
    """Whether the ``flow`` method and flow diagnostics are served (else refused by name)."""
    engine_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    """Engine options beyond ``helpers.make_llm``'s."""

    def __str__(self) -> str:
        return self.name


def llava_prompt(question: str, images: int) -> str:
    return "USER: " + "<image>\n" * images + question + " ASSISTANT:"


def qwen_prompt(question: str, images: int) -> str:
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * images
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


LLAVA = Family(
    name="llava",
    arch="LlavaForConditionalGeneration",
    model_dir_fixture="tiny_model_dir",
    serve_name="tiny",
    reference=hf_reference.LlavaReference,
    prompt=llava_prompt,
    # CLIP resizes and crops every image to 336 px: two different images, one grid.
    images=(ImageCase((336, 336), (24, 24)), ImageCase((448, 336), (24, 24))),
    large=ImageCase((336, 336), (24, 24)),
    positions="1-D RoPE, compact: kept rows take consecutive positions",
    flow=True,
)

QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    arch="Qwen2_5_VLForConditionalGeneration",
    model_dir_fixture="qwen_model_dir",
    serve_name="qwen-tiny",
    reference=hf_reference.Qwen2_5_VLReference,
    prompt=qwen_prompt,
    # Multiples of 28 px: the processor keeps them as they are, one token per 28 x 28 px.
    # Rows != cols on purpose; the first is portrait (rows > cols), where vLLM EVS's rule for the
    # text after an image (base + cols) differs from the right one (base + max(rows, cols)).
    images=(ImageCase((168, 280), (10, 6)), ImageCase((224, 112), (4, 8))),
    large=ImageCase((672, 448), (16, 24)),
    positions="M-RoPE, original: each kept token at its own (t, h, w), text after as unpruned",
    flow=True,
    engine_kwargs={"limit_mm_per_prompt": {"image": 2, "video": 0}},
)

QWEN3_VL = Family(
    name="qwen3_vl",
    arch="Qwen3VLForConditionalGeneration",
    model_dir_fixture="qwen3_model_dir",
    serve_name="qwen3-tiny",
    reference=hf_reference.Qwen3VLReference,
    prompt=qwen_prompt,
    # Multiples of 32 px (patch 16, 2x2 merger), as QWEN2_5_VL's. The large one: keep 0.25 still
    # fills a 128-token block.
    images=(ImageCase((192, 320), (10, 6)), ImageCase((256, 128), (4, 8))),
    large=ImageCase((960, 448), (14, 30)),
    positions="M-RoPE (interleaved), original, as Qwen2.5-VL; every DeepStack level keeps the "
    "main embedding's rows",
    flow=True,
    engine_kwargs={"limit_mm_per_prompt": {"image": 2, "video": 0}},
)

QWEN3_VL_MOE = dataclasses.replace(
    QWEN3_VL,
    name="qwen3_vl_moe",
    arch="Qwen3VLMoeForConditionalGeneration",
    model_dir_fixture="qwen3_moe_model_dir",
    serve_name="qwen3-moe-tiny",
    reference=hf_reference.Qwen3VLMoeReference,
)

FAMILIES = [LLAVA, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE]
WITH_FLOW = [f for f in FAMILIES if f.flow]
WITHOUT_FLOW = [f for f in FAMILIES if not f.flow]
