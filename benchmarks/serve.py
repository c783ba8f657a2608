"""Online serving under load: the highest request rate each setting sustains at a p99 TTFT SLO.

A real ``lvlm-prune serve`` on 127.0.0.1 (one per workload), driven over HTTP by vLLM's own serving
benchmark (``vllm.benchmarks.serve.benchmark``, what ``vllm bench serve`` runs: Poisson arrivals,
streamed chat completions, TTFT / TPOT / ITL percentiles, goodput at an SLO). The settings differ
only in the request's ``pruning.keep_ratio`` (``--extra-body``), so all of them hit the same server
with the same engine, KV cache and caches, and they take turns throughout.

Workloads: ``random-mm`` (vLLM's dataset: random text of ``--input-len`` tokens and one fresh
random 336 x 336 image per request, so no cache ever hits) on ``--model``; ``shapes`` (fresh
ShapesVQA scenes with their own questions, answers to EOS) on the trained ShapesVQA model.

Steps per workload: warm-up, until stock's one-at-a-time TTFT is stable (two batches of five in a
row within 10 %); the **unloaded** TTFT and end-to-end latency of every setting (one
request at a time); the **SLO**: p99 TTFT <= 2 x stock's unloaded median TTFT, for every setting;
then each setting searches its own geometric grid of rates (three per doubling), starting at half
its unloaded rate (1 / its mean end-to-end latency alone): up while it passes, stopping after two
failing rates in a row, or down from a failing start until a rate passes; one more rate at the
geometric midpoint between its highest pass and the failure above it. The settings take turns, one
rate each per round in rotated order, so drift on a shared machine falls on all of them. Each rate
runs at least 100 requests, so its p99 is a percentile and not the maximum (with its 95 %
order-statistic interval in the results). A rate passes when every request succeeded and p99 TTFT
is within the SLO; the **sustainable rate** is the highest tested rate at which it and every lower
tested rate passed (monotone: a pass above a failure does not count), confirmed by a second run at
that rate (a failed confirmation moves it down, and the next one is confirmed in turn); the
headline is its ratio to stock's. A rate measured while other processes than the benchmark and
the server used more than 10 % of the machine's CPU is marked noisy and never used; it is measured
again once the machine is quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shlex
from pathlib import Path

from . import common, harness
from .benchmark import Benchmark, Context

NAME = "serve"
GOAL_RATIO = 3.0  # sustainable rate at keep 0.25 / stock's, on the random-mm workload
GOAL_KEEP_RATIO = 0.25
SLO_FACTOR = 2.0
START_FACTOR = 0.5
MAX_FACTOR = 12.0
MAX_STEPS_DOWN = 8
COTENANT_LIMIT = common.COTENANT_LIMIT
"""A rate measured while other processes used more than this share of the machine's CPU is
marked noisy and never used: the sweep waits for a quiet machine and measures it again (at
most ``QUIET_RETRIES`` times)."""
QUIET_RETRIES = 2
IMAGE_SIZE = 336


# --------------------------------------------------------------------------------------------
# Settings and workloads


@dataclasses.dataclass(frozen=True)
class Setting(common.Setting):
    @property
    def name(self) -> str:
        return "stock" if self.stock else f"keep {self.keep_ratio:g}"

    def extra_body(self) -> dict:
        # Stock is keep_ratio 1.0 on the same server: the processor leaves the prompt alone.
        return {"pruning": {"keep_ratio": self.keep_ratio}}


@dataclasses.dataclass
class Workload:
    name: str
    model_dir: str
    model_label: str
    output_len: int
    ignore_eos: bool
    description: str

    def requests(self, tokenizer, n: int, seed: int, input_len: int) -> list:
        if self.name == "random-mm":
            return random_mm_requests(tokenizer, n, seed, input_len, self.output_len)
        return shapes_requests(tokenizer, n, seed, self.output_len)

    def vllm_command(self, setting: Setting, input_len: int) -> str:
        """The ``vllm bench serve`` line one rate of this workload corresponds to."""
        if self.name != "random-mm":
            return "no vLLM dataset: ShapesVQA scenes made here, sent by the same benchmark()"
        return shlex.join(
            [
                *("vllm", "bench", "serve", "--backend", "openai-chat"),
                *("--endpoint", "/v1/chat/completions"),
                *random_mm_args(input_len, self.output_len, "N", "SEED"),
                *("--extra-body", json.dumps(setting.extra_body())),
                *("--request-rate", "RATE", "--goodput", "ttft:SLO_MS"),
                *("--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"),
            ]
        )


def random_mm_args(input_len: int, output_len: int, n, seed) -> list[str]:
    return [
        *("--dataset-name", "random-mm", "--num-prompts", str(n), "--seed", str(seed)),
        *("--random-input-len", str(input_len), "--random-output-len", str(output_len)),
        *("--random-range-ratio", "0", "--random-mm-base-items-per-request", "1"),
        *("--random-mm-num-mm-items-range-ratio", "0"),
        *("--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}'),
        *("--random-mm-bucket-config", f"{{({IMAGE_SIZE}, {IMAGE_SIZE}, 1): 1.0}}"),
    ]


def random_mm_requests(tokenizer, n: int, seed: int, input_len: int, output_len: int) -> list:
    """vLLM's ``--dataset-name random-mm``, parsed by its own argument parser: random text and
    one random-pixel JPEG per request, drawn from ``seed`` (a new seed per rate and setting)."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        ["--backend", "openai-chat", *random_mm_args(input_len, output_len, n, seed)]
    )
    return get_samples(args, tokenizer)


