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

On the trained ShapesVQA model (``--model shapes``, or any folder it was saved to) the benchmark
asks fresh ShapesVQA questions of the version it answers instead (v3 for the released one;
``--seed`` replays a draw; equal counts per question type), in the task's own multiple-choice
form: the greedy next token restricted to the type's options. Per configuration it adds accuracy
per question type (and per kind of exists question), and the **object hit rate** of each
selection (the share of the asked object's patches kept, read from the engine's diagnostics): it
needs no LM and says why an answer survived. It also runs a control with every image swapped for
another scene's, which should bring accuracy to chance. The relevance query is the question text,
as the server sets it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import math
import random
import sys
from pathlib import Path

from lvlm_prune.kernels import PRUNE_METHODS

from . import common
from .benchmark import Benchmark, Context, model_stem

NAME = "fidelity"
LETTERS = "ABCDEFGH"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHAPES_RATIOS = (1.0, 0.3333, 0.2222, 0.11, 0.05)  # 576 / 192 / 128 / 64 / 29 tokens
SHAPES_METHODS = ("simignore", "cover", "simignore+merge", "uniform", "random", "flow", "flow/2")
"""``+merge``: with ``prune_merge``; ``flow/L``: the flow method with ``prune_layer`` L (``flow``
alone: the checkpoint's declared depth, 1 on the trained model, whose cliff is at layer 1; 2 is
the default for a model that declares none)."""
SHAPES_ITEMS_PER_TYPE = 200
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
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=None,
        help=f"keep ratios (default {' '.join(map(str, common.RATIOS))}; ShapesVQA model: "
        f"{' '.join(map(str, SHAPES_RATIOS))})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"methods (default {' '.join(common.METHODS)}; ShapesVQA model: "
        f"{' '.join(SHAPES_METHODS)}, where simignore+merge is simignore with prune_merge and "
        "flow/L the flow method with prune_layer L)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="ShapesVQA model: seed of the question draw (default: a fresh one, recorded)",
    )
    parser.add_argument(
        "--positions",
        nargs="+",
        choices=("original", "compact"),
        default=None,
        help="ShapesVQA model: run every pruned setting with each of these kept-token position "
        "rules (prune_positions) side by side; results in fidelity-MODEL-positions (default: the "
        "engine's default rule only)",
    )


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


def run(args: argparse.Namespace, ctx: Context) -> dict | None:
    from lvlm_prune.models.shapes import is_shapes_model

    if args.make_synthetic:
        items = make_synthetic(args.items or 40)
        write_jsonl(items, Path(args.make_synthetic))
        print(f"wrote {len(items)} synthetic items to {args.make_synthetic}")
        return None
    llm = ctx.llm
    if is_shapes_model(llm.llm_engine.vllm_config.model_config.model) and not args.data:
        return run_shapes(args, llm, ctx.label)
    return run_multiple_choice(args, llm, ctx.label)


def run_multiple_choice(args: argparse.Namespace, llm, model_label: str) -> dict:
    """The JSONL set (or a synthetic one) in LLaVA's ScienceQA prompt format."""
    from vllm import SamplingParams

    ratios = args.ratios or list(common.RATIOS)
    methods = args.methods or list(common.METHODS)
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
    configs = common.configs_for(ratios, methods)
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
    # The built-in models (lvlm_prune/models) leave a spec file beside their random weights.
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
    if result.get("task"):
        return shapes_markdown(result)

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


# --------------------------------------------------------------------------------------------
# The trained ShapesVQA model


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    keep_ratio: float
    method: str | None = None  # None: stock
    merge: bool = False
    prune_layer: int | None = None  # flow: the scout's depth (None: the model's default)
    positions: str | None = None  # the kept tokens' positions (None: the engine's default)

    @property
    def spec(self) -> str:
        """The method as ``--methods`` names it (``simignore+merge``, ``flow/2``, ...), and the
        position rule where ``--positions`` set one (``simignore [compact]``)."""
        merge = "+merge" if self.merge else ""
        layer = f"/{self.prune_layer}" if self.prune_layer is not None else ""
        positions = f" [{self.positions}]" if self.positions else ""
        return f"{self.method}{merge}{layer}{positions}"

    @property
    def name(self) -> str:
        if self.method is None:
            return "stock"
        return f"{self.spec}@{self.keep_ratio:g}"

    def mm_kwargs(self, question: str, *, seed: int, diag_id: int | None) -> dict:
        if self.method is None:
            return {"keep_ratio": 1.0}
        kwargs = {
            "keep_ratio": self.keep_ratio,
            "prune_method": self.method,
            "prune_merge": self.merge,
            "prune_query": question,  # what the server sets: the user's question text
            "prune_seed": seed,  # random: a draw per item, not per question text
        }
        if self.prune_layer is not None:
            kwargs["prune_layer"] = self.prune_layer
        if self.positions is not None:
            kwargs["prune_positions"] = self.positions
        if diag_id is not None:
            kwargs["prune_diagnostics"] = diag_id
        return kwargs


