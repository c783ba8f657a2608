"""Where TTFT goes: input processing, vision tower, projector, the selection, the LLM prefill;
what the flow method's scout and a flow diagnostics pass cost.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the benchmark can time
the pieces from outside the product code: forward hooks on the model's vision tower, projector and
language model; a timing wrapper around the model instance's ``embed_multimodal`` and around
``select_tokens`` as the plugin module calls it; a wrapper around our processor's ``apply`` (it
runs in the API process, here the same one). All of it is installed for the run and removed after.
The plugin's own record of the selection time (``diagnostics.STORE.drain_timings``) is read too,
as a cross-check. One request at a time with ``max_tokens=1``, so the LLM forward is the prefill.
The ``flow`` method's scout (``vllm_plugin.flow.scout_scores``) is timed on its own; after the
rounds, flow diagnostics passes (``flow.fetch_flow``, the RPC into the worker) are timed against
the LLM forward of the same prompt.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time

from lvlm_prune.vllm_plugin import options

from . import common
from .benchmark import Benchmark, Context

NAME = "overhead"
PIECES = (
    "processor",
    "vision_tower",
    "projector",
    "scout",
    "selection",
    "embed_multimodal",
    "llm_forward",
)
FLOW_RATIOS = (1.0, 0.25)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_scaled(parser, "--repeats", "measured rounds", full=6, smoke=1)
    common.add_scaled(parser, "--warmup", "unmeasured rounds", full=1, smoke=1)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(common.RATIOS))
    parser.add_argument("--methods", nargs="+", default=[*common.METHODS, "flow"])
    parser.add_argument(
        "--prune-layer",
        type=int,
        default=None,
        help="the flow method's scout layers (default: the model's declared depth, else 2)",
    )
    common.add_scaled(
        parser, "--flow-passes", "flow diagnostics passes timed per keep ratio", full=6, smoke=1
    )


class Probe:
    """Accumulates wall seconds per piece; CUDA work is synchronised before each clock read."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._undo: list = []
        import torch

        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def module(self, name: str, module) -> None:
        starts: list[float] = []

        def pre(_mod, _args):
            starts.append(self._now())

        def post(_mod, _args, _out):
            self.seconds[name] += self._now() - starts.pop()

        self._undo.append(module.register_forward_pre_hook(pre).remove)
        self._undo.append(module.register_forward_hook(post).remove)

    def attribute(self, name: str, owner, attr: str, *, instance: bool = False) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = self._now()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += self._now() - start

        setattr(owner, attr, timed)
        if instance:  # shadowing a bound method on the instance: delete to restore the class's
            self._undo.append(lambda: delattr(owner, attr))
        else:
            self._undo.append(lambda: setattr(owner, attr, original))

    def take(self) -> dict[str, float]:
        out = {name: self.seconds.get(name, 0.0) for name in PIECES}
        self.seconds.clear()
        return out

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def instrumented(llm):
    from lvlm_prune.vllm_plugin import llava as plugin_llava
    from lvlm_prune.vllm_plugin.worker import flow as plugin_flow
    from lvlm_prune.vllm_plugin.worker import model as pruning

    if common.family_of(llm) != "llava":
        raise SystemExit(
            "bench overhead attributes time to LLaVA's modules (vision tower, projector, "
            "processor); run bench latency or throughput for other families"
        )
    model = common.model_of(llm)
    probe = Probe()
    try:
        probe.module("vision_tower", model.vision_tower)
        probe.module("projector", model.multi_modal_projector)
        # NOTE(vLLM 0.32): @support_torch_compile's __call__ calls self.forward directly, so
        # forward hooks on the language model never fire; wrap the instance's forward instead.
        probe.attribute("llm_forward", model.language_model.model, "forward", instance=True)
        probe.attribute("embed_multimodal", model, "embed_multimodal", instance=True)
        probe.attribute("selection", pruning, "select_tokens")
        probe.attribute("scout", plugin_flow, "scout_scores")
        probe.attribute("processor", plugin_llava.LlavaPruneMultiModalProcessor, "apply")
        yield probe, model
    finally:
        probe.remove()


def request_for(config, image, args: argparse.Namespace) -> dict:
    req = common.request(config, image)
    if config.method == "flow" and not config.stock and args.prune_layer is not None:
        req["mm_processor_kwargs"]["prune_layer"] = args.prune_layer
    return req


