"""The released lvlm-prune-shapes in a real vLLM engine: it answers fresh ShapesVQA questions
from the image, through the chat template as the OpenAI server renders it.

Fresh questions every run (the seed is printed). The thresholds sit well inside what the model
measures on 1,000 questions, so a run fails only when the model or the engine changed.
"""

import numpy as np
import pytest
from helpers import close_llm, data_url, make_llm
from vllm import SamplingParams

from lvlm_prune.shapes import released_model_dir, scenes

ITEMS = 240  # 80 per question type
ACCURACY_FLOOR = 0.95
TYPE_FLOOR = 0.90


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(str(released_model_dir()))
    yield engine
    close_llm(engine)


def chat(question: str, image) -> list[dict]:
    """The user message as the openai client sends it: an image part, then the question."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": question},
            ],
        }
    ]


def ask(llm, items, images) -> list[str]:
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    outs = llm.chat(
        [chat(q.text, img) for (_, q), img in zip(items, images)], sampling, use_tqdm=False
    )
    return [o.outputs[0].text for o in outs]


def accuracy_by_type(items, replies) -> dict[str, float]:
    out = {}
    for t in scenes.QUESTION_TYPES:
        hits = [scenes.score_reply(r, q) for (_, q), r in zip(items, replies) if q.type == t]
        out[t] = float(np.mean(hits))
    out["all"] = float(np.mean([scenes.score_reply(r, q) for (_, q), r in zip(items, replies)]))
    return out


def test_answers_fresh_questions_from_the_image(llm, seed):
    items = scenes.sample(seed, ITEMS, per_type=True)
    images = [scene.image() for scene, _ in items]
    replies = ask(llm, items, images)
    acc = accuracy_by_type(items, replies)
    print(f"accuracy on {ITEMS} fresh questions: {acc}")
    # Replies are the bare answer word, detokenised ("red", not "" or "▁red").
    assert (
        sum(r.strip() in scenes.OPTIONS[q.type] for (_, q), r in zip(items, replies))
        >= 0.95 * ITEMS
    )
    assert acc["all"] >= ACCURACY_FLOOR, acc
    for t in scenes.QUESTION_TYPES:
        assert acc[t] >= TYPE_FLOOR, (t, acc)


def test_another_scenes_image_brings_accuracy_to_chance(llm, seed):
    """Each question asked about the next scene's image: the answer must come from the image."""
    items = scenes.sample(seed, ITEMS, per_type=True)
    images = [scene.image() for scene, _ in items]
    replies = ask(llm, items, images[1:] + images[:1])
    acc = accuracy_by_type(items, replies)
    chance = sum(scenes.CHANCE[q.type] for _, q in items) / ITEMS
    print(f"accuracy with swapped images: {acc} (chance {chance:.3f})")
    # Chance is 1/6, 1/4 and 1/2 by type (about 0.31 overall); the standard error on 240 items
    # is about 0.03, on 80 about 0.05.
    assert acc["all"] <= chance + 0.15, acc
    assert acc["colour"] <= scenes.CHANCE["colour"] + 0.2, acc
    assert acc["pattern"] <= scenes.CHANCE["pattern"] + 0.2, acc


def test_fidelity_harness_on_the_trained_model(llm, seed, tmp_path):
    """``bench fidelity --model shapes`` in small: rows, hit rates from the engine's own
    selections, the swapped-image control, the table and the plot."""
    import argparse

    from lvlm_prune.benchmarks import fidelity

    args = argparse.Namespace(
        items=24, smoke=True, seed=seed, ratios=[1.0, 0.11], methods=["simignore", "uniform"]
    )
    result = fidelity.run_shapes(args, llm, "shapes")
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == [
        "stock",
        "simignore@0.11",
        "uniform@0.11",
        "mismatched image",
        "stock (repeat)",
    ]
    assert rows["stock (repeat)"]["predictions"] == rows["stock"]["predictions"]
    assert rows["simignore@0.11"]["kept_tokens"] == 64
    # 64 of 576 evenly spaced tokens hold about 11 % of an object; simignore finds the object.
    assert rows["simignore@0.11"]["object_hit_rate"] >= 0.8
    assert rows["uniform@0.11"]["object_hit_rate"] <= 0.4
    scores = result["relevance_scores"]
    assert scores["asked_object"] > scores["background"] + 0.2
    assert "mismatched image" in fidelity.shapes_markdown(result)
    if fidelity.plot(result, tmp_path / "fidelity.png"):
        assert (tmp_path / "fidelity.png").stat().st_size > 1000