def shapes_requests(tokenizer, n: int, seed: int, output_len: int) -> list:
    """Fresh ShapesVQA scenes (the released model's version), each with one of its own questions
    (PNG, as the model saw)."""
    from vllm.benchmarks.datasets import SampleRequest

    from lvlm_prune.shapes import scenes

    out = []
    for scene, question in scenes.sample(seed, n):
        url = harness.data_url(scene.image())
        out.append(
            SampleRequest(
                prompt=question.text,
                prompt_len=len(tokenizer.encode(question.text)),
                expected_output_len=output_len,
                multi_modal_data=[{"type": "image_url", "image_url": {"url": url}}],
            )
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=("random-mm", "shapes"),
        default=None,
        help="random-mm on --model, and/or shapes (ShapesVQA questions on the trained "
        "ShapesVQA model) (default: both; smoke: random-mm)",
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.11])
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="request rates (req/s) instead of the adaptive grid (every setting runs each)",
    )
    parser.add_argument(
        "--rate-step",
        type=float,
        default=2 ** (1 / 3),
        help="factor between grid rates (default 2^(1/3), three per doubling)",
    )
    common.add_scaled(
        parser,
        "--seconds-per-rate",
        "arrivals per rate last this long",
        full=15,
        smoke=4,
        type=float,
    )
    common.add_scaled(
        parser,
        "--min-requests",
        "per rate (100: enough for p99 to be a percentile, not the maximum)",
        full=100,
        smoke=6,
    )
    common.add_scaled(parser, "--unloaded", "one-at-a-time requests per setting", full=20, smoke=4)
    parser.add_argument(
        "--input-len", type=int, default=24, help="random-mm text tokens (default 24)"
    )
    common.add_scaled(
        parser,
        "--output-len",
        "random-mm output tokens, ignore_eos",
        full=16,
        smoke=4,
        more="; shapes: at most 8, to EOS",
    )
    parser.add_argument(
        "--mm-processor-cache-gb",
        type=float,
        default=0.25,
        help="the server's processor cache (fresh images never hit it; bounded so a long sweep "
        "does not fill the shared machine's memory; default 0.25)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-timeout", type=float, default=900, help="seconds to wait for a server to start"
    )


