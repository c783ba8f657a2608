"""The OpenAI-compatible API with pruning: real server, real ``openai`` client, tiny model."""

from __future__ import annotations

import base64
import json
import time

import hf_reference as ref
import openai
import pytest
import requests
from helpers import data_url, make_image

from server_api.serving import API_KEY, MAX_IMAGES, MODEL, SERVER_KEEP_RATIO

N = 576
QUESTION = "What color is the car parked beside the tree?"


def messages(question=QUESTION, images=(0,)):
    content = [{"type": "image_url", "image_url": {"url": data_url(make_image(s))}} for s in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def chat(client, *, question=QUESTION, images=(0,), pruning=None, max_tokens=4, **extra_body):
    body = dict(extra_body)
    if pruning is not None:
        body["pruning"] = pruning
    return client.chat.completions.create(
        model=MODEL,
        messages=messages(question, images),
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=body or None,
    )


def pruning_of(response) -> dict:
    return response.model_extra["pruning"]


def test_server_default_and_per_request_ratio(client):
    default = chat(client)
    full = chat(client, pruning={"keep_ratio": 1.0})
    quarter = chat(client, pruning={"keep_ratio": 0.25, "method": "uniform"})
    k_default = round(N * SERVER_KEEP_RATIO)
    assert pruning_of(default)["image_tokens_after"] == k_default
    assert pruning_of(default)["keep_ratio"] == SERVER_KEEP_RATIO
    p = pruning_of(quarter)
    assert (p["image_tokens_before"], p["image_tokens_after"], p["keep_ratio"], p["method"]) == (
        N,
        144,
        0.25,
        "uniform",
    )
    assert p["per_image"] == [{"tokens_before": N, "tokens_after": 144}]
    # The counts are the prompt: usage moves by exactly the tokens pruned.
    assert full.usage.prompt_tokens - quarter.usage.prompt_tokens == N - 144
    assert full.usage.prompt_tokens - default.usage.prompt_tokens == N - k_default
    assert pruning_of(full)["image_tokens_after"] == N


def test_positions_original_by_default_and_compact_on_request(client):
    """Same kept rows, same prompt length; the positions alone move the logprobs."""

    def first_logprob(pruning):
        response = client.chat.completions.create(
            model=MODEL,
            messages=messages(),
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            extra_body={"pruning": pruning},
        )
        assert pruning_of(response)["image_tokens_after"] == 144
        return response.usage.prompt_tokens, response.choices[0].logprobs.content[0].logprob

    quarter = {"keep_ratio": 0.25, "method": "uniform"}
    tokens, default = first_logprob(quarter)
    assert first_logprob({**quarter, "positions": "original"}) == (tokens, default)
    compact_tokens, compact = first_logprob({**quarter, "positions": "compact"})
    assert compact_tokens == tokens
    assert abs(compact - default) > 2e-3


def test_raw_mm_processor_kwargs_still_work(client):
    response = chat(client, mm_processor_kwargs={"keep_ratio": 0.25})
    assert pruning_of(response)["image_tokens_after"] == 144


def test_requests_without_images_get_no_pruning_object(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=2,
        extra_body={"pruning": {"keep_ratio": 0.25}},
    )
    assert "pruning" not in (response.model_extra or {})
    completion = client.completions.create(
        model=MODEL,
        prompt="USER: hello ASSISTANT:",
        max_tokens=2,
        extra_body={"pruning": {"keep_ratio": 0.25}},
    )
    assert completion.usage.prompt_tokens > 0 and "pruning" not in (completion.model_extra or {})
    with pytest.raises(openai.BadRequestError, match="pruning.keep_ratio"):
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2, extra_body={"pruning": {"keep_ratio": 2}}
        )


