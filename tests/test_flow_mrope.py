"""Information flow on the M-RoPE families (Qwen2.5-VL, Qwen3-VL dense and MoE), in a real vLLM
engine, against transformers' eager attention (``output_attentions=True``) on the same float32
inputs: the prompt with the reference's kept rows, at the reference's positions (each kept token
at its original (t, h, w), the text after an image where it is unpruned), DeepStack levels added
after the first layers. tests/test_flow.py does the same for LLaVA and the math without an engine.
"""

from __future__ import annotations

import flow_reference as fref
import pytest
import torch
from family.families import QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE
from family.suite import FamilyEngine
from helpers import close_llm, make_image, make_llm, pop_diagnostics
from vllm import SamplingParams

from lvlm_prune.kernels import keep_count
from lvlm_prune.vllm_plugin.worker import flow

ATOL = 1e-4
SAMPLING = SamplingParams(max_tokens=2, temperature=0.0)
MAX_ERRORS: dict[str, float] = {}
"""Largest difference seen per family and quantity (printed with -s, for the record)."""


@pytest.fixture(scope="module", params=[QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE], ids=str)
def engine(request):
    family = request.param
    model_dir = request.getfixturevalue(family.model_dir_fixture)
    llm = make_llm(model_dir, **family.engine_kwargs)
    yield FamilyEngine(family, llm, fref.eager_reference(family.reference, model_dir))
    close_llm(llm)
    print({k: f"{v:.1e}" for k, v in MAX_ERRORS.items() if k.startswith(family.name)})


def record(engine, what: str, diff: float) -> None:
    key = f"{engine.family.name} {what}"
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), diff)


def served_flow(engine, images, **mm_kwargs):
    diag_id = engine.diagnostics_id()
    req = engine.request(images=images, prune_diagnostics=diag_id, prune_flow=True, **mm_kwargs)
    out = engine.generate(req, SAMPLING)
    got = flow.fetch_flow(engine.llm, diag_id, out.prompt_token_ids)
    return out, got, pop_diagnostics(engine.llm, diag_id)


def assert_flow_matches(engine, out, got, kept, rows, grids, *, control=False):
    """``got`` (the served ``flow`` object) against transformers fed ``rows`` at the positions
    of the family's rule for ``kept`` (``control``: a negative control, errors not recorded)."""
    ref = engine.ref
    positions = ref.positions(out.prompt_token_ids, grids, kept)
    shares, maps = fref.mrope_prompt_flow(ref, out.prompt_token_ids, rows, positions)
    layers = ref.model.config.text_config.num_hidden_layers
    assert len(got["layers"]) == len(shares) == layers
    for layer, (served, want) in enumerate(zip(got["layers"], shares)):
        values = [served["system"], served["image"], served["question"]]
        assert abs(sum(values) - 1) < 1e-4, (layer, values)
        diff = max(abs(a - b) for a, b in zip(values, want))
        if not control:
            record(engine, "shares", diff)
        assert diff < ATOL, f"layer {layer}: {values} vs transformers {want} ({diff:.2e})"
    assert [m["layer"] for m in got["image_map_layers"]] == list(range(min(layers, 3)))
    for entry in got["image_map_layers"]:
        for grid, (rows_n, cols_n), indices, want in zip(
            entry["per_image"], grids, kept, maps[entry["layer"]]
        ):
            assert len(grid) == rows_n and all(len(row) == cols_n for row in grid)
            flat = [v for row in grid for v in row]
            assert [i for i, v in enumerate(flat) if v is not None] == indices.tolist()
            values = torch.tensor([flat[i] for i in indices], dtype=torch.float64)
            diff = float((values - want).abs().max()) / float(want.max())
            if not control:
                record(engine, "maps (relative)", diff)
            assert diff < ATOL, f"layer {entry['layer']} map differs by {diff:.2e} (relative)"
    assert got["cliff_layer"] == flow.cliff_layer([s[1] for s in shares])


