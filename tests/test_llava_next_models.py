"""The tiny and bench-sized LLaVA-NeXT / LLaVA-OneVision models: token counts per image (the rule
in ``tiny_llava_next.image_token_counts``, transformers' processor and stock vLLM agree), and the
bench models' vision : LLM prefill cost proportion."""

import pytest
from helpers import close_llm, make_image, make_llm

from lvlm_prune.models.tiny_llava import IMAGE_TOKEN_ID as NEXT_IMAGE_TOKEN_ID
from lvlm_prune.models.tiny_llava_next import (
    NEXT_7B,
    NEXT_BENCH,
    ONEVISION_7B,
    ONEVISION_BENCH,
    OV_IMAGE_TOKEN_ID,
    TINY_NEXT,
    TINY_ONEVISION,
    ImageTokens,
    image_token_counts,
    prefill_flops,
)

QUESTION = "What is shown in this image?"

# (width, height) -> (base, crops, newlines, crop grid), worked out by hand from the AnyRes rule:
# a square image, a wide and a tall one (crop grids with rows != cols, unpadded), and for
# OneVision one past anyres_max_9 (crop features interpolated down).
NEXT_COUNTS = {
    (112, 112): ImageTokens(64, 8 * 8, 8, (1, 2)),
    (300, 120): ImageTokens(64, 8 * 20, 8, (1, 3)),
    (120, 300): ImageTokens(64, 20 * 8, 20, (3, 1)),
    (208, 208): ImageTokens(64, 16 * 16, 16, (2, 2)),
}
ONEVISION_COUNTS = {
    (112, 112): ImageTokens(49, 14 * 14, 14, (2, 2)),
    (300, 120): ImageTokens(49, 8 * 21, 8, (2, 3)),
    (120, 300): ImageTokens(49, 21 * 8, 21, (3, 2)),
    (600, 400): ImageTokens(49, 17 * 25, 17, (4, 6)),
}

CASES = {
    "next": (
        TINY_NEXT,
        "llava_next_model_dir",
        NEXT_IMAGE_TOKEN_ID,
        f"USER: <image>\n{QUESTION}\nASSISTANT:",
        NEXT_COUNTS,
    ),
    "onevision": (
        TINY_ONEVISION,
        "onevision_model_dir",
        OV_IMAGE_TOKEN_ID,
        f"<|im_start|>user <image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        ONEVISION_COUNTS,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    spec, fixture, image_token_id, prompt, counts = CASES[request.param]
    return spec, request.getfixturevalue(fixture), image_token_id, prompt, counts


def test_tiny_token_counts_match_transformers_processor(case):
    from transformers import AutoProcessor

    spec, model_dir, image_token_id, prompt, counts = case
    processor = AutoProcessor.from_pretrained(model_dir)
    for (width, height), want in counts.items():
        assert image_token_counts(spec, width, height) == want, (width, height)
        out = processor(text=prompt, images=make_image(0, (width, height)), return_tensors="pt")
        n = int((out["input_ids"][0] == image_token_id).sum())
        assert n == want.total, (width, height)
        rows, cols = want.crop_grid
        assert out["pixel_values"].shape[1] == 1 + rows * cols, (width, height)


def test_stock_vllm_expands_each_image_as_transformers_does(case):
    """Stock vLLM (these architectures are not pruned yet) loads the tiny model, generates, and
    gives an image as many placeholders as transformers' processor."""
    from vllm import SamplingParams

    _, model_dir, image_token_id, prompt, counts = case
    llm = make_llm(model_dir)
    try:
        requests = [
            {"prompt": prompt, "multi_modal_data": {"image": make_image(seed, size)}}
            for seed, size in enumerate(counts)
        ]
        outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        close_llm(llm)
    for out, want in zip(outs, counts.values()):
        assert out.prompt_token_ids.count(image_token_id) == want.total
        assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    ("bench", "real", "tokens_672"),
    [
        (NEXT_BENCH, NEXT_7B, 576 + 48 * 48 + 48),
        (ONEVISION_BENCH, ONEVISION_7B, 729 + 54 * 54 + 54),
    ],
    ids=["next", "onevision"],
)
def test_bench_model_keeps_the_7b_vision_to_llm_cost_proportion(bench, real, tokens_672):
    assert image_token_counts(real, 672, 672).total == tokens_672
    for width, height in ((672, 672), (672, 448)):
        assert image_token_counts(bench, width, height) == image_token_counts(real, width, height)
        vision, llm = prefill_flops(bench, width, height)
        vision_7b, llm_7b = prefill_flops(real, width, height)
        assert abs((vision / llm) / (vision_7b / llm_7b) - 1) < 0.05, (width, height)


def test_onevision_chat_template_renders_the_released_format(onevision_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(onevision_model_dir)
    want = CASES["onevision"][3]
    for image in ({"type": "image"}, {"type": "image_url", "image_url": {"url": "x"}}):
        chat = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, image]}]
        assert processor.apply_chat_template(chat, add_generation_prompt=True) == want
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    assert processor.apply_chat_template(chat) == (
        "<|im_start|>user \nHi<|im_end|>\n<|im_start|>assistant \nYes<|im_end|>\n"
    )
