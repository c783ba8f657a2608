"""A soak: minutes of mixed, partly bad, partly abandoned traffic on one real server, then checks.

One ``lvlm-prune serve`` (server-wide keep 0.25, as ``make serve``; up to two images per prompt;
``--mm-processor-cache-gb`` bounded: every image here is new, so the cache never hits and only
costs memory; the engine core keeps its copy of each processed image, ~0.65 MiB for a 336 px one
in bf16, and by default the cache holds half the warm-up's images, at most 0.05 GiB, so it is full
when the memory baseline is taken and filling it is not counted as growth) gets Poisson arrivals at
``--rate`` (default: 80 % of the sustainable rate at keep 0.25 in ``serve-MODEL.json``) from an
aiohttp client. Every request has a fresh random image. The mix, drawn per request:

- 10 % an invalid ``pruning`` value (must be a 400 naming the field);
- 3 % an oversized image (a PNG header that declares 20000 x 20000 pixels) or bytes that are no image
  (must be a 400);
- 5 % streamed, and the client closes its connection after the first token (the server is still
  generating: as many tokens as ``--max-model-len`` leaves room for, ``ignore_eos``, keep 0.05);
- the rest valid: half streamed; ~10 % of all with ``diagnostics: "heatmap"``; ~10 % of all with
  two images; ``pruning`` absent (the server's 0.25) or keep 0.25 / 0.11 / 0.5, simignore,
  uniform, random, merge, or 1.0.

The first ``--warmup-share`` of the time is warm-up; the server is then let go idle (and, idle,
hands back what the burst freed: ``lvlm_prune.memory``) and the resident memory of its processes
(API, engine core, workers) is the baseline; after the rest and a drain, it is compared again.
Checks: no 5xx; every valid request answered exactly once (HTTP
200, one complete body, or one stream with one ``[DONE]`` and one ``pruning`` chunk), and vLLM's
finished-request counter moved by exactly the number of requests answered in full; every bad
request a 400; every dropped stream stopped by the server, not run to its end (dropped streams,
and only they, ask keep 0.05, so the first bucket of ``lvlm_prune_keep_ratio`` counts those that
ran on); after the run ``vllm:num_requests_running`` and ``_waiting`` are 0, the API's ledger
(``lvlm_prune_ledger_entries``) and the workers' diagnostics store
(``lvlm_prune_diagnostics_pending``) are empty; ``lvlm_prune_requests_total`` grew by exactly
the number of valid image requests answered (the middleware counts a request when its response
finishes, so a dropped stream counts only if it ran to its end); resident memory grew by at most
5 % per process. The command exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import math
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from . import common, harness, serve
from .benchmark import Benchmark, Context

NAME = "soak"
SERVER_KEEP_RATIO = 0.25
RATE_SHARE = 0.8
MEMORY_TOLERANCE = 0.05
SETTLE_SECONDS = 90
CACHE_MIB_PER_IMAGE = 0.65  # one 336-px LLaVA image in the processor cache, bf16 (float32: twice)
MAX_CACHE_GB = 0.05
DIAGNOSTICS_POLL_SECONDS = 5.0  # server/plugin.py POLL_SECONDS: the pending gauge's refresh

SHARE_INVALID = 0.10
SHARE_BAD_IMAGE = 0.03
SHARE_DISCONNECT = 0.05
SHARE_HEATMAP = 0.10  # of all requests, drawn among the valid ones
SHARE_TWO_IMAGES = 0.10
DROP_KEEP_RATIO = 0.05
"""Dropped streams ask for this keep ratio and no other request does, so the first bucket of
``lvlm_prune_keep_ratio`` counts exactly the dropped streams the server ran to their end."""
DROP_PROMPT_ROOM = 300  # their prompt: one image at keep 0.05 and a question
LATE_DROP_EVENTS = 50
"""A client whose first read of a stream brings this many events drops it late: the API process
was seconds behind its engine (a CPU-starved shared machine), and a small model may finish the
whole stream before the disconnect reaches the engine. Such drops may run on; prompt ones may not."""

VALID_PRUNING = (  # (pruning object or None for the server's default, weight)
    (None, 0.45),
    ({"keep_ratio": 0.25}, 0.15),
    ({"keep_ratio": 0.11}, 0.10),
    ({"keep_ratio": 0.25, "method": "uniform"}, 0.10),
    ({"keep_ratio": 0.25, "merge": True}, 0.05),
    ({"keep_ratio": 0.5, "method": "random", "seed": 7}, 0.05),
    ({"keep_ratio": 0.5}, 0.05),
    ({"keep_ratio": 1.0}, 0.05),
)
INVALID_PRUNING = (
    {"keep_ratio": 0},
    {"keep_ratio": 1.5},
    {"keep_ratio": "half"},
    {"method": "best"},
    {"diagnostics": "pdf"},
    {"merge": "maybe"},
    "everything",
    {"query": ["one question", "too many"]},
)
QUESTIONS = (
    "What is the color of the car on the street?",
    "How many people are standing near the door?",
    "Is there a dog on the grass?",
    "What is written on the sign?",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_scaled(parser, "--minutes", "length of the soak", full=10.0, smoke=1.0, type=float)
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests/s (default: 0.8 x the sustainable rate at keep 0.25 in "
        "serve-MODEL.json under --serve-results; smoke: 4)",
    )
    parser.add_argument(
        "--serve-results",
        default=None,
        help="folder with the serve benchmark's JSON (default: ./benchmarks/results)",
    )
    parser.add_argument(
        "--warmup-share",
        type=float,
        default=None,
        help="share of the time that is warm-up, before the memory baseline "
        "(default 0.2, at least 30 s; smoke 0.5)",
    )
    parser.add_argument(
        "--mm-processor-cache-gb",
        type=float,
        default=None,
        help="the server's processor cache, GiB (default: half the warm-up's images, at most "
        f"{MAX_CACHE_GB:g}: full before the memory baseline)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-timeout", type=float, default=900, help="seconds to wait for the server to start"
    )


# --------------------------------------------------------------------------------------------
# The traffic


@dataclasses.dataclass
class Planned:
    index: int
    at: float  # seconds after the phase starts
    kind: str  # valid | invalid | bad-image | disconnect
    stream: bool
    images: int
    pruning: object  # the pruning value sent (None: the field is absent)
    max_tokens: int
    bad: str | None = None  # oversized | not-an-image

    @property
    def heatmap(self) -> bool:
        return isinstance(self.pruning, dict) and self.pruning.get("diagnostics") == "heatmap"


def plan(
    rng: np.random.Generator, rate: float, seconds: float, first_index: int, drop_tokens: int
) -> list[Planned]:
    """Poisson arrivals over ``seconds`` and each request's kind, drawn from ``rng``."""
    out, at, index = [], 0.0, first_index
    valid_share = 1 - SHARE_INVALID - SHARE_BAD_IMAGE - SHARE_DISCONNECT
    weights = np.array([w for _, w in VALID_PRUNING])
    while True:
        at += rng.exponential(1 / rate)
        if at >= seconds:
            return out
        u = rng.random()
        stream = bool(rng.random() < 0.5)
        max_tokens = int(rng.integers(8, 33))
        if u < SHARE_INVALID:
            bad = INVALID_PRUNING[index % len(INVALID_PRUNING)]
            req = Planned(index, at, "invalid", stream, 1, bad, max_tokens)
        elif u < SHARE_INVALID + SHARE_BAD_IMAGE:
            bad = ("oversized", "not-an-image")[index % 2]
            req = Planned(index, at, "bad-image", stream, 1, None, max_tokens, bad)
        elif u < SHARE_INVALID + SHARE_BAD_IMAGE + SHARE_DISCONNECT:
            pruning = {"keep_ratio": DROP_KEEP_RATIO}
            req = Planned(index, at, "disconnect", True, 1, pruning, drop_tokens)
        else:
            choice = VALID_PRUNING[int(rng.choice(len(VALID_PRUNING), p=weights / weights.sum()))]
            pruning = dict(choice[0]) if choice[0] is not None else None
            if rng.random() < SHARE_HEATMAP / valid_share:
                pruning = {**(pruning or {}), "diagnostics": "heatmap"}
            images = 2 if rng.random() < SHARE_TWO_IMAGES / valid_share else 1
            req = Planned(index, at, "valid", stream, images, pruning, max_tokens)
        out.append(req)
        index += 1


