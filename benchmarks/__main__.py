"""``python -m lvlm_prune.benchmarks NAME [...]`` / ``lvlm-prune bench NAME [...]``.

NAME: latency, throughput, overhead, fidelity, prefill-gpu, or all. Each prints a markdown table
and writes ``NAME-MODEL.{json,md}`` (and a PNG where it plots) to ``--out`` (default
``./benchmarks/results/`` of the working directory; with ``--smoke``, its ``smoke/`` subfolder,
which git ignores). ``kernels`` (the Triton kernels: torch + Triton only, no engine) is not part
of ``all``, nor are ``serve`` (rate sweeps against real servers), ``soak`` (minutes of mixed
traffic, then checks; exits 1 when one fails) and ``lmms-eval`` (lmms-eval against presets),
which start their own servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lvlm_prune import envs

envs.use_offline_defaults()  # before anything imports vLLM

from . import (  # noqa: E402
    bench_kernels,
    common,
    fidelity,
    latency,
    lmms,
    multiturn,
    overhead,
    prefill_gpu,
    serve,
    soak,
    throughput,
)
from .benchmark import Benchmark, Context, add_engine_options, out_dir  # noqa: E402


def _run_prefill_gpu(args: argparse.Namespace, ctx) -> dict | None:
    return prefill_gpu.run(args)


def _prefill_gpu_stem(args: argparse.Namespace, ctx) -> str:
    return f"{prefill_gpu.NAME}-{'tiny-cpu' if args.smoke else 'llava7b-shape'}"


@dataclasses.dataclass(frozen=True)
class KernelsBenchmark(Benchmark):
    """``bench kernels``: torch + Triton only, so none of the engine options; its ``main`` (run
    here as ``run``) picks one of its modes and writes that mode's files itself."""

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        self.add_arguments(parser)

    def main(self, args: argparse.Namespace, command: str) -> tuple[str | None, bool | None]:
        return None, self.run(args, command) == 0


BENCHMARKS = {
    b.name: b
    for b in (
        latency.BENCHMARK,
        throughput.BENCHMARK,
        overhead.BENCHMARK,
        fidelity.BENCHMARK,
        Benchmark(
            prefill_gpu.NAME,
            prefill_gpu.__doc__,
            prefill_gpu.add_arguments,
            _run_prefill_gpu,
            prefill_gpu.markdown,
            stem=_prefill_gpu_stem,
            unmeasured=f"### LLM prefill on a GPU\n\n{prefill_gpu.NO_CUDA}",
        ),
        multiturn.BENCHMARK,
        serve.BENCHMARK,
        soak.BENCHMARK,
        lmms.BENCHMARK,
        KernelsBenchmark(
            bench_kernels.NAME,
            bench_kernels.__doc__,
            bench_kernels.add_arguments,
            bench_kernels.main,
            bench_kernels.markdown,
        ),
    )
}
ALL = ("latency", "throughput", "overhead", "fidelity", "prefill-gpu", "multiturn")
"""What ``all`` runs: serve and soak start their own servers for tens of minutes, and kernels
needs no engine."""

SUMMARY_NOTE = (
    "Stock (keep_ratio 1.0) and every pruned setting ran in one process, one engine, interleaved "
    "round-robin in every repeat; read the ratios, not the absolute times. The machine may be "
    "shared (on the project's 2-core machines another developer's tests and servers run beside "
    "the benchmark): the `co-tenant CPU` columns say how much of the CPU other processes used "
    "during the measured requests. See benchmarks/README.md for the model shapes and how each "
    "number is measured."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvlm-prune bench",
        description="Pruned vs stock vLLM, side by side: every benchmark runs keep_ratio 1.0 and the "
        "pruned settings interleaved in one process and reports medians and ratios.",
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    for bench in BENCHMARKS.values():
        p = sub.add_parser(
            bench.name,
            help=bench.doc.strip().splitlines()[0],
            description=bench.doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        bench.add_options(p)
    p = sub.add_parser(
        "all", help="every benchmark above but serve and soak, with defaults, one shared engine"
    )
    add_engine_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = common.command_line(argv)
    if args.name != "all":
        _, passed = BENCHMARKS[args.name].main(args, command)
        return 1 if passed is False else 0
    sections, failed = [], False
    for name in ALL:
        section, passed = BENCHMARKS[name].main(parser.parse_args([name, *argv[1:]]), command)
        failed |= passed is False
        if section:
            sections.append(section)
    if sections:
        label = Context(args).model_name
        path = out_dir(args) / f"summary-{label}.md"
        path.write_text(
            f"# lvlm-prune benchmarks — model `{label}`\n\n{SUMMARY_NOTE}\n\n"
            + "\n\n".join(sections)
            + "\n"
        )
        print(f"\nsummary: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
