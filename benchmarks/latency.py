"""TTFT and end-to-end latency of one image request: stock vs pruned, interleaved, same engine.

TTFT is vLLM's own per-request number, ``RequestOutput.metrics.first_token_latency`` (vLLM 0.32):
from the request's arrival, before its image is preprocessed, to the engine output that carries
its first token. So it covers input processing (HF image processor + our processor), scheduling,
the vision tower, the selection, the LLM prefill and the first sample. End-to-end is the wall time
of ``llm.generate`` for one request with a fixed number of output tokens (``ignore_eos``).
One request at a time, prefix caching off and a fresh random image per request: no repeat is
cheaper than the first.
"""

from __future__ import annotations

import argparse

from . import common
from .benchmark import Benchmark, Context, model_stem

NAME = "latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_scaled(parser, "--repeats", "measured rounds", full=15, smoke=2)
    common.add_scaled(parser, "--warmup", "unmeasured rounds first", full=2, smoke=1)
    common.add_scaled(parser, "--max-tokens", "output tokens per request", full=16, smoke=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(common.RATIOS))
    parser.add_argument("--methods", nargs="+", default=list(common.METHODS))
    parser.add_argument(
        "--positions",
        nargs="+",
        choices=("original", "compact"),
        default=None,
        help="run every pruned setting with each of these kept-token position rules "
        "(prune_positions) side by side; results in latency-MODEL-positions (default: the "
        "engine's default rule only)",
    )


def run(args: argparse.Namespace, ctx: Context) -> dict:
    configs = common.configs_for(args.ratios, args.methods, args.positions or (None,))
    guard = common.QuietGuard.for_run(args)
    samples = _measure(ctx, args, configs, guard)
    return {
        "benchmark": NAME,
        "model": ctx.label,
        "settings": {
            **{k: getattr(args, k) for k in ("repeats", "warmup", "max_tokens")},
            "ratios": args.ratios,
            "methods": args.methods,
            "positions": args.positions,
            "prefix_caching": False,
            "image_per_request": "fresh random {}x{} image (seeded by round and position)".format(
                *args.image_size
            ),
            "order": "round-robin over configs, rotated by one position each round",
        },
        "ttft_source": (
            "RequestOutput.metrics.first_token_latency: request arrival (before input processing) "
            "to the first token's output; engine_prefill = metrics.first_token_ts - scheduled_ts"
        ),
        "quiet": guard.record(),
        "rows": _rows(samples, configs, guard),
    }


def _measure(ctx: Context, args: argparse.Namespace, configs, guard: common.QuietGuard) -> dict:
    """One request at a time, configs round-robin; the samples of the measured rounds."""
    from vllm import SamplingParams

    warmup, repeats, max_tokens = args.warmup, args.repeats, args.max_tokens
    llm = ctx.llm
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    samples = {
        c.name: {"ttft": [], "prefill": [], "e2e": [], "cotenant": [], "prompt_tokens": set()}
        for c in configs
    }
    family = common.family_of(llm)
    bar = common.progress((warmup + repeats) * len(configs), f"{NAME} ({ctx.label})")
    for round_ in guard.rounds(warmup, repeats):
        for i, config in enumerate(common.rotated(configs, round_)):
            image = common.make_image(10_000 * round_ + i, args.image_size)
            req = common.request(config, image, family=family)
            with guard.timer() as t:
                (out,) = llm.generate([req], sampling, use_tqdm=False)
            bar.update()
            if round_ < warmup:
                continue
            s = samples[config.name]
            s["ttft"].append(common.ttft_seconds(out))
            s["prefill"].append(common.engine_prefill_seconds(out))
            s["e2e"].append(t.seconds)
            s["cotenant"].append(t.cotenant_cpu_share)
            s["prompt_tokens"].add(len(out.prompt_token_ids))
            assert len(out.outputs[0].token_ids) == max_tokens
    bar.close()
    return samples


TIMES = {"ttft": "ttft", "engine_prefill": "prefill", "e2e": "e2e"}
"""A row's times and the samples they come from."""