def shapes_configs(ratios, methods, positions=(None,)) -> list[ShapesConfig]:
    out = [ShapesConfig(1.0)]
    for ratio in ratios:
        if ratio >= 1.0:
            continue
        for method in methods:
            rest, _, layer = method.partition("/")
            base, _, merge = rest.partition("+")
            if (
                base not in PRUNE_METHODS
                or merge not in ("", "merge")
                or (layer and (base != "flow" or not layer.isdigit()))
            ):
                raise SystemExit(f"unknown method {method!r}: use one of {list(SHAPES_METHODS)}")
            out.extend(
                ShapesConfig(ratio, base, merge == "merge", int(layer) if layer else None, rule)
                for rule in positions
            )
    return out


def run_shapes(args: argparse.Namespace, llm, model_label: str) -> dict:
    from lvlm_prune.models.shapes import task_version
    from lvlm_prune.shapes import scenes

    version = task_version(llm.llm_engine.vllm_config.model_config.model)
    task, n_types = scenes.VERSIONS[version], len(scenes.VERSION_TYPES[version])
    n = args.items or (3 * n_types if args.smoke else SHAPES_ITEMS_PER_TYPE * n_types)
    n = n_types * math.ceil(n / n_types)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"{task} draw: seed={seed}, {n} questions", file=sys.stderr)
    items = scenes.sample(seed, n, per_type=True, version=version, stream_name="fidelity")
    images = [scene.image() for scene, _ in items]
    patches = [scene.object_patches() for scene, _ in items]
    configs = shapes_configs(
        args.ratios or SHAPES_RATIOS, args.methods or SHAPES_METHODS, args.positions or (None,)
    )
    # The control: every question asked about the next item's image (another scene).
    runs = [(c.name, c, images) for c in configs]
    runs.append(("mismatched image", ShapesConfig(1.0), images[1:] + images[:1]))
    runs.append(("stock (repeat)", ShapesConfig(1.0), images))
    predictions, kept, scores = _ask_shapes(llm, runs, items, seed, f"{NAME} ({model_label})")
    types = [q.type for _, q in items]
    return {
        "benchmark": NAME,
        "task": task,
        "model": model_label,
        "data": f"{task}, {n} fresh questions ({n // n_types} per type), seed {seed}",
        "seed": seed,
        "n_items": n,
        "chance_accuracy": sum(scenes.CHANCE[t] for t in types) / n,
        "chance_per_type": {t: scenes.CHANCE[t] for t in scenes.VERSION_TYPES[version]},
        "scoring": "greedy next token restricted to the question type's options "
        "(docs/shapesvqa.md multiple-choice form); relevance query = the question text",
        "relevance_scores": _score_summary(scores, items, patches) if scores else None,
        "note": None,
        "rows": _shapes_rows(runs, items, patches, predictions, kept),
    }


def _ask_shapes(llm, runs, items, seed: int, desc: str):
    """Every run's answers, the kept indices of every pruned run (from the engine's diagnostics)
    and the relevance scores of the first simignore run."""
    from vllm import SamplingParams

    from lvlm_prune.shapes import scenes

    tokenizer = llm.get_tokenizer()
    option_ids = {t: tokenizer.convert_tokens_to_ids(list(o)) for t, o in scenes.OPTIONS.items()}
    sampling = [
        SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=option_ids[q.type])
        for _, q in items
    ]
    n = len(items)
    predictions: dict[str, list[str]] = {}
    kept: dict[str, list[list[int]]] = {}
    scores: list | None = None
    bar = common.progress(len(runs) * n, desc)
    next_id = 1
    for name, config, imgs in runs:
        diag_ids = None
        if config.method is not None:
            diag_ids = list(range(next_id, next_id + n))
            next_id += n
        reqs = [
            {
                "prompt": f"USER: <image>\n{q.text} ASSISTANT:",
                "multi_modal_data": {"image": img},
                "mm_processor_kwargs": config.mm_kwargs(
                    q.text, seed=seed * 1000 + i, diag_id=None if diag_ids is None else diag_ids[i]
                ),
            }
            for i, ((_, q), img) in enumerate(zip(items, imgs))
        ]
        outs = llm.generate(reqs, sampling, use_tqdm=False)
        predictions[name] = [
            q.options[option_ids[q.type].index(o.outputs[0].token_ids[0])]
            for o, (_, q) in zip(outs, items)
        ]
        if diag_ids is not None:
            (diag,) = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=(diag_ids,))
            kept[name] = [diag[i][0]["kept_indices"] for i in diag_ids]
            if scores is None and config.method == "simignore":
                scores = [diag[i][0]["scores"] for i in diag_ids]
        bar.update(n)
    bar.close()
    return predictions, kept, scores


