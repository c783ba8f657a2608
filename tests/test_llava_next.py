"""LLaVA-NeXT and LLaVA-OneVision (AnyRes): what the family suite (``tests/family/``, entries
``llava_next`` and ``llava_onevision``) does not check on every family.

An AnyRes image's N rows are a base view, then the crops' rows each closed by the same
``image_newline`` row (``vllm_plugin/llava_next.py``). The newline rows do not compete: K is
taken from the other rows, a pruned image keeps none of its newlines, an unpruned one all of them.
Positions are LLaVA-1.5's rules over all N rows: original by default, compact per request.
"""

from __future__ import annotations

import flow_reference as fref
import pytest
import torch
from family.families import LLAVA_NEXT, LLAVA_ONEVISION
from family.suite import QUESTION, FamilyEngine
from helpers import PositionsSeen, close_llm, make_image, make_llm, pop_diagnostics
from hf_reference import LOGPROB_ATOL, max_logprob_diff, reference

from lvlm_prune.kernels import keep_count
from lvlm_prune.vllm_plugin.processing.accounting import LEDGER
from lvlm_prune.vllm_plugin.worker import flow


@pytest.fixture(scope="module", params=[LLAVA_NEXT, LLAVA_ONEVISION], ids=str)
def engine(request):
    family = request.param
    model_dir = request.getfixturevalue(family.model_dir_fixture)
    llm = make_llm(model_dir, enable_prefix_caching=True, **family.engine_kwargs)
    yield FamilyEngine(family, llm, reference(family.reference, model_dir))
    close_llm(llm)


def newline_rows(case) -> set[int]:
    return set(range(case.tokens)) - set(case.competing.tolist())


@pytest.mark.parametrize("method", ["simignore", "uniform", "random"])
@pytest.mark.parametrize("ratio", [0.9, 0.25])
def test_a_pruned_image_keeps_no_newline_row_and_takes_k_from_the_other_rows(engine, ratio, method):
    """K = keep_count(N - newlines, ratio) placeholders, and no kept index is a newline row
    (the reference finds them by value, the suite's table by the layout: both agree)."""
    case = engine.family.images[0]
    image = make_image(0, case.size)
    newlines = newline_rows(case)
    assert len(newlines) == case.crops[0]
    assert engine.ref.newline_rows(image).nonzero().flatten().tolist() == sorted(newlines)
    diag_id = engine.diagnostics_id()
    out = engine.generate(
        engine.request(keep_ratio=ratio, prune_method=method, prune_diagnostics=diag_id)
    )
    k = keep_count(case.tokens - len(newlines), ratio)
    assert engine.image_token_count(out) == k
    (diag,) = pop_diagnostics(engine.llm, diag_id)
    assert len(diag["kept_indices"]) == k
    assert not newlines & set(diag["kept_indices"])
    assert [i for i, s in enumerate(diag["scores"]) if s is None] == sorted(newlines)


def test_keep_one_keeps_every_row_newlines_included(engine):
    """Unpruned is stock: all N placeholders, every row (newlines too) kept and scored."""
    case = engine.family.images[0]
    diag_id = engine.diagnostics_id()
    out = engine.generate(engine.request(keep_ratio=1.0, prune_diagnostics=diag_id))
    assert engine.image_token_count(out) == case.tokens
    (diag,) = pop_diagnostics(engine.llm, diag_id)
    assert diag["kept_indices"] == list(range(case.tokens))
    assert None not in diag["scores"]
    engine.assert_matches(out, engine.expected(out))


def test_diagnostics_report_both_views(engine):
    """Each image: ``grid`` is the base view's, ``views`` the base view and the crops at their
    offsets into the image's rows, for two images of different layouts."""
    images = list(zip((20, 21), engine.family.images))
    diag_id = engine.diagnostics_id()
    engine.generate(engine.request(images=images, keep_ratio=0.25, prune_diagnostics=diag_id))
    entries = pop_diagnostics(engine.llm, diag_id)
    assert len(entries) == 2
    for (_, case), entry in zip(images, entries, strict=True):
        base = case.grid[0] * case.grid[1]
        assert entry["num_tokens"] == case.tokens
        assert entry["grid"] == list(case.grid)
        assert entry["views"] == [
            {"view": "base", "grid": list(case.grid), "offset": 0},
            {"view": "crops", "grid": list(case.crops), "offset": base, "newline": True},
        ]


def test_merge_folds_the_competing_rows_only(engine):
    """``prune_merge``: each dropped content row folds into its nearest kept row; the newline
    rows are not folded in (the reference merges over the competing rows only)."""
    from lvlm_prune.kernels.reference import merge_dropped_ref

    case = engine.family.images[0]
    out = engine.generate(engine.request(keep_ratio=0.25, prune_merge=True))
    want = engine.expected(out, k=case.keep(0.25))
    image = make_image(0, case.size)
    kept = want.kept[0]
    want.rows = [engine.ref.pruned_rows(image, kept, merge=True)]
    with_newlines = merge_dropped_ref(engine.ref.image_features(image), kept)
    assert not torch.allclose(want.rows[0], with_newlines, atol=1e-3)
    assert not torch.allclose(want.rows[0], engine.ref.pruned_rows(image, kept), atol=1e-3)
    engine.assert_matches(out, want)


