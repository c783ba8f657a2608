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
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.1,
        help="also report TTFT over requests during which other processes used less than this "
        "share of the machine's CPU (default 0.1)",
    )


def run(args: argparse.Namespace, ctx: Context) -> dict:
    configs = common.configs_for(args.ratios, args.methods, args.positions or (None,))
    samples = _measure(ctx, args, configs)
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
            "quiet_below": args.quiet_below,
        },
        "ttft_source": (
            "RequestOutput.metrics.first_token_latency: request arrival (before input processing) "
            "to the first token's output; engine_prefill = metrics.first_token_ts - scheduled_ts"
        ),
        "cotenant_cpu_share_median": common.summary_or_none(
            [x for c in configs for x in samples[c.name]["cotenant"]]
        ),
        "rows": _rows(samples, configs, args.quiet_below),
    }


def _measure(ctx: Context, args: argparse.Namespace, configs) -> dict:
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
    for round_ in range(warmup + repeats):
        for i, config in enumerate(common.rotated(configs, round_)):
            image = common.make_image(10_000 * round_ + i, args.image_size)
            req = common.request(config, image, family=family)
            with common.Timer() as t:
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


def _rows(samples: dict, configs, quiet_below: float) -> list[dict]:
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
                "ttft": common.summary(s["ttft"]),
                "engine_prefill": common.summary(s["prefill"]),
                "e2e": common.summary(s["e2e"]),
                "cotenant_cpu_share": common.summary_or_none(s["cotenant"]),
            }
        )
    stock = rows[0]
    quiet = _quiet_ttft(samples, configs, quiet_below)
    for row in rows:
        row["ttft_quiet"] = quiet[row["config"]]
        row["ttft_quiet_ratio"] = (
            quiet[row["config"]]["median"] / quiet["stock"]["median"]
            if quiet[row["config"]] and quiet["stock"]
            else None
        )
        for key in ("ttft", "engine_prefill", "e2e"):
            row[f"{key}_ratio"] = row[key]["median"] / stock[key]["median"]
            # Paired by round: each pruned request against the stock request of the same round.
            row[f"{key}_paired_ratio_median"] = common.summary(
                [a / b for a, b in zip(row[key]["values"], stock[key]["values"])]
            )["median"]
    return rows


def _quiet_ttft(samples: dict, configs, threshold: float) -> dict:
    """TTFT over the requests during which other processes used < ``threshold`` of the CPU."""
    out = {}
    for config in configs:
        s = samples[config.name]
        out[config.name] = common.summary_or_none(
            [t for t, c in zip(s["ttft"], s["cotenant"]) if c is not None and c < threshold]
        )
    return out


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
        "co-tenant CPU",
        "quiet TTFT ratio (n)",
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
            common.share(r["cotenant_cpu_share"]),
            "n/a"
            if r["ttft_quiet_ratio"] is None
            else f"{r['ttft_quiet_ratio']:.3f} ({r['ttft_quiet']['n']})",
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
            "Co-tenant CPU: median share of the machine's CPU that other processes used during the "
            "config's requests (another workload on a shared machine); quiet TTFT ratio: the same "
            f"ratio over only the requests with co-tenant CPU < {100 * s['quiet_below']:.0f}% (n of them).",
            "",
            common.markdown_table(headers, rows),
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
