"""The offline engine on a model lvlm-prune does not prune refuses our kwargs instead of dropping
them unseen (``vllm_internals.refuse_pruning_kwargs_on_unpruned_models``): an engine-wide keep
ratio fails every request with an image (vLLM's start-up warm-up swallows the error, so it cannot
stop the engine), a per-request one fails that request, and a request without pruning is vLLM's
own."""

import pytest
from helpers import close_llm, make_image, make_llm
from tiny_qwen2_vl import ARCHITECTURE
from vllm import SamplingParams

from lvlm_prune.models.tiny_qwen import IMAGE_TOKEN_ID
from lvlm_prune.vllm_plugin import MODELS

SAMPLING = SamplingParams(max_tokens=2, temperature=0.0)
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"


def request(**mm_kwargs) -> dict:
    req = {"prompt": PROMPT, "multi_modal_data": {"image": make_image(0, size=224)}}
    if mm_kwargs:
        req["mm_processor_kwargs"] = mm_kwargs
    return req


def assert_names_why(message: str) -> None:
    assert f"does not prune {ARCHITECTURE}" in message
    assert all(arch in message for arch in MODELS)


@pytest.fixture(scope="module")
def llm(qwen2_vl_dir):
    engine = make_llm(
        qwen2_vl_dir, mm_processor_kwargs={"keep_ratio": 0.25}, limit_mm_per_prompt={"image": 1}
    )
    yield engine
    close_llm(engine)


def test_an_engine_wide_keep_ratio_refuses_every_image_request(llm):
    with pytest.raises(ValueError) as err:
        llm.generate([request()], SAMPLING, use_tqdm=False)
    assert_names_why(str(err.value))
    assert "keep_ratio" in str(err.value)


def test_per_request_pruning_is_refused_and_a_no_op_runs_unpruned(llm):
    with pytest.raises(ValueError) as err:
        llm.generate([request(keep_ratio=1.0, prune_method="uniform")], SAMPLING, use_tqdm=False)
    assert_names_why(str(err.value))
    assert "prune_method" in str(err.value)
    # keep_ratio 1.0 per request overrides the engine-wide one: a no-op, run as stock vLLM runs
    # it, with the unpruned prompt (8 x 8 image tokens).
    out = llm.generate([request(keep_ratio=1.0)], SAMPLING, use_tqdm=False)[0]
    assert out.prompt_token_ids.count(IMAGE_TOKEN_ID) == 64
