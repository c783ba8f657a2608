"""A model lvlm-prune does not prune says so: ``lvlm-prune serve`` refuses a server-wide keep
ratio for it, ``/metrics`` and the log say the model is served unpruned, a request that asks for
pruning gets a 400 naming why, and a request without pruning is vLLM's own.

The model is a tiny Qwen2-VL (``tiny_qwen2_vl``): close to Qwen2.5-VL, which we prune, but an
architecture ``vllm_plugin.MODELS`` does not name.
"""

from __future__ import annotations

import openai
import pytest
import requests
from helpers import data_url, make_image
from tiny_qwen2_vl import ARCHITECTURE

from lvlm_prune.server.plugin import UnprunedModel
from lvlm_prune.vllm_plugin import MODELS
from lvlm_prune.vllm_plugin.support import unpruned_reason
from server_api.serving import API_KEY, refused_at_start_up, serve

MODEL = "qwen2-vl-tiny"
IMAGE_SIDE = 224  # 8 x 8 tokens after the 2x2 merger


@pytest.fixture(scope="module")
def unpruned_server(qwen2_vl_dir, tmp_path_factory):
    args = [
        *(qwen2_vl_dir, "--served-model-name", MODEL, "--api-key", API_KEY),
        *("--enforce-eager", "--max-model-len", "2048"),
        *("--limit-mm-per-prompt", '{"image": 1}'),
    ]
    with serve(args, tmp_path_factory.mktemp("unpruned-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(unpruned_server):
    return openai.OpenAI(
        base_url=f"{unpruned_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    )


def messages(seed: int = 0) -> list[dict]:
    image = make_image(seed, size=IMAGE_SIDE)
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]


def assert_names_the_models(message: str) -> None:
    assert ARCHITECTURE in message, message
    assert all(arch in message for arch in MODELS), message


def test_the_one_rule_and_what_asks_for_pruning():
    from transformers import LlavaConfig

    llava = LlavaConfig()
    pixtral_hf = LlavaConfig(vision_config={"model_type": "pixtral"})
    assert unpruned_reason("LlavaForConditionalGeneration", llava) is None
    assert "Pixtral-HF" in unpruned_reason("LlavaForConditionalGeneration", pixtral_hf)
    assert_names_the_models(unpruned_reason(ARCHITECTURE, llava))

    asked = UnprunedModel("why").pruning_asked
    no_ops = [
        {},
        {"pruning": {}},
        {"pruning": {"keep_ratio": 1.0, "diagnostics": False, "requery": False}},
        {"pruning": None, "mm_processor_kwargs": {"keep_ratio": 1, "do_resize": True}},
    ]
    assert [asked(body) for body in no_ops] == [[]] * len(no_ops)
    assert asked({"pruning": {"keep_ratio": 1.0, "query": "a cat"}}) == ["pruning.query"]
    assert asked({"pruning": "on"}) == ["pruning"]
    assert asked({"mm_processor_kwargs": {"prune_method": "uniform", "do_resize": True}}) == [
        "mm_processor_kwargs.prune_method"
    ]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--keep-ratio", "0.25"], "keep_ratio=0.25"),
        (["--preset", 'fast={"keep_ratio": 0.25}'], ':fast ({"keep_ratio": 0.25})'),
    ],
    ids=["keep-ratio", "preset"],
)
def test_serve_refuses_server_wide_pruning_before_the_engine_loads(qwen2_vl_dir, flags, named):
    returncode, stderr = refused_at_start_up([qwen2_vl_dir, *flags])
    assert returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lvlm-prune serve: lvlm-prune does not prune"), stderr[-3000:]
    assert_names_the_models(last)
    assert named in last
    assert "Traceback" not in stderr
    assert "Resolved architecture" not in stderr  # vLLM's engine config was never built


def test_start_up_says_the_model_is_served_unpruned(unpruned_server):
    text = requests.get(f"{unpruned_server.url}/metrics", timeout=30).text
    assert f'lvlm_prune_model_pruned{{model_name="{MODEL}"}} 0.0' in text.splitlines()
    log = unpruned_server.log.read_text()
    lines = [line for line in log.splitlines() if f"lvlm-prune: {MODEL} is served unpruned" in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    assert_names_the_models(lines[0])


@pytest.mark.parametrize(
    ("extra_body", "param"),
    [
        ({"pruning": {"keep_ratio": 0.25}}, "pruning.keep_ratio"),
        ({"pruning": {"diagnostics": True}}, "pruning.diagnostics"),
        ({"pruning": {"keep_ratio": 1.0, "method": "uniform"}}, "pruning.method"),
        ({"mm_processor_kwargs": {"prune_seed": 3}}, "mm_processor_kwargs.prune_seed"),
    ],
    ids=["keep_ratio", "diagnostics", "method", "raw-kwargs"],
)
def test_a_request_that_asks_for_pruning_is_refused(client, extra_body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, max_tokens=2, messages=messages(), extra_body=extra_body
        )
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["param"] == param, error
    assert error["message"].startswith("lvlm-prune does not prune"), error
    assert param in error["message"]
    assert_names_the_models(error["message"])


def test_routes_the_middleware_does_not_see_refuse_pruning_kwargs_too(unpruned_server):
    """vLLM's per-request kwargs gate (``plugin._refuse_on_unpruned_model``): /tokenize."""
    response = requests.post(
        f"{unpruned_server.url}/tokenize",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": MODEL,
            "messages": messages(),
            "mm_processor_kwargs": {"keep_ratio": 0.5},
        },
        timeout=120,
    )
    assert response.status_code == 400, response.text
    assert "mm_processor_kwargs.keep_ratio" in response.json()["error"]["message"]


def test_a_request_without_pruning_is_vllms_own(client, qwen2_vl_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen2_vl_dir)
    hf_prompt = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": make_image(0, size=IMAGE_SIDE)},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    unpruned = len(hf_prompt["input_ids"][0])
    assert unpruned > (IMAGE_SIDE // 28) ** 2
    for extra_body in (None, {"pruning": {"keep_ratio": 1.0}}, {"pruning": {}}):
        response = client.chat.completions.create(
            model=MODEL, max_tokens=2, messages=messages(), extra_body=extra_body
        )
        assert response.usage.prompt_tokens == unpruned, extra_body
        assert "pruning" not in (response.model_extra or {}), extra_body
    # No image, no pruning asked: a text request passes too.
    response = client.chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hello"}]
    )
    assert response.usage.prompt_tokens > 0 and response.choices