def run(args: argparse.Namespace, ctx: Context) -> dict:
    repeats, warmup = args.repeats, args.warmup
    configs = common.configs_for(args.ratios, args.methods)
    llm = ctx.llm
    guard, flow_guard = common.QuietGuard.for_run(args), common.QuietGuard.for_run(args)
    with instrumented(llm) as (probe, _model):
        samples, prompt_tokens = _measure(ctx, probe, args, configs, guard, (warmup, repeats))
        ratios = [r for r in FLOW_RATIOS if r in {c.keep_ratio for c in configs}]
        flow_rows = time_flow_passes(llm, probe, args, ratios, flow_guard)
    rows = _rows(samples, configs, prompt_tokens, guard)
    stock = rows[0]["median_seconds"]
    vision = stock["vision_tower"] + stock["projector"]
    hf_config = llm.llm_engine.vllm_config.model_config.hf_config
    return {
        "benchmark": NAME,
        "model": ctx.label,
        "settings": {
            "repeats": repeats,
            "warmup": warmup,
            "max_tokens": 1,
            "prefix_caching": False,
        },
        "method": (
            "forward hooks on vision_tower / multi_modal_projector, timing wrappers on "
            "language_model.model.forward, the model's embed_multimodal, the plugin's select_tokens "
            "and the processor's apply; "
            "installed by the benchmark in-process, removed after"
        ),
        "llm_to_vision_time_ratio_stock": stock["llm_forward"] / vision if vision else None,
        "estimated_flops_stock": _flops(hf_config, rows[0]["prompt_tokens"], args.prune_layer),
        "quiet": guard.record(),
        "rows": rows,
        "flow_quiet": flow_guard.record(),
        "flow_passes": flow_rows,
    }


def _measure(
    ctx: Context, probe: Probe, args, configs, guard: common.QuietGuard, rounds: tuple[int, int]
):
    """One request at a time, configs round-robin: each request's pieces, and the derived ones."""
    from vllm import SamplingParams

    from lvlm_prune.vllm_plugin.worker import diagnostics

    warmup, repeats = rounds
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    samples = {c.name: collections.defaultdict(list) for c in configs}
    prompt_tokens: dict[str, int] = {}
    bar = common.progress((warmup + repeats) * len(configs), f"{NAME} ({ctx.label})")
    for round_ in guard.rounds(warmup, repeats):
        for i, config in enumerate(common.rotated(configs, round_)):
            image = common.make_image(2_000_000 + 10_000 * round_ + i)
            probe.take()
            diagnostics.STORE.drain_timings()
            with guard.timer() as t:
                (out,) = ctx.llm.generate(
                    [request_for(config, image, args)], sampling, use_tqdm=False
                )
            pieces = probe.take()
            recorded = sum(s for s, _ in diagnostics.STORE.drain_timings())
            bar.update()
            if round_ < warmup:
                continue
            s = samples[config.name]
            ttft = common.ttft_seconds(out)
            s["ttft"].append(ttft)
            for piece, seconds in pieces.items():
                s[piece].append(seconds)
            # Derived per request, then medians (medians of parts do not add up).
            s["pruning_other"].append(
                pieces["embed_multimodal"]
                - pieces["vision_tower"]
                - pieces["projector"]
                - pieces["scout"]
                - pieces["selection"]
            )
            s["engine_other"].append(
                ttft - pieces["processor"] - pieces["embed_multimodal"] - pieces["llm_forward"]
            )
            s["selection_share"].append(pieces["selection"] / ttft)
            s["cotenant"].append(t.cotenant_cpu_share)
            s["selection_recorded_by_plugin"].append(recorded)
            prompt_tokens[config.name] = len(out.prompt_token_ids)
    bar.close()
    return samples, prompt_tokens


def _rows(samples: dict, configs, prompt_tokens: dict[str, int], guard: common.QuietGuard):
    """Medians over the quiet rounds (every sample stays in ``samples``)."""
    rows = []
    for config in configs:
        s = samples[config.name]
        med = {k: common.summary(guard.quiet(v))["median"] for k, v in s.items()}
        rows.append(
            {
                "config": config.name,
                "keep_ratio": config.keep_ratio,
                "prompt_tokens": prompt_tokens[config.name],
                "median_seconds": med,
                "selection_share_of_ttft": med["selection_share"],
                "samples": {k: list(v) for k, v in s.items()},
            }
        )
    # Paired per round (a config's i-th sample and stock's i-th ran in the same round): a shared
    # machine's slow drift cancels out of the ratio.
    stock_ttft = guard.quiet(samples[configs[0].name]["ttft"])
    for row in rows:
        scout = guard.quiet(samples[row["config"]]["scout"])
        row["scout_share_of_stock_ttft"] = common.summary(
            [a / b for a, b in zip(scout, stock_ttft)]
        )["median"]
    return rows


