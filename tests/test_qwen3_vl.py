"""Qwen3-VL, dense and MoE: what the family suite (``tests/family/``, entries ``qwen3_vl`` and
``qwen3_vl_moe``) does not check on every family.

DeepStack: the vision tower gives each merged token its main embedding and one slice per
DeepStack level, added to the hidden states after the first decoder layers at the image's
positions. A pruned image must send every level exactly the main embedding's kept rows; the
suite's comparison feeds transformers those rows (``hf_reference.Qwen3VLReference``), and here
the same comparison with misaligned levels must fail, so the right alignment is what passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family.families import QWEN3_VL, QWEN3_VL_MOE
from family.suite import FamilyEngine
from helpers import PositionsSeen, close_llm, make_image, make_llm
from hf_reference import LOGPROB_ATOL, max_logprob_diff, reference

from lvlm_prune.kernels import keep_count
from lvlm_prune.models.tiny_qwen3 import (
    QWEN3_8B,
    QWEN3_BENCH,
    VIDEO_TOKEN_ID,
    image_grid,
    prefill_flops,
)


@pytest.fixture(scope="module", params=[QWEN3_VL, QWEN3_VL_MOE], ids=str)
def engine(request):
    family = request.param
    model_dir = request.getfixturevalue(family.model_dir_fixture)
    llm = make_llm(model_dir, limit_mm_per_prompt={"image": 2, "video": 1}, max_model_len=4096)
    yield FamilyEngine(family, llm, reference(family.reference, model_dir))
    close_llm(llm)


def test_misaligned_deepstack_rows_miss_the_tolerance(engine):
    """The right main rows with each level's first K rows (what selecting the main embedding
    alone and slicing the levels naively gives), or with no DeepStack at all, miss the tolerance
    that the right rows meet."""
    (model,) = engine.llm.apply_model(lambda m: m)
    assert model.deepstack_num_level == 2
    case = engine.family.images[0]
    k = keep_count(case.tokens, 0.25)
    out = engine.generate(engine.request(keep_ratio=0.25))
    want = engine.expected(out, k=k)
    engine.assert_matches(out, want)
    main, levels = engine.ref.features(make_image(0, case.size))
    width = main.shape[1]
    wrong = {
        "first K rows of each level": torch.cat([main[want.kept[0]], *(x[:k] for x in levels)], 1),
        "no DeepStack": torch.cat(
            [main[want.kept[0]], *(torch.zeros_like(x[:k]) for x in levels)], 1
        ),
    }
    assert torch.equal(want.rows[0][:, :width], main[want.kept[0]])
    for name, rows in wrong.items():
        _, hf_lp = engine.ref.greedy(
            out.prompt_token_ids, [rows], want.positions, len(out.outputs[0].token_ids)
        )
        diff = max_logprob_diff(out, hf_lp)
        assert diff > 10 * LOGPROB_ATOL, f"{name}: {diff:.2e}"


def test_a_video_after_a_pruned_image_keeps_its_positions(engine):
    """vLLM's Qwen3-VL positions find each video frame by its token ids: the unpruned layout
    they are computed on must carry the prompt's real ids. The video and the text after it sit
    where they sit when the image is not pruned, and decoding follows from there."""
    frames = np.random.RandomState(0).randint(0, 256, (4, 128, 160, 3), dtype=np.uint8)
    metadata = {
        "fps": 2.0,
        "duration": 2.0,
        "total_num_frames": 4,
        "frames_indices": [0, 1, 2, 3],
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    prompt = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n"
    )
    case = engine.family.images[0]
    after = {}
    for ratio in (1.0, 0.5):
        req = {
            "prompt": prompt,
            "multi_modal_data": {
                "image": [make_image(0, case.size)],
                "video": [(frames, metadata)],
            },
            "mm_processor_kwargs": {"keep_ratio": ratio},
        }
        seen = PositionsSeen(engine.llm)
        try:
            out = engine.generate(req)
        finally:
            seen.close()
        ids = list(out.prompt_token_ids)
        assert engine.image_token_count(out) == keep_count(case.tokens, ratio)
        end = ids.index(engine.ref.image_token_id) + engine.image_token_count(out)
        after[ratio] = (ids[end:], seen.all()[:, end:])
    (ids, positions), (pruned_ids, pruned_positions) = after[1.0], after[0.5]
    assert pruned_ids == ids and VIDEO_TOKEN_ID in ids
    assert torch.equal(pruned_positions, positions)


def test_merge_is_refused_by_name_and_the_engine_keeps_serving(engine):
    """``prune_merge`` would have to carry the main embedding's merge over to every level."""
    with pytest.raises(ValueError, match="prune_merge is not available for Qwen3-VL"):
        engine.generate(engine.request(keep_ratio=0.25, prune_merge=True))
    out = engine.generate(engine.request(keep_ratio=0.25))
    assert engine.image_token_count(out) == keep_count(engine.family.images[0].tokens, 0.25)


def test_bench_model_keeps_the_8b_vision_to_llm_cost_proportion():
    for width, height, tokens in ((672, 448, 294), (1344, 896, 1176)):
        vision, llm = prefill_flops(QWEN3_BENCH, width, height)
        vision_8b, llm_8b = prefill_flops(QWEN3_8B, width, height)
        assert abs((vision / llm) / (vision_8b / llm_8b) - 1) < 0.05, (width, height)
        rows, cols = image_grid(QWEN3_8B, width, height)
        assert rows * cols == tokens