def cache_size_gb(warmup: list[Planned]) -> float:
    """A processor cache that the first half of the warm-up fills (only images that reach the
    engine count), so the memory baseline is taken with it full."""
    images = sum(r.images for r in warmup if r.kind in ("valid", "disconnect"))
    return round(min(MAX_CACHE_GB, images / 2 * CACHE_MIB_PER_IMAGE / 1024), 4)


def oversized_png_url(width: int = 20000, height: int = 20000) -> str:
    """A PNG that declares ``width`` x ``height`` pixels (400 M by default: over vLLM's and PIL's
    limits) in a few dozen bytes: a decompression bomb's header, built without drawing it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
    png += chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _image_urls(req: Planned, seed: int) -> list[str]:
    if req.bad == "oversized":
        return [oversized_png_url()]
    if req.bad == "not-an-image":
        junk = np.random.default_rng(seed + req.index).bytes(4096)
        return ["data:image/png;base64," + base64.b64encode(junk).decode()]
    return [
        harness.data_url(common.make_image(seed * 1_000_003 + 2 * req.index + i))
        for i in range(req.images)
    ]


def _body(req: Planned, model: str, urls: list[str]) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": QUESTIONS[req.index % len(QUESTIONS)]})
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": req.max_tokens,
        "stream": req.stream,
    }
    if req.kind == "disconnect":
        body["ignore_eos"] = True  # still generating when the client leaves
    if req.pruning is not None:
        body["pruning"] = req.pruning
    return body


async def _send(session, url: str, req: Planned, body: dict) -> dict:
    out = {"index": req.index, "kind": req.kind, "stream": req.stream, "images": req.images}
    out["heatmap"] = req.heatmap
    start = time.monotonic()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            out["status"] = response.status
            if req.stream and response.status == 200:
                await _read_stream(response, req, out)
            else:
                text = await response.text()
                out.update(_check_json(text, req, response.status))
    except Exception as err:  # noqa: BLE001 - every client-side failure is an outcome to count
        out["status"] = None
        out["problem"] = f"client error: {type(err).__name__}: {err}"[:300]
    out["seconds"] = time.monotonic() - start
    return out


async def _read_stream(response, req: Planned, out: dict) -> None:
    done = pruning = tokens = errors = 0
    finish = []
    buffer = b""
    # Events split by hand: a pruning chunk with heatmaps is one line of several hundred KB,
    # over aiohttp's line limit.
    async for chunk in response.content.iter_any():
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for raw in events:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done += 1
                continue
            event = json.loads(data)
            if "error" in event:
                errors += 1
            if event.get("pruning") is not None:
                pruning += 1
                out["pruning"] = event["pruning"]
            for choice in event.get("choices") or []:
                tokens += 1
                if choice.get("finish_reason"):
                    finish.append(choice["finish_reason"])
        if req.kind == "disconnect" and tokens and not done:
            response.close()  # drop the connection mid-stream
            out["disconnected"] = True
            out["events_before_drop"] = tokens
            return
    # A dropping client that only got to read after the whole stream had arrived (a slow client
    # beside a fast model) was answered in full: it is checked and counted as answered.
    out["ended_before_drop"] = req.kind == "disconnect"
    problems = []
    if done != 1:
        problems.append(f"{done} [DONE] events")
    if pruning != 1:
        problems.append(f"{pruning} pruning chunks")
    if errors:
        problems.append(f"{errors} error events")
    if len(finish) != 1:
        problems.append(f"finish reasons {finish}")
    problems += _pruning_problems(out.get("pruning"), req)
    if problems:
        out["problem"] = "; ".join(problems)


def _check_json(text: str, req: Planned, status: int) -> dict:
    try:
        body = json.loads(text)
    except ValueError:
        return {"problem": f"not JSON: {text[:200]!r}"}
    if status != 200:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not error.get("message"):
            return {"problem": f"HTTP {status} without an error body: {text[:200]!r}"}
        return {"error_param": error.get("param"), "error_message": error["message"][:200]}
    problems = []
    choices = body.get("choices") or []
    if len(choices) != 1 or not choices[0].get("finish_reason"):
        problems.append(f"choices {choices!r:.200}")
    problems += _pruning_problems(body.get("pruning"), req)
    return {"problem": "; ".join(problems)} if problems else {}


def _pruning_problems(pruning, req: Planned) -> list[str]:
    if not isinstance(pruning, dict):
        return ["no pruning object"]
    per_image = pruning.get("per_image") or []
    problems = []
    if len(per_image) != req.images:
        problems.append(f"{len(per_image)} per_image entries for {req.images} images")
    if req.heatmap and not all(p.get("heatmap_png") for p in per_image):
        problems.append("heatmap asked, missing")
    return problems


async def _drive(url: str, model: str, requests: list[Planned], seed: int) -> list[dict]:
    import aiohttp

    # A connection per request: a pooled keep-alive connection the server has just closed (its
    # idle timeout, 5 s, is shorter than Poisson gaps at these rates) fails the next request that
    # reuses it before a byte is sent ("Can not write request body"), a client-side race that
    # says nothing about the server. Clients that pool (openai's httpx) retry that case.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        tasks = []
        for req in requests:
            urls = await asyncio.to_thread(_image_urls, req, seed)
            delay = start + req.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(session, url, req, _body(req, model, urls))))
        return list(await asyncio.gather(*tasks))


# --------------------------------------------------------------------------------------------
# Server state: idle, memory


def settle(server: harness.Server, since: float) -> dict:
    """Poll ``/metrics`` until the engine is idle, the stores are empty and the server has
    trimmed its memory since the load ended (at most 90 s); the diagnostics gauge is refreshed
    every 5 s, so it is read from a scrape at least that long after the load ended."""
    deadline = time.monotonic() + SETTLE_SECONDS
    trims_before = harness.metric(server.metrics(), "lvlm_prune_memory_trims_total")
    while True:
        m = server.metrics()
        trimmed = harness.metric(m, "lvlm_prune_memory_trims_total") > trims_before
        state = {
            "num_requests_running": harness.metric(m, "vllm:num_requests_running"),
            "num_requests_waiting": harness.metric(m, "vllm:num_requests_waiting"),
            "ledger_entries": harness.metric(m, "lvlm_prune_ledger_entries"),
            "diagnostics_pending": harness.metric(m, "lvlm_prune_diagnostics_pending"),
        }
        fresh = time.monotonic() - since > DIAGNOSTICS_POLL_SECONDS + 1
        if (fresh and trimmed and not any(state.values())) or time.monotonic() > deadline:
            state["seconds_to_settle"] = round(time.monotonic() - since, 1)
            state["memory_trimmed"] = trimmed
            return state
        time.sleep(1)


class MemorySampler:
    """Resident memory (MiB) of every server process, every few seconds, in a thread."""

    def __init__(self, server: harness.Server, every: float = 5.0) -> None:
        self.procs = server.processes()
        self.every = every
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def rss(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = proc.memory_info().rss / 2**20
            except Exception:  # noqa: BLE001 - a process that is gone has no memory to report
                out[name] = math.nan
        return out

    def sample(self, mark: str | None = None) -> dict:
        entry = {"t": round(time.monotonic() - self.t0, 1), "rss_mib": self.rss()}
        if mark:
            entry["mark"] = mark
        self.samples.append(entry)
        return entry

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample("server ready")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# The run


def default_rate(args: argparse.Namespace, label: str) -> tuple[float, str]:
    if args.rate:
        return args.rate, "--rate"
    if args.smoke:
        return 4.0, "smoke default"
    folder = Path(args.serve_results) if args.serve_results else common.results_dir()
    path = folder / f"serve-{label}.json"
    result = serve.load_result(path)
    rate = serve.sustainable_rate(result, SERVER_KEEP_RATIO) if result else None
    if not rate:
        raise SystemExit(
            f"no sustainable rate at keep {SERVER_KEEP_RATIO:g} in {path}: run "
            f"`lvlm-prune bench serve --model {label}` first, or pass --rate"
        )
    return RATE_SHARE * rate, (
        f"{RATE_SHARE:.0%} of the sustainable rate at keep {SERVER_KEEP_RATIO:g} "
        f"({rate:.2f} req/s) in {path.name}"
    )


@dataclasses.dataclass
class Soak:
    """What the soak is to do: its traffic, by phase, and the server it runs against."""

    label: str
    minutes: float
    rate: float
    rate_source: str
    warmup: float  # seconds
    phases: dict[str, list[Planned]]
    cache_gb: float
    server_args: list[str]


@dataclasses.dataclass
class Observed:
    """What the soak saw: every request's outcome, the server's state and memory."""

    outcomes: list[dict]
    settled: dict[str, dict]  # per phase, once idle after it
    before: dict[str, float]  # /metrics before the traffic
    after: dict[str, float]  # and after it
    memory: list[dict]  # MemorySampler.samples
    cotenant: float
    log_tail: str


def run(args: argparse.Namespace, ctx: Context) -> dict:
    soak = prepare(args, ctx.label)
    print(
        f"[{NAME}] {soak.minutes:g} min at {soak.rate:.2f} req/s ({soak.rate_source}); warm-up "
        f"{soak.warmup:.0f} s",
        flush=True,
    )
    with harness.serve([ctx.model_dir, *soak.server_args], timeout=args.server_timeout) as server:
        observed = _observe(server, soak, args.seed)
    return _result(soak, observed)


def prepare(args: argparse.Namespace, label: str) -> Soak:
    """The rate, the warm-up, every request of both phases, and the server's options."""
    minutes = args.minutes
    rate, rate_source = default_rate(args, label)
    share = args.warmup_share if args.warmup_share is not None else (0.5 if args.smoke else 0.2)
    total = minutes * 60
    warmup = min(total / 2, max(30.0, share * total)) if not args.smoke else share * total
    rng = np.random.default_rng(args.seed)
    drop_tokens = args.max_model_len - DROP_PROMPT_ROOM  # as long as the server allows
    phases = {"warm-up": plan(rng, rate, warmup, 0, drop_tokens)}
    phases["measured"] = plan(rng, rate, total - warmup, len(phases["warm-up"]), drop_tokens)
    cache_gb = args.mm_processor_cache_gb
    if cache_gb is None:
        cache_gb = cache_size_gb(phases["warm-up"])
    server_args = [
        *harness.server_options(
            label, max_model_len=args.max_model_len, dtype=args.dtype, images=2
        ),
        *("--keep-ratio", str(SERVER_KEEP_RATIO), "--mm-processor-cache-gb", f"{cache_gb:g}"),
    ]
    return Soak(label, minutes, rate, rate_source, warmup, phases, cache_gb, server_args)


