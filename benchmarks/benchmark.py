"""The one shape of a benchmark: options, a run that returns its results, a table, maybe a plot.

Each benchmark module declares ``BENCHMARK = Benchmark(...)``; ``__main__`` lists them in one
table and runs any of them the same way: parse its options, run it on a ``Context`` (the model and
the in-process engine, made only when the benchmark asks for them), write ``STEM.json``,
``STEM.md`` and, where it plots, ``STEM.png``, and print the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from . import common


class Context:
    """What a benchmark runs on, made when first asked for: the model (built-in or a folder) and
    the in-process engine (one per model for the whole command, so ``all`` shares it)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @property
    def model_name(self) -> str:
        return self.args.model or ("tiny" if self.args.smoke else "bench")

    @functools.cached_property
    def _model(self) -> tuple[str, str]:
        return common.resolve_model(self.model_name)

    @property
    def model_dir(self) -> str:
        return self._model[0]

    @property
    def label(self) -> str:
        """The model's name in tables and file names."""
        return self._model[1]

    @functools.cached_property
    def llm(self):
        return common.get_llm(
            self.model_dir, max_model_len=self.args.max_model_len, dtype=self.args.dtype
        )

    def model_source(self) -> str | None:
        """A built-in model named by its spec and content key, never by where it is cached; None
        when the benchmark ran on no model."""
        if "_model" not in self.__dict__:
            return None
        if self.model_name == self.label:
            return f"built-in {self.model_name}: {Path(self.model_dir).name}"
        return self.model_dir


def model_stem(args: argparse.Namespace, ctx: Context) -> str:
    """``NAME-MODEL``, and ``-WxH`` for an image size other than the default."""
    stem = f"{args.name}-{ctx.label}"
    if args.image_size != common.IMAGE_SIZE:
        stem += "-{}x{}".format(*args.image_size)
    return stem


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark on a model takes."""
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
    common.add_scaled(
        parser,
        "--quiet-wait",
        "seconds each measured round may wait for other processes to use at most "
        f"{100 * common.COTENANT_LIMIT:.0f} %% of the CPU",
        full=300,
        smoke=0,
        type=float,
    )
    parser.add_argument(
        "--image-size",
        type=common.image_size,
        default=common.IMAGE_SIZE,
        metavar="WxH",
        help="the images' width x height (default 336x336; Qwen2.5-VL's token count follows it, "
        "and a size other than the default is part of the result files' names)",
    )


def out_dir(args: argparse.Namespace) -> Path:
    return args.out or common.results_dir(smoke=args.smoke)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One ``lvlm-prune bench NAME``.

    Attributes:
        name: the command's NAME and the result files' first word.
        doc: its ``--help`` (the module docstring; the first line is the one-line help).
        add_arguments: its own options (the engine options are added to every benchmark).
        run: ``(args, ctx) -> results`` (None: nothing measured and nothing to write).
        markdown: the results as a markdown section.
        plot: writes the PNG, True when it did (absent: no plot).
        stem: the result files' name.
        unmeasured: the section ``all`` shows when ``run`` measured nothing.
    """

    name: str
    doc: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], dict | None]
    markdown: Callable[[dict], str]
    plot: Callable[[dict, Path], bool] | None = None
    stem: Callable[[argparse.Namespace, Context], str] = model_stem
    unmeasured: str | None = None

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        add_engine_options(parser)
        self.add_arguments(parser)

    def main(self, args: argparse.Namespace, command: str) -> tuple[str | None, bool | None]:
        """Run, write the files, print the table; return the markdown section and whether its
        checks passed (None: it has none)."""
        ctx = Context(common.resolve_scaled(args))
        machine = common.machine_info()
        result = self.run(args, ctx)
        if result is None:
            return self.unmeasured, None
        if (source := ctx.model_source()) is not None:
            result["model_source"] = source
        result["machine"] = machine
        result["command"] = command
        section = self.write(out_dir(args), self.stem(args, ctx), result)
        return section, result.get("passed")

    def write(self, out: Path, stem: str, result: dict) -> str:
        files = common.write_results(out, stem, result, "")  # JSON first; markdown below
        png = out / f"{stem}.png"
        plotted = self.plot is not None and self.plot(result, png)
        section = self.markdown(result)
        if plotted:
            section += f"\n\n![{self.name}]({stem}.png)"
        section += "\n\n" + common.machine_markdown(result["machine"], result["command"])
        files["md"].write_text(section + "\n")
        print("\n" + section + "\n")
        print(f"wrote {files['json']}, {files['md']}" + (f", {png}" if plotted else ""))
        return section
