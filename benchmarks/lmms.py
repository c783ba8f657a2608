"""lmms-eval, the harness teams already run, against a real ``lvlm-prune serve`` with presets.

Fresh ShapesVQA questions are drawn here and written as the lmms-eval task in
``lmms_tasks/shapesvqa`` reads them (``shapesvqa.jsonl``, images inline); one server serves the
trained model with one pruning preset per keep ratio (``MODEL:keep-R``), and lmms-eval's ``openai``
model (``OpenAICompatible``, which sends no extra body) evaluates each preset by its model name.
Beside it, the same questions through the same server as ``shapes.evaluate`` asks them (image,
then question, ``pruning.keep_ratio``): accuracy per question type with Wilson intervals, and how
many answers the two agree on. The server's ``lvlm_prune_requests_total{preset=...}`` confirms
each preset's requests were pruned as the preset says.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common, harness
from .benchmark import Benchmark, Context

NAME = "lmms-eval"
TASK = "shapesvqa"
TASK_DIR = Path(__file__).resolve().parent / "lmms_tasks" / TASK
EVAL_VENV = Path(".venv-eval")
"""Where ``make eval`` installs lmms-eval (layered over .venv: its pins stay out of it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.11])
    common.add_scaled(parser, "--items", "fresh questions, a quarter per type", full=400, smoke=20)
    parser.add_argument(
        "--seed", type=int, default=None, help="the questions' seed (default: fresh)"
    )
    parser.add_argument(
        "--python",
        default=None,
        help="the Python that runs lmms-eval (default: this one if it has lmms_eval, else "
        f"{EVAL_VENV}/bin/python, which `make eval` installs)",
    )
    parser.add_argument("--server-timeout", type=float, default=600)


def lmms_eval_python(given: str | None) -> str:
    if given:
        return given
    if importlib.util.find_spec("lmms_eval") is not None:
        return sys.executable
    venv = EVAL_VENV / "bin" / "python"
    if venv.exists():
        return str(venv.absolute())  # not resolve(): the link is what makes it the venv
    sys.exit(
        "lvlm-prune bench lmms-eval: lmms-eval is not installed: `make eval` (a venv layered "
        "over .venv) or `pip install 'lvlm-prune[eval]'`, or name its Python with --python"
    )


def preset_name(ratio: float) -> str:
    return f"keep-{ratio:g}"