def workloads_for(args: argparse.Namespace, ctx: Context) -> tuple[list[Workload], list[str]]:
    names = args.workloads or (["random-mm"] if args.smoke else ["random-mm", "shapes"])
    model_dir, label = ctx.model_dir, ctx.label
    out, skipped = [], []
    for name in names:
        if name == "random-mm":
            out.append(
                Workload(
                    "random-mm",
                    model_dir,
                    label,
                    output_len=args.output_len,
                    ignore_eos=True,
                    description=f"vLLM's random-mm: {args.input_len} random text tokens, one "
                    f"fresh random {IMAGE_SIZE} x {IMAGE_SIZE} JPEG, "
                    f"{args.output_len} output tokens (ignore_eos)",
                )
            )
            continue
        from lvlm_prune.models.shapes import MODEL_NAME, released_model_dir

        try:
            shapes_dir = str(released_model_dir())
        except FileNotFoundError as err:
            skipped.append(f"shapes: {err}")
            continue
        out.append(
            Workload(
                "shapes",
                shapes_dir,
                MODEL_NAME,
                output_len=8,
                ignore_eos=False,
                description="fresh ShapesVQA scenes (PNG) with one of their own questions, "
                "answered to EOS (at most 8 tokens)",
            )
        )
    return out, skipped


# --------------------------------------------------------------------------------------------
# Measuring


class Runner:
    """One workload against one server: every measurement is one call of vLLM's benchmark."""

    def __init__(
        self,
        server: harness.Server,
        server_args: list[str],
        workload: Workload,
        args: argparse.Namespace,
    ) -> None:
        from vllm.tokenizers import get_tokenizer

        self.server, self.server_args = server, server_args
        self.workload, self.args = workload, args
        self.tokenizer = get_tokenizer(workload.model_dir)
        self.seed = args.seed * 1_000_003
        self.slo_ms: float | None = None

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def measure(self, setting: Setting, *, n: int, rate: float, one_at_a_time=False) -> dict:
        from vllm.benchmarks.serve import TaskType, benchmark

        seed = self.next_seed()
        requests = self.workload.requests(self.tokenizer, n, seed, self.args.input_len)
        random.seed(seed)
        import numpy as np

        np.random.seed(seed % 2**32)  # vLLM's Poisson arrival times come from numpy's global RNG
        meter = common.CpuMeter(self.server.processes().values())
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            raw = asyncio.run(
                benchmark(
                    task_type=TaskType.GENERATION,
                    endpoint_type="openai-chat",
                    api_url=f"{self.server.url}/v1/chat/completions",
                    base_url=self.server.url,
                    model_id=self.workload.model_label,
                    model_name=self.workload.model_label,
                    tokenizer=self.tokenizer,
                    input_requests=requests,
                    logprobs=None,
                    request_rate=rate,
                    burstiness=1.0,
                    disable_tqdm=True,
                    num_warmups=0,
                    profile=False,
                    selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
                    selected_percentiles=[50.0, 99.0],
                    ignore_eos=self.workload.ignore_eos,
                    goodput_config_dict={"ttft": self.slo_ms} if self.slo_ms else {},
                    max_concurrency=1 if one_at_a_time else None,
                    lora_modules=None,
                    extra_headers=None,
                    extra_body=setting.extra_body(),
                    # Its ready check sends input_requests[0] first, so that request would then
                    # hit the prefix and encoder caches: one fast sample per call (the bimodal
                    # unloaded TTFTs of earlier runs). The server is ready already (/health).
                    ready_check_timeout_sec=0,
                )
            )
        point = _point(raw, setting, rate, n, seed)
        point["cotenant_cpu_share"] = meter.share()
        point["vllm_output"] = _result_block(printed.getvalue())
        if self.slo_ms is not None and not one_at_a_time:
            point["within_slo"] = bool(point["failed"] == 0 and point["p99_ttft_ms"] <= self.slo_ms)
        return point


