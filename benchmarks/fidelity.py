"""Multiple-choice fidelity: does pruning change the answer? (ScienceQA-style JSONL.)

Each line: ``{"image": <path | base64 | data URL>, "question": str, "options": [str, ...],
"answer": <letter | index>}``; a relative image path is read from the JSONL's folder. The prompt is
LLaVA-1.5's ScienceQA format (options as ``A. ...`` lines, "Answer with the option's letter from
the given choices directly."). The answer is the greedy next token restricted to the option
letters (``SamplingParams.allowed_token_ids``); its logprob is kept too.

Every configuration (stock, each ratio × method, and stock once more as a determinism check) runs
the whole set as one batch, in the same order, in the same engine. Reported per configuration:
accuracy against the key and agreement with the unpruned answer, each with a 95% Wilson interval.
With random weights (the built-in models) accuracy is chance; only agreement means anything.

``--make-synthetic PATH [--items N]`` writes a set of random images and made-up questions.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
from pathlib import Path

from . import common

NAME = "fidelity"
LETTERS = "ABCDEFGH"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
RANDOM_WEIGHTS_NOTE = (
    "random weights: accuracy is chance level and says nothing; only agreement with the unpruned "
    "answer is meaningful"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="JSONL set; default: a synthetic set made on the fly")
    parser.add_argument(
        "--items", type=int, default=None, help="synthetic set size (default 40; smoke 6)"
    )
    parser.add_argument(
        "--make-synthetic", metavar="PATH", help="write a synthetic JSONL set and exit"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=list(common.RATIOS))
    parser.add_argument("--methods", nargs="+", default=list(common.METHODS))


# --------------------------------------------------------------------------------------------
# Data

_SUBJECTS = [
    "the car",
    "the sky",
    "the dog",
    "the sign",
    "the cup",
    "the house",
    "the tree",
    "the bird",
]
_ASPECTS = ["color", "shape", "position", "size", "material"]
_WORDS = [
    "red",
    "blue",
    "green",
    "left",
    "right",
    "round",
    "square",
    "small",
    "large",
    "wooden",
    "metal",
    "top",
    "bottom",
    "yellow",
    "white",
    "black",
]


def make_synthetic(n: int, *, seed: int = 0) -> list[dict]:
    """Random images and made-up questions: enough to run the harness, nothing to learn from."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        options = rng.sample(_WORDS, rng.choice([2, 3, 4]))
        buf = io.BytesIO()
        common.make_image(3_000_000 + seed * 100_000 + i).save(buf, format="PNG")
        items.append(
            {
                "id": f"synthetic-{seed}-{i}",
                "image": base64.b64encode(buf.getvalue()).decode(),
                "question": f"What is the {rng.choice(_ASPECTS)} of {rng.choice(_SUBJECTS)}?",
                "options": options,
                "answer": LETTERS[rng.randrange(len(options))],
            }
        )
    return items