def _shapes_rows(runs, items, patches, predictions: dict, kept: dict) -> list[dict]:
    """One row per run: accuracy and agreement with stock, per type and per exists kind
    (``Question.subtype``: yes / absent / binding), and the object hit rate (both objects of a
    binding negative)."""
    from lvlm_prune.kernels import keep_count
    from lvlm_prune.shapes import scenes
    from lvlm_prune.shapes.evaluate import table_keys

    n = len(items)
    groups = [k for k in table_keys(items) if k != "all"]
    types = [{q.type, q.subtype} for _, q in items]
    stock = predictions["stock"]
    rows = []
    for name, config, _ in runs:
        pred = predictions[name]
        correct = [p == q.answer for p, (_, q) in zip(pred, items)]
        agree = [p == s for p, s in zip(pred, stock)]
        row = {
            "config": name,
            "keep_ratio": config.keep_ratio,
            "kept_tokens": keep_count(scenes.NUM_PATCHES, config.keep_ratio),
            "method": config.method,
            "merge": config.merge,
            "spec": config.spec if config.method else None,
            "positions": config.positions,
            "n": n,
            **_proportion("accuracy", correct),
            **_proportion("agreement_with_stock", agree),
            "per_type": {
                t: _proportion("accuracy", [c for c, ty in zip(correct, types) if t in ty])
                for t in groups
            },
            "predictions": pred,
        }
        if name in kept:
            hits = [
                scenes.object_hit_rate(scene, q, k, per_object)
                for (scene, q), k, per_object in zip(items, kept[name], patches)
            ]
            row["object_hit_rate"] = sum(hits) / n
            row["object_hit_rate_per_type"] = {
                t: _mean([h for h, ty in zip(hits, types) if t in ty]) for t in groups
            }
        elif config.method is None and name != "mismatched image":
            row["object_hit_rate"] = 1.0
        rows.append(row)
    stock_acc = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_vs_stock"] = row["accuracy"] / stock_acc if stock_acc else None
    return rows


def _proportion(key: str, flags: list[bool]) -> dict:
    hits = sum(flags)
    return {key: hits / len(flags), f"{key}_ci95": common.wilson_interval(hits, len(flags))}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _score_summary(scores, items, patches) -> dict:
    """Mean simignore score (best cosine to a question word) of the asked object's patches, of
    the other objects' patches and of the background: how word-like the image rows are."""
    asked, other, background = [], [], []
    for row, (scene, q), obj_patches in zip(scores, items, patches):
        on_object = scene.patch_coverage().sum(0) > 0
        for o, ps in enumerate(obj_patches):
            (asked if o in q.targets else other).extend(row[p] for p in ps)
        background.extend(s for s, on in zip(row, on_object) if not on)
    return {
        "asked_object": _mean(asked),
        "other_objects": _mean(other),
        "background": _mean(background),
        "background_p99": sorted(background)[int(0.99 * (len(background) - 1))],
    }


def shapes_headline(result: dict) -> list[str]:
    """One line per method: share of full-token accuracy kept at 64 and 29 tokens."""
    rows = {r["config"]: r for r in result["rows"]}
    lines = []
    specs = {r["spec"] for r in result["rows"] if r["method"]}
    order = {spec: i for i, spec in enumerate(SHAPES_METHODS)}
    for label in sorted(specs, key=lambda s: (order.get(s.split(" [")[0], len(order)), s)):
        parts = []
        stock = result["rows"][0]["per_type"]
        for ratio in (0.11, 0.05):
            row = rows.get(f"{label}@{ratio:g}")
            if row:
                location = ""
                if "location" in row["per_type"] and stock["location"]["accuracy"]:
                    kept = row["per_type"]["location"]["accuracy"] / stock["location"]["accuracy"]
                    hit = (row.get("object_hit_rate_per_type") or {}).get("location")
                    location = f", location {100 * kept:.1f}%" + (
                        f" (location hit rate {100 * hit:.0f}%)" if hit is not None else ""
                    )
                parts.append(
                    f"{row['kept_tokens']} tokens: {100 * row['accuracy_vs_stock']:.1f}% of "
                    f"full-token accuracy (object hit rate {100 * row['object_hit_rate']:.0f}%)"
                    f"{location}"
                )
        if parts:
            lines.append(f"- `{label}` — " + "; ".join(parts))
    return lines


