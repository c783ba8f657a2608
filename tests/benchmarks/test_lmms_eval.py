"""lmms-eval for real against a real ``lvlm-prune serve`` with presets (``bench lmms-eval
--smoke``: 20 fresh ShapesVQA questions, keep 1.0 and 0.25), and the task's scoring against ours.

lmms-eval runs from ``.venv-eval`` (``make eval``, which ``make test`` installs); without it the
tests that run it are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lvlm_prune.benchmarks import lmms

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / lmms.EVAL_VENV / "bin" / "python"

needs_lmms_eval = pytest.mark.skipif(
    not PYTHON.exists(), reason="needs lmms-eval in .venv-eval (make eval)"
)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lmms")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lvlm_prune.benchmarks", "lmms-eval", "--smoke"),
            *("--ratios", "1.0", "0.25", "--python", str(PYTHON), "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "lmms-eval-shapes.json").read_text())


@needs_lmms_eval
def test_each_preset_is_evaluated_by_model_name_and_pruned_as_it_says(result):
    rows = {r["keep_ratio"]: r for r in result["rows"]}
    assert list(rows) == [1.0, 0.25]
    items = result["settings"]["items"]
    assert items == 20
    for ratio, row in rows.items():
        assert row["model"] == f"lvlm-prune-shapes:keep-{ratio:g}"
        # Every request lmms-eval sent reached the preset: none fell back to the server default.
        assert row["requests_under_preset"] == items


@needs_lmms_eval
def test_lmms_eval_agrees_with_our_evaluation_on_the_same_questions(result):
    full = result["rows"][0]
    theirs, ours = full["lmms_eval"], full["ours"]
    assert ours["accuracy"] >= 0.9  # the trained model on fresh questions, unpruned
    low, high = ours["ci95"]
    assert low <= theirs["accuracy"] <= high
    assert full["same_answer"] >= 0.9
    # The task's own aggregate (utils.py) is the accuracy we compute from its replies.
    for row in result["rows"]:
        reported = row["lmms_eval"]["reported"]
        assert reported["accuracy"] == pytest.approx(row["lmms_eval"]["accuracy"])
        for kind, share in row["lmms_eval"]["per_type"].items():
            assert reported[kind] == pytest.approx(share), kind


def test_the_task_data_round_trips(tmp_path, seed):
    """What ``write_task_data`` writes is what the task's utils read back (image, question)."""
    import importlib.util

    from lvlm_prune.shapes import scenes

    items = scenes.sample(seed, 4, per_type=True)
    path = tmp_path / "shapesvqa.jsonl"
    lmms.write_task_data(items, path)
    spec = importlib.util.spec_from_file_location("task_utils", lmms.TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    for doc, (scene, question) in zip(docs, items, strict=True):
        (image,) = utils.doc_to_visual(doc)
        assert list(image.getdata()) == list(scene.image().convert("RGB").getdata())
        assert utils.doc_to_text(doc) == question.text
        right = utils.process_results(doc, [question.answer + "."])["accuracy"]
        other = next(o for o in question.options if o != question.answer)
        wrong = utils.process_results(doc, [other])["accuracy"]
        assert right["correct"] and not wrong["correct"] and right["type"] == question.type