def _observe(server: harness.Server, soak: Soak, seed: int) -> Observed:
    """Both phases' traffic, each followed by a settle and a memory sample."""
    outcomes, settled = [], {}
    before = server.metrics()
    meter = common.CpuMeter(server.processes().values())
    with MemorySampler(server) as memory:
        for phase, requests in soak.phases.items():
            print(f"[{NAME}] {phase}: {len(requests)} requests", flush=True)
            outcomes += asyncio.run(_drive(server.url, soak.label, requests, seed))
            settled[phase] = settle(server, time.monotonic())
            memory.sample(f"after {phase}, idle")
    cotenant = meter.share()
    after = server.metrics()
    return Observed(
        outcomes, settled, before, after, memory.samples, cotenant, server.log_tail(3000)
    )


# --------------------------------------------------------------------------------------------
# Checks


@dataclasses.dataclass
class Outcomes:
    """The outcomes sorted by kind and by what the checks need of them."""

    all: list[dict]
    valid: list[dict]
    invalid: list[dict]
    bad: list[dict]  # oversized images and non-images
    gone: list[dict]  # streams to be dropped
    answered: list[dict]  # valid, 200, no problem
    disconnected: list[dict]  # dropped by the client mid-stream
    late: list[dict]  # dropped only after LATE_DROP_EVENTS events
    ended: list[dict]  # found already ended at the client's first read

    @classmethod
    def of(cls, outcomes: list[dict]) -> Outcomes:
        kind = {k: [o for o in outcomes if o["kind"] == k] for k in KINDS}
        disconnected = [o for o in kind["disconnect"] if o.get("disconnected")]
        return cls(
            all=outcomes,
            valid=kind["valid"],
            invalid=kind["invalid"],
            bad=kind["bad-image"],
            gone=kind["disconnect"],
            answered=[o for o in kind["valid"] if o.get("status") == 200 and not o.get("problem")],
            disconnected=disconnected,
            late=[o for o in disconnected if o.get("events_before_drop", 0) >= LATE_DROP_EVENTS],
            ended=[
                o for o in kind["disconnect"] if o.get("ended_before_drop") and not o.get("problem")
            ],
        )


