"""Faults a supervisor and the other clients must survive, on a real ``lvlm-prune serve``.

- The engine core process killed under load: every request in flight ends at once with an error
  (HTTP 500 and an error body; a stream that had started ends with an error event), ``/health``
  stops answering 200, and the server process exits non-zero on its own, so a supervisor restarts
  it (vLLM 0.32 alone exits 0: ``server/supervision.py``).
- A client that opens 50 long requests and closes its connections: the others keep being served,
  and the server frees what the abandoned requests held (engine queue, ledger, diagnostics).
- Bad inputs (an oversized image, bytes that are no image) are 400s, and the server serves on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time

import aiohttp
import pytest
import requests
from helpers import data_url, make_image

from lvlm_prune.benchmarks.harness import engine_core
from lvlm_prune.benchmarks.soak import oversized_png_url
from server_api.serving import API_KEY, MODEL, serve

LONG = 1700  # output tokens (ignore_eos): still generating when the fault comes, at 2048 tokens
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def body(seed: int, *, stream: bool, max_tokens: int = LONG, **pruning) -> dict:
    out = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(make_image(seed))}},
                    {"type": "text", "text": f"What is in picture {seed}?"},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if pruning:
        out["pruning"] = pruning
    return out


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def gauge(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


def wait_until_idle(url: str, timeout: float = 60) -> dict[str, float]:
    """Engine queue and both stores empty (the diagnostics gauge refreshes every 5 s)."""
    names = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "lvlm_prune_ledger_entries",
        "lvlm_prune_diagnostics_pending",
    )
    start = time.monotonic()
    while True:
        samples = scrape(url)
        state = {name: gauge(samples, name) for name in names}
        if (time.monotonic() - start > 6 and not any(state.values())) or (
            time.monotonic() - start > timeout
        ):
            return state
        time.sleep(0.5)


async def send(session: aiohttp.ClientSession, url: str, payload: dict) -> dict:
    start = time.monotonic()
    async with session.post(f"{url}/v1/chat/completions", json=payload, headers=HEADERS) as r:
        text = await r.text()
    end = time.monotonic()
    return {"status": r.status, "text": text, "seconds": end - start, "ended": end}


# --------------------------------------------------------------------------------------------
# The engine core dies under load


@pytest.fixture
def doomed_server(tiny_model_dir, tmp_path):
    """A server of its own: this test kills its engine."""
    args = ["tiny", "--api-key", API_KEY, "--enforce-eager", "--max-model-len", "4096"]
    with serve(args, tmp_path) as srv:
        yield srv


async def scrape_async(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``scrape`` without blocking the loop that is still sending the requests."""
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_engine_death_fails_in_flight_requests_and_exits_non_zero(doomed_server):
    url = doomed_server.url

    async def scenario():
        timeout = aiohttp.ClientTimeout(total=180)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # Outputs as long as the context allows (~600 prompt tokens): none ends before all six run.
            flights = [
                asyncio.create_task(send(session, url, body(i, stream=i % 2 == 0, max_tokens=3400)))
                for i in range(6)
            ]
            deadline = time.monotonic() + 120
            running = 0
            while running < len(flights):
                done = [f.result() for f in flights if f.done()]
                assert not done, f"a request ended before the kill: {done[0]}"
                assert time.monotonic() < deadline, f"only {running} of the requests ever ran"
                await asyncio.sleep(0.2)
                running = gauge(await scrape_async(session, url), "vllm:num_requests_running")
            engine_core(doomed_server.proc.pid).kill()
            killed = time.monotonic()
            health = []
            while doomed_server.proc.poll() is None and time.monotonic() - killed < 30:
                try:
                    health.append(requests.get(f"{url}/health", timeout=2).status_code)
                except requests.ConnectionError:
                    health.append("refused")
                await asyncio.sleep(0.05)
            results = await asyncio.wait_for(asyncio.gather(*flights), timeout=60)
            return results, health, killed

    results, health, killed = asyncio.run(scenario())
    print(
        f"\n/health after the kill: {health}; server gone after {time.monotonic() - killed:.1f} s"
    )
    for result in results:
        assert result["ended"] - killed < 30, "a request hung after the kill"
        if result["status"] == 200:  # a stream that had started: the error comes in-band
            events = [
                json.loads(line[6:])
                for line in result["text"].splitlines()
                if line.startswith("data: {")
            ]
            errors = [e["error"] for e in events if "error" in e]
            assert errors and errors[0]["code"] >= 500, result["text"][-2000:]
        else:
            assert result["status"] >= 500, result
            error = json.loads(result["text"])["error"]
            assert error["code"] >= 500 and error["message"], error
    assert any(r["status"] != 200 for r in results), "no non-streamed request was in flight"
    # /health stopped saying 200 once the death was seen, and stayed so until the server left.
    first_bad = next(i for i, h in enumerate(health) if h != 200)
    assert all(h != 200 for h in health[first_bad:]), health
    assert doomed_server.proc.wait(timeout=30) == 1, doomed_server.log.read_text()[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=2)


