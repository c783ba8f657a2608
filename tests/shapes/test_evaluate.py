"""``python -m lvlm_prune.shapes.evaluate --out``: the results files name the model, not a path."""

import json

from lvlm_prune.benchmarks import common
from lvlm_prune.models.shapes import released_model_dir
from lvlm_prune.shapes import evaluate, scenes


def test_results_files_carry_the_numbers_the_command_and_no_path(tmp_path):
    items = scenes.sample(7, 8, per_type=True, version="v3")
    right = [q.answer for _, q in items]
    wrong = [next(o for o in q.options if o != q.answer) for _, q in items]
    result = {
        "model": str(released_model_dir()),
        "task": "ShapesVQA v3",
        "seed": 7,
        "items": 8,
        "chance": 0.3,
        "accuracy": evaluate._with_intervals(items, right[:4] + wrong[4:]),
        "swapped_image_accuracy": evaluate._with_intervals(items, wrong),
        "seconds": 1.0,
    }
    machine = common.machine_info()
    evaluate.write_results(tmp_path / "accuracy-shapes", result, "CMD", machine, released=True)
    payload = json.loads((tmp_path / "accuracy-shapes.json").read_text())
    markdown = (tmp_path / "accuracy-shapes.md").read_text()
    assert payload["model"] == "lvlm-prune-shapes (released)" and payload["command"] == "CMD"
    assert payload["accuracy"]["all"]["accuracy"] == 0.5
    assert str(released_model_dir()) not in json.dumps(payload) + markdown
    assert payload["machine"]["loadavg_at_end"] is not None and "at end None" not in markdown
    assert "| all | 50.0% (" in markdown and "| 0.0% |" in markdown and "`CMD`" in markdown
    # Every v3 type, and exists by kind, has its row.
    for t in ("colour", "pattern", "exists", "location"):
        assert f"| {t} |" in markdown
    assert "ShapesVQA v3" in markdown