KINDS = ("valid", "invalid", "bad-image", "disconnect")


@dataclasses.dataclass
class Counters:
    """What the server's counters say happened between the start and the end of the traffic."""

    finished: float  # vLLM requests finished (stop + length)
    counted: float  # lvlm_prune_requests_total increase
    ran_on: float  # dropped streams the server ran to their end

    @classmethod
    def of(cls, before: dict, after: dict) -> Counters:
        def delta(name: str, **labels) -> float:
            return harness.metric(after, name, **labels) - harness.metric(before, name, **labels)

        success = "vllm:request_success_total"
        return cls(
            finished=delta(success, finished_reason="stop")
            + delta(success, finished_reason="length"),
            counted=delta("lvlm_prune_requests_total"),
            # Dropped streams (and only they) ran at keep 0.05: the histogram's first bucket
            # counts those the server finished (the ones whose end the client saw, and any whose
            # drop came too late).
            ran_on=delta("lvlm_prune_keep_ratio_bucket", le=f"{DROP_KEEP_RATIO}"),
        )


def _traffic_checks(o: Outcomes, c: Counters) -> list[tuple[str, object, object]]:
    five_xx = [x for x in o.all if (x.get("status") or 0) >= 500]
    no_status = [x for x in o.all if x.get("status") is None]
    invalid_ok = [
        x
        for x in o.invalid
        if x.get("status") == 400 and str(x.get("error_param", "")).startswith("pruning")
    ]
    bad_ok = [x for x in o.bad if x.get("status") == 400 and not x.get("problem")]
    prompt_drops = len(o.disconnected) - len(o.late)
    return [
        ("responses 5xx", 0, len(five_xx)),
        ("requests without any HTTP response (client errors, timeouts)", 0, len(no_status)),
        (
            "valid requests answered exactly once (200, one complete body or stream, one pruning)",
            len(o.valid),
            len(o.answered),
        ),
        ("invalid pruning values answered 400 naming pruning.*", len(o.invalid), len(invalid_ok)),
        ("oversized images and non-images answered 400", len(o.bad), len(bad_ok)),
        (
            "streams the client dropped after the first token (or found already ended)",
            len(o.gone),
            len(o.disconnected) + len(o.ended),
        ),
        (
            f"dropped streams the server stopped (not run to their end), of those the client "
            f"dropped at once (before {LATE_DROP_EVENTS} events had arrived)",
            prompt_drops,
            prompt_drops - max(0, c.ran_on - len(o.ended) - len(o.late)),
        ),
        (
            "vLLM requests finished (stop + length) = answered in full + dropped but run on",
            len(o.answered) + c.ran_on,
            c.finished,
        ),
    ]