def _point(raw: dict, setting: Setting, rate: float, n: int, seed: int) -> dict:
    keys = (
        "completed",
        "failed",
        "duration",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_input_tokens",
        "total_output_tokens",
        "max_concurrent_requests",
        "mean_ttft_ms",
        "p50_ttft_ms",
        "p99_ttft_ms",
        "p50_tpot_ms",
        "p99_tpot_ms",
        "p50_itl_ms",
        "p99_itl_ms",
        "mean_e2el_ms",
        "p50_e2el_ms",
        "p99_e2el_ms",
    )
    point = {"setting": setting.name, "keep_ratio": setting.keep_ratio, "rate": rate, "n": n}
    point["seed"] = seed
    point.update({k: _plain(raw.get(k)) for k in keys})
    point["ttfts_ms"] = [round(t * 1e3, 2) for t, e in zip(raw["ttfts"], raw["errors"]) if not e]
    point["p99_ttft_ci95_ms"] = common.quantile_interval(point["ttfts_ms"], 0.99)
    errors = [e for e in raw["errors"] if e]
    point["errors"] = sorted(set(e.strip().splitlines()[-1][:300] for e in errors))[:3]
    return point


def _plain(value):
    """numpy scalars from vLLM's metrics as Python numbers (JSON)."""
    return value.item() if hasattr(value, "item") else value


def _result_block(printed: str) -> str:
    """vLLM's own "Serving Benchmark Result" block, as ``vllm bench serve`` prints it."""
    at = printed.find("=" * 10)
    return printed[at:].strip() if at >= 0 else printed.strip()


def sweep(runner: Runner, settings: list[Setting], args: argparse.Namespace) -> dict:
    seconds, min_requests = args.seconds_per_rate, args.min_requests
    label = f"{NAME} {runner.workload.name}"

    warm_up = _warm_up(runner, settings, label)
    unloaded = _unloaded_phase(runner, settings, args.unloaded)
    stock = unloaded[settings[0].name]
    runner.slo_ms = SLO_FACTOR * stock["ttft_ms"]["median"]
    print(
        f"[{label}] stock unloaded TTFT {stock['ttft_ms']['median']:.0f} ms -> SLO p99 TTFT <= "
        f"{runner.slo_ms:.0f} ms",
        flush=True,
    )
    points = Points(runner, label, seconds, min_requests)
    if args.rates:
        _fixed_rates(points, settings, args.rates)
    else:
        _search(points, settings, unloaded, args.rate_step)
        _confirm(points, settings)

    sustainable = {s.name: _sustainable(points.measured, s) for s in settings}
    stock_rate = sustainable[settings[0].name]
    return {
        "workload": runner.workload.name,
        "model": runner.workload.model_label,
        "description": runner.workload.description,
        "server_args": runner.server_args,
        "vllm_bench_serve_equivalent": {
            s.name: runner.workload.vllm_command(s, args.input_len) for s in settings
        },
        "slo": {
            "p99_ttft_ms": runner.slo_ms,
            "rule": f"p99 TTFT <= {SLO_FACTOR:g} x stock's unloaded median TTFT, and no "
            "failed request",
        },
        "warm_up": warm_up,
        "prefix_cache_hit_tokens": harness.metric(
            runner.server.metrics(), "vllm:prefix_cache_hits_total"
        ),
        "unloaded_rates": {name: 1e3 / u["e2el_ms"]["mean"] for name, u in unloaded.items()},
        "seconds_per_rate": seconds,
        "min_requests": min_requests,
        "unloaded": unloaded,
        "points": points.measured,
        "sustainable_rate": sustainable,
        "ratio_to_stock": {
            name: (rate / stock_rate if rate and stock_rate else None)
            for name, rate in sustainable.items()
        },
    }


WARM_UP_BATCH = 5
WARM_UP_TOLERANCE = 0.10
WARM_UP_MAX_BATCHES = 8


def _warm_up(runner: Runner, settings: list[Setting], label: str) -> dict:
    """Three requests per setting, then stock one at a time in batches of ``WARM_UP_BATCH``
    until two batches in a row agree: the SLO comes from stock's unloaded TTFT, so it is
    measured only once that TTFT has stopped moving (oneDNN builds kernels per shape, caches
    fill)."""
    print(f"[{label}] warm-up", flush=True)
    for setting in settings:
        runner.measure(setting, n=3, rate=math.inf, one_at_a_time=True)
    medians: list[float] = []
    while not _stable(medians) and len(medians) < WARM_UP_MAX_BATCHES:
        p = _quiet_measure(runner, settings[0], WARM_UP_BATCH)
        medians.append(p["p50_ttft_ms"])
        print(f"[{label}] warm-up: stock median TTFT {medians[-1]:.0f} ms", flush=True)
    return {
        "stock_batch_median_ttft_ms": medians,
        "batch": WARM_UP_BATCH,
        "stable": _stable(medians),
        "rule": f"stock one at a time in batches of {WARM_UP_BATCH} until two batches in a row "
        f"have median TTFTs within {WARM_UP_TOLERANCE:.0%} of each other "
        f"(at most {WARM_UP_MAX_BATCHES} batches)",
    }


