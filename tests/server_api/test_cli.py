"""``lvlm-prune serve``: vLLM's serve options pass through, ours fold in, SIGTERM ends everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
import requests

from lvlm_prune.server.cli import build_serve_args
from lvlm_prune.vllm_plugin import WORKER_EXTENSION
from server_api.serving import MODEL, Server, free_port


def test_defaults_serve_the_trained_built_in_model():
    from lvlm_prune.models.shapes import MODEL_NAME, released_model_dir

    args = build_serve_args([])
    assert args.model == str(released_model_dir())
    assert args.served_model_name == [MODEL_NAME]
    assert args.host == "127.0.0.1"
    assert args.worker_extension_cls == WORKER_EXTENSION
    assert not args.mm_processor_kwargs


def test_built_in_models_by_name(tiny_model_dir):
    args = build_serve_args(["tiny"])
    assert args.model == tiny_model_dir and args.served_model_name == [MODEL]
    args = build_serve_args(["tiny", "--served-model-name", "mine"])
    assert args.model == tiny_model_dir and args.served_model_name == ["mine"]


def test_our_flags_fold_into_mm_processor_kwargs_and_vllm_options_pass_through():
    args = build_serve_args(
        [
            "some/checkpoint",
            "--keep-ratio",
            "0.25",
            "--prune-method",
            "uniform",
            "--mm-processor-kwargs",
            json.dumps({"keep_ratio": 0.9, "do_resize": True}),
            "--max-model-len",
            "1234",
            "--api-key",
            "k",
            "--host",
            "0.0.0.0",
            "--port",
            "8123",
        ]
    )
    assert args.model == "some/checkpoint"
    assert args.mm_processor_kwargs == {
        "keep_ratio": 0.25,
        "prune_method": "uniform",
        "do_resize": True,
    }
    assert (args.max_model_len, args.api_key, args.host, args.port) == (
        1234,
        ["k"],
        "0.0.0.0",
        8123,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--keep-ratio", "0"],
        ["--keep-ratio", "2"],
        ["--prune-method", "best"],
        ["--mm-processor-kwargs", '{"keep_ratio": -1}'],
    ],
)
def test_bad_server_defaults_fail_at_startup(argv):
    with pytest.raises((SystemExit, ValueError)):
        build_serve_args(argv)


def test_make_serve_answers_a_newcomer_and_sigterm_stops_everything(tmp_path, seed):
    """What ``make serve`` starts (the default model, keep 0.25) answers the README's first
    request on freshly drawn scenes; then SIGTERM ends the server and its engine processes."""
    from helpers import data_url
    from openai import OpenAI

    from lvlm_prune.models.shapes import MODEL_NAME
    from lvlm_prune.shapes import scenes

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lvlm_prune.server.cli",
                "serve",
                "--port",
                str(port),
                "--enforce-eager",
                "--keep-ratio",
                "0.25",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
            start_new_session=True,
        )
    server = Server(port, proc, log)
    try:
        server.wait_ready()
        served = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        assert served == MODEL_NAME, "the default model"
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        right = 0
        for i in range(5):  # fresh scenes each run; the model answers ~100 % of them at 0.25
            scene, question = scenes.example(seed=seed + i)
            content = [
                {"type": "image_url", "image_url": {"url": data_url(scene.image())}},
                {"type": "text", "text": question.text},
            ]
            reply = client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": content}],
                max_tokens=4,
                temperature=0.0,
            )
            assert reply.model_extra["pruning"]["image_tokens_after"] == 144
            right += scenes.score_reply(reply.choices[0].message.content, question)
        assert right >= 4, f"{right}/5 right"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "vLLM's engine core should run in a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