def _state_checks(o: Outcomes, c: Counters, settled: dict) -> list[tuple[str, object, object]]:
    end = settled["measured"]
    return [
        ("vllm:num_requests_running after the run", 0, end["num_requests_running"]),
        ("vllm:num_requests_waiting after the run", 0, end["num_requests_waiting"]),
        ("lvlm_prune_ledger_entries after the run", 0, end["ledger_entries"]),
        ("lvlm_prune_diagnostics_pending after the run", 0, end["diagnostics_pending"]),
        (
            "memory handed back once idle, after warm-up and after the run "
            "(lvlm_prune_memory_trims_total grew)",
            True,
            all(phase.get("memory_trimmed", False) for phase in settled.values()),
        ),
        (
            "lvlm_prune_requests_total increase, dropped streams aside = valid image requests",
            len(o.answered),
            c.counted - c.ran_on,
        ),
    ]


def _rss_rows(memory: list[dict]) -> list[dict]:
    """Per server process: resident memory idle after the warm-up, idle at the end, the peak."""
    baseline = next(s for s in memory if s.get("mark") == "after warm-up, idle")
    final = next(s for s in memory if s.get("mark") == "after measured, idle")
    rows = []
    for name, start_mib in baseline["rss_mib"].items():
        end_mib = final["rss_mib"][name]
        peak = max(s["rss_mib"].get(name, 0) for s in memory if s["t"] >= baseline["t"])
        growth = end_mib / start_mib - 1
        rows.append(
            {
                "process": name,
                "start_mib": start_mib,
                "end_mib": end_mib,
                "peak_mib": peak,
                "change": growth,
                "ok": growth <= MEMORY_TOLERANCE,
            }
        )
    return rows