def test_streaming_carries_pruning_in_the_last_chunk_before_done(server, client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages(),
            max_tokens=4,
            stream=True,
            extra_body={"pruning": {"keep_ratio": 0.25}},
        )
    )
    with_pruning = [c for c in chunks if (c.model_extra or {}).get("pruning")]
    assert len(with_pruning) == 1 and with_pruning[0] is chunks[-1]
    assert with_pruning[0].model_extra["pruning"]["image_tokens_after"] == 144
    # On the wire: the pruning event is the one right before [DONE].
    raw = requests.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": MODEL,
            "messages": messages(),
            "max_tokens": 3,
            "stream": True,
            "pruning": {"keep_ratio": 0.25},
        },
        timeout=120,
    )
    events = [e for e in raw.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["pruning"]["image_tokens_after"] == 144


def post(server, body, *, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return requests.post(
            f"{server.url}/v1/chat/completions",
            data=raw,
            headers={**headers, "Content-Type": "application/json"},
            timeout=120,
        )
    return requests.post(
        f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120
    )


def good_body(**over):
    return {"model": MODEL, "messages": messages(), "max_tokens": 2, **over}


def not_an_image_url():
    return "data:image/png;base64," + base64.b64encode(b"this is plain text, not a PNG").decode()


BAD = {
    "keep_ratio 0": (good_body(pruning={"keep_ratio": 0}), "pruning.keep_ratio"),
    "keep_ratio -1": (good_body(pruning={"keep_ratio": -1}), "pruning.keep_ratio"),
    "keep_ratio 1.5": (good_body(pruning={"keep_ratio": 1.5}), "pruning.keep_ratio"),
    "keep_ratio abc": (good_body(pruning={"keep_ratio": "abc"}), "pruning.keep_ratio"),
    "unknown method": (good_body(pruning={"method": "best"}), "pruning.method"),
    "unknown positions": (good_body(pruning={"positions": "sideways"}), "pruning.positions"),
    "diagnostics wrong type": (good_body(pruning={"diagnostics": "yes"}), "pruning.diagnostics"),
    "diagnostics number": (good_body(pruning={"diagnostics": 5}), "pruning.diagnostics"),
    "unknown pruning key": (good_body(pruning={"keep": 0.5}), "pruning.keep"),
    "pruning not an object": (good_body(pruning=0.5), "pruning"),
    "raw kwarg bad": (
        good_body(mm_processor_kwargs={"keep_ratio": 2}),
        "mm_processor_kwargs.keep_ratio",
    ),
    "raw foreign kwarg": (
        good_body(mm_processor_kwargs={"do_resize": False}),
        "mm_processor_kwargs",
    ),
    "raw internal kwarg": (
        good_body(mm_processor_kwargs={"prune_diagnostics": 5}),
        "mm_processor_kwargs.prune_diagnostics",
    ),
    "forged request tag": (
        good_body(mm_processor_kwargs={"prune_tag": "abc"}),
        "mm_processor_kwargs.prune_tag",
    ),
    "media_io_kwargs stay gated": (
        good_body(media_io_kwargs={"image": {"mode": "L"}}),
        "media_io_kwargs",
    ),
    "seed beyond int64": (good_body(pruning={"seed": 2**63}), "pruning.seed"),
    "raw seed beyond int64": (
        good_body(mm_processor_kwargs={"prune_seed": 2**63}),
        "mm_processor_kwargs.prune_seed",
    ),
    "raw huge keep_ratio": (
        good_body(mm_processor_kwargs={"keep_ratio": 10**400}),
        "mm_processor_kwargs.keep_ratio",
    ),
    "query too long": (good_body(pruning={"query": "x" * 20_001}), "pruning.query"),
    "corrupt base64": (
        good_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"},
                        },
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        ),
        None,
    ),
    "data url not an image": (
        good_body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": not_an_image_url()}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ]
        ),
        None,
    ),
    "too many images": (good_body(messages=messages(images=tuple(range(MAX_IMAGES + 1)))), None),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_a_400_and_the_server_keeps_serving(server, client, case):
    body, param = BAD[case]
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] and error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[-1] in error["message"]
    assert pruning_of(chat(client, pruning={"keep_ratio": 0.25}))["image_tokens_after"] == 144


def test_long_query_is_cut_to_its_last_tokens(client, tiny_model_dir):
    from lvlm_prune.vllm_plugin.options import MAX_QUERY_TOKENS

    question = " ".join(f"w{i}" for i in range(2000))
    response = chat(client, pruning={"keep_ratio": 0.25, "diagnostics": True, "query": question})
    (image,) = pruning_of(response)["per_image"]
    ids = ref.load(tiny_model_dir)[1].tokenizer.encode(question, add_special_tokens=False)
    assert len(ids) > MAX_QUERY_TOKENS
    assert {t["id"] for t in image["top_query_tokens"]} <= set(ids[-MAX_QUERY_TOKENS:])
    assert len(image["kept_indices"]) == 144