def run(args: argparse.Namespace, ctx: Context) -> dict:
    from lvlm_prune.models.shapes import MODEL_NAME, released_model_dir
    from lvlm_prune.shapes import scenes

    if args.model not in (None, "shapes"):
        sys.exit("lvlm-prune bench lmms-eval: runs on the trained ShapesVQA model (--model shapes)")
    python = lmms_eval_python(args.python)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    items = scenes.sample(seed, args.items, per_type=True)
    ratios = sorted(set(args.ratios), reverse=True)
    presets = {preset_name(r): {"keep_ratio": r} for r in ratios}
    options = [
        *harness.server_options(MODEL_NAME, max_model_len=args.max_model_len, dtype=args.dtype),
        *(a for name, p in presets.items() for a in ("--preset", f"{name}={json.dumps(p)}")),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lvlm-prune-lmms-") as tmp:
        work = Path(tmp)
        write_task_data(items, work / f"{TASK}.jsonl")
        with harness.serve(
            [str(released_model_dir()), *options], timeout=args.server_timeout
        ) as srv:
            for ratio in ratios:
                model = f"{MODEL_NAME}:{preset_name(ratio)}"
                before = srv.metrics()
                lmms = run_lmms_eval(python, srv.url, model, work)
                counted = harness.metric(
                    srv.metrics(), "lvlm_prune_requests_total", preset=model
                ) - harness.metric(before, "lvlm_prune_requests_total", preset=model)
                ours = ask_ours(srv, items, ratio, MODEL_NAME)
                rows.append(_row(ratio, model, items, lmms, ours, counted))
    return {
        "benchmark": NAME,
        "model": MODEL_NAME,
        "settings": {
            "items": len(items),
            "seed": seed,
            "ratios": ratios,
            "presets": {f"{MODEL_NAME}:{n}": p for n, p in presets.items()},
            "lmms_eval": _lmms_eval_version(python),
            "lmms_eval_command": "python -m lmms_eval --model openai --model_args "
            "model_version=MODEL:PRESET,base_url=URL/v1,api_key=none --tasks shapesvqa "
            f"--include_path {TASK_DIR.relative_to(TASK_DIR.parents[2])} --batch_size 1 "
            "--log_samples (in the folder holding shapesvqa.jsonl)",
            "ours": "shapes.evaluate's message (image, then question) through the same server, "
            "pruning.keep_ratio in the request, max_tokens 4, temperature 0",
        },
        "rows": rows,
    }


def write_task_data(items, path: Path) -> None:
    """The questions as ``lmms_tasks/shapesvqa`` reads them: one JSON line each, image inline."""
    with open(path, "w") as f:
        for i, (scene, q) in enumerate(items):
            buf = io.BytesIO()
            scene.image().save(buf, format="PNG")
            line = {"id": i, "question": q.text, "answer": q.answer, "type": q.type}
            f.write(json.dumps({**line, "image": base64.b64encode(buf.getvalue()).decode()}) + "\n")


def run_lmms_eval(python: str, url: str, model: str, work: Path) -> dict:
    """One lmms-eval run of the task against ``model``: its per-question replies by doc id and
    its aggregated metrics."""
    out = work / "out" / model.replace(":", "_")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    command = [
        *(python, "-m", "lmms_eval", "--model", "openai"),
        *("--model_args", f"model_version={model},base_url={url}/v1,api_key=none"),
        *("--tasks", TASK, "--include_path", str(TASK_DIR), "--batch_size", "1"),
        *("--output_path", str(out), "--log_samples"),
    ]
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    if proc.returncode != 0 or not results or not samples:
        raise RuntimeError(f"lmms-eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    metrics = json.loads(results[-1].read_text())["results"][TASK]
    replies = {}
    for line in samples[-1].read_text().splitlines():
        sample = json.loads(line)
        replies[sample["doc_id"]] = _first(sample.get("filtered_resps", sample.get("resps")))
    return {"metrics": metrics, "replies": replies}


def _first(resps):
    while isinstance(resps, list):
        resps = resps[0]
    return resps


def ask_ours(server: harness.Server, items, ratio: float, model: str) -> list[str]:
    from lvlm_prune.shapes.evaluate import chat_message

    replies = []
    for scene, q in items:
        body = {
            "model": model,
            "messages": chat_message(q.text, scene.image()),
            "max_tokens": 4,
            "temperature": 0.0,
            "pruning": {"keep_ratio": ratio},
        }
        replies.append(server.chat(body)["choices"][0]["message"]["content"] or "")
    return replies


def _row(ratio, model, items, lmms, ours, counted) -> dict:
    from lvlm_prune.shapes.scenes import first_word, score_reply

    theirs = [lmms["replies"].get(i, "") for i in range(len(items))]
    row = {"keep_ratio": ratio, "model": model, "requests_under_preset": counted}
    for who, replies in (("lmms_eval", theirs), ("ours", ours)):
        per_type: dict[str, list[bool]] = {}
        for (_, q), reply in zip(items, replies):
            per_type.setdefault(q.type, []).append(score_reply(reply or "", q))
        correct = [c for v in per_type.values() for c in v]
        row[who] = {
            "accuracy": sum(correct) / len(correct),
            "ci95": common.wilson_interval(sum(correct), len(correct)),
            "per_type": {t: sum(v) / len(v) for t, v in per_type.items()},
        }
    row["lmms_eval"]["reported"] = {
        k.split(",")[0]: v for k, v in lmms["metrics"].items() if not k.endswith("stderr,none")
    }
    row["same_answer"] = sum(
        first_word(a or "") == first_word(b or "") for a, b in zip(theirs, ours)
    ) / len(items)
    return row


def _lmms_eval_version(python: str) -> str | None:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('lmms_eval'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or None


def markdown(result: dict) -> str:
    s = result["settings"]
    types = list(result["rows"][0]["ours"]["per_type"])
    headers = [
        "preset (model name)",
        "keep",
        "lmms-eval accuracy (95% CI)",
        *(f"lmms-eval {t}" for t in types),
        "ours, same questions (95% CI)",
        "same answer",
        "requests under the preset",
    ]

    def ci(who: dict) -> str:
        lo, hi = who["ci95"]
        return f"{100 * who['accuracy']:.1f}% ({100 * lo:.1f}–{100 * hi:.1f}%)"

    rows = [
        [
            f"`{r['model']}`",
            f"{r['keep_ratio']:g}",
            ci(r["lmms_eval"]),
            *(f"{100 * r['lmms_eval']['per_type'][t]:.1f}%" for t in types),
            ci(r["ours"]),
            f"{100 * r['same_answer']:.1f}%",
            f"{r['requests_under_preset']:.0f}",
        ]
        for r in result["rows"]
    ]
    return "\n".join(
        [
            f"### lmms-eval against `lvlm-prune serve` — model `{result['model']}`",
            "",
            f"{s['items']} fresh ShapesVQA questions (seed {s['seed']}, a quarter per type), one "
            f"server with one preset per keep ratio; lmms-eval {s['lmms_eval']}'s `openai` model "
            "asks each preset by its model name and sends no extra body: "
            f"`{s['lmms_eval_command']}`. Ours: {s['ours']}. Same answer: both replies' first "
            "word equal. Requests under the preset: the server's "
            "`lvlm_prune_requests_total{preset=...}` during lmms-eval's run (pruned as the preset "
            "says). lmms-eval's own aggregate is in the JSON (`reported`). Compare with the "
            "fidelity table ([fidelity-shapes.md](fidelity-shapes.md)).",
            "",
            common.markdown_table(headers, rows),
        ]
    )


def stem(args: argparse.Namespace, ctx: Context) -> str:
    return f"{NAME}-shapes"


BENCHMARK = Benchmark(NAME, __doc__, add_arguments, run, markdown, stem=stem)
