"""Offline throughput of a batch of image requests, and how many fit in a fixed KV cache.

Throughput: M requests (each its own random image) handed to ``llm.generate`` at once; wall time
→ requests/s, prompt tokens/s, output tokens/s. Ratios interleave per repeat; medians reported.

KV capacity is computed, not guessed: after init vLLM's cache config says how many KV blocks it
allocated (``cache_config.num_gpu_blocks``) and how many tokens a block holds (``block_size``).
A request needs ``ceil((prompt_tokens + max_tokens) / block_size)`` blocks for its whole life, so
``num_blocks // that`` requests fit at once. The same cache in bytes is
``num_blocks * block_size * 2 * layers * kv_heads * head_dim * dtype_bytes``.
"""

from __future__ import annotations

import argparse
import math

from . import common
from .benchmark import Benchmark, Context

NAME = "throughput"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_scaled(parser, "--batch", "requests per batch", full=12, smoke=3)
    common.add_scaled(parser, "--repeats", "measured rounds", full=3, smoke=1)
    common.add_scaled(parser, "--warmup", "unmeasured rounds", full=1, smoke=0)
    common.add_scaled(parser, "--max-tokens", "output tokens per request", full=8, smoke=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(common.RATIOS))
    parser.add_argument("--method", default="simignore")


def run(args: argparse.Namespace, ctx: Context) -> dict:
    batch, repeats, warmup, max_tokens = args.batch, args.repeats, args.warmup, args.max_tokens
    configs = [common.Config(r, args.method) for r in sorted(set(args.ratios), reverse=True)]
    assert configs[0].stock, "the ratios must include 1.0 (stock)"
    guard = common.QuietGuard.for_run(args)
    samples = _measure(ctx, args, configs, guard, batch, (warmup, repeats), max_tokens)
    kv = common.kv_cache_info(ctx.llm)
    return {
        "benchmark": NAME,
        "model": ctx.label,
        "settings": {
            "batch": batch,
            "repeats": repeats,
            "warmup": warmup,
            "max_tokens": max_tokens,
            "method": args.method,
            "prefix_caching": False,
            "order": "round-robin over ratios, rotated each round",
        },
        "kv_cache": kv,
        "kv_capacity_method": (
            "num_blocks // ceil((prompt_tokens + max_tokens) / block_size), from vLLM's cache config "
            "after init; token_granular = num_blocks * block_size // (prompt_tokens + max_tokens)"
        ),
        "quiet": guard.record(),
        "rows": _rows(samples, configs, guard, kv, batch, max_tokens),
    }