def _memory_check(row: dict) -> dict:
    return {
        "check": f"resident memory of {row['process']}: growth after warm-up <= "
        f"{MEMORY_TOLERANCE:.0%}",
        "expected": f"<= {row['start_mib'] * (1 + MEMORY_TOLERANCE):.0f} MiB",
        "observed": f"{row['start_mib']:.0f} -> {row['end_mib']:.0f} MiB ({row['change']:+.1%})",
        "ok": row["ok"],
    }


def _checks(o: Outcomes, c: Counters, settled: dict, rss_rows: list[dict]) -> list[dict]:
    checks = [
        {"check": name, "expected": expected, "observed": observed, "ok": observed == expected}
        for name, expected, observed in _traffic_checks(o, c) + _state_checks(o, c, settled)
    ]
    return checks + [_memory_check(row) for row in rss_rows]


def _result(soak: Soak, seen: Observed) -> dict:
    outcomes = Outcomes.of(seen.outcomes)
    rss_rows = _rss_rows(seen.memory)
    checks = _checks(outcomes, Counters.of(seen.before, seen.after), seen.settled, rss_rows)
    durations = [o["seconds"] for o in outcomes.answered]
    passed = all(c["ok"] for c in checks)
    return {
        "benchmark": NAME,
        "model": soak.label,
        "settings": _settings(soak),
        "counts": _counts(outcomes),
        "valid_latency_s": common.summary(durations) if durations else None,
        "settled": seen.settled,
        "memory": {"processes": rss_rows, "samples": seen.memory},
        "cotenant_cpu_share": seen.cotenant,
        "checks": checks,
        "problems": _problems(seen.outcomes)[:20],
        "server_log_tail": seen.log_tail if not passed else None,
        "passed": passed,
    }