def shapes_markdown(result: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ci(row, key):
        lo, hi = row[f"{key}_ci95"]
        return f"{pct(row[key])} ({pct(lo)}–{pct(hi)})"

    groups = list(result["rows"][0]["per_type"])
    headers = [
        "config",
        "tokens",
        "accuracy (95% CI)",
        *groups,
        "agreement with stock (95% CI)",
        "object hit rate",
        *(f"hit rate {t}" for t in ("location", "exists/binding") if t in groups),
    ]
    rows = [
        [
            r["config"],
            r["kept_tokens"],
            ci(r, "accuracy"),
            *(ci(r["per_type"][t], "accuracy") for t in groups),
            ci(r, "agreement_with_stock"),
            pct(r.get("object_hit_rate")),
            *(
                pct((r.get("object_hit_rate_per_type") or {}).get(t))
                for t in ("location", "exists/binding")
                if t in groups
            ),
        ]
        for r in result["rows"]
    ]
    chance = result["chance_per_type"]
    chances = ", ".join(f"{t} {pct(c)}" for t, c in chance.items())
    lines = [
        f"### Fidelity — model `{result['model']}` on {result['task']}",
        "",
        f"Data: {result['data']}. Scoring: {result['scoring']}. Intervals: Wilson 95%. Chance: "
        f"{pct(result['chance_accuracy'])} overall ({chances}). `mismatched image`: each "
        "question asked about another scene's image (the answer must come from the image). "
        "Object hit rate: the share of the asked object's patches the selection kept (both "
        "objects' for a binding negative). exists/yes, exists/absent, exists/binding: the exists "
        "questions by answer and kind of negative.",
        "",
        "Headline (accuracy relative to the unpruned model):",
        *shapes_headline(result),
    ]
    scores = result.get("relevance_scores")
    if scores:
        lines += [
            "",
            "Relevance scores (simignore: best cosine of an image row to a question word), mean "
            f"over patches: asked object {scores['asked_object']:.2f}, other objects "
            f"{scores['other_objects']:.2f}, background {scores['background']:.2f} (99th "
            f"percentile {scores['background_p99']:.2f}).",
        ]
    lines += ["", common.markdown_table(headers, rows)]
    return "\n".join(lines)


@common.figure
def plot(result: dict, plt):
    """ShapesVQA model: accuracy and object hit rate vs kept tokens, one line per method."""
    if not result.get("task"):
        return None
    rows = result["rows"]
    stock = rows[0]
    control = next(r for r in rows if r["config"] == "mismatched image")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "simignore": "o-",
        "cover": "P-",
        "simignore+merge": "D--",
        "uniform": "s-",
        "random": "^-",
        "flow": "v-",
        "flow/2": "v--",
    }
    for label, style in styles.items():
        pts = [r for r in rows if r["method"] and r.get("spec") == label]
        if not pts:
            continue
        pts = [stock] + pts
        shift = 1 + 0.02 * (list(styles).index(label) - 2.5)  # keep the intervals apart
        xs = [r["kept_tokens"] * shift for r in pts]
        acc = [r["accuracy"] for r in pts]
        err = [  # clamped: at 0 % or 100 % the interval's bound can sit a rounding error inside
            [max(0.0, a - r["accuracy_ci95"][0]) for a, r in zip(acc, pts)],
            [max(0.0, r["accuracy_ci95"][1] - a) for a, r in zip(acc, pts)],
        ]
        axes[0].errorbar(xs, acc, yerr=err, fmt=style, capsize=3, label=label, ms=5)
        axes[1].plot(xs, [r["object_hit_rate"] for r in pts], style, label=label, ms=5)
    axes[0].axhline(result["chance_accuracy"], color="grey", ls=":", label="chance")
    axes[0].axhline(control["accuracy"], color="k", ls="--", lw=1, label="mismatched image")
    axes[0].set_ylabel("accuracy (95% CI)")
    axes[0].set_title(f"{result['task']}: accuracy — model {result['model']}")
    axes[1].set_ylabel("share of the asked object's patches kept")
    axes[1].set_title("object hit rate of the selection")
    ticks = sorted({r["kept_tokens"] for r in rows})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("image tokens kept (of 576)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def stem(args: argparse.Namespace, ctx: Context) -> str:
    """``fidelity-MODEL``, ``-positions`` when ``--positions`` compares position rules."""
    return model_stem(args, ctx) + ("-positions" if args.positions else "")


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, plot, stem=stem)