# --------------------------------------------------------------------------------------------
# A client that leaves with 50 requests in flight


def test_client_closing_50_requests_does_not_disturb_the_others(server):
    url = server.url
    before = scrape(url)

    async def scenario():
        timeout = aiohttp.ClientTimeout(total=300)
        # The leaving client: 50 connections, streamed and not, some with diagnostics.
        leaving = aiohttp.ClientSession(timeout=timeout)
        flights = [
            asyncio.create_task(
                send(
                    leaving,
                    url,
                    body(
                        1000 + i,
                        stream=i % 2 == 0,
                        keep_ratio=0.25,
                        diagnostics=["heatmap", True, False][i % 3],
                    ),
                )
            )
            for i in range(50)
        ]
        async with aiohttp.ClientSession(timeout=timeout) as staying:
            deadline = time.monotonic() + 120
            while gauge(scrape(url), "vllm:num_requests_running") < 1:
                assert time.monotonic() < deadline, "the leaving client's requests never ran"
                await asyncio.sleep(0.2)
            others = [
                asyncio.create_task(
                    send(staying, url, body(2000 + i, stream=i % 2 == 1, max_tokens=4))
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.5)
            for task in flights:
                task.cancel()  # the client goes away: its connections close
            await leaving.close()
            others += [
                asyncio.create_task(send(staying, url, body(3000 + i, stream=False, max_tokens=4)))
                for i in range(4)
            ]
            return await asyncio.wait_for(asyncio.gather(*others), timeout=240)

    results = asyncio.run(scenario())
    for result in results:
        assert result["status"] == 200, result
        if result["text"].startswith("{"):
            assert json.loads(result["text"])["pruning"]["image_tokens_after"] > 0
        else:
            assert result["text"].rstrip().endswith("data: [DONE]")
            assert '"pruning"' in result["text"]
    # The 50 abandoned requests were aborted, not run to their 1024 tokens: the engine is idle
    # and nothing of theirs is left in the API's ledger or the workers' diagnostics store.
    state = wait_until_idle(url, timeout=60)
    assert not any(state.values()), state
    finished = gauge(scrape(url), "vllm:request_success_total") - gauge(
        before, "vllm:request_success_total"
    )
    assert finished < 50, f"{finished:.0f} requests ran to the end: the disconnects were not seen"


# --------------------------------------------------------------------------------------------
# Bad images


@pytest.mark.parametrize("kind", ["oversized", "not-an-image"])
def test_bad_images_are_400_and_the_server_serves_on(server, kind):
    payload = body(1, stream=False, max_tokens=2)
    part = payload["messages"][0]["content"][0]
    if kind == "oversized":
        part["image_url"]["url"] = oversized_png_url()  # declares 20000 x 20000 pixels
    else:
        part["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(b"no" * 999).decode()
    r = requests.post(
        f"{server.url}/v1/chat/completions", json=payload, headers=HEADERS, timeout=60
    )
    assert r.status_code == 400, r.text
    assert "image" in r.json()["error"]["message"].lower()
    ok = requests.post(
        f"{server.url}/v1/chat/completions",
        json=body(2, stream=False, max_tokens=2),
        headers=HEADERS,
        timeout=60,
    )
    assert ok.status_code == 200, ok.text


def test_a_requested_stop_exits_zero(tiny_model_dir, tmp_path):
    """vLLM marks its engine client dead in every shutdown, a requested one too; the server
    still exits 0 after a SIGTERM (``vllm_internals.engine_core_died``), so a supervisor that
    restarts failures does not restart a stop."""
    args = ["tiny", "--api-key", API_KEY, "--enforce-eager", "--max-model-len", "4096"]
    with serve(args, tmp_path) as srv:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 0, srv.log.read_text()[-3000:]