def _measure(
    ctx: Context,
    args,
    configs,
    guard: common.QuietGuard,
    batch: int,
    rounds: tuple[int, int],
    max_tokens: int,
):
    """A batch per config, configs round-robin; the samples of the measured rounds."""
    from vllm import SamplingParams

    warmup, repeats = rounds
    llm = ctx.llm
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    samples = {
        c.name: {"seconds": [], "cotenant": [], "prompt_tokens": None, "output_tokens": None}
        for c in configs
    }
    family = common.family_of(llm)
    bar = common.progress((warmup + repeats) * len(configs) * batch, f"{NAME} ({ctx.label})")
    for round_ in guard.rounds(warmup, repeats):
        for i, config in enumerate(common.rotated(configs, round_)):
            seeds = [1_000_000 + 10_000 * round_ + 100 * i + j for j in range(batch)]
            reqs = [
                common.request(config, common.make_image(s, args.image_size), family=family)
                for s in seeds
            ]
            with guard.timer() as t:
                outs = llm.generate(reqs, sampling, use_tqdm=False)
            bar.update(batch)
            if round_ < warmup:
                continue
            s = samples[config.name]
            s["seconds"].append(t.seconds)
            s["cotenant"].append(t.cotenant_cpu_share)
            s["prompt_tokens"] = sum(len(o.prompt_token_ids) for o in outs)
            s["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
            s["prompt_tokens_per_request"] = len(outs[0].prompt_token_ids)
    bar.close()
    return samples


def _rows(
    samples: dict, configs, guard: common.QuietGuard, kv: dict, batch: int, max_tokens: int
) -> list[dict]:
    rows = []
    for config in configs:
        s = samples[config.name]
        wall = common.summary(guard.quiet(s["seconds"]))
        per_request = s["prompt_tokens_per_request"]
        blocks = math.ceil((per_request + max_tokens) / kv["block_size"])
        rows.append(
            {
                "config": config.name,
                "keep_ratio": config.keep_ratio,
                "prompt_tokens_per_request": per_request,
                "wall_seconds": wall,
                "requests_per_s": batch / wall["median"],
                "prompt_tokens_per_s": s["prompt_tokens"] / wall["median"],
                "output_tokens_per_s": s["output_tokens"] / wall["median"],
                "kv_blocks_per_request": blocks,
                "kv_capacity_requests": kv["num_blocks"] // blocks,
                "kv_capacity_requests_token_granular": kv["tokens"] // (per_request + max_tokens),
                "cotenant_cpu_share": common.summary(s["cotenant"]),
                "all_rounds_seconds": s["seconds"],
            }
        )
    stock = rows[0]
    for row in rows:
        row["requests_per_s_ratio"] = row["requests_per_s"] / stock["requests_per_s"]
        row["kv_capacity_ratio"] = row["kv_capacity_requests"] / stock["kv_capacity_requests"]
    return rows


def markdown(result: dict) -> str:
    s, kv = result["settings"], result["kv_cache"]
    headers = [
        "config",
        "prompt tokens / req",
        "batch wall s median (min–max)",
        "req/s",
        "× stock",
        "prompt tok/s",
        "KV blocks / req",
        "requests in KV cache",
        "× stock",
        "co-tenant CPU",
    ]
    rows = [
        [
            r["config"],
            r["prompt_tokens_per_request"],
            f"{r['wall_seconds']['median']:.2f} ({r['wall_seconds']['min']:.2f}–{r['wall_seconds']['max']:.2f})",
            f"{r['requests_per_s']:.2f}",
            f"**{r['requests_per_s_ratio']:.2f}**",
            f"{r['prompt_tokens_per_s']:.0f}",
            r["kv_blocks_per_request"],
            f"{r['kv_capacity_requests']} ({r['kv_capacity_requests_token_granular']} by tokens)",
            f"**{r['kv_capacity_ratio']:.2f}**",
            common.share(r["cotenant_cpu_share"]),
        ]
        for r in result["rows"]
    ]
    return "\n".join(
        [
            f"### Throughput and KV capacity — model `{result['model']}`",
            "",
            f"Batches of {s['batch']} image requests (method {s['method']}), {s['max_tokens']} output "
            f"tokens each, {s['repeats']} measured rounds after {s['warmup']} warm-up, {s['order']}.",
            f"KV cache: {kv['num_blocks']} blocks × {kv['block_size']} tokens = {kv['tokens']} tokens, "
            f"{kv['bytes_per_token']} bytes/token, {kv['bytes'] / 2**30:.2f} GiB. Capacity = "
            f"{result['kv_capacity_method']}.",
            "",
            common.markdown_table(headers, rows),
            "",
            common.quiet_markdown(result["quiet"]),
        ]
    )


@common.figure
def plot(result: dict, plt):
    rows = result["rows"]
    xs = [r["keep_ratio"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(xs, [r["requests_per_s"] for r in rows], "o-")
    axes[0].set_ylabel("requests / s")
    axes[0].set_title(f"offline throughput, batch {result['settings']['batch']}")
    axes[1].plot(xs, [r["kv_capacity_requests"] for r in rows], "o-", label="block granular")
    axes[1].plot(
        xs, [r["kv_capacity_requests_token_granular"] for r in rows], "s--", label="token granular"
    )
    axes[1].set_ylabel("concurrent image requests")
    axes[1].set_title(f"KV capacity ({result['kv_cache']['bytes'] / 2**30:.2f} GiB cache)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("keep ratio (1.0 = stock vLLM)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"model {result['model']}")
    return fig


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, plot)