def test_an_image_sent_again_is_counted_from_its_size(engine):
    """The second request is a processor-cache hit (the HF processor does not run): N still
    counts the newline rows, K does not."""
    first, second = engine.family.images
    images = [(30, first), (31, second)]
    tag = f"{engine.family.name}-again"
    want = [(case.tokens, case.keep(0.25)) for _, case in images]
    for _ in range(2):
        LEDGER.expect(tag)
        engine.generate(engine.request(QUESTION, images, keep_ratio=0.25, prune_tag=tag))
        assert LEDGER.pop(tag).per_image == want


def test_an_image_sent_by_uuid_only_is_counted_from_its_first_sending(engine):
    """Sent again without its data (a processor-cache hit by uuid): N is the one counted when
    the image came with its data, not a guess from the model's largest image."""
    case = engine.family.images[1]
    tag = f"{engine.family.name}-uuid"
    uuid = f"{engine.family.name}-image-40"
    for data in (make_image(40, case.size), None):
        req = engine.request(images=[(40, case)], keep_ratio=0.25, prune_tag=tag)
        req["multi_modal_data"] = {"image": [data]}
        req["multi_modal_uuids"] = {"image": [uuid]}
        LEDGER.expect(tag)
        out = engine.generate(req)
        assert engine.image_token_count(out) == case.keep(0.25)
        assert LEDGER.pop(tag).per_image == [(case.tokens, case.keep(0.25))]


def test_the_text_model_runs_through_vllms_mrope_path_without_touching_the_checkpoint(engine):
    """Llama (NeXT) and Qwen2 (OneVision) have a plain rope: vLLM's config hook switches both to
    the M-RoPE path, in vLLM's copy of the config only."""
    from transformers import AutoConfig

    config = engine.llm.llm_engine.vllm_config.model_config
    assert config.uses_mrope
    assert "mrope_section" in config.hf_config.get_text_config().rope_parameters
    on_disk = AutoConfig.from_pretrained(config.model).get_text_config().rope_parameters
    assert "mrope_section" not in on_disk


def test_compact_per_request_and_original_by_default_each_match_their_own_reference(engine):
    """One image, one question, both rules: original spans all N rows (the text after the image
    N - K later than compact), and each output matches its own rule's reference and misses the
    other's."""
    case = engine.family.images[0]
    k = case.keep(0.25)
    outs, seen = {}, {}
    for rule in ("original", "compact"):
        watch = PositionsSeen(engine.llm)
        try:
            req = engine.request("Where is the red bus?", keep_ratio=0.25, prune_positions=rule)
            outs[rule] = engine.generate(req)
        finally:
            watch.close()
        seen[rule] = watch.all()
    ids = list(outs["original"].prompt_token_ids)
    assert list(outs["compact"].prompt_token_ids) == ids
    assert engine.image_token_count(outs["original"]) == k
    want = engine.expected(outs["original"], k=k)
    positions = {
        "original": want.positions,
        "compact": engine.ref.compact_positions(ids, want.grids, want.kept),
    }
    assert int(positions["original"][-1] - positions["compact"][-1]) == case.tokens - k
    for rule, out in outs.items():
        cached = out.num_cached_tokens
        assert torch.equal(seen[rule][: len(ids) - cached], positions[rule][cached:]), rule
        engine.assert_matches(out, want, positions=positions[rule])
        other = positions["compact" if rule == "original" else "original"]
        _, hf_lp = engine.ref.greedy(ids, want.rows, other, len(out.outputs[0].token_ids))
        assert max_logprob_diff(out, hf_lp) > 10 * LOGPROB_ATOL, rule


PARTS = ("system", "image", "question")  # a flow layer's shares, in the reference's order


def test_flow_diagnostics_run_at_the_served_positions(engine, request):
    """The flow pass reruns the language model's decoder layers (Llama; OneVision's Qwen2) at
    the positions the request was served at: each layer's shares and the image map at the kept
    rows equal transformers' eager attention over the same rows at the original positions, and
    at compact ones they do not."""
    case = engine.family.images[0]
    diag_id = engine.diagnostics_id()
    req = engine.request(keep_ratio=0.25, prune_diagnostics=diag_id, prune_flow=True)
    out = engine.generate(req)
    got = flow.fetch_flow(engine.llm, diag_id, out.prompt_token_ids)
    pop_diagnostics(engine.llm, diag_id)
    want = engine.expected(out, k=case.keep(0.25))
    model_dir = request.getfixturevalue(engine.family.model_dir_fixture)
    eager = fref.eager_reference(engine.family.reference, model_dir)
    ids = list(out.prompt_token_ids)
    kept = want.kept[0].tolist()

    def misses(positions) -> list[str]:
        shares, maps = fref.mrope_prompt_flow(eager, ids, want.rows, positions)
        wrong = [
            f"layer {i} shares"
            for i, (layer, expected) in enumerate(zip(got["layers"], shares, strict=True))
            if max(abs(layer[part] - b) for part, b in zip(PARTS, expected)) >= 1e-4
        ]
        for entry in got["image_map_layers"]:
            (image_map,) = entry["per_image"]  # flat over the image's N rows, None: dropped
            assert [i for i, v in enumerate(image_map) if v is not None] == kept
            values = torch.tensor([image_map[i] for i in kept], dtype=torch.float64)
            (expected,) = maps[entry["layer"]]
            if float((values - expected).abs().max()) >= 1e-4 * float(expected.max()):
                wrong.append(f"layer {entry['layer']} map")
        return wrong

    assert got["image_map_layers"]
    assert misses(want.positions) == []
    assert misses(engine.ref.compact_positions(ids, want.grids, want.kept))
