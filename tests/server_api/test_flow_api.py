"""Flow diagnostics and the flow method through a real ``lvlm-prune serve`` and the ``openai``
client: the ``flow`` object, its agreement with transformers, the bound on concurrent flow passes
(429), bad input (400) and the metrics."""

from __future__ import annotations

import json
import re
import time

import flow_reference as fref
import hf_reference as ref
import openai
import pytest
import requests
import torch
from family.families import QWEN3_VL_MOE
from helpers import data_url, make_image

from lvlm_prune.kernels import keep_count
from lvlm_prune.server.plugin import MAX_FLOW_PASSES
from server_api.serving import API_KEY, MODEL, serve

N = 576
LAYERS = 2  # the tiny model's decoder layers
QUESTION = "Which animal sits on the green grass?"


def messages(question=QUESTION, images=(0,)):
    content = [{"type": "image_url", "image_url": {"url": data_url(make_image(s))}} for s in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def chat(client, pruning, *, images=(0,), max_tokens=2, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=messages(images=images),
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"pruning": pruning, **extra},
    )


def post(server, body):
    return requests.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages(), "max_tokens": 2, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )


def prompt_ids(server, ratio: float, images=(0,)) -> list[int]:
    """The prompt as the server runs it: vLLM's own /tokenize renders the same chat."""
    response = requests.post(
        f"{server.url}/tokenize",
        json={
            "model": MODEL,
            "messages": messages(images=images),
            "mm_processor_kwargs": {"keep_ratio": ratio},
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def scrape(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    found = re.search(rf'^{name}\{{model_name="{MODEL}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("images", [(0,), (0, 1)], ids=["one-image", "two-images"])
def test_flow_through_the_openai_client_matches_transformers(
    server, client, tiny_model_dir, images
):
    response = chat(client, {"keep_ratio": 0.25, "diagnostics": "flow"}, images=images)
    pruning = response.model_extra["pruning"]
    flow = pruning["flow"]
    assert "flow_error" not in pruning
    # Everything diagnostics true gives is there too (and no heatmap).
    for image in pruning["per_image"]:
        assert image["grid"] == [24, 24] and len(image["kept_indices"]) == 144
        assert image["top_query_tokens"] and "heatmap_png" not in image

    assert len(flow["layers"]) == LAYERS
    for layer in flow["layers"]:
        assert set(layer) == {"system", "image", "question"}
        assert abs(sum(layer.values()) - 1) < 1e-4, layer
    assert isinstance(flow["cliff_layer"], int)
    assert [m["layer"] for m in flow["image_map_layers"]] == list(range(LAYERS))
    for entry in flow["image_map_layers"]:
        assert len(entry["per_image"]) == len(images)
        for grid, image in zip(entry["per_image"], pruning["per_image"]):
            assert [len(grid), len(grid[0])] == image["grid"]
            flat = [v for row in grid for v in row]
            assert [i for i, v in enumerate(flat) if v is not None] == image["kept_indices"]

    # The same numbers as transformers' eager attention on the same pruned input.
    tokenizer = ref.load(tiny_model_dir)[1].tokenizer
    q_ids = tokenizer.encode(QUESTION, add_special_tokens=False)
    kept = [ref.reference_kept(tiny_model_dir, make_image(s), q_ids, 144) for s in images]
    assert [i["kept_indices"] for i in pruning["per_image"]] == [k.tolist() for k in kept]
    ids = prompt_ids(server, 0.25, images)
    assert len(ids) == response.usage.prompt_tokens
    rows = [ref.pruned_rows(tiny_model_dir, make_image(s), k) for s, k in zip(images, kept)]
    shares, maps = fref.prompt_flow(tiny_model_dir, ids, rows, kept)
    for got, want in zip(flow["layers"], shares):
        assert [got["system"], got["image"], got["question"]] == pytest.approx(want, abs=1e-4)
    for entry in flow["image_map_layers"]:
        for grid, indices, want in zip(entry["per_image"], kept, maps[entry["layer"]]):
            flat = [v for row in grid for v in row]
            got = torch.tensor([flat[i] for i in indices.tolist()], dtype=torch.float64)
            assert float((got - want).abs().max()) < 1e-4 * float(want.max())


def test_flow_in_the_streaming_answer_and_through_raw_kwargs(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages(),
            max_tokens=2,
            stream=True,
            extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": "flow"}},
        )
    )
    pruning = chunks[-1].model_extra["pruning"]
    assert len(pruning["flow"]["layers"]) == LAYERS
    # Raw mm_processor_kwargs ask the same with prune_flow (the server supplies the id).
    raw = chat(client, {"keep_ratio": 0.5}, mm_processor_kwargs={"prune_flow": True})
    pruning = raw.model_extra["pruning"]
    assert len(pruning["flow"]["layers"]) == LAYERS and "kept_indices" in pruning["per_image"][0]
    # Without flow, no flow.
    assert "flow" not in chat(client, {"diagnostics": True}).model_extra["pruning"]


def test_flow_method_through_the_api(client, tiny_model_dir):
    response = chat(
        client, {"keep_ratio": 0.25, "method": "flow", "prune_layer": 1, "diagnostics": True}
    )
    pruning = response.model_extra["pruning"]
    (image,) = pruning["per_image"]
    assert pruning["method"] == image["method"] == "flow"
    assert pruning["image_tokens_after"] == 144
    q_ids = ref.load(tiny_model_dir)[1].tokenizer.encode(QUESTION, add_special_tokens=False)
    scores = fref.scout_scores(tiny_model_dir, make_image(0), q_ids, 1)
    assert image["kept_indices"] == fref.top_k(scores, 144).tolist()


def stalling_client(server) -> openai.OpenAI:
    """A client whose sockets buffer a few KB at most: a stream it stops reading fills them, so
    the server waits to send and the stream cannot end. Fixed buffers, because Linux grows a
    loopback socket's receive buffer to tens of MB by default, which would hold a whole stream
    and let it end unread (the test then depended on how fast the machine generated)."""
    import socket

    import httpx

    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=API_KEY,
        max_retries=0,
        timeout=120,
        http_client=httpx.Client(transport=transport, timeout=120),
    )


def test_flow_passes_are_bounded_with_a_429(server, client):
    """Every flow slot held by a stream that is still generating: one more flow request is
    refused at once with an OpenAI-style 429 (the openai client's RateLimitError). The slots
    come back when their clients drop the streams, and a stream read to its end gets its flow."""
    rejected_before = scrape(server, "lvlm_prune_flow_rejected_total")
    passes_before = scrape(server, "lvlm_prune_flow_seconds_count")
    held = []
    staller = stalling_client(server)
    for _ in range(MAX_FLOW_PASSES):
        # A stream the client stops reading cannot end: 3 x 1500 chunks of 1-2 KB (20 top
        # logprobs each) are several times what the socket buffers hold (loopback's 64 KB
        # segments give the server's send buffer ~1.3 MB), so the server waits to send and the
        # stream's slot stays taken until the client reads on or drops it.
        stream = staller.chat.completions.create(
            model=MODEL,
            messages=messages(),
            max_tokens=1500,
            n=3,
            logprobs=True,
            top_logprobs=20,
            stream=True,
            extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": "flow"}, "ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        held.append((stream, chunks))
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client, {"keep_ratio": 0.25, "diagnostics": "flow"})
    err = refused.value
    assert (err.status_code, err.body["type"], err.body["param"]) == (
        429,
        "RateLimitError",
        "pruning.diagnostics",
    )
    assert "flow passes" in err.body["message"]
    assert err.response.headers["retry-after"] == "1"
    assert scrape(server, "lvlm_prune_flow_rejected_total") - rejected_before == 1
    for stream, _ in held:  # dropped mid-stream
        stream.close()
    # Both slots come back (as soon as the server sees the connections gone): then a stream
    # read to its end gets its flow, and one more flow request than there are slots, one after
    # the other.
    deadline = time.monotonic() + 60
    while True:
        try:
            chat(client, {"diagnostics": "flow"})
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "a dropped stream kept its flow slot"
            time.sleep(0.5)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages(),
        max_tokens=4,
        stream=True,
        extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": "flow"}},
    )
    last = list(stream)[-1]
    assert len(last.model_extra["pruning"]["flow"]["layers"]) == LAYERS
    for _ in range(MAX_FLOW_PASSES + 1):
        assert "flow" in chat(client, {"diagnostics": "flow"}).model_extra["pruning"]
    passes = scrape(server, "lvlm_prune_flow_seconds_count") - passes_before
    assert passes >= 1 + 1 + MAX_FLOW_PASSES + 1


BAD = {
    "diagnostics unknown": ({"pruning": {"diagnostics": "flows"}}, "pruning.diagnostics"),
    "prune_layer 0": ({"pruning": {"method": "flow", "prune_layer": 0}}, "pruning.prune_layer"),
    "prune_layer string": (
        {"pruning": {"method": "flow", "prune_layer": "2"}},
        "pruning.prune_layer",
    ),
    "prune_layer beyond the model": (
        {"pruning": {"keep_ratio": 0.25, "method": "flow", "prune_layer": LAYERS + 1}},
        "pruning.prune_layer",
    ),
    "raw prune_flow not a bool": (
        {"mm_processor_kwargs": {"prune_flow": "yes"}},
        "mm_processor_kwargs.prune_flow",
    ),
    "raw prune_layer": (
        {"mm_processor_kwargs": {"prune_layer": 0}},
        "mm_processor_kwargs.prune_layer",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_flow_input_is_a_400_naming_the_field(server, client, case):
    body, param = BAD[case]
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and param.split(".")[-1] in error["message"]
    if param.startswith(("pruning.", "mm_processor_kwargs.")):
        assert error["param"] == param
    # The server keeps serving, with its flow slots intact.
    assert "flow" in chat(client, {"diagnostics": "flow"}).model_extra["pruning"]


# ---- an M-RoPE family: Qwen3-VL-MoE (M-RoPE positions, q/k norms, DeepStack, MoE blocks) -------


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    args = [
        *(QWEN3_VL_MOE.serve_name, "--dtype", "float32", "--enforce-eager"),
        *("--max-model-len", "2048", "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0})),
    ]
    with serve(args, tmp_path_factory.mktemp("qwen3-moe-flow-server")) as srv:
        yield srv


def test_flow_on_a_qwen_server_matches_transformers(qwen_server, qwen3_moe_model_dir):
    """``method: "flow"`` and ``diagnostics: "flow"`` on Qwen3-VL-MoE: 200 with a ``flow``
    object; the scout kept what transformers' scout keeps, and the shares and maps are
    transformers' over the prompt with those rows at their original M-RoPE positions."""
    (case, _), k = QWEN3_VL_MOE.images, keep_count(QWEN3_VL_MOE.images[0].tokens, 0.25)
    name = f"lvlm-prune-{QWEN3_VL_MOE.serve_name}"
    image = make_image(0, case.size)
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    body = {
        "model": name,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}],
        "max_tokens": 2,
        "temperature": 0.0,
        "pruning": {"keep_ratio": 0.25, "method": "flow", "prune_layer": 2, "diagnostics": "flow"},
    }
    response = requests.post(f"{qwen_server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    pruning = response.json()["pruning"]
    assert "flow_error" not in pruning
    (entry,) = pruning["per_image"]
    ref_model = fref.eager_reference(QWEN3_VL_MOE.reference, qwen3_moe_model_dir)
    q_ids = ref_model.encode(QUESTION)
    scores = fref.mrope_scout_scores(ref_model, image, q_ids, 2)
    kept = fref.top_k(scores, k)
    assert entry["method"] == "flow" and entry["kept_indices"] == kept.tolist()
    served = torch.tensor([v for row in entry["scores"] for v in row])
    assert float((served - scores).abs().max() / scores.abs().max()) < 1e-4

    tokenized = requests.post(
        f"{qwen_server.url}/tokenize",
        json={
            "model": name,
            "messages": body["messages"],
            "mm_processor_kwargs": {"keep_ratio": 0.25},
        },
        timeout=120,
    )
    ids = tokenized.json()["tokens"]
    rows = [ref_model.pruned_rows(image, kept)]
    positions = ref_model.positions(ids, [case.grid], [kept])
    shares, maps = fref.mrope_prompt_flow(ref_model, ids, rows, positions)
    flow = pruning["flow"]
    assert len(flow["layers"]) == len(shares) == 3
    for got, want in zip(flow["layers"], shares):
        assert max(abs(a - b) for a, b in zip(got.values(), want)) < 1e-4
    assert [m["layer"] for m in flow["image_map_layers"]] == [0, 1, 2]
    for entry_map, (want,) in zip(flow["image_map_layers"], maps):
        (grid,) = entry_map["per_image"]
        assert len(grid) == case.grid[0] and all(len(row) == case.grid[1] for row in grid)
        flat = [v for row in grid for v in row]
        values = torch.tensor([flat[i] for i in kept.tolist()], dtype=torch.float64)
        assert float((values - want).abs().max()) < 1e-4 * float(want.max())