def _rows(samples: dict, configs, guard: common.QuietGuard) -> list[dict]:
    """Medians and ratios over the quiet rounds only; every sample stays in ``all_rounds``."""
    stock_tokens = _one(samples["stock"]["prompt_tokens"])
    rows = []
    for config in configs:
        s = samples[config.name]
        tokens = _one(s["prompt_tokens"])
        rows.append(
            {
                "config": config.name,
                "keep_ratio": config.keep_ratio,
                "method": None if config.stock else config.method,
                "positions": config.positions,
                "prompt_tokens": tokens,
                "token_bound": tokens / stock_tokens,
                **{row: common.summary(guard.quiet(s[key])) for row, key in TIMES.items()},
                "cotenant_cpu_share": common.summary(s["cotenant"]),
                "all_rounds": {row: s[key] for row, key in TIMES.items()},
            }
        )
    stock = rows[0]
    for row in rows:
        for key in TIMES:
            row[f"{key}_ratio"] = row[key]["median"] / stock[key]["median"]
            # Paired by round: each pruned request against the stock request of the same round.
            row[f"{key}_paired_ratio_median"] = common.summary(
                [a / b for a, b in zip(row[key]["values"], stock[key]["values"])]
            )["median"]
    return rows


def _one(values: set[int]) -> int:
    assert len(values) == 1, f"prompt length varied within one config: {sorted(values)}"
    return next(iter(values))


def _ms(summary: dict) -> str:
    return f"{summary['median'] * 1e3:.1f} ({summary['min'] * 1e3:.0f}–{summary['max'] * 1e3:.0f})"


def markdown(result: dict) -> str:
    s = result["settings"]
    headers = [
        "config",
        "prompt tokens",
        "token bound",
        "TTFT ms median (min–max)",
        "TTFT ratio",
        "engine prefill ms",
        "prefill ratio",
        "e2e ms median (min–max)",
        "e2e ratio",
        "co-tenant CPU (max)",
    ]
    rows = [
        [
            r["config"],
            r["prompt_tokens"],
            f"{r['token_bound']:.3f}",
            _ms(r["ttft"]),
            f"**{r['ttft_ratio']:.3f}**",
            f"{r['engine_prefill']['median'] * 1e3:.1f}",
            f"{r['engine_prefill_ratio']:.3f}",
            _ms(r["e2e"]),
            f"{r['e2e_ratio']:.3f}",
            f"{common.share(r['cotenant_cpu_share'])} ({100 * r['cotenant_cpu_share']['max']:.0f}%)",
        ]
        for r in result["rows"]
    ]
    return "\n".join(
        [
            f"### Latency — model `{result['model']}`",
            "",
            f"{s['repeats']} measured rounds after {s['warmup']} warm-up rounds; {s['order']}; "
            f"{s['image_per_request']}; prefix caching off; {s['max_tokens']} output tokens (ignore_eos).",
            f"TTFT: {result['ttft_source']}. Ratios are median / stock median; "
            "token bound = prompt tokens / stock prompt tokens (what a cost linear in tokens would give). "
            "Co-tenant CPU: median (max) share of the machine's CPU that other processes used "
            "during the config's requests, every round.",
            "",
            common.markdown_table(headers, rows),
            "",
            common.quiet_markdown(result["quiet"]),
        ]
    )


@common.figure
def plot(result: dict, plt):
    rows = result["rows"]
    stock = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ttft", "TTFT"), (axes[1], "e2e", "end-to-end")):
        markers = {"simignore": "o", "uniform": "s", "random": "^"}
        series = sorted({(r["method"], r.get("positions") or "") for r in rows[1:]})
        for method, rule in series:
            if method not in markers:
                continue
            pts = [stock] + [
                r for r in rows[1:] if (r["method"], r.get("positions") or "") == (method, rule)
            ]
            label = f"{method} [{rule}]" if rule else method
            xs = [r["keep_ratio"] for r in pts]
            med = [r[key]["median"] * 1e3 for r in pts]
            err = [
                [m - r[key]["min"] * 1e3 for m, r in zip(med, pts)],
                [r[key]["max"] * 1e3 - m for m, r in zip(med, pts)],
            ]
            ax.errorbar(
                xs,
                med,
                yerr=err,
                marker=markers[method],
                capsize=3,
                label=f"{label} (median, min–max)",
            )
        first_rule = next((rule for method, rule in series if method == "simignore"), "")
        bound = [stock] + [
            r
            for r in rows[1:]
            if (r["method"], r.get("positions") or "") == ("simignore", first_rule)
        ]
        ax.plot(
            [r["keep_ratio"] for r in bound],
            [stock[key]["median"] * 1e3 * r["token_bound"] for r in bound],
            "k--",
            lw=1,
            label="stock × token bound",
        )
        ax.set_xlabel("keep ratio (1.0 = stock vLLM)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} — model {result['model']}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def stem(args: argparse.Namespace, ctx: Context) -> str:
    """``latency-MODEL[-WxH]``, ``-positions`` when ``--positions`` compares position rules."""
    return model_stem(args, ctx) + ("-positions" if args.positions else "")


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, plot, stem=stem)
