"""A server-wide default (--mm-processor-kwargs) and chunked prefill, in one engine.

The batch budget (64 tokens) is smaller than every prompt here, so each prefill is chunked;
the outputs must still equal the transformers reference of the same selection.
"""

import hf_reference as ref
import pytest
from helpers import close_llm, make_llm
from test_plugin_engine import N, assert_matches_reference, generate, request


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = make_llm(
        tiny_model_dir,
        enable_chunked_prefill=True,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
        mm_processor_kwargs={"keep_ratio": 0.25, "prune_method": "simignore"},
    )
    yield engine
    close_llm(engine)


def test_server_default_prunes_and_chunked_prefill_matches_reference(llm, tiny_model_dir):
    out = generate(llm, request())
    assert sum(t == ref.IMAGE_TOKEN_ID for t in out.prompt_token_ids) == 144
    assert len(out.prompt_token_ids) > 64, "the prompt must not fit in one chunk"
    q_ids = ref.query_ids(tiny_model_dir, out.prompt_token_ids)
    kept = ref.reference_kept(tiny_model_dir, ref_image(), q_ids, 144)
    assert_matches_reference(
        tiny_model_dir, out, [ref.pruned_rows(tiny_model_dir, ref_image(), kept)], [kept]
    )


def test_request_overrides_server_default(llm, tiny_model_dir):
    full = generate(llm, request(keep_ratio=1.0))
    assert sum(t == ref.IMAGE_TOKEN_ID for t in full.prompt_token_ids) == N
    hf_prompt, hf_ids = ref.stock_generate(
        tiny_model_dir, request()["prompt"], [ref_image()], len(full.outputs[0].token_ids)
    )
    assert list(full.prompt_token_ids) == hf_prompt
    assert list(full.outputs[0].token_ids) == hf_ids
    half = generate(llm, request(keep_ratio=0.5))
    assert sum(t == ref.IMAGE_TOKEN_ID for t in half.prompt_token_ids) == 288


def ref_image():
    from helpers import make_image

    return make_image(0)


def test_hf_processor_never_sees_our_kwargs(llm, monkeypatch):
    from transformers import LlavaProcessor

    from lvlm_prune.vllm_plugin.options import OWN_KWARGS

    seen = []
    call = LlavaProcessor.__call__

    def spy(self, *args, **kwargs):
        seen.append(set(kwargs))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LlavaProcessor, "__call__", spy)
    # A fresh image and question: a processor-cache miss, so the HF processor really runs.
    out = generate(
        llm,
        {
            **request(images=(9,)),
            "mm_processor_kwargs": {"prune_method": "uniform", "prune_merge": True},
        },
    )
    assert sum(t == ref.IMAGE_TOKEN_ID for t in out.prompt_token_ids) == 144
    assert seen, "the HF processor was not called"
    assert all(not (keys & OWN_KWARGS) for keys in seen), seen
