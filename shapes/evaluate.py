"""Held-out accuracy of a ShapesVQA checkpoint in vLLM, as a user meets it.

``python -m lvlm_prune.shapes.evaluate [--model DIR] [--items 1000] [--seed S]`` asks fresh
questions through vLLM's chat path (LLaVA-1.5's template, the image as a PNG data URL, greedy),
scores each reply by its first word (docs/shapesvqa.md), and repeats the set with every image
swapped for another scene's (the control: accuracy must fall to chance when the answer has to come
from the image). Prints accuracy per question type with 95 % intervals, as JSON.

``--position-check K [K ...]`` instead measures, in transformers, how much of what pruning to K
rows costs comes from the question moving closer to the image rows (RoPE distances the model
never saw in training) rather than from rows lost (see :func:`position_check`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import time
from pathlib import Path

import torch

from lvlm_prune.models.shapes import released_model_dir, task_version

from . import scenes


def chat_message(question: str, image) -> list[dict]:
    """The user message as the openai client sends it: an image part, then the question."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def ask(llm, items, images, *, mm_processor_kwargs: dict | None = None) -> list[str]:
    """Greedy replies of an in-process ``vllm.LLM`` to each (scene, question) with ``images``."""
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    messages = [chat_message(q.text, img) for (_, q), img in zip(items, images)]
    kwargs = {"mm_processor_kwargs": mm_processor_kwargs} if mm_processor_kwargs else {}
    outs = llm.chat(messages, sampling, use_tqdm=False, **kwargs)
    return [o.outputs[0].text for o in outs]


def table_keys(items) -> list[str]:
    """The rows of an accuracy table: each type asked, exists' kinds (yes / absent / binding),
    and all."""
    asked = {q.type for _, q in items} | {q.subtype for _, q in items}
    keys = [t for t in scenes.QUESTION_TYPES if t in asked]
    keys += sorted(k for k in asked if k.startswith("exists/"))
    return [*keys, "all"]


def _with_intervals(items, replies) -> dict:
    from lvlm_prune.benchmarks.common import wilson_interval

    out = {}
    for t in table_keys(items):
        flags = [
            scenes.score_reply(r, q)
            for (_, q), r in zip(items, replies)
            if t in ("all", q.type, q.subtype)
        ]
        out[t] = {
            "accuracy": sum(flags) / len(flags),
            "ci95": wilson_interval(sum(flags), len(flags)),
            "n": len(flags),
        }
    return out


