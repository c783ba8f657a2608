"""TTFT per turn of 3-turn conversations about one image, through a real server: stock vs pruned.

Each conversation sends an image and a question, then two follow-up questions; every turn
resends the whole history (image, questions, the assistant's replies), as every chat UI does. It
runs through a real ``lvlm-prune serve`` started here with prefix caching on (vLLM's default) and
``--enable-prompt-tokens-details``, so each reply says how many of its prompt tokens came from the
prefix cache; one server per KV block size (on CPU: 128, vLLM's default there, and 32, the
smallest its CPU attention takes, nearer a GPU's 16). TTFT is vLLM's own per-request number, the same as the
``latency`` benchmark's (``first_token_latency``: arrival, before input processing, to the first
token's output), read from the server's ``/metrics`` as the change of
``vllm:time_to_first_token_seconds_sum`` across each request (requests go one at a time); encoder
runs are the encoder inputs vLLM's scheduler logged (``--enable-logging-iteration-details``).
Conversations of all settings are interleaved turn by turn, rotated each round; each has a fresh
random image. ``simignore@0.25 requery`` re-selects the image for every new question
(``pruning.requery``): what a follow-up costs when it must see other regions of the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import time

from . import common, harness
from .benchmark import Benchmark, Context

NAME = "multiturn"
QUESTIONS = (
    common.QUESTION,
    "How many people are standing near the door?",
    "Is there a dog on the grass?",
)


@dataclasses.dataclass(frozen=True)
class Setting(common.Setting):
    requery: bool = False

    @property
    def name(self) -> str:
        if self.stock:
            return "stock"
        return f"simignore@{self.keep_ratio:g}" + (" requery" if self.requery else "")

    def pruning(self) -> dict:
        if self.stock:
            return {"keep_ratio": 1.0}
        out = {"keep_ratio": self.keep_ratio, "method": "simignore"}
        if self.requery:
            out["requery"] = True
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_scaled(
        parser,
        "--conversations",
        "measured conversations per setting and block size",
        full=10,
        smoke=2,
    )
    common.add_scaled(parser, "--warmup", "unmeasured rounds first", full=1, smoke=1)
    common.add_scaled(parser, "--max-tokens", "reply tokens per turn", full=16, smoke=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.11])
    parser.add_argument(
        "--requery-ratio",
        type=float,
        default=0.25,
        help="also run this keep ratio with pruning.requery (0: skip; default 0.25)",
    )
    parser.add_argument(
        "--block-sizes",
        type=int,
        nargs="+",
        default=None,
        help="KV cache block sizes, one server each (default without CUDA: 128, vLLM's CPU "
        "default, and 32, the smallest its CPU attention takes; with CUDA: 16, vLLM's GPU "
        "default, and 128; smoke: the first of them)",
    )
    parser.add_argument(
        "--server-timeout", type=float, default=900, help="seconds to wait for a server to start"
    )


def default_block_sizes() -> list[int]:
    import torch

    return [16, 128] if torch.cuda.is_available() else [128, 32]


def settings_for(ratios, requery_ratio: float) -> list[Setting]:
    out = [Setting(1.0)] + [Setting(r) for r in ratios if r < 1.0]
    if 0 < requery_ratio < 1.0:
        out.append(Setting(requery_ratio, requery=True))
    return out


def run(args: argparse.Namespace, ctx: Context) -> dict:
    conversations, warmup, max_tokens = args.conversations, args.warmup, args.max_tokens
    block_sizes = args.block_sizes or default_block_sizes()[: 1 if args.smoke else None]
    settings = settings_for(args.ratios, args.requery_ratio)

    rows, options, quiet = [], None, {}
    for block_size in block_sizes:
        # Prefix caching on (vLLM's default): what a follow-up turn reuses is the point.
        options = [
            *harness.server_options(ctx.label, max_model_len=args.max_model_len, dtype=args.dtype),
            *("--block-size", str(block_size), "--enable-prompt-tokens-details"),
            "--enable-logging-iteration-details",
        ]
        with harness.serve([ctx.model_dir, *options], timeout=args.server_timeout) as server:
            guard = common.QuietGuard.for_run(args, server.processes().values())
            samples = _converse(
                server, ctx.label, settings, guard, (warmup, conversations), max_tokens
            )
        rows += _rows(samples, settings, block_size, guard)
        quiet[str(block_size)] = guard.record()

    return {
        "benchmark": NAME,
        "model": ctx.label,
        "settings": {
            "conversations": conversations,
            "warmup": warmup,
            "turns": len(QUESTIONS),
            "questions": list(QUESTIONS),
            "max_tokens": max_tokens,
            "ratios": args.ratios,
            "requery_ratio": args.requery_ratio,
            "block_sizes": block_sizes,
            "server_args": options,
            "image_per_conversation": "fresh random 336x336 image (seeded by round and setting)",
            "order": "turn by turn: turn t of every setting's conversation, then turn t+1; "
            "settings rotated by one position each round",
        },
        "ttft_source": (
            "vLLM's first_token_latency (arrival, before input processing, to the first token's "
            "output): the change of vllm:time_to_first_token_seconds_sum on /metrics across the "
            "request; engine_prefill: of vllm:request_prefill_time_seconds_sum "
            "(first_token_ts - scheduled_ts)"
        ),
        "quiet": quiet,
        "goal": _goal(rows),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------
# The conversations


def _converse(
    server: harness.Server,
    model: str,
    settings,
    guard: common.QuietGuard,
    rounds: tuple[int, int],
    max_tokens: int,
):
    keys = ("ttft", "prefill", "e2e", "prompt", "cached", "encoder", "image_tokens")
    samples = {
        (s.name, turn): {k: [] for k in keys} for s in settings for turn in range(len(QUESTIONS))
    }
    warmup, conversations = rounds
    bar = common.progress(
        (warmup + conversations) * len(settings) * len(QUESTIONS), f"{NAME} ({model})"
    )
    counters = _counters(server)
    _new_encoder_inputs(server)
    for round_ in guard.rounds(warmup, conversations):
        histories = {
            s.name: [_user(QUESTIONS[0], harness.data_url(common.make_image(10_000 * round_ + i)))]
            for i, s in enumerate(settings)
        }
        for turn in range(len(QUESTIONS)):
            for setting in common.rotated(settings, round_):
                messages = histories[setting.name]
                if turn > 0:
                    messages.append(_user(QUESTIONS[turn]))
                body = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "pruning": setting.pruning(),
                }
                with guard.timer() as t:
                    reply = server.chat(body)
                e2e = t.seconds
                before, counters = counters, _counters_after(server, counters)
                encoder = _new_encoder_inputs(server)
                content = reply["choices"][0]["message"]["content"] or ""
                messages.append({"role": "assistant", "content": content})
                bar.update()
                if round_ >= warmup:
                    s = samples[(setting.name, turn)]
                    _record(s, reply, e2e, encoder, before, counters)
    bar.close()
    return samples


def _record(s: dict, reply: dict, e2e: float, encoder: int, before: dict, after: dict) -> None:
    """One turn's numbers into its (setting, turn) samples."""
    for key, counter in (
        ("ttft", "time_to_first_token_seconds_sum"),
        ("prefill", "request_prefill_time_seconds_sum"),
    ):
        s[key].append(after[counter] - before[counter])
    s["e2e"].append(e2e)
    s["prompt"].append(reply["usage"]["prompt_tokens"])
    details = reply["usage"].get("prompt_tokens_details") or {}
    s["cached"].append(details.get("cached_tokens"))
    s["encoder"].append(encoder)
    s["image_tokens"].append(reply["pruning"]["image_tokens_after"])


