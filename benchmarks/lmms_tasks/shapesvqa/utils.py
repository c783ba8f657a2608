"""ShapesVQA for lmms-eval: one question per scene, the image inline (base64 PNG), scored as
``shapes.evaluate`` scores it (the reply's first word against the answer), per question type."""

import base64
import io

from PIL import Image

from lvlm_prune.shapes.scenes import first_word

TYPES = ("colour", "pattern", "exists", "location")


def doc_to_visual(doc):
    return [Image.open(io.BytesIO(base64.b64decode(doc["image"]))).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]  # as the model was trained and as shapes.evaluate asks


def process_results(doc, results):
    record = {"type": doc["type"], "correct": first_word(results[0]) == doc["answer"]}
    return {"accuracy": record, **{t: record for t in TYPES}}


def _share(records, kind=None):
    chosen = [r for r in records if kind is None or r["type"] == kind]
    return sum(r["correct"] for r in chosen) / len(chosen) if chosen else float("nan")


def accuracy(records):
    return _share(records)


def colour(records):
    return _share(records, "colour")


def pattern(records):
    return _share(records, "pattern")


def exists(records):
    return _share(records, "exists")


def location(records):
    return _share(records, "location")