def write_jsonl(items: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def load_jsonl(path: Path) -> list[dict]:
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        missing = {"image", "question", "options", "answer"} - item.keys()
        if missing:
            raise ValueError(f"{path}:{lineno}: missing {sorted(missing)}")
        if not 2 <= len(item["options"]) <= len(LETTERS):
            raise ValueError(f"{path}:{lineno}: options must number 2..{len(LETTERS)}")
        item["_base"] = path.parent
        items.append(item)
    return items


def answer_index(item: dict) -> int:
    answer = item["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    else:
        raise ValueError(f"answer must be a letter or an index, got {answer!r}")
    if not 0 <= index < len(item["options"]):
        raise ValueError(f"answer {answer!r} out of range for {len(item['options'])} options")
    return index


def load_image(item: dict):
    from PIL import Image

    ref = item["image"]
    if ref.startswith("data:"):
        data = base64.b64decode(ref.split(",", 1)[1])
    else:
        path = Path(ref)
        if not path.is_absolute():
            path = Path(item.get("_base", ".")) / path
        if len(ref) < 1024 and path.is_file():
            return Image.open(path).convert("RGB")
        data = base64.b64decode(ref, validate=True)
    return Image.open(io.BytesIO(data)).convert("RGB")


def prompt_for(item: dict) -> str:
    lines = [item["question"]] + [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(item["options"])]
    return "USER: <image>\n" + "\n".join(lines) + "\n" + INSTRUCTION + " ASSISTANT:"


def letter_token_ids(tokenizer, count: int) -> list[int]:
    """One token id for each of the first ``count`` option letters, as written after ``ASSISTANT:``.

    Per letter, the form with a leading space (" A", what follows "ASSISTANT:" in LLaVA's training
    data) where the tokenizer makes it one token, else the bare letter.
    """
    ids = []
    for letter in LETTERS[:count]:
        for form in (f" {letter}", letter):
            encoded = tokenizer.encode(form, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] != tokenizer.unk_token_id:
                ids.append(encoded[0])
                break
        else:
            raise ValueError(
                f"the tokenizer has no single-token form of the option letter {letter}"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"option letters share token ids: {ids}")
    return ids


# --------------------------------------------------------------------------------------------
# Run


def run(args: argparse.Namespace, llm, model_label: str) -> dict:
    from vllm import SamplingParams

    if args.data:
        items, source = load_jsonl(Path(args.data)), str(args.data)
    else:
        n = args.items or (6 if args.smoke else 40)
        items, source = make_synthetic(n), f"synthetic ({n} items, generated in memory, seed 0)"
    letter_ids = letter_token_ids(llm.get_tokenizer(), max(len(item["options"]) for item in items))
    images = [load_image(item) for item in items]
    truth = [answer_index(item) for item in items]
    sampling = [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=1,
            allowed_token_ids=letter_ids[: len(item["options"])],
        )
        for item in items
    ]
    configs = common.configs_for(args.ratios, args.methods)
    runs = [(c.name, c) for c in configs] + [("stock (repeat)", common.Config(1.0))]

    predictions: dict[str, list[int]] = {}
    bar = common.progress(len(runs) * len(items), f"{NAME} ({model_label})")
    for name, config in runs:
        reqs = [
            {
                "prompt": prompt_for(item),
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": config.mm_kwargs(),
            }
            for item, image in zip(items, images)
        ]
        outs = llm.generate(reqs, sampling, use_tqdm=False)
        predictions[name] = [letter_ids.index(o.outputs[0].token_ids[0]) for o in outs]
        bar.update(len(items))
    bar.close()

    stock = predictions["stock"]
    rows = []
    for name, config in runs:
        pred = predictions[name]
        correct = sum(p == t for p, t in zip(pred, truth))
        agree = sum(p == s for p, s in zip(pred, stock))
        rows.append(
            {
                "config": name,
                "keep_ratio": config.keep_ratio,
                "method": None if config.stock else config.method,
                "n": len(items),
                "accuracy": correct / len(items),
                "accuracy_ci95": common.wilson_interval(correct, len(items)),
                "agreement_with_stock": agree / len(items),
                "agreement_ci95": common.wilson_interval(agree, len(items)),
                "predictions": [LETTERS[p] for p in pred],
            }
        )
    # The built-in models (tiny_models.py) leave a spec file beside their random weights.
    model_path = Path(llm.llm_engine.vllm_config.model_config.model)
    random_weights = (model_path / "lvlm_prune_spec.json").exists()
    return {
        "benchmark": NAME,
        "model": model_label,
        "data": source,
        "n_items": len(items),
        "chance_accuracy": sum(1 / len(item["options"]) for item in items) / len(items),
        "scoring": "greedy next token restricted to the option letters (allowed_token_ids)",
        "note": RANDOM_WEIGHTS_NOTE if random_weights else None,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%"

    headers = ["config", "accuracy (95% CI)", "agreement with stock (95% CI)"]
    rows = [
        [
            r["config"],
            f"{pct(r['accuracy'])} ({pct(r['accuracy_ci95'][0])}–{pct(r['accuracy_ci95'][1])})",
            f"**{pct(r['agreement_with_stock'])}** ({pct(r['agreement_ci95'][0])}–"
            f"{pct(r['agreement_ci95'][1])})",
        ]
        for r in result["rows"]
    ]
    lines = [
        f"### Fidelity — model `{result['model']}`",
        "",
        f"Data: {result['data']}; {result['n_items']} items; chance accuracy "
        f"{pct(result['chance_accuracy'])}. Scoring: {result['scoring']}. Intervals: Wilson 95%.",
    ]
    if result["note"]:
        lines.append(f"**Note — {result['note']}.**")
    lines += ["", common.markdown_table(headers, rows)]
    return "\n".join(lines)
