"""The model families every family test runs on: one :class:`Family` entry each.

Adding a family to the suite is one entry here (plus its :class:`hf_reference.Reference`
subclass); every test in ``tests/family/`` and ``tests/server_api/test_family_api.py`` then runs on
it. See docs/adding-a-model-family.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import hf_reference
import torch

from lvlm_prune.kernels import keep_count


@dataclasses.dataclass(frozen=True)
class ImageCase:
    """An image size the family's processor handles, and the token grid it must give."""

    size: tuple[int, int]  # (width, height) px
    grid: tuple[int, int]  # (rows, cols) of image tokens (AnyRes: of the base view)
    crops: tuple[int, int] | None = None
    """AnyRes (LLaVA-NeXT): (rows, cols) of the crops' features after the base view, each row
    closed by a newline token that does not compete in the selection."""

    @property
    def tokens(self) -> int:
        """N, the image's placeholders unpruned."""
        crops = 0 if self.crops is None else self.crops[0] * (self.crops[1] + 1)
        return self.grid[0] * self.grid[1] + crops

    @property
    def competing(self) -> torch.Tensor:
        """The rows that compete in the selection (all but AnyRes' newline rows), ascending."""
        rows = torch.ones(self.tokens, dtype=torch.bool)
        if self.crops is not None:
            base, (crop_rows, cols) = self.grid[0] * self.grid[1], self.crops
            rows[base + cols :: cols + 1] = False
            assert int((~rows).sum()) == crop_rows
        return rows.nonzero().flatten()

    def keep(self, ratio: float) -> int:
        """K at ``ratio``: every row unpruned, else keep_count of the competing rows."""
        return self.tokens if ratio >= 1.0 else keep_count(len(self.competing), ratio)


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
    prefix_ratio: float = 0.25
    """The keep ratio of the prefix-cache test on ``large``: its prompt must fill a 128-token
    block (LLaVA-NeXT's largest tiny image does at 0.5, not at 0.25)."""

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
    positions="1-D RoPE, original by default: each kept token at its unpruned position, the "
    "text after the image where it is unpruned (compact per request: tests/test_llava_positions.py)",
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


def onevision_prompt(question: str, images: int) -> str:
    return f"<|im_start|>user {'<image>' * images}\n{question}<|im_end|>\n<|im_start|>assistant\n"


# The tiny AnyRes models (lvlm_prune.models.tiny_llava_next): a wide and a tall image, whose crop
# grids are not square and are transposes of each other's, so a transposed layout fails.
LLAVA_NEXT = Family(
    name="llava_next",
    arch="LlavaNextForConditionalGeneration",
    model_dir_fixture="llava_next_model_dir",
    serve_name="next-tiny",
    reference=hf_reference.LlavaNextReference,
    prompt=llava_prompt,
    # 112 px CLIP / 14: an 8 x 8 base view; 300 x 120 px takes 1 x 3 crops, 8 x 20 unpadded.
    images=(ImageCase((300, 120), (8, 8), (8, 20)), ImageCase((120, 300), (8, 8), (20, 8))),
    large=ImageCase((208, 208), (8, 8), (16, 16)),
    positions="1-D RoPE, original by default, as LLaVA-1.5's, over all N rows: each kept row at "
    "its index among them (newline rows included, dropped when pruned), the text after the "
    "image where it is unpruned (compact per request: tests/test_llava_next.py)",
    flow=True,
    prefix_ratio=0.5,
)

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    arch="LlavaOnevisionForConditionalGeneration",
    model_dir_fixture="onevision_model_dir",
    serve_name="onevision-tiny",
    reference=hf_reference.LlavaOnevisionReference,
    prompt=onevision_prompt,
    # 104 px SigLIP / 14: a 7 x 7 base view; the large one's 21 x 29 crop features are shrunk
    # to 17 x 24 (anyres_max_9).
    images=(ImageCase((300, 120), (7, 7), (8, 21)), ImageCase((120, 300), (7, 7), (21, 8))),
    large=ImageCase((420, 300), (7, 7), (17, 24)),
    positions="1-D RoPE (Qwen2), original by default, as LLaVA-NeXT's",
    flow=True,
    engine_kwargs={"limit_mm_per_prompt": {"image": 2, "video": 0}},
)

FAMILIES = [LLAVA, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, LLAVA_NEXT, LLAVA_ONEVISION]
WITH_FLOW = [f for f in FAMILIES if f.flow]
WITHOUT_FLOW = [f for f in FAMILIES if not f.flow]