@torch.no_grad()
def position_check(model_dir, items, keep_counts, *, batch: int = 20) -> dict:
    """Accuracy after simignore keeps K image rows, with the rows at consecutive positions (what
    vLLM does for LLaVA: the question moves up to follow the K rows) and at their unpruned
    positions (the question where it would be unpruned). transformers, not vLLM: vLLM has no
    hook for a LLaVA prompt's position ids. Greedy over the question type's options.

    Tells whether answers lost to pruning were lost with the rows or with the shift in RoPE
    distances between the question and the rows it reads.
    """
    from lvlm_prune.kernels import select_tokens
    from lvlm_prune.models import shapes as shapes_model

    from .train import vision_rows

    model, processor = shapes_model.load_model(model_dir)
    tokenizer = processor.tokenizer
    embed = model.get_input_embeddings()
    lm = model.model.language_model
    head = tokenizer.encode("USER:", add_special_tokens=True)
    tail = tokenizer.encode("ASSISTANT:", add_special_tokens=False)
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        pixels = torch.stack([torch.from_numpy(scene.pixels()) for scene, _ in chunk])
        rows = vision_rows(model, shapes_model.pixel_values(pixels))
        for (_, q), image_rows in zip(chunk, rows):
            question = tokenizer.encode(q.text, add_special_tokens=False)
            query = embed(torch.tensor(question))
            text_after = embed(torch.tensor(question + tail))
            options = tokenizer.convert_tokens_to_ids(list(q.options))
            for k in keep_counts:
                (sel,) = select_tokens(
                    [image_rows], [query], [k], methods=["simignore"], merge=[False], seeds=[0]
                )
                embeds = torch.cat([embed(torch.tensor(head)), sel.rows, text_after])[None]
                n_head, n_after = len(head), len(text_after)
                consecutive = torch.arange(embeds.shape[1])
                unpruned = torch.cat(
                    [
                        torch.arange(n_head),
                        n_head + sel.kept,
                        n_head + scenes.NUM_PATCHES + torch.arange(n_after),
                    ]
                )
                for name, pos in (("consecutive", consecutive), ("unpruned", unpruned)):
                    hidden = lm(inputs_embeds=embeds, position_ids=pos[None]).last_hidden_state
                    logits = model.lm_head(hidden[0, -1])[options]
                    right = q.options[int(logits.argmax())] == q.answer
                    hits.setdefault(f"{k}/{name}/{q.type}", []).append(right)
                    hits.setdefault(f"{k}/{name}/all", []).append(right)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlm_prune.shapes.evaluate")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: released)")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    parser.add_argument(
        "--position-check",
        type=int,
        nargs="+",
        metavar="K",
        help="instead: simignore keeps K rows; accuracy with the rows at consecutive vs unpruned "
        "positions (transformers)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="also write OUT.json and OUT.md with the machine and the command (e.g. "
        "benchmarks/results/accuracy-shapes)",
    )
    args = parser.parse_args(argv)
    model_dir = args.model or str(released_model_dir())
    version = task_version(model_dir)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed={seed}", file=sys.stderr)
    if args.position_check:
        items = scenes.sample(seed, args.items, per_type=True, version=version)
        result = position_check(model_dir, items, args.position_check)
        print(json.dumps({"seed": seed, "items": args.items, "accuracy": result}, indent=2))
        return 0

    from lvlm_prune import envs

    envs.use_offline_defaults()
    from vllm import LLM

    from lvlm_prune.benchmarks import common

    # Before the run, so its load average is the one at the start.
    machine = common.machine_info() if args.out is not None else None
    llm = LLM(model_dir, enforce_eager=True, max_model_len=2048, seed=0)
    items = scenes.sample(seed, args.items, version=version)
    images = [scene.image() for scene, _ in items]
    start = time.perf_counter()
    replies = ask(llm, items, images)
    swapped = ask(llm, items, images[1:] + images[:1])
    result = {
        "model": model_dir,
        "task": scenes.VERSIONS[version],
        "seed": seed,
        "items": args.items,
        "chance": sum(scenes.CHANCE[q.type] for _, q in items) / len(items),
        "accuracy": _with_intervals(items, replies),
        "swapped_image_accuracy": _with_intervals(items, swapped),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        command = "python -m lvlm_prune.shapes.evaluate " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        write_results(args.out, result, command, machine, released=args.model is None)
    return 0


def write_results(out: Path, result: dict, command: str, machine: dict, *, released: bool) -> None:
    """``out``.json and ``out``.md: the accuracy per type with intervals, and the control."""
    from lvlm_prune.benchmarks import common

    # The model by name, not by where it sits on this machine.
    model = "lvlm-prune-shapes (released)" if released else Path(result["model"]).name
    payload = {**result, "model": model, "command": command, "machine": machine}
    files = common.write_results(out.parent, out.name, payload, "")  # sets the end's load
    rows = []
    for t in result["accuracy"]:
        acc, swapped = result["accuracy"][t], result["swapped_image_accuracy"][t]
        low, high = acc["ci95"]
        rows.append(
            [
                t,
                f"{acc['accuracy']:.1%} ({low:.1%}–{high:.1%})",
                acc["n"],
                f"{swapped['accuracy']:.1%}",
            ]
        )
    markdown = "\n\n".join(
        [
            f"### Accuracy — {model} on {result['task']}",
            f"{result['items']} fresh questions (seed {result['seed']}), greedy through vLLM's "
            f"chat path; `swapped image`: each question asked about the next scene's image "
            f"(chance {result['chance']:.1%}). {result['seconds']} s for both passes.",
            common.markdown_table(
                ["type", "accuracy (95% CI)", "questions", "swapped image"], rows
            ),
            common.machine_markdown(payload["machine"], command),
        ]
    )
    files["md"].write_text(markdown + "\n")
    print(f"wrote {files['json']} and {files['md']}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
