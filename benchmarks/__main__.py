"""``python -m lvlm_prune.benchmarks NAME [...]`` / ``lvlm-prune bench NAME [...]``.

NAME: latency, throughput, overhead, fidelity, prefill-gpu, or all. Each prints a markdown table
and writes ``NAME-MODEL.{json,md}`` (and a PNG where it plots) to ``--out`` (default
``./benchmarks/results/`` of the working directory; with ``--smoke``, its ``smoke/`` subfolder,
which git ignores). ``kernels`` (the Triton kernels: torch + Triton only, no engine) is not part
of ``all``, nor are ``serve`` (rate sweeps against real servers) and ``soak`` (minutes of mixed
traffic, then checks; exits 1 when one fails), which start their own servers and run for long.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvlm_prune import envs

envs.use_offline_defaults()  # before anything imports vLLM

from . import (  # noqa: E402
    bench_kernels,
    common,
    fidelity,
    latency,
    multiturn,
    overhead,
    prefill_gpu,
    serve,
    soak,
    throughput,
)

BENCHMARKS = {
    "latency": latency,
    "throughput": throughput,
    "overhead": overhead,
    "fidelity": fidelity,
    "prefill-gpu": prefill_gpu,
    "multiturn": multiturn,
    "serve": serve,
    "soak": soak,
}


SUMMARY_NOTE = (
    "Stock (keep_ratio 1.0) and every pruned setting ran in one process, one engine, interleaved "
    "round-robin in every repeat; read the ratios, not the absolute times. The machine may be "
    "shared (on the project's 2-core machines another developer's tests and servers run beside "
    "the benchmark): the `co-tenant CPU` columns say how much of the CPU other processes used "
    "during the measured requests. See benchmarks/README.md for the model shapes and how each "
    "number is measured."
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="shapes (the trained built-in model) | tiny | bench (random-weight LLaVA-1.5 shapes) "
        "| a local checkpoint folder (default: bench; tiny with --smoke)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="seconds-long version on the tiny model"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON / markdown / PNG"
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the engine's dtype, as vLLM's --dtype (default auto: the checkpoint's, bf16 for "
        "bench). A CPU without native bf16 (no AVX512-BF16 or AMX) runs bf16 matmuls on a "
        "slow fallback: float32 there",
    )
    parser.add_argument(
        "--image-size",
        type=common.image_size,
        default=common.IMAGE_SIZE,
        metavar="WxH",
        help="the images' width x height (default 336x336; Qwen2.5-VL's token count follows it, "
        "and a size other than the default is part of the result files' names)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvlm-prune bench",
        description="Pruned vs stock vLLM, side by side: every benchmark runs keep_ratio 1.0 and the "
        "pruned settings interleaved in one process and reports medians and ratios.",
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module in BENCHMARKS.items():
        p = sub.add_parser(
            name,
            help=module.__doc__.strip().splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(p)
        module.add_arguments(p)
    # torch + Triton only: no engine, none of the common engine options, not part of `all`.
    p = sub.add_parser(
        bench_kernels.NAME,
        help=bench_kernels.__doc__.strip().splitlines()[0],
        description=bench_kernels.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_kernels.add_arguments(p)
    p = sub.add_parser(
        "all", help="every benchmark above but serve and soak, with defaults, one shared engine"
    )
    _add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.name == bench_kernels.NAME:
        return bench_kernels.main(args, common.command_line(argv))
    if args.name == "fidelity" and args.make_synthetic:
        items = fidelity.make_synthetic(args.items or 40)
        fidelity.write_jsonl(items, Path(args.make_synthetic))
        print(f"wrote {len(items)} synthetic items to {args.make_synthetic}")
        return 0
    if args.name == "all":
        rest = argv[1:]
        # serve and soak (IN_ALL = False) start their own servers for tens of minutes.
        names = [n for n, m in BENCHMARKS.items() if getattr(m, "IN_ALL", True)]
        runs = [parser.parse_args([name, *rest]) for name in names]
    else:
        runs = [args]
    sections, failed = [], False
    command = common.command_line(argv)
    for run_args in runs:
        section, passed = run_one(run_args, command)
        failed |= passed is False
        if section:
            sections.append(section)
    if args.name == "all" and sections:
        out = _out_dir(args)
        label = _model_name(args)
        path = out / f"summary-{label}.md"
        path.write_text(
            f"# lvlm-prune benchmarks — model `{label}`\n\n{SUMMARY_NOTE}\n\n"
            + "\n\n".join(sections)
            + "\n"
        )
        print(f"\nsummary: {path}")
    return 1 if failed else 0


def _model_name(args) -> str:
    return args.model or ("tiny" if args.smoke else "bench")


def _out_dir(args) -> Path:
    return args.out or common.results_dir(smoke=args.smoke)


def run_one(args: argparse.Namespace, command: str) -> tuple[str | None, bool | None]:
    """Run one benchmark, write its files, print its table; return its markdown section and
    whether its checks passed (None: it has none; a failed soak makes the command exit 1)."""
    module = BENCHMARKS[args.name]
    machine = common.machine_info()
    if module is prefill_gpu:
        result = module.run(args)
        if result is None:
            return f"### LLM prefill on a GPU\n\n{prefill_gpu.NO_CUDA}", None
        stem = f"{args.name}-{'tiny-cpu' if args.smoke else 'llava7b-shape'}"
    else:
        model_dir, label = common.resolve_model(_model_name(args))
        # A benchmark that starts its own servers (USES_ENGINE = False) gets no in-process engine.
        uses_engine = getattr(module, "USES_ENGINE", True)
        llm = (
            common.get_llm(model_dir, max_model_len=args.max_model_len, dtype=args.dtype)
            if uses_engine
            else None
        )
        result = module.run(args, llm, label)
        # A built-in model is named by its spec and content key, never by where it is cached.
        name = _model_name(args)
        result["model_source"] = (
            f"built-in {name}: {Path(model_dir).name}" if name == label else model_dir
        )
        stem = f"{args.name}-{label}"
        if getattr(args, "image_size", common.IMAGE_SIZE) != common.IMAGE_SIZE:
            stem += "-{}x{}".format(*args.image_size)
    result["machine"] = machine
    result["command"] = command
    out = _out_dir(args)
    files = common.write_results(out, stem, result, "")  # JSON first; markdown below
    plotted = hasattr(module, "plot") and module.plot(result, out / f"{stem}.png")
    section = module.markdown(result)
    if plotted:
        section += f"\n\n![{args.name}]({stem}.png)"
    section += "\n\n" + common.machine_markdown(result["machine"], command)
    files["md"].write_text(section + "\n")
    print("\n" + section + "\n")
    print(
        f"wrote {files['json']}, {files['md']}" + (f", {out / (stem + '.png')}" if plotted else "")
    )
    return section, result.get("passed")


if __name__ == "__main__":
    sys.exit(main())
