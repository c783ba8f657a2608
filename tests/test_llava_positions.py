"""LLaVA's ``positions`` option in one engine: original (the default) and compact per request, the
engine-wide default, keep 1.0 untouched, decoding after an original-position prompt, and the
prefix cache keeping the two apart. The family suite (tests/family/) checks original positions
everywhere else (chunked prefill, prefix hits inside an image, batches, tensor parallelism)."""

import pytest
import torch
from family.families import LLAVA
from family.suite import QUESTION, SAMPLING, FamilyEngine
from helpers import PositionsSeen, close_llm, make_image, make_llm
from hf_reference import (
    LOGPROB_ATOL,
    LlavaReference,
    assert_matches,
    max_logprob_diff,
    reference,
)

from lvlm_prune.kernels import keep_count
from lvlm_prune.vllm_plugin import options

N = LLAVA.images[0].tokens


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    llm = make_llm(tiny_model_dir, enable_prefix_caching=True, max_num_batched_tokens=4096)
    yield FamilyEngine(LLAVA, llm, reference(LlavaReference, tiny_model_dir))
    close_llm(llm)


def _run(engine, req):
    seen = PositionsSeen(engine.llm)
    try:
        out = engine.generate(req)
    finally:
        seen.close()
    return out, seen.all()


def _ids(out) -> list[int]:
    return list(out.outputs[0].token_ids)


def test_the_engine_runs_llava_through_vllms_mrope_path_without_touching_the_checkpoint(
    engine, tiny_model_dir
):
    from transformers import AutoConfig

    config = engine.llm.llm_engine.vllm_config.model_config
    assert config.uses_mrope
    assert "mrope_section" in config.hf_config.get_text_config().rope_parameters
    on_disk = AutoConfig.from_pretrained(tiny_model_dir).text_config.rope_parameters
    assert "mrope_section" not in on_disk


@pytest.mark.parametrize("ratio", [0.5, 0.11])
def test_compact_per_request_matches_the_compact_reference_and_misses_the_original(engine, ratio):
    k = keep_count(N, ratio)
    out, seen = _run(engine, engine.request(keep_ratio=ratio, prune_positions="compact"))
    n = len(out.prompt_token_ids)
    assert engine.image_token_count(out) == k
    want = engine.expected(out, k=k)
    compact = engine.ref.compact_positions(out.prompt_token_ids, want.grids, want.kept)
    assert torch.equal(seen[:n], compact)
    assert torch.equal(seen[n:], torch.arange(n, n + seen.shape[0] - n))
    engine.assert_matches(out, want, positions=compact)
    _, hf_lp = engine.ref.greedy(out.prompt_token_ids, want.rows, want.positions, len(_ids(out)))
    assert max_logprob_diff(out, hf_lp) > 10 * LOGPROB_ATOL


def test_original_is_the_default_and_decoding_continues_from_n(engine):
    """The first generated token sits where it does unpruned: after N image positions."""
    k = keep_count(N, 0.25)
    full = engine.generate(engine.request(question="Which one is the tallest?"))
    out, seen = _run(engine, engine.request(question="Which one is the tallest?", keep_ratio=0.25))
    n = len(out.prompt_token_ids)
    assert len(full.prompt_token_ids) == n + N - k
    want = engine.expected(out, k=k)
    assert torch.equal(seen[:n], want.positions)
    assert int(want.positions[-1]) == len(full.prompt_token_ids) - 1
    decode = seen[n:]
    first = len(full.prompt_token_ids)
    assert decode.numel() > 0
    assert torch.equal(decode, torch.arange(first, first + decode.numel()))
    engine.assert_matches(out, want)
    explicit = engine.generate(
        engine.request(
            question="Which one is the tallest?", keep_ratio=0.25, prune_positions="original"
        )
    )
    assert _ids(explicit) == _ids(out)


def test_keep_ratio_one_is_the_same_under_either_rule(engine):
    """Nothing dropped: both rules are vLLM's positions, and compact is not even hashed."""
    base = engine.generate(engine.request(question="Is it raining?"))
    compact, seen = _run(
        engine, engine.request(question="Is it raining?", keep_ratio=1.0, prune_positions="compact")
    )
    assert _ids(compact) == _ids(base)
    assert compact.num_cached_tokens > 0, "the same hash as the default: a prefix hit"
    assert torch.equal(seen, torch.arange(seen.shape[0]) + compact.num_cached_tokens)
    want = engine.expected(base)
    engine.assert_matches(base, want, positions=torch.arange(len(base.prompt_token_ids)))


def test_the_prefix_cache_never_hands_one_rule_the_others_kv(engine):
    """Same image, question and keep ratio: original and compact are cached apart (the positions
    move the KV of the image and of every later token)."""
    question = "What is written on the sign?"
    k = keep_count(N, 0.5)
    original = engine.generate(engine.request(question=question, keep_ratio=0.5))
    compact, seen = _run(
        engine, engine.request(question=question, keep_ratio=0.5, prune_positions="compact")
    )
    n = len(compact.prompt_token_ids)
    first_image = list(compact.prompt_token_ids).index(engine.ref.image_token_id)
    assert compact.num_cached_tokens <= first_image
    want = engine.expected(compact, k=k)
    compact_positions = engine.ref.compact_positions(
        compact.prompt_token_ids, want.grids, want.kept
    )
    assert torch.equal(
        seen[: n - compact.num_cached_tokens], compact_positions[compact.num_cached_tokens :]
    )
    engine.assert_matches(compact, want, positions=compact_positions)
    again = engine.generate(engine.request(question=question, keep_ratio=0.5))
    assert again.num_cached_tokens > first_image, "original's own blocks are still cached"
    assert _ids(again) == _ids(original)
    engine.assert_matches(again, engine.expected(again, k=k))


