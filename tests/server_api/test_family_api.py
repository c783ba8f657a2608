"""Qwen2.5-VL through the API: a real ``lvlm-prune serve qwen-tiny``.

Dynamic resolution gives an image its own rows x cols of tokens; the diagnostics, the heatmap and
the usage must follow that grid, not assume LLaVA's square one. The ``flow`` method and flow
diagnostics rerun Llama-family layers and are refused for this model with a 400 naming the field.
"""

from __future__ import annotations

import base64
import io

import pytest
import requests
import torch
from helpers import data_url
from PIL import Image
from test_qwen2_5_vl import IMAGE_TOKEN_ID, PORTRAIT, make_image, reference_kept

from server_api.serving import serve

MODEL = "lvlm-prune-qwen-tiny"
QUESTION = "What is the color of the car on the street?"
ROWS, COLS = PORTRAIT[1] // 28, PORTRAIT[0] // 28  # 10 x 6 = 60 tokens


@pytest.fixture(scope="module")
def qwen_server(qwen_model_dir, tmp_path_factory):
    args = ["qwen-tiny", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
    with serve(args, tmp_path_factory.mktemp("qwen-server")) as srv:
        yield srv


def body(pruning=None, **over):
    image = {"type": "image_url", "image_url": {"url": data_url(make_image(0))}}
    out = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}],
        "max_tokens": 2,
        "temperature": 0.0,
        **over,
    }
    if pruning is not None:
        out["pruning"] = pruning
    return out


def post(server, payload) -> requests.Response:
    return requests.post(f"{server.url}/v1/chat/completions", json=payload, timeout=120)


def test_diagnostics_follow_the_images_own_grid(qwen_server, qwen_model_dir):
    from transformers import AutoTokenizer

    stock = post(qwen_server, body(pruning={"keep_ratio": 1.0}))
    pruned = post(qwen_server, body(pruning={"keep_ratio": 0.25, "diagnostics": True}))
    assert stock.status_code == pruned.status_code == 200, pruned.text
    k = round(ROWS * COLS * 0.25)
    assert stock.json()["usage"]["prompt_tokens"] - pruned.json()["usage"]["prompt_tokens"] == (
        ROWS * COLS - k
    )
    info = pruned.json()["pruning"]
    assert (info["image_tokens_before"], info["image_tokens_after"]) == (ROWS * COLS, k)
    (image,) = info["per_image"]
    assert image["grid"] == [ROWS, COLS]
    assert len(image["scores"]) == ROWS and all(len(row) == COLS for row in image["scores"])
    tokenizer = AutoTokenizer.from_pretrained(qwen_model_dir)
    q_ids = tokenizer.encode(QUESTION, add_special_tokens=False)
    assert IMAGE_TOKEN_ID not in q_ids
    want = reference_kept(qwen_model_dir, make_image(0), q_ids, k)
    assert image["kept_indices"] == want.tolist()
    assert torch.tensor(image["scores"]).shape == (ROWS, COLS)


def test_heatmap_has_the_images_aspect(qwen_server):
    response = post(qwen_server, body(pruning={"keep_ratio": 0.25, "diagnostics": "heatmap"}))
    assert response.status_code == 200, response.text
    (image,) = response.json()["pruning"]["per_image"]
    png = Image.open(io.BytesIO(base64.b64decode(image["heatmap_png"])))
    assert png.size == (round(336 * COLS / ROWS), 336)  # portrait, as the image


@pytest.mark.parametrize(
    "payload,param",
    [
        (body(pruning={"keep_ratio": 0.25, "method": "flow"}), "pruning.method"),
        (body(mm_processor_kwargs={"prune_method": "flow"}), "mm_processor_kwargs.prune_method"),
        (body(pruning={"diagnostics": "flow"}), "pruning.diagnostics"),
    ],
    ids=["method", "raw-method", "diagnostics"],
)
def test_flow_is_refused_for_a_non_llama_language_model(qwen_server, payload, param):
    response = post(qwen_server, payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "information flow supports llama" in error["message"]
    assert post(qwen_server, body(pruning={"keep_ratio": 0.25})).status_code == 200
