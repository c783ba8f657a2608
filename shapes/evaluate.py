"""Held-out accuracy of a ShapesVQA checkpoint in vLLM, as a user meets it.

``python -m lvlm_prune.shapes.evaluate [--model DIR] [--items 1000] [--seed S]`` asks fresh
questions through vLLM's chat path (LLaVA-1.5's template, the image as a PNG data URL, greedy),
scores each reply by its first word (SHAPES.md), and repeats the set with every image swapped for
another scene's (the control: accuracy must fall to chance when the answer has to come from the
image). Prints accuracy per question type with 95 % intervals, as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import time

from . import scenes
from .model import released_model_dir


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


def accuracy_by_type(items, replies) -> dict[str, float]:
    out = {}
    for t in scenes.QUESTION_TYPES:
        hits = [scenes.score_reply(r, q) for (_, q), r in zip(items, replies) if q.type == t]
        out[t] = sum(hits) / len(hits) if hits else float("nan")
    out["all"] = sum(scenes.score_reply(r, q) for (_, q), r in zip(items, replies)) / len(items)
    return out


def _with_intervals(items, replies) -> dict:
    from lvlm_prune.benchmarks.common import wilson_interval

    out = {}
    for t in (*scenes.QUESTION_TYPES, "all"):
        flags = [
            scenes.score_reply(r, q) for (_, q), r in zip(items, replies) if t in ("all", q.type)
        ]
        out[t] = {
            "accuracy": sum(flags) / len(flags),
            "ci95": wilson_interval(sum(flags), len(flags)),
            "n": len(flags),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlm_prune.shapes.evaluate")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: released)")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    args = parser.parse_args(argv)

    from lvlm_prune import envs

    envs.use_offline_defaults()
    from vllm import LLM

    model_dir = args.model or str(released_model_dir())
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed={seed}", file=sys.stderr)
    llm = LLM(model_dir, enforce_eager=True, max_model_len=2048, seed=0)
    items = scenes.sample(seed, args.items)
    images = [scene.image() for scene, _ in items]
    start = time.perf_counter()
    replies = ask(llm, items, images)
    swapped = ask(llm, items, images[1:] + images[:1])
    result = {
        "model": model_dir,
        "seed": seed,
        "items": args.items,
        "chance": sum(scenes.CHANCE[q.type] for _, q in items) / len(items),
        "accuracy": _with_intervals(items, replies),
        "swapped_image_accuracy": _with_intervals(items, swapped),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