def _stable(medians: list[float]) -> bool:
    """The last two batch medians within ``WARM_UP_TOLERANCE`` of each other."""
    if len(medians) < 2:
        return False
    a, b = medians[-2:]
    return abs(a - b) <= WARM_UP_TOLERANCE * max(a, b)


def _unloaded_phase(runner: Runner, settings: list[Setting], n: int) -> dict[str, dict]:
    """``n`` one-at-a-time requests per setting, in two halves with the order rotated."""
    label = f"{NAME} {runner.workload.name}"
    print(f"[{label}] unloaded: {n} requests per setting, one at a time", flush=True)
    points: dict[str, list[dict]] = {s.name: [] for s in settings}
    for round_, half in enumerate((n - n // 2, n // 2)):
        for setting in common.rotated(settings, round_):
            if half:
                points[setting.name].append(_quiet_measure(runner, setting, half))
    return {name: _unloaded(own) for name, own in points.items()}


def _quiet_measure(runner: Runner, setting: Setting, n: int) -> dict:
    """``n`` requests one at a time, measured again (at most ``QUIET_RETRIES`` times) after a
    wait for a quiet machine while other processes used more than ``COTENANT_LIMIT``: the SLO
    comes from these."""
    for attempt in range(QUIET_RETRIES + 1):
        p = runner.measure(setting, n=n, rate=math.inf, one_at_a_time=True)
        if p["cotenant_cpu_share"] <= COTENANT_LIMIT or attempt == QUIET_RETRIES:
            return p
        common.wait_for_quiet(COTENANT_LIMIT, runner.server.processes().values())
    return p


class Points:
    """The loaded measurements: each rate's arrivals last ``seconds`` (at least ``min_requests``)."""

    def __init__(self, runner: Runner, label: str, seconds: float, min_requests: int) -> None:
        self.runner, self.label = runner, label
        self.seconds, self.min_requests = seconds, min_requests
        self.measured: list[dict] = []

    def run(self, setting: Setting, rate: float) -> dict:
        """One rate; measured again after the machine quiets down while the co-tenant CPU
        share is above ``COTENANT_LIMIT`` (the noisy measurement kept, marked, never used)."""
        n = max(self.min_requests, math.ceil(rate * self.seconds))
        for attempt in range(QUIET_RETRIES + 1):
            p = self.runner.measure(setting, n=n, rate=rate)
            p["noisy"] = p["cotenant_cpu_share"] > COTENANT_LIMIT
            self.measured.append(p)
            print(
                f"[{self.label}] {setting.name:>9} @ {rate:6.3f} req/s: p99 TTFT "
                f"{p['p99_ttft_ms']:.0f} ms, {p['request_throughput']:.2f} req/s, failed "
                f"{p['failed']}, co-tenant CPU {p['cotenant_cpu_share']:.0%} -> "
                f"{'within' if p['within_slo'] else 'OUT OF'} SLO"
                + (" (noisy: not used)" if p["noisy"] else ""),
                flush=True,
            )
            if not p["noisy"] or attempt == QUIET_RETRIES:
                return p
            common.wait_for_quiet(COTENANT_LIMIT, self.runner.server.processes().values())
        return p


def _fixed_rates(points: Points, settings: list[Setting], rates: list[float]) -> None:
    """``--rates``: every setting at every rate, the settings rotated each round."""
    for round_, rate in enumerate(sorted(rates)):
        for setting in common.rotated(settings, round_):
            points.run(setting, rate)


def _search(points: Points, settings: list[Setting], unloaded: dict, step: float) -> None:
    """Each setting's ladder, one rate each per round in rotated order; then one rate at the
    geometric midpoint between each setting's highest pass and the failure above it."""
    ladders = [Ladder(s, 1e3 / unloaded[s.name]["e2el_ms"]["mean"], step) for s in settings]
    round_ = 0
    while any(not ladder.done for ladder in ladders):
        for ladder in common.rotated([x for x in ladders if not x.done], round_):
            ladder.record(points.run(ladder.setting, ladder.rate)["within_slo"])
        round_ += 1
    refine = []
    for setting in settings:
        passed, failed = _bracket(points.measured, setting)
        if passed is not None and failed is not None:
            refine.append((setting, math.sqrt(passed * failed)))
    for setting, rate in common.rotated(refine, round_):
        points.run(setting, rate)


@dataclasses.dataclass
class Ladder:
    """One setting's search for its sustainable rate on a geometric grid of ratio ``step``.

    It starts at ``START_FACTOR`` x the setting's own unloaded rate (1 / its mean end-to-end
    latency alone) and climbs until two rates in a row fail; if its first rate fails it goes
    down instead, until one passes (at most ``MAX_STEPS_DOWN`` steps).
    """

    setting: Setting
    unloaded_rate: float
    step: float
    rate: float = 0.0
    going_down: bool = False
    fails_in_a_row: int = 0
    steps_down: int = 0
    measured: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        self.rate = START_FACTOR * self.unloaded_rate

    def record(self, passed: bool) -> None:
        self.measured += 1
        if self.measured == 1 and not passed:
            self.going_down = True
        if self.going_down:
            if passed or self.steps_down >= MAX_STEPS_DOWN:
                self.done = True
            else:
                self.steps_down += 1
                self.rate /= self.step
            return
        self.fails_in_a_row = 0 if passed else self.fails_in_a_row + 1
        self.rate *= self.step
        self.done = self.fails_in_a_row >= 2 or self.rate > MAX_FACTOR * self.unloaded_rate


def _unloaded(points: list[dict]) -> dict:
    ttfts = [t for p in points for t in p["ttfts_ms"]]
    e2el = [p["mean_e2el_ms"] for p in points]
    return {
        "ttft_ms": common.summary(ttfts),
        "e2el_ms": {"mean": sum(e2el) / len(e2el)},
        "tpot_ms_median": points[0]["p50_tpot_ms"],
        "cotenant_cpu_share": max(p["cotenant_cpu_share"] for p in points),
    }


def _rates(points: list[dict], setting: Setting) -> list[tuple[float, bool]]:
    """Each tested rate of ``setting``, ascending, and whether every run at it met the SLO
    (noisy runs, above ``COTENANT_LIMIT``, left out)."""
    runs: dict[float, bool] = {}
    for p in points:
        if p["setting"] == setting.name and not p.get("noisy"):
            runs[p["rate"]] = runs.get(p["rate"], True) and p["within_slo"]
    return sorted(runs.items())


def _sustainable(points: list[dict], setting: Setting) -> float | None:
    """The highest tested rate at which it and every lower tested rate met the SLO (every run
    at each); None when the lowest failed. A pass above a failure is not sustainable: it is
    noise, or a rate the server meets only by luck of the arrivals."""
    best = None
    for rate, passed in _rates(points, setting):
        if not passed:
            break
        best = rate
    return best


def _bracket(points: list[dict], setting: Setting) -> tuple[float | None, float | None]:
    """The sustainable rate and the lowest failing rate above it."""
    passed = _sustainable(points, setting)
    if passed is None:
        return None, None
    failed = min((r for r, ok in _rates(points, setting) if not ok and r > passed), default=None)
    return passed, failed


MAX_CONFIRMATIONS = 3


def _confirm(points: Points, settings: list[Setting]) -> None:
    """Run each setting's sustainable rate once more: a rate counts only when every run at it
    passed, so a failed confirmation moves the rate down to the next one, which is confirmed in
    turn (at most ``MAX_CONFIRMATIONS`` runs per setting)."""
    confirmed: dict[str, set[float]] = {s.name: set() for s in settings}
    for _ in range(MAX_CONFIRMATIONS):
        todo = []
        for setting in settings:
            rate = _sustainable(points.measured, setting)
            if rate is not None and rate not in confirmed[setting.name]:
                todo.append((setting, rate))
        if not todo:
            return
        for setting, rate in todo:
            points.run(setting, rate)
            confirmed[setting.name].add(rate)


def run(args: argparse.Namespace, ctx: Context) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")  # vLLM's dataset and request bars, per rate
    settings = [Setting(r) for r in sorted(set(args.ratios), reverse=True)]
    if not settings[0].stock:
        settings.insert(0, Setting(1.0))
    workloads, skipped = workloads_for(args, ctx)
    results = []
    for workload in workloads:
        options = [
            *harness.server_options(
                workload.model_label, max_model_len=args.max_model_len, dtype=args.dtype
            ),
            *("--mm-processor-cache-gb", f"{args.mm_processor_cache_gb:g}"),
        ]
        with harness.serve([workload.model_dir, *options], timeout=args.server_timeout) as server:
            results.append(sweep(Runner(server, options, workload, args), settings, args))
        print(markdown_workload(results[-1]), flush=True)
    return {
        "benchmark": NAME,
        "model": ctx.label,
        "settings": [s.name for s in settings],
        "skipped": skipped,
        "client": "vllm.benchmarks.serve.benchmark (vllm bench serve's core), openai-chat "
        "backend, streaming; the benchmark process runs on the same machine as the server",
        "workloads": results,
        "goal": _goal(results),
    }


def _goal(results: list[dict]) -> dict | None:
    for r in results:
        if r["workload"] == "random-mm":
            ratio = r["ratio_to_stock"].get(f"keep {GOAL_KEEP_RATIO:g}")
            return {
                "what": f"sustainable rate at keep {GOAL_KEEP_RATIO:g} >= {GOAL_RATIO:g} x stock's "
                f"({r['model']}, random-mm)",
                "ratio": ratio,
                "met": ratio is not None and ratio >= GOAL_RATIO,
            }
    return None


def sustainable_rate(result: dict, keep_ratio: float, workload: str = "random-mm") -> float | None:
    """The sustainable rate of one setting in a ``serve`` result (the soak's default load)."""
    for r in result.get("workloads", []):
        if r["workload"] == workload:
            return r["sustainable_rate"].get(Setting(keep_ratio).name)
    return None


# --------------------------------------------------------------------------------------------
# Table and plot


def _ci(interval) -> str:
    """A quantile's interval; an open end (too few requests to bound it) reads as such."""
    if not interval:
        return "n/a"
    low, high = interval
    return (
        f"{_f(low) if low is not None else '?'}–{_f(high) if high is not None else '(beyond max)'}"
    )


def _f(x, digits=0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_workload(r: dict) -> str:
    slo = r["slo"]["p99_ttft_ms"]
    lines = [
        f"#### Workload `{r['workload']}` on `{r['model']}`",
        "",
        f"{r['description']}. **SLO: p99 TTFT <= {slo:.0f} ms** ({SLO_FACTOR:g} x stock's "
        f"unloaded median TTFT) with no failed request. Each rate: Poisson arrivals for "
        f"{r['seconds_per_rate']:g} s (at least {r['min_requests']} requests).",
        "",
        f"Warm-up: {r['warm_up']['rule']}; stock's batch medians "
        + ", ".join(f"{m:.0f}" for m in r["warm_up"]["stock_batch_median_ttft_ms"])
        + f" ms ({'stable' if r['warm_up']['stable'] else '**not stable**'}). Prompt tokens "
        f"served from the prefix cache over the whole sweep: {r['prefix_cache_hit_tokens']:.0f} "
        "(every request is fresh).",
        "",
        "Sustainable rate (the highest rate within the SLO):",
        "",
    ]
    rows = []
    for name, u in r["unloaded"].items():
        rate = r["sustainable_rate"][name]
        ratio = r["ratio_to_stock"][name]
        rows.append(
            [
                name,
                _f(u["ttft_ms"]["median"]),
                _f(u["tpot_ms_median"], 1),
                _f(rate, 2),
                "n/a" if ratio is None else f"**{ratio:.2f}x**",
            ]
        )
    lines.append(
        common.markdown_table(
            [
                "setting",
                "unloaded TTFT ms (median)",
                "unloaded TPOT ms",
                "sustainable req/s",
                "ratio to stock",
            ],
            rows,
        )
    )
    lines += ["", "Every rate measured (the settings took turns, one rate each per round):", ""]
    rows = []
    for p in sorted(r["points"], key=lambda p: (p["keep_ratio"] * -1, p["rate"])):
        rows.append(
            [
                p["setting"],
                f"{p['rate']:.2f}",
                p["completed"],
                p["failed"],
                _f(p["p50_ttft_ms"]),
                _f(p["p99_ttft_ms"]),
                _ci(p.get("p99_ttft_ci95_ms")),
                _f(p["p50_tpot_ms"], 1),
                _f(p["output_throughput"], 1),
                _f(p["request_throughput"], 2),
                _f(p["request_goodput"], 2),
                f"{p['cotenant_cpu_share']:.0%}",
                ("yes" if p["within_slo"] else "**no**")
                + (" (noisy: not used)" if p.get("noisy") else ""),
            ]
        )
    lines.append(
        common.markdown_table(
            [
                "setting",
                "rate req/s",
                "ok",
                "failed",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "p99 95% CI",
                "TPOT p50 ms",
                "output tok/s",
                "req/s",
                f"goodput req/s (TTFT <= {slo:.0f} ms)",
                "co-tenant CPU",
                "within SLO",
            ],
            rows,
        )
    )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = [f"### Serving under load — model `{result['model']}`", ""]
    goal = result["goal"]
    if goal:
        lines += [
            f"Goal: {goal['what']}: **{'met' if goal['met'] else 'NOT met'}** "
            f"({_f(goal['ratio'], 2)}x).",
            "",
        ]
    lines += [
        "One `lvlm-prune serve` per workload, every setting on it through the request's "
        "`pruning.keep_ratio` (`--extra-body`; stock = 1.0), the settings taking turns. Client: "
        f"{result['client']}. TTFT, TPOT, throughput and goodput are vLLM's benchmark's own "
        "numbers (client side: from sending the request to the first streamed token).",
    ]
    for r in result["workloads"]:
        lines += ["", markdown_workload(r)]
    for s in result["skipped"]:
        lines += ["", f"Skipped: {s}"]
    return "\n".join(lines)


@common.figure
def plot(result: dict, plt):
    if not result["workloads"]:
        return None
    workloads = result["workloads"]
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 7.5), squeeze=False)
    for col, r in enumerate(workloads):
        top, bottom = axes[0][col], axes[1][col]
        for name in r["unloaded"]:
            own = sorted((p for p in r["points"] if p["setting"] == name), key=lambda p: p["rate"])
            rates = [p["rate"] for p in own]
            (line,) = top.plot(
                rates, [p["p99_ttft_ms"] for p in own], marker="o", label=f"{name} p99"
            )
            top.plot(
                rates,
                [p["p50_ttft_ms"] for p in own],
                ls="--",
                color=line.get_color(),
                alpha=0.6,
                label=f"{name} p50",
            )
            bottom.plot(rates, [p["request_goodput"] for p in own], marker="o", label=name)
            if r["sustainable_rate"][name]:
                top.axvline(r["sustainable_rate"][name], color=line.get_color(), lw=0.8, ls=":")
        slo = r["slo"]["p99_ttft_ms"]
        top.axhline(slo, color="black", lw=1, label=f"SLO {slo:.0f} ms")
        top.set_yscale("log")
        top.set_ylabel("TTFT ms (client side)")
        top.set_title(f"{r['workload']} on {r['model']}: TTFT vs request rate")
        bottom.set_ylabel(f"goodput req/s (TTFT <= {slo:.0f} ms)")
        bottom.set_xlabel("request rate (req/s, Poisson)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig


def load_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, plot)
