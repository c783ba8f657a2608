"""The released lvlm-prune-shapes in a real vLLM engine: it answers fresh ShapesVQA questions
from the image, through the chat template as the OpenAI server renders it.

Fresh questions every run (the seed is printed). The thresholds sit well inside what the model
measures on 1,000 questions, so a run fails only when the model or the engine changed.
"""

import flow_reference as fref
import hf_reference as ref
import numpy as np
import pytest
import torch
from helpers import close_llm, make_llm
from vllm import SamplingParams

from lvlm_prune.models.shapes import released_model_dir, task_version
from lvlm_prune.shapes import scenes
from lvlm_prune.shapes.evaluate import ask, chat_message

ITEMS = 240  # 60 per question type
BINDING_ITEMS = 60
CONTROL_ITEMS = 160
ACCURACY_FLOOR = 0.95
TYPE_FLOOR = 0.90
BINDING_FLOOR = 0.85


def accuracy_by_type(items, replies) -> dict[str, float]:
    """Share of right replies per question type, per exists kind (``exists/binding``, ...) and
    over all (``"all"``)."""
    out = {}
    for t in (*scenes.QUESTION_TYPES, "exists/yes", "exists/absent", "exists/binding"):
        hits = [
            scenes.score_reply(r, q)
            for (_, q), r in zip(items, replies)
            if t in (q.type, q.subtype)
        ]
        out[t] = sum(hits) / len(hits) if hits else float("nan")
    out["all"] = sum(scenes.score_reply(r, q) for (_, q), r in zip(items, replies)) / len(items)
    return out


def binding_negatives(seed: int, n: int):
    """``n`` fresh exists questions whose answer is no with both named attributes present, on
    two objects (the kind v2 never asked; about 1 in 16 of a v3 draw)."""
    rng = np.random.default_rng([seed, 1])
    out = []
    while len(out) < n:
        scene, q = scenes.sample_item(rng, qtype="exists")
        if q.negative == "binding":
            out.append((scene, q))
    return out


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(str(released_model_dir()))
    yield engine
    close_llm(engine)


def test_the_released_model_answers_shapesvqa_v3():
    assert task_version(released_model_dir()) == "v3"


def test_answers_fresh_questions_from_the_image(llm, seed):
    items = scenes.sample(seed, ITEMS, per_type=True, version="v3")
    images = [scene.image() for scene, _ in items]
    replies = ask(llm, items, images)
    acc = accuracy_by_type(items, replies)
    print(f"accuracy on {ITEMS} fresh questions: {acc}")
    # Replies are the bare answer word, detokenised ("red", not " red" or "").
    assert sum(r in scenes.OPTIONS[q.type] for (_, q), r in zip(items, replies)) >= 0.95 * ITEMS
    assert acc["all"] >= ACCURACY_FLOOR, acc
    for t in scenes.QUESTION_TYPES:
        assert acc[t] >= TYPE_FLOOR, (t, acc)


def test_binds_colour_to_pattern(llm, seed):
    """v3's binding negatives: "a red striped object?" when the red one is dotted and the
    striped one blue. A model that only checks each attribute's presence says yes to all."""
    items = binding_negatives(seed, BINDING_ITEMS)
    replies = ask(llm, items, [scene.image() for scene, _ in items])
    acc = accuracy_by_type(items, replies)["exists/binding"]
    print(f"accuracy on {BINDING_ITEMS} binding negatives: {acc:.3f}")
    assert acc >= BINDING_FLOOR


def test_another_scenes_image_brings_accuracy_to_chance(llm, seed):
    """Each question asked about the next scene's image: the answer must come from the image."""
    items = scenes.sample(seed, CONTROL_ITEMS, per_type=True, version="v3")
    images = [scene.image() for scene, _ in items]
    replies = ask(llm, items, images[1:] + images[:1])
    acc = accuracy_by_type(items, replies)
    chance = sum(scenes.CHANCE[q.type] for _, q in items) / CONTROL_ITEMS
    print(f"accuracy with swapped images: {acc} (chance {chance:.3f})")
    # Chance is 1/6, 1/4, 1/2 and 1/6 by type (about 0.27 overall); the standard error on 160
    # items is about 0.035, on 40 about 0.07.
    assert acc["all"] <= chance + 0.15, acc
    for t in ("colour", "pattern", "location"):
        assert acc[t] <= scenes.CHANCE[t] + 0.25, (t, acc)