@pytest.mark.parametrize("ratio", [1.0, 0.25], ids=["unpruned", "keep0.25"])
def test_flow_diagnostics_match_transformers_eager_attention(engine, ratio):
    """Two images of different grids: shares per layer and the image maps."""
    images = [(0, engine.family.images[0]), (1, engine.family.images[1])]
    out, got, diags = served_flow(engine, images, keep_ratio=ratio)
    ks = [keep_count(case.tokens, ratio) for _, case in images]
    want = engine.expected(out, images, k=ks)
    assert [d["kept_indices"] for d in diags] == [k.tolist() for k in want.kept]
    assert engine.image_token_count(out) == sum(ks)
    assert_flow_matches(engine, out, got, want.kept, want.rows, want.grids)


@pytest.mark.parametrize("prune_layer", [1, 2])
def test_flow_method_keeps_what_an_independent_scout_keeps(engine, prune_layer):
    """The scout's scores and kept indices as transformers' (layer 2 reads DeepStack level 0 on
    Qwen3-VL), and the flow pass over the result."""
    images = [(0, engine.family.images[0])]
    case = images[0][1]
    out, got, (diag,) = served_flow(
        engine, images, keep_ratio=0.25, prune_method="flow", prune_layer=prune_layer
    )
    image = make_image(0, case.size)
    q_ids = engine.ref.query_ids(out.prompt_token_ids)
    scores = fref.mrope_scout_scores(engine.ref, image, q_ids, prune_layer)
    diff = float((torch.tensor(diag["scores"]) - scores).abs().max() / scores.abs().max())
    record(engine, "scout (relative)", diff)
    assert diff < ATOL, f"scout scores differ by {diff:.2e} (relative)"
    kept = fref.top_k(scores, keep_count(case.tokens, 0.25))
    assert diag["method"] == "flow" and diag["kept_indices"] == kept.tolist()
    # Not what simignore keeps: the scout decided.
    assert not torch.equal(kept, engine.ref.kept(image, q_ids, kept.numel()))
    rows = [engine.ref.pruned_rows(image, kept)]
    assert_flow_matches(engine, out, got, [kept], rows, [case.grid])


def test_flow_comparison_can_fail(engine, monkeypatch):
    """Negative control: the pass at 1-D positions (what it ran before M-RoPE) misses the
    tolerance that the right positions meet."""
    images = [(0, engine.family.images[0])]
    monkeypatch.setattr(type(engine.llm.apply_model(lambda m: m)[0]), "flow_inputs", None)
    out, got, _ = served_flow(engine, images, keep_ratio=0.25)
    k = keep_count(images[0][1].tokens, 0.25)
    want = engine.expected(out, images, k=k)
    with pytest.raises(AssertionError, match="differs|vs transformers"):
        assert_flow_matches(engine, out, got, want.kept, want.rows, want.grids, control=True)


def test_without_deepstack_the_comparison_fails(engine, monkeypatch):
    """Negative control (Qwen3-VL): the pass and the scout without the DeepStack levels miss
    the tolerance, so adding them after the first layers is what the comparisons above check."""
    if not engine.family.name.startswith("qwen3"):
        pytest.skip("no DeepStack")
    monkeypatch.setattr(flow, "deepstack_adder", lambda at, levels: lambda i, hidden: hidden)
    images = [(0, engine.family.images[0])]
    case = images[0][1]
    out, got, (diag,) = served_flow(
        engine, images, keep_ratio=0.25, prune_method="flow", prune_layer=2
    )
    image = make_image(0, case.size)
    scores = fref.mrope_scout_scores(
        engine.ref, image, engine.ref.query_ids(out.prompt_token_ids), 2
    )
    diff = float((torch.tensor(diag["scores"]) - scores).abs().max() / scores.abs().max())
    assert diff > 10 * ATOL, f"the scout without DeepStack is off by only {diff:.2e}"
    kept = torch.tensor(diag["kept_indices"])
    rows = [engine.ref.pruned_rows(image, kept)]
    with pytest.raises(AssertionError, match="differs|vs transformers"):
        assert_flow_matches(engine, out, got, [kept], rows, [case.grid], control=True)