def test_original_and_compact_requests_in_one_batch_each_at_its_own_positions(engine):
    """One prefill step, an original and a compact request: the carrier's offsets land on the
    original request's rows only."""
    k = keep_count(N, 0.25)
    reqs = [
        engine.request(question="Where is the dog?", keep_ratio=0.25),
        engine.request(question="Where is the dog?", keep_ratio=0.25, prune_positions="compact"),
    ]
    outs = engine.llm.generate(reqs, SAMPLING, use_tqdm=False)
    want = engine.expected(outs[0], k=k)
    engine.assert_matches(outs[0], want)
    engine.assert_matches(
        outs[1],
        want,
        positions=engine.ref.compact_positions(outs[1].prompt_token_ids, want.grids, want.kept),
    )


def test_a_bad_positions_value_is_refused_by_name(engine):
    with pytest.raises(ValueError, match=options.POSITIONS):
        engine.generate(engine.request(question=QUESTION, keep_ratio=0.5, prune_positions="both"))


def test_an_image_wholly_in_the_prefix_cache_keeps_its_span(engine):
    """A later request whose cached prefix covers the whole image: the scheduler strips the
    image's data but keeps its ``prune_position_span`` (kept on the CPU), so the text after it
    and decoding still sit at their unpruned positions."""
    long_question = " ".join(["Is the red car parked next to the old blue house?"] * 14)
    k = keep_count(N, 0.25)
    # One query for both (the default, the prompt's text, differs): one image hash.
    mm = {"keep_ratio": 0.25, "prune_query": "Is the red car parked?"}
    first = engine.generate(engine.request(question=long_question, **mm))
    out, seen = _run(engine, engine.request(question=long_question + " Answer briefly.", **mm))
    ids = list(out.prompt_token_ids)
    image_end = len(ids) - ids[::-1].index(engine.ref.image_token_id)
    assert out.num_cached_tokens >= image_end, (out.num_cached_tokens, image_end)
    assert out.num_cached_tokens <= len(first.prompt_token_ids)
    image = make_image(0, LLAVA.images[0].size)
    kept = engine.ref.kept(image, engine.ref.encode(mm["prune_query"]), k)
    grids = [LLAVA.images[0].grid]
    positions = engine.ref.positions(ids, grids, [kept])
    cached = out.num_cached_tokens
    assert torch.equal(seen[: len(ids) - cached], positions[cached:])
    assert torch.equal(seen[len(ids) - cached :][:1], positions[-1:] + 1)
    assert_matches(engine.ref, out, [engine.ref.pruned_rows(image, kept)], positions)


def test_an_engine_wide_compact_default_and_a_request_overriding_it(tiny_model_dir, engine):
    """``--prune-positions compact`` (``mm_processor_kwargs``): compact unless asked otherwise.
    Last in this module: closing a second engine tears down vLLM's process-wide parallel state,
    which the module's engine would need again."""
    llm = make_llm(
        tiny_model_dir,
        enable_prefix_caching=False,
        mm_processor_kwargs={options.POSITIONS: "compact"},
    )
    try:
        other = FamilyEngine(LLAVA, llm, engine.ref)
        k = keep_count(N, 0.25)
        out = other.generate(other.request(keep_ratio=0.25))
        want = other.expected(out, k=k)
        other.assert_matches(
            out,
            want,
            positions=other.ref.compact_positions(out.prompt_token_ids, want.grids, want.kept),
        )
        original = other.generate(other.request(keep_ratio=0.25, prune_positions="original"))
        other.assert_matches(original, other.expected(original, k=k))
    finally:
        close_llm(llm)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}


def test_a_rope_left_1d_serves_compact_by_default_and_refuses_an_asked_original(tiny_model_dir):
    """A text model whose rope cannot take the M-RoPE path (here llama3's): a stock client (no
    positions asked, the default original) is served compact, never refused; a request that asks
    for original itself gets the refusal by name. The API process's processor alone, no engine."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import ProcessorInputs, TimingContext

    from lvlm_prune.vllm_plugin import register

    register()  # what vLLM's plugin loading does in every process
    config = ModelConfig(
        model=tiny_model_dir,
        hf_overrides={"text_config": {"rope_parameters": LLAMA3_ROPE}},
    )
    assert not config.uses_mrope
    assert ModelConfig(model=tiny_model_dir).uses_mrope, "the default rope takes the path"
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    prompt = processor.info.get_tokenizer().encode(LLAVA.prompt(QUESTION, 1))

    def apply(**kwargs):
        items = processor.info.parse_mm_data({"image": [make_image(0)]})
        inputs = ProcessorInputs(prompt=prompt, mm_data_items=items, hf_processor_mm_kwargs=kwargs)
        return processor.apply(inputs, TimingContext(enabled=False))

    k = keep_count(N, 0.25)
    for asked in ({}, {options.POSITIONS: "compact"}):
        out = apply(keep_ratio=0.25, **asked)
        assert out["mm_placeholders"]["image"][0].length == k
        assert int(out["mm_kwargs"]["image"][0][options.POSITION_SPAN_FIELD].data) == k
    with pytest.raises(options.PruneOptionError, match="'original' is not available"):
        apply(keep_ratio=0.25, **{options.POSITIONS: "original"})