_TIMERS = ("time_to_first_token_seconds", "request_prefill_time_seconds")


def _counters(server: harness.Server) -> dict[str, float]:
    """vLLM's TTFT and prefill-time sums and counts, over every label set."""
    samples = server.metrics()
    return {
        f"{m}_{part}": harness.metric(samples, f"vllm:{m}_{part}")
        for m in _TIMERS
        for part in ("sum", "count")
    }


def _counters_after(server: harness.Server, before: dict) -> dict:
    """The counters once this request's TTFT and prefill time are in (one request at a time)."""
    for _ in range(100):
        after = _counters(server)
        if all(after[f"{m}_count"] == before[f"{m}_count"] + 1 for m in _TIMERS):
            return after
        time.sleep(0.02)
    raise RuntimeError(f"vLLM's TTFT counters did not move by one request: {before} → {after}")


def _new_encoder_inputs(server: harness.Server) -> int:
    """Encoder inputs the scheduler logged since the last call."""
    return sum(int(n) for n in re.findall(r"encoder inputs: (\d+)", server.new_log()))


def _user(text: str, image_url: str | None = None) -> dict:
    content = [{"type": "text", "text": text}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"role": "user", "content": content}


# --------------------------------------------------------------------------------------------
# Rows, goal, table, plot


def p90(values) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def _rows(samples: dict, settings, block_size: int, guard: common.QuietGuard) -> list[dict]:
    """Per setting and turn, over the quiet rounds only."""
    quiet = {key: {k: guard.quiet(v) for k, v in s.items()} for key, s in samples.items()}
    rows = []
    for setting in settings:
        for turn in range(len(QUESTIONS)):
            s = quiet[(setting.name, turn)]
            stock = quiet[("stock", turn)]
            rows.append(
                {
                    "block_size": block_size,
                    "config": setting.name,
                    "keep_ratio": setting.keep_ratio,
                    "requery": setting.requery,
                    "turn": turn + 1,
                    "prompt_tokens": common.summary(s["prompt"]),
                    "image_tokens": _one(s["image_tokens"]),
                    "cached_tokens": common.summary_or_none(s["cached"]),
                    "encoder_runs": sum(s["encoder"]),
                    "conversations": len(s["encoder"]),
                    "ttft": {**common.summary(s["ttft"]), "p90": p90(s["ttft"])},
                    "ttft_ratio": statistics.median(s["ttft"]) / statistics.median(stock["ttft"]),
                    # Paired by round: each conversation's turn against stock's of the same round.
                    "ttft_paired_ratio_median": statistics.median(
                        a / b for a, b in zip(s["ttft"], stock["ttft"])
                    ),
                    "engine_prefill": common.summary(s["prefill"]),
                    "e2e": common.summary(s["e2e"]),
                }
            )
    return rows


