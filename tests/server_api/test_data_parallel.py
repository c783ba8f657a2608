"""Diagnostics under data parallelism: a real ``lvlm-prune serve --data-parallel-size 2``.

vLLM's load balancer sends each request to one of the engines; the diagnostics of a request live in
that engine's workers. Every request must get its own diagnostics back, whichever engine ran it.
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest
import requests
import torch
from helpers import data_url, make_image

from server_api.serving import MODEL, serve

REQUESTS = 8


@pytest.fixture(scope="module")
def dp_server(tiny_model_dir, tmp_path_factory):
    cpus = sorted(os.sched_getaffinity(0))
    if torch.cuda.is_available() or len(cpus) < 2:
        pytest.skip("data parallelism here runs two CPU engines, one core each")
    args = [
        *("tiny", "--data-parallel-size", "2"),
        *("--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"),
    ]
    # One core per engine: vLLM's "auto" binding wants one NUMA node per engine.
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}
    with serve(args, tmp_path_factory.mktemp("dp-server"), env=env, timeout=600) as srv:
        yield srv


def test_every_request_gets_its_diagnostics_from_the_engine_that_ran_it(dp_server):
    from openai import AsyncOpenAI

    async def one(client, i):
        response = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(make_image(300 + i))}},
                        {"type": "text", "text": f"What is in picture {i}?"},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0.0,
            extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": True}},
        )
        return response.model_extra["pruning"]

    async def run():
        client = AsyncOpenAI(base_url=f"{dp_server.url}/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))
        finally:
            await client.close()

    results = asyncio.run(run())
    for pruning in results:
        (image,) = pruning["per_image"]
        assert image["tokens_after"] == 144
        assert len(image["kept_indices"]) == 144, "diagnostics came back"

    # Both engines served requests: otherwise this test would not show anything.
    metrics = requests.get(f"{dp_server.url}/metrics", timeout=30).text
    per_engine: dict[str, float] = {}
    for engine, count in re.findall(
        r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', metrics, re.M
    ):  # one series per finish reason
        per_engine[engine] = per_engine.get(engine, 0.0) + float(count)
    assert sorted(per_engine) == ["0", "1"], per_engine
    assert all(count > 0 for count in per_engine.values()), per_engine


def test_flow_diagnostics_come_from_the_engine_that_ran_the_request(dp_server):
    """The flow pass reruns a request on the engine that served it; the other engine answers
    "not mine" without a collective (its workers would otherwise wait for each other)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{dp_server.url}/v1", api_key="none", max_retries=0, timeout=300)
    for i in range(4):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(make_image(320 + i))}},
                        {"type": "text", "text": f"What is in picture {i}?"},
                    ],
                }
            ],
            max_tokens=2,
            extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": "flow"}},
        )
        pruning = response.model_extra["pruning"]
        assert "flow_error" not in pruning, pruning["flow_error"]
        layers = pruning["flow"]["layers"]
        assert len(layers) == 2 and all(abs(sum(x.values()) - 1) < 1e-4 for x in layers)