def test_done_event_is_found_only_at_an_event_boundary():
    from lvlm_prune.server.middleware import _done_event_at

    assert _done_event_at(b"data: [DONE]\n\n") == 0
    chunk = b'data: {"x": 1}\n\ndata: [DONE]\n\n'
    assert _done_event_at(chunk) == chunk.index(b"data: [DONE]")
    assert _done_event_at(b'data: {"content": "say data: [DONE] now"}\n\n') == -1


def test_empty_body_is_a_400(server):
    for raw in (b"", b"{}", b"not json"):
        response = post(server, None, raw=raw)
        assert response.status_code == 400, (raw, response.status_code, response.text)
        assert response.json()["error"]["message"]


def test_api_key_guards_everything_but_health_and_metrics(server):
    for path in ("/v1/models",):
        assert requests.get(f"{server.url}{path}", timeout=30).status_code == 401
    assert post(server, good_body(pruning={"keep_ratio": 0.25}), key=None).status_code == 401
    assert post(server, good_body(pruning={"keep_ratio": 0}), key="wrong").status_code == 401
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert requests.get(f"{server.url}/metrics", timeout=30).status_code == 200
    assert (
        requests.get(
            f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        ).status_code
        == 200
    )


def test_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, pruning={"method": "best"})
    assert "pruning.method" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,status,param",
    [
        ({"keep_ratio": 0.25}, 200, None),
        ({"prune_tag": "forged"}, 400, "mm_processor_kwargs.prune_tag"),
        ({"prune_diagnostics": 5}, 400, "mm_processor_kwargs.prune_diagnostics"),
        ({"prune_query_ids": [7, 8]}, 400, "mm_processor_kwargs.prune_query_ids"),
        ({"do_resize": False}, 400, "mm_processor_kwargs"),
    ],
)
@pytest.mark.parametrize(
    "route,body",
    [
        ("/v1/chat/completions", {"max_tokens": 1}),  # vLLM's preprocess_chat, after our middleware
        ("/tokenize", {}),  # preprocess_chat, no middleware
        ("/tokenize", {"prompt": "USER: hello ASSISTANT:"}),  # preprocess_cmpl
        (
            "/v1/completions",
            {"prompt": "USER: hello ASSISTANT:", "max_tokens": 1},
        ),  # preprocess_cmpl
    ],
    ids=["chat", "tokenize-chat", "tokenize-prompt", "completions"],
)
def test_vllm_gate_on_every_gated_route(server, route, body, kwargs, status, param):
    """Every route that reaches vLLM's per-request kwargs gate: pruning keys pass it, server-set
    keys only when our middleware issued them, any other key only with --trust-request-mm-kwargs."""
    payload = {"model": MODEL, "mm_processor_kwargs": kwargs, **body}
    if "prompt" not in body:
        payload["messages"] = messages()
    response = requests.post(
        f"{server.url}{route}",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json=payload,
        timeout=120,
    )
    assert response.status_code == status, response.text
    if status != 200:
        assert param in response.json()["error"]["message"]
    elif route == "/tokenize" and "messages" in payload:
        assert response.json()["tokens"].count(ref.IMAGE_TOKEN_ID) == 144
    elif route == "/v1/chat/completions":
        assert response.json()["pruning"]["image_tokens_after"] == 144


def test_server_hands_memory_back_once_idle(server, client):
    def trims() -> float:
        text = requests.get(f"{server.url}/metrics", timeout=30).text
        line = next(x for x in text.splitlines() if x.startswith("lvlm_prune_memory_trims_total"))
        return float(line.rsplit(" ", 1)[1])

    before = trims()
    chat(client)
    deadline = time.monotonic() + 30  # idle 1 s, at most one trim per 10 s: well within 30
    while trims() == before:
        assert time.monotonic() < deadline, "no trim after the server went idle"
        time.sleep(0.5)