def _one(values) -> int:
    # The point of the feature: an image's placeholder count never changes within a setting.
    assert len(set(values)) == 1, f"image tokens varied within one setting: {sorted(set(values))}"
    return values[0]


def _goal(rows: list[dict]) -> dict:
    """Pruned follow-ups (turns 2, 3) at or below stock's TTFT median, per block size."""
    out = {}
    stock = {(r["block_size"], r["turn"]): r for r in rows if r["config"] == "stock"}
    for r in rows:
        if r["config"] == "stock" or r["requery"] or r["turn"] == 1:
            continue
        key = f"block {r['block_size']}: {r['config']}"
        ok = r["ttft"]["median"] <= stock[(r["block_size"], r["turn"])]["ttft"]["median"]
        out[key] = out.get(key, True) and ok
    return out


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    headers = [
        "config",
        "turn",
        "image tokens",
        "prompt tokens",
        "cached tokens median (min)",
        "encoder runs",
        "TTFT ms median",
        "TTFT ms p90",
        "TTFT / stock",
        "paired",
        "engine prefill ms",
    ]
    sections = [
        f"### Multi-turn conversations — model `{result['model']}`",
        "",
        f"{s['conversations']} conversations per setting and block size after {s['warmup']} "
        f"warm-up round(s), {s['turns']} turns each, {s['max_tokens']} reply tokens per turn "
        "(ignore_eos); every turn resends the history; a fresh random 336x336 image per "
        f"conversation; {s['order']}. One `lvlm-prune serve` per KV block size, prefix caching on. "
        f"TTFT: {result['ttft_source']}. TTFT / stock: median over stock's median at the same "
        "turn; paired: median of the per-round ratios (each conversation's turn over stock's turn "
        "of the same round). Encoder runs: images the vision tower encoded at that turn, over all "
        "conversations. `requery` re-selects the image for each new question (`pruning.requery`).",
    ]
    for block_size in s["block_sizes"]:
        rows = [r for r in result["rows"] if r["block_size"] == block_size]
        table = [
            [
                r["config"],
                r["turn"],
                r["image_tokens"],
                f"{r['prompt_tokens']['median']:.0f}",
                "n/a"
                if r["cached_tokens"] is None
                else f"{r['cached_tokens']['median']:.0f} ({r['cached_tokens']['min']:.0f})",
                f"{r['encoder_runs']} / {r['conversations']}",
                _ms(r["ttft"]["median"]),
                _ms(r["ttft"]["p90"]),
                f"**{r['ttft_ratio']:.2f}**",
                f"{r['ttft_paired_ratio_median']:.2f}",
                _ms(r["engine_prefill"]["median"]),
            ]
            for r in rows
        ]
        sections += ["", f"KV block size {block_size}:", "", common.markdown_table(headers, table)]
        sections += ["", common.quiet_markdown(result["quiet"][str(block_size)])]
    goal = ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in result["goal"].items())
    sections += ["", f"Goal (pruned turn 2 and 3 TTFT median ≤ stock's): {goal}."]
    return "\n".join(sections)


@common.figure
def plot(result: dict, plt):
    block_sizes = result["settings"]["block_sizes"]
    fig, axes = plt.subplots(1, len(block_sizes), figsize=(5.5 * len(block_sizes), 4.2))
    axes = [axes] if len(block_sizes) == 1 else list(axes)
    names = list(dict.fromkeys(r["config"] for r in result["rows"]))
    for ax, block_size in zip(axes, block_sizes):
        for name in names:
            rows = [
                r for r in result["rows"] if r["block_size"] == block_size and r["config"] == name
            ]
            turns = [r["turn"] for r in rows]
            med = [r["ttft"]["median"] * 1e3 for r in rows]
            up = [r["ttft"]["p90"] * 1e3 - m for r, m in zip(rows, med)]
            ax.errorbar(turns, med, yerr=[[0] * len(med), up], marker="o", capsize=3, label=name)
        ax.set_xticks([1, 2, 3])
        ax.set_xlabel("turn")
        ax.set_ylabel("TTFT ms (median, whisker to p90)")
        ax.set_title(f"{result['model']}, KV block size {block_size}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, plot)