def _flops(hf_config, prompt_tokens: int, prune_layer: int | None) -> dict:
    """Estimated FLOPs of one stock prefill, and of the flow method's scout over it."""
    flops = estimated_flops(hf_config, prompt_tokens)
    prune_layer = prune_layer or options.default_prune_layer(hf_config)
    flops["scout"] = estimated_scout_flops(hf_config, prompt_tokens, prune_layer)
    flops["scout_to_llm_ratio"] = flops["scout"] / flops["llm"]
    flops["prune_layer"] = prune_layer
    return flops


def time_flow_passes(
    llm, probe: Probe, args: argparse.Namespace, ratios, guard: common.QuietGuard
) -> list[dict]:
    """Flow diagnostics: per keep ratio, the pass as the worker timed it and the RPC's wall time
    (``flow.fetch_flow``), after one request with ``prune_flow`` each; each pass against its own
    request's prefill, both timed in one guarded round (a prefill slowed by another process
    beside a quiet pass made an unexplained 0.29x once)."""
    from vllm import SamplingParams

    from lvlm_prune.vllm_plugin.worker import flow

    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    samples = {ratio: {"pass": [], "rpc": [], "prefill": []} for ratio in ratios}
    prompt_tokens = {}
    for round_ in guard.rounds(1, args.flow_passes):  # the first round warms up
        for ratio in ratios:
            diag_id = 7_000_000 + int(ratio * 1000) * 100 + round_
            config = common.Config(ratio)
            image = common.make_image(3_000_000 + 100 * round_ + int(ratio * 10))
            req = common.request(config, image)
            req["mm_processor_kwargs"].update(prune_diagnostics=diag_id, prune_flow=True)
            probe.take()
            with guard.timer():
                (out,) = llm.generate([req], sampling, use_tqdm=False)
            prefill = probe.take()["llm_forward"]  # this very prompt's prefill
            with guard.timer() as t:
                result = llm.collective_rpc("lvlm_prune_flow", args=(diag_id, out.prompt_token_ids))
            llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
            flow.combine_flow([r for r in result if r is not None])
            prompt_tokens[ratio] = len(out.prompt_token_ids)
            if round_:
                s = samples[ratio]
                s["pass"].append(max(r["seconds"] for r in result if r is not None))
                s["rpc"].append(t.seconds)
                s["prefill"].append(prefill)
    rows = []
    for ratio in ratios:
        quiet = {k: guard.quiet(v) for k, v in samples[ratio].items()}
        rows.append(
            {
                "keep_ratio": ratio,
                "prompt_tokens": prompt_tokens[ratio],
                "median_pass_seconds": common.summary(quiet["pass"])["median"],
                "median_rpc_seconds": common.summary(quiet["rpc"])["median"],
                "prefill_seconds": common.summary(quiet["prefill"])["median"],
                # Each pass over its own request's prefill, then the median.
                "times_prefill": common.summary(
                    [a / b for a, b in zip(quiet["pass"], quiet["prefill"])]
                )["median"],
                "samples": samples[ratio],
            }
        )
    return rows


def estimated_scout_flops(hf_config, tokens: int, prune_layer: int) -> float:
    """Matmul + attention FLOPs of the flow method's scout over about ``tokens`` tokens: its first
    ``prune_layer - 1`` decoder layers in full, then the last one's q/k/v projections and the
    question rows' attention (small)."""
    t = hf_config.text_config
    th = t.hidden_size
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or th // t.num_attention_heads
    qkv = 2 * th * (t.num_attention_heads + 2 * kv_heads) * head_dim
    attn_proj = 2 * th * t.num_attention_heads * head_dim + 2 * th * kv_heads * head_dim
    full = 2 * tokens * (attn_proj + 3 * th * t.intermediate_size)
    full += 4 * tokens * tokens * t.num_attention_heads * head_dim
    return (prune_layer - 1) * full + tokens * qkv


