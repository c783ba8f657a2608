"""``lvlm-prune explain IMAGE QUESTION``: one question about one image, and how its information
flowed through the language model, as a picture and as JSON.

Runs the request through the offline engine (in this process) with flow diagnostics, exactly as
the server would (the chat template, the question as the image's relevance query), then draws in
the style of "From Redundancy to Relevance": the system / image / question shares of the last
prompt token's attention per decoder layer with the cliff marked, the relevance heatmap the
selection ranked by, and a shallow layer's attention map over the kept image tokens.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from pathlib import Path

from lvlm_prune import envs
from lvlm_prune.kernels import PRUNE_METHODS
from lvlm_prune.vllm_plugin import options

DIAGNOSTICS_ID = 1
MAP_LAYER = 2
"""The layer whose image map is drawn (the deepest one at or below it that the model has)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvlm-prune explain",
        description="One question about one image through the offline engine, with flow "
        "diagnostics: writes a PNG (attention shares per decoder layer with the cliff, the "
        "relevance heatmap, a shallow layer's attention map) and the JSON behind it.",
    )
    parser.add_argument("image", type=Path, help="an image file (PNG, JPEG, ...)")
    parser.add_argument("question", help="the question about it")
    parser.add_argument(
        "--model", default=None, help="checkpoint (default: the one `lvlm-prune serve` serves)"
    )
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="in (0, 1] (default 0.25)")
    parser.add_argument("--method", choices=PRUNE_METHODS, default="simignore")
    parser.add_argument(
        "--prune-layer",
        type=int,
        default=None,
        help="flow method: scout layers (default: the model's declared depth, else 2)",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length (default 32)")
    parser.add_argument(
        "--dtype", default="auto", help="the engine's dtype (vLLM's --dtype; default auto)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path without suffix; writes OUT.png and OUT.json (default: IMAGE's name "
        "with -flow, in the working directory)",
    )
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    kwargs = {options.KEEP_RATIO: args.keep_ratio, options.METHOD: args.method}
    if args.prune_layer is not None:
        kwargs[options.PRUNE_LAYER] = args.prune_layer
    try:
        options.PruneOptions.from_kwargs(kwargs)
    except options.PruneOptionError as err:
        sys.exit(f"lvlm-prune explain: {err}")
    if not args.image.is_file():
        sys.exit(f"lvlm-prune explain: no image file {args.image}")
    out = args.out or Path.cwd() / f"{args.image.stem}-flow"
    result = explain(
        args.image,
        args.question,
        model=args.model,
        mm_kwargs=kwargs,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".png").write_bytes(draw(result, args.image))
    print(f"answer: {result['answer']!r}")
    cliff = result["flow"]["cliff_layer"]
    print(f"cliff layer: {cliff}" if cliff >= 0 else "cliff layer: none (the share never falls)")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


def resolve_model(model: str | None) -> tuple[str, str]:
    """(path, name): a built-in model by name (``lvlm_prune.models``; the default is what
    ``lvlm-prune serve`` serves without a MODEL) or a checkpoint as given."""
    from lvlm_prune import models

    return models.resolve(model or models.DEFAULT) or (model, _model_name(model))


def _model_name(model: str) -> str:
    """How the picture names a checkpoint: the project's own model by its name, else as given."""
    from lvlm_prune.models.shapes import MODEL_NAME, is_shapes_model

    return MODEL_NAME if Path(model).is_dir() and is_shapes_model(model) else model


def explain(
    image_path: Path,
    question: str,
    *,
    model: str | None = None,
    mm_kwargs: dict,
    max_tokens: int = 32,
    dtype: str = "auto",
) -> dict:
    """Run one request with ``prune_flow`` and return what the server's ``pruning`` would hold
    with ``diagnostics: "flow"``, plus the answer and the options."""
    import torch

    envs.use_serve_defaults(cuda=torch.cuda.is_available())
    for key, value in envs.IN_PROCESS_DEFAULTS.items():  # the engine in this process: seconds
        os.environ.setdefault(key, value)
    from PIL import Image
    from vllm import LLM, SamplingParams

    from lvlm_prune.vllm_plugin import WORKER_EXTENSION
    from lvlm_prune.vllm_plugin.worker import flow

    path, name = resolve_model(model)
    llm = LLM(
        path,
        served_model_name=name,
        dtype=dtype,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        worker_extension_cls=WORKER_EXTENSION,
        seed=0,
    )
    image = Image.open(image_path).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]
    kwargs = {
        **mm_kwargs,
        options.QUERY: [question],  # as the server: the image's own question, not the template
        options.DIAGNOSTICS: DIAGNOSTICS_ID,
        options.FLOW: True,
    }
    (output,) = llm.chat(
        messages,
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        mm_processor_kwargs=kwargs,
        use_tqdm=False,
    )
    result_flow = flow.fetch_flow(llm, DIAGNOSTICS_ID, output.prompt_token_ids)
    answers = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([DIAGNOSTICS_ID],))
    entries = next(a[DIAGNOSTICS_ID] for a in answers if DIAGNOSTICS_ID in a)  # rank 0's
    per_image = []
    for entry in entries:
        n, grid = entry["num_tokens"], entry["grid"]
        per_image.append(
            {
                "tokens_before": n,
                "tokens_after": len(entry["kept_indices"]),
                "method": entry["method"],
                "grid": grid,
                "scores": flow.patch_grid(entry["scores"], range(n), n, grid)
                if entry["scores"] is not None
                else None,
                "kept_indices": entry["kept_indices"],
            }
        )
    return {
        "model": name,
        "question": question,
        "answer": output.outputs[0].text,
        "prompt_tokens": len(output.prompt_token_ids),
        "keep_ratio": mm_kwargs[options.KEEP_RATIO],
        "method": mm_kwargs[options.METHOD],
        "per_image": per_image,
        "flow": result_flow,
    }


