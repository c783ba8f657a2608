"""32 concurrent requests, a few rounds, with and without diagnostics: all succeed, each response's
diagnostics are its own, and the workers' diagnostics store drains."""

from __future__ import annotations

import asyncio
import re
import time

import hf_reference as ref
import requests
import torch
from helpers import data_url, make_image

from server_api.serving import API_KEY, MODEL

CONCURRENCY = 32
ROUNDS = 3
IMAGES = 4
WORDS = [
    "car",
    "tree",
    "dog",
    "sky",
    "door",
    "sign",
    "cup",
    "table",
    "bike",
    "road",
    "grass",
    "box",
]


def question(i: int) -> str:
    return f"Is the {WORDS[i % len(WORDS)]} near the {WORDS[(i * 5 + 3) % len(WORDS)]} {i}?"


async def one(client, urls, i: int, diagnostics: bool):
    response = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": urls[i % IMAGES]}},
                    {"type": "text", "text": question(i)},
                ],
            }
        ],
        max_tokens=3,
        extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": diagnostics}},
    )
    return i, diagnostics, response


def test_concurrent_requests_get_their_own_diagnostics(server, tiny_model_dir):
    from openai import AsyncOpenAI

    urls = [data_url(make_image(100 + s)) for s in range(IMAGES)]

    async def run():
        client = AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300
        )
        results = []
        for r in range(ROUNDS):
            jobs = [one(client, urls, r * CONCURRENCY + j, j % 2 == 0) for j in range(CONCURRENCY)]
            results += await asyncio.gather(*jobs, return_exceptions=True)
        await client.close()
        return results

    start = time.monotonic()
    results = asyncio.run(run())
    wall = time.monotonic() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    print(f"\n{len(results)} requests, {len(failures)} failures, {wall:.1f} s wall")
    assert not failures, failures[:3]

    tokenizer = ref.load(tiny_model_dir)[1].tokenizer
    features = [ref.image_features(tiny_model_dir, make_image(100 + s)) for s in range(IMAGES)]
    for i, diagnostics, response in results:
        pruning = response.model_extra["pruning"]
        assert pruning["image_tokens_after"] == 144
        (image,) = pruning["per_image"]
        if not diagnostics:
            assert "kept_indices" not in image
            continue
        q_ids = tokenizer.encode(question(i), add_special_tokens=False)
        assert {t["id"] for t in image["top_query_tokens"]} <= set(q_ids)
        feats = features[i % IMAGES]
        q = ref.embed(tiny_model_dir, q_ids)
        scores = ref.relevance_ref(feats, torch.tensor([0, 576]), q, torch.tensor([0, len(q_ids)]))
        assert image["kept_indices"] == ref.topk_select_ref(scores, 144).tolist(), f"request {i}"

    # Every diagnostics entry was taken: the workers' store is back to empty.
    deadline = time.monotonic() + 20
    pending = None
    while time.monotonic() < deadline:
        text = requests.get(f"{server.url}/metrics", timeout=30).text
        match = re.search(
            rf'^lvlm_prune_diagnostics_pending\{{model_name="{MODEL}"\}} (\S+)$', text, re.M
        )
        if match and float(match.group(1)) == 0.0:
            pending = 0.0
            break
        time.sleep(1)
    assert pending == 0.0, "diagnostics left behind in the worker store"