def test_fidelity_harness_on_the_trained_model(llm, seed, tmp_path):
    """``bench fidelity --model shapes`` in small: rows, per-type and per-kind accuracy, hit
    rates from the engine's own selections, the swapped-image control, the table and the plot."""
    import argparse

    from lvlm_prune.benchmarks import fidelity

    args = argparse.Namespace(
        items=24,
        smoke=True,
        seed=seed,
        ratios=[1.0, 0.11],
        methods=["simignore", "uniform"],
        positions=["original", "compact"],
    )
    result = fidelity.run_shapes(args, llm, "shapes")
    assert result["task"] == "ShapesVQA v3" and result["n_items"] == 24
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == [
        "stock",
        "simignore [original]@0.11",
        "simignore [compact]@0.11",
        "uniform [original]@0.11",
        "uniform [compact]@0.11",
        "mismatched image",
        "stock (repeat)",
    ]
    assert {"colour", "pattern", "exists", "location"} <= set(rows["stock"]["per_type"])
    for method in ("simignore", "uniform"):
        # The rule moves positions only; the selection is the same.
        assert rows[f"{method} [original]@0.11"]["object_hit_rate"] == pytest.approx(
            rows[f"{method} [compact]@0.11"]["object_hit_rate"]
        )
    simignore, uniform = rows["simignore [original]@0.11"], rows["uniform [original]@0.11"]
    assert rows["stock (repeat)"]["predictions"] == rows["stock"]["predictions"]
    assert simignore["kept_tokens"] == 64
    # 64 of 576 evenly spaced tokens hold about 11 % of an object; simignore finds the object
    # the question names.
    for t in ("colour", "pattern"):
        assert simignore["object_hit_rate_per_type"][t] >= 0.8, t
    assert uniform["object_hit_rate"] <= 0.4
    scores = result["relevance_scores"]
    assert scores["asked_object"] > scores["background"] + 0.2
    markdown = fidelity.shapes_markdown(result)
    assert "mismatched image" in markdown
    (header,) = [line for line in markdown.splitlines() if line.startswith("| config |")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    for column in ("location", "exists/binding", "hit rate location", "hit rate exists/binding"):
        assert column in columns, column
    if fidelity.plot(result, tmp_path / "fidelity.png"):
        assert (tmp_path / "fidelity.png").stat().st_size > 1000


def test_flow_method_scouts_as_deep_as_the_checkpoint_declares(llm, seed):
    """The released config.json declares prune_layer 1 (its cliff): a flow request that names no
    depth ranks by layer 0's attention; a request's own prune_layer still wins."""
    model_dir = str(released_model_dir())
    scene, question = scenes.sample(seed, 1)[0]
    image = scene.image()
    for diag_id, layer in ((1, None), (2, 2)):
        kwargs = {"keep_ratio": 0.25, "prune_method": "flow", "prune_diagnostics": diag_id}
        if layer is not None:
            kwargs["prune_layer"] = layer
        (out,) = llm.chat(
            [chat_message(question.text, image)],
            SamplingParams(max_tokens=1, temperature=0.0),
            mm_processor_kwargs=kwargs,
            use_tqdm=False,
        )
        (diag,) = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))[0][diag_id]
        got = torch.tensor(diag["scores"])
        q_ids = ref.query_ids(model_dir, out.prompt_token_ids)
        error = {
            depth: float((got - fref.scout_scores(model_dir, image, q_ids, depth)).abs().max())
            for depth in (1, 2)
        }
        want, other = (1, 2) if layer is None else (layer, 1)
        print(f"prune_layer {layer}: max |score - scout of depth d| {error}")
        assert error[want] < 1e-5 and error[other] > 100 * error[want], (layer, error)