def _settings(soak: Soak) -> dict:
    return {
        "minutes": soak.minutes,
        "rate": soak.rate,
        "rate_source": soak.rate_source,
        "warmup_seconds": soak.warmup,
        "server_args": soak.server_args,
        "mm_processor_cache_gb": soak.cache_gb,
        "mix": {
            "invalid_pruning": SHARE_INVALID,
            "bad_image": SHARE_BAD_IMAGE,
            "disconnect": SHARE_DISCONNECT,
            "heatmap": SHARE_HEATMAP,
            "two_images": SHARE_TWO_IMAGES,
            "streamed": 0.5,
            "valid_pruning": [[p, w] for p, w in VALID_PRUNING],
            "invalid_values": list(INVALID_PRUNING),
        },
    }


def _counts(o: Outcomes) -> dict:
    return {
        "sent": len(o.all),
        "valid": len(o.valid),
        "valid_streamed": sum(x["stream"] for x in o.valid),
        "valid_heatmap": sum(x["heatmap"] for x in o.valid),
        "valid_two_images": sum(x["images"] == 2 for x in o.valid),
        "invalid": len(o.invalid),
        "bad_image": len(o.bad),
        "disconnect": len(o.gone),
        "disconnect_ended_before_drop": len(o.ended),
        "disconnect_late": len(o.late),
        "statuses": _statuses(o.all),
    }