def estimated_flops(hf_config, prompt_tokens: int) -> dict:
    """Matmul + attention FLOPs of one stock prefill (2 per multiply-add), vision vs LLM."""
    v, t = hf_config.vision_config, hf_config.text_config
    n_img = (v.image_size // v.patch_size) ** 2
    n_vis = n_img + 1  # CLS
    feature_layer = getattr(hf_config, "vision_feature_layer", -2)
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = max(feature_layer, key=lambda x: x % (v.num_hidden_layers + 1))
    layers_run = feature_layer % (v.num_hidden_layers + 1)
    h, inter = v.hidden_size, v.intermediate_size
    vision = layers_run * (2 * n_vis * (4 * h * h + 2 * h * inter) + 4 * n_vis * n_vis * h)
    vision += 2 * n_img * 3 * v.patch_size**2 * h  # patch embedding
    th = t.hidden_size
    projector = 2 * n_img * (h * th + th * th)
    kv_heads = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or th // t.num_attention_heads
    attn_proj = 2 * th * t.num_attention_heads * head_dim + 2 * th * kv_heads * head_dim
    llm = t.num_hidden_layers * (
        2 * prompt_tokens * (attn_proj + 3 * th * t.intermediate_size)
        + 4 * prompt_tokens * prompt_tokens * t.num_attention_heads * head_dim
    )
    return {
        "vision_tower": vision,
        "projector": projector,
        "llm": llm,
        "vision_layers_run": layers_run,
        "llm_to_vision_ratio": llm / (vision + projector),
        "prompt_tokens": prompt_tokens,
    }


def markdown(result: dict) -> str:
    fl = result["estimated_flops_stock"]
    measured = result["llm_to_vision_time_ratio_stock"]
    return "\n".join(
        [
            f"### Overhead breakdown — model `{result['model']}`",
            "",
            f"Medians in ms over {result['settings']['repeats']} rounds (one request at a time, "
            "max_tokens=1). Method: " + result["method"] + ". `engine other` = TTFT − processor − "
            "embed_multimodal − LLM forward (scheduling, input batch, logits, sampling, output); "
            "derived columns are computed per request, then the median (so a row need not add up).",
            "",
            _pieces_table(result["rows"]),
            "",
            common.quiet_markdown(result["quiet"]),
            "",
            f"Stock prefill, LLM : vision (tower + projector): measured time "
            f"{measured:.1f} : 1; estimated FLOPs {fl['llm_to_vision_ratio']:.1f} : 1 "
            f"({fl['llm'] / 1e9:.1f} vs {(fl['vision_tower'] + fl['projector']) / 1e9:.1f} GFLOP, "
            f"{fl['vision_layers_run']} vision layers run, {fl['prompt_tokens']} prompt tokens).",
            "",
            f"`scout` is the `flow` method's scout pass (its first `prune_layer` = "
            f"{fl['prune_layer']} decoder layers over the image and the question); `scout / stock "
            "TTFT` is its time over stock's TTFT in the same round, median over rounds. "
            "Estimated FLOPs: scout / stock LLM prefill = "
            f"{100 * fl['scout_to_llm_ratio']:.1f}% (the floor: {fl['prune_layer'] - 1} "
            "of the model's decoder layers over about as many tokens as the stock prompt, plus "
            "the last scout layer's projections).",
            "",
            "Flow diagnostics (`prune_flow`): medians in ms of the worker's pass (one eager "
            "forward of the prompt with attention probabilities read out), of the RPC around it, "
            "and of the same request's own LLM forward (its prefill); `pass / prefill` is per "
            "request, then the median.",
            "",
            _flow_table(result.get("flow_passes", [])),
            "",
            common.quiet_markdown(result["flow_quiet"]),
        ]
    )


def _pieces_table(result_rows: list[dict]) -> str:
    headers = [
        "config",
        "prompt tokens",
        "TTFT",
        "processor",
        "vision tower",
        "projector",
        "selection",
        "scout",
        "query embed + gather",
        "LLM forward",
        "engine other",
        "selection / TTFT",
        "scout / stock TTFT",
        "co-tenant CPU",
    ]
    pieces = (
        "ttft",
        "processor",
        "vision_tower",
        "projector",
        "selection",
        "scout",
        "pruning_other",
        "llm_forward",
        "engine_other",
    )
    rows = []
    for r in result_rows:
        m = r["median_seconds"]
        rows.append(
            [
                r["config"],
                r["prompt_tokens"],
                *(f"{m[k] * 1e3:.1f}" for k in pieces),
                f"**{100 * r['selection_share_of_ttft']:.2f}%**",
                f"{100 * r['scout_share_of_stock_ttft']:.1f}%",
                f"{100 * m['cotenant']:.0f}%",
            ]
        )
    return common.markdown_table(headers, rows)


def _flow_table(flow_passes: list[dict]) -> str:
    return common.markdown_table(
        ["keep ratio", "prompt tokens", "flow pass", "RPC wall", "LLM forward", "pass / prefill"],
        [
            [
                f"{f['keep_ratio']:g}",
                f["prompt_tokens"],
                f"{f['median_pass_seconds'] * 1e3:.1f}",
                f"{f['median_rpc_seconds'] * 1e3:.1f}",
                f"{f['prefill_seconds'] * 1e3:.1f}",
                f"**{f['times_prefill']:.2f}\u00d7**",
            ]
            for f in flow_passes
        ],
    )


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown)
