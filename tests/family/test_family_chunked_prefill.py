"""Chunked prefill on every family: a pruned image split across prefill chunks.

An engine of its own per family (8-token batches), so it lives in its own module: one engine per
family per module.
"""

import pytest
import torch
from helpers import PositionsSeen, close_llm, make_llm
from hf_reference import reference

from family.suite import FamilyEngine

CHUNK = 8


@pytest.fixture(scope="module")
def engine(family, model_dir):
    llm = make_llm(
        model_dir,
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK,
        **family.engine_kwargs,
    )
    yield FamilyEngine(family, llm, reference(family.reference, model_dir))
    close_llm(llm)


def test_chunked_prefill_splits_an_image_and_keeps_every_position(engine):
    """8-token chunks: the pruned image's rows span several chunks; each chunk's rows are the
    right ones at their own positions, so the whole prompt sees the reference's positions, ids
    and logprobs."""
    k = engine.family.images[0].keep(0.25)
    assert k > CHUNK, "the image must span chunks"
    seen = PositionsSeen(engine.llm)
    try:
        out = engine.generate(engine.request(keep_ratio=0.25))
    finally:
        seen.close()
    n = len(out.prompt_token_ids)
    assert [c.shape[-1] for c in seen.calls][: n // CHUNK] == [CHUNK] * (n // CHUNK)
    want = engine.expected(out, k=k)
    assert torch.equal(seen.all()[..., :n], want.positions)
    engine.assert_matches(out, want)