def _problems(outcomes: list[dict]) -> list[dict]:
    keys = ("index", "kind", "stream", "status", "problem", "error_message")
    return [
        {k: o.get(k) for k in keys}
        for o in outcomes
        if o.get("problem") or (o.get("status") or 0) >= 500 or o.get("status") is None
    ]


def _statuses(outcomes: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        key = str(o.get("status"))
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# Table and plot


def markdown(result: dict) -> str:
    s, c = result["settings"], result["counts"]
    lines = [
        f"### Soak — model `{result['model']}`: {'every check passed' if result['passed'] else '**CHECKS FAILED**'}",
        "",
        f"{s['minutes']:g} minutes at {s['rate']:.2f} req/s ({s['rate_source']}), Poisson "
        f"arrivals; the first {s['warmup_seconds']:.0f} s are warm-up. Server: `lvlm-prune serve "
        f"{' '.join(s['server_args'])}` (`--mm-processor-cache-gb {s['mm_processor_cache_gb']:g}`: "
        "every image is new, so the cache only costs memory; bounded, half the warm-up's images "
        f"fill it). Sent {c['sent']}: {c['valid']} valid ({c['valid_streamed']} streamed, "
        f"{c['valid_heatmap']} with heatmaps, {c['valid_two_images']} with two images), "
        f"{c['invalid']} invalid `pruning`, {c['bad_image']} oversized or non-images, "
        f"{c['disconnect']} to be dropped mid-stream ({c['disconnect_ended_before_drop']} of "
        "them had already ended when the client read its first event, and count as answered; "
        f"{c['disconnect_late']} dropped late, {LATE_DROP_EVENTS}+ events at the client's first "
        "read). "
        "HTTP statuses: "
        + ", ".join(f"{k}: {v}" for k, v in c["statuses"].items())
        + f". Co-tenant CPU during the run: {result['cotenant_cpu_share']:.0%}.",
        "",
        common.markdown_table(
            ["check", "expected", "observed", "ok"],
            [
                [x["check"], x["expected"], x["observed"], "yes" if x["ok"] else "**no**"]
                for x in result["checks"]
            ],
            align="lrrc",
        ),
        "",
        "Resident memory (MiB) per server process: baseline when idle after the warm-up, end "
        "when idle after the run, peak in between:",
        "",
        common.markdown_table(
            ["process", "after warm-up", "end", "peak", "change"],
            [
                [
                    m["process"],
                    f"{m['start_mib']:.0f}",
                    f"{m['end_mib']:.0f}",
                    f"{m['peak_mib']:.0f}",
                    f"{m['change']:+.1%}",
                ]
                for m in result["memory"]["processes"]
            ],
        ),
    ]
    if result["valid_latency_s"]:
        v = result["valid_latency_s"]
        lines += [
            "",
            f"Valid requests, wall time per request: median {v['median']:.2f} s, max {v['max']:.2f} s.",
        ]
    if result["problems"]:
        lines += ["", "First problems:", ""] + [
            f"- `{json.dumps(p)}`" for p in result["problems"][:10]
        ]
    return "\n".join(lines)


@common.figure
def plot(result: dict, plt):
    samples = result["memory"]["samples"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in samples[0]["rss_mib"]:
        ax.plot([s["t"] for s in samples], [s["rss_mib"].get(name) for s in samples], label=name)
    for s in samples:
        if s.get("mark"):
            ax.axvline(s["t"], color="grey", lw=0.8, ls=":")
            ax.annotate(s["mark"], (s["t"], ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    ax.set_xlabel("seconds since the server was ready")
    ax.set_ylabel("resident memory MiB")
    ax.set_title(f"soak on {result['model']}: memory of the server's processes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, plot)