def draw(result: dict, image_path: Path) -> bytes:
    """The PNG: shares per layer with the cliff; relevance heatmap; a shallow layer's map."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("lvlm-prune explain draws with matplotlib: pip install 'lvlm-prune[bench]'")
    import numpy as np
    from PIL import Image

    flow = result["flow"]
    layers = flow["layers"]
    image = _as_processed(Image.open(image_path).convert("RGB"))
    fig, axes = plt.subplots(
        1, 3, figsize=(13.5, 4.2), gridspec_kw={"width_ratios": [1.5, 1, 1]}, dpi=90
    )

    ax = axes[0]
    xs = np.arange(len(layers))
    for part, colour in (("image", "#d1495b"), ("question", "#2e86ab"), ("system", "#7a7a7a")):
        ax.plot(xs, [100 * layer[part] for layer in layers], marker="o", color=colour, label=part)
    cliff = flow["cliff_layer"]
    if cliff >= 0:
        ax.axvline(cliff, color="#8a1c12", linestyle="--", linewidth=1.5)
        ax.annotate(
            f"cliff: layer {cliff}",
            (cliff, 95),
            xytext=(4, 0),
            textcoords="offset points",
            color="#8a1c12",
        )
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of the last token's attention (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(xs if len(xs) <= 16 else xs[:: max(1, len(xs) // 16)])
    ax.legend(loc="center right", frameon=False)
    ax.set_title("Information flow to the answer")

    (entry,) = result["per_image"][:1]
    grid = entry["scores"]
    _overlay(axes[1], image, grid, entry["kept_indices"])
    axes[1].set_title(
        f"Relevance ({entry['method']}), kept {entry['tokens_after']} of {entry['tokens_before']}"
    )
    maps = flow["image_map_layers"]
    if maps:
        shown = max((m for m in maps if m["layer"] <= MAP_LAYER), key=lambda m: m["layer"])
        _overlay(axes[2], image, shown["per_image"][0], entry["kept_indices"])
        axes[2].set_title(f"Question \u2192 image attention, layer {shown['layer']}")
    else:
        axes[2].axis("off")
    fig.suptitle(
        f"{result['model']}: \u201c{result['question']}\u201d  (keep {result['keep_ratio']:g})",
        fontsize=11,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _as_processed(image):
    """The centre square, as LLaVA-1.5's image processor crops it."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((336, 336))


def _overlay(ax, image, grid, kept) -> None:
    import numpy as np

    from .heatmap import colorize

    ax.imshow(image)
    ax.axis("off")
    if not grid or not isinstance(grid[0], list):
        return
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    finite = values[~np.isnan(values)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    scaled = (values - finite.min()) / span if span > 0 else np.zeros_like(values)
    colour = colorize(np.nan_to_num(scaled)).astype(float) / 255
    mask = np.zeros(values.size, dtype=bool)
    mask[np.asarray(kept, dtype=int)] = True
    alpha = np.where(mask.reshape(values.shape), 0.6, 0.85)[..., None]
    colour[~mask.reshape(values.shape)] *= 0.35  # dropped: dimmed
    rgba = np.concatenate([colour, alpha], axis=-1)
    ax.imshow(rgba, extent=(0, image.width, image.height, 0), interpolation="nearest")
