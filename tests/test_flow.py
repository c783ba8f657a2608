"""Information flow: flow diagnostics and the ``flow`` selection, in a real vLLM engine, against
transformers' eager attention (``output_attentions=True``) on the same float32 inputs.

Random weights: only attention shares, maps, scores, kept indices and logprobs are compared.
"""

import types

import flow_reference as fref
import hf_reference as ref
import pytest
import torch
from helpers import close_llm, make_image, make_llm
from vllm import SamplingParams

from lvlm_prune.kernels import select_tokens
from lvlm_prune.vllm_plugin import options
from lvlm_prune.vllm_plugin.options import PruneOptionError, PruneOptions
from lvlm_prune.vllm_plugin.worker import flow

N = 576
LAYERS = 2  # the tiny model's decoder layers
ATOL = 1e-4
LOGPROB_ATOL = 2e-4
QUESTION = "What is the color of the car on the street?"
SAMPLING = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)


def request(images=(0,), question=QUESTION, **mm_kwargs):
    return {
        "prompt": "USER: " + "<image>\n" * len(images) + question + " ASSISTANT:",
        "multi_modal_data": {"image": [make_image(s) for s in images]},
        "mm_processor_kwargs": mm_kwargs,
    }


# ---- the attention math, no engine ----------------------------------------------------------


@pytest.mark.parametrize("heads,length,dim", [(4, 1, 8), (3, 37, 16), (2, 577, 32)])
@pytest.mark.parametrize("rows", ["last", "tail", "all"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_head_summed_attention_matches_the_full_matrix(
    seed, monkeypatch, heads, length, dim, rows, chunk
):
    if chunk is not None:  # several row chunks, the last one partial
        monkeypatch.setattr(flow, "ROW_CHUNK_ELEMENTS", chunk * heads * length)
    q, k = torch.randn(heads, length, dim), torch.randn(heads, length, dim)
    picked = {
        "last": torch.tensor([length - 1]),
        "tail": torch.arange(length // 2, length),
        "all": torch.arange(length),
    }[rows]
    scale = dim**-0.5
    got = flow.head_summed_attention(q, k, picked, scale=scale)
    want = flow.head_summed_attention_ref(q, k, picked, scale=scale)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # Each row's probabilities sum to 1, over heads: H.
    assert abs(float(got.sum()) - heads) < 1e-4


def test_cliff_layer_is_the_largest_fall_of_the_image_share():
    assert flow.cliff_layer([0.6, 0.5, 0.05, 0.02, 0.1]) == 2
    assert flow.cliff_layer([0.6, 0.3, 0.6, 0.3]) == 1  # a tie: the first
    assert flow.cliff_layer([0.1, 0.2, 0.3]) == -1  # never falls
    assert flow.cliff_layer([0.5]) == -1


def test_patch_grid_and_combining_ranks():
    grid = flow.patch_grid([1.0, 2.0], [0, 3], 4)
    assert grid == [[1.0, None], [None, 2.0]]
    assert flow.patch_grid([5.0], [1], 3) == [None, 5.0, None]  # not a square: flat

    def rank(heads, layer_sums, map_sums):
        return {
            "heads": heads,
            "total_heads": 4,
            "layers": layer_sums,
            "image_map_layers": [{"layer": 0, "per_image": [map_sums]}],
            "kept": [[0, 3]],
            "num_tokens": [4],
            "seconds": 0.0,
        }

    one = flow.combine_flow([rank(4, [[0.4, 2.0, 1.6], [0.4, 0.4, 3.2]], [0.8, 0.4])])
    two = flow.combine_flow(
        [
            rank(2, [[0.1, 1.0, 0.9], [0.2, 0.2, 1.6]], [0.5, 0.1]),
            rank(2, [[0.3, 1.0, 0.7], [0.2, 0.2, 1.6]], [0.3, 0.3]),
        ]
    )
    for a, b in zip(one["layers"], two["layers"]):
        assert a == pytest.approx(b)
    assert one["layers"][0] == pytest.approx({"system": 0.1, "image": 0.5, "question": 0.4})
    assert one["cliff_layer"] == two["cliff_layer"] == 1
    assert two["image_map_layers"] == [
        {"layer": 0, "per_image": [[[pytest.approx(0.2), None], [None, pytest.approx(0.1)]]]}
    ]
    with pytest.raises(flow.FlowUnavailable, match="2 of 4 heads"):
        flow.combine_flow([rank(2, [[0.1, 1.0, 0.9]], [0.5, 0.1])])
    with pytest.raises(flow.FlowUnavailable, match="broken"):
        flow.combine_flow([{"error": "broken"}])


def test_select_tokens_ranks_flow_by_the_given_scores(seed):
    images = [torch.randn(50, 16), torch.randn(30, 16)]
    queries = [torch.randn(3, 16), torch.randn(0, 16)]
    given = [torch.rand(50), None]
    given[0][[4, 9]] = given[0].max() + 1  # a tie at the top: both kept
    sels = select_tokens(
        images,
        queries,
        [10, 6],
        methods=["flow", "flow"],
        merge=[False, False],
        seeds=[0, 0],
        need_scores=True,
        scores=given,
    )
    assert sels[0].kept.tolist() == fref.top_k(given[0], 10).tolist()
    assert {4, 9} <= set(sels[0].kept.tolist())
    assert sels[0].method == "flow" and torch.equal(sels[0].scores, given[0])
    assert torch.equal(sels[0].rows, images[0][sels[0].kept])
    # No question, no scout scores: evenly spaced, as simignore without a query.
    assert sels[1].method == "uniform" and sels[1].scores is None


def test_flow_options():
    opts = PruneOptions.from_kwargs(
        {"prune_method": "flow", "prune_layer": 1, "prune_diagnostics": 3, "prune_flow": True}
    )
    assert (opts.method, opts.prune_layer, opts.flow) == ("flow", 1, True)
    hashed = opts.hashed_kwargs([[1]])
    assert hashed["prune_layer"] == 1 and hashed["prune_flow"] is True
    # prune_layer only matters (and is only hashed) for the flow method.
    assert "prune_layer" not in PruneOptions.from_kwargs({"prune_layer": 3}).hashed_kwargs([[1]])
    assert PruneOptions.from_kwargs({"prune_method": "flow"}).scout_layers == 2
    for bad in (0, -1, 1025, 1.0, True, "2"):
        with pytest.raises(PruneOptionError, match="prune_layer must be an integer in"):
            PruneOptions.from_kwargs({"prune_layer": bad})
    with pytest.raises(PruneOptionError, match="prune_flow needs prune_diagnostics"):
        PruneOptions.from_kwargs({"prune_flow": True})
    with pytest.raises(PruneOptionError, match="prune_flow must be true or false"):
        PruneOptions.from_kwargs({"prune_flow": 1, "prune_diagnostics": 3})
    with pytest.raises(PruneOptionError, match="at most the model's 2 decoder layers, got 3"):
        PruneOptions.from_kwargs({"prune_method": "flow", "prune_layer": 3}).check_layers(2)
    with pytest.raises(PruneOptionError, match="at most the model's 2 decoder layers, got 3"):
        PruneOptions.from_kwargs({"prune_layer": 3}).check_layers(2)  # every method, as HTTP
    # What the worker could not run is refused in the processor, naming the kwarg.
    gemma = types.SimpleNamespace(model_type="gemma2", num_hidden_layers=4)
    flow.check_supported(PruneOptions(), gemma)  # neither flow method nor flow diagnostics
    with pytest.raises(PruneOptionError, match="prune_method: information flow supports llama"):
        flow.check_supported(PruneOptions(method="flow"), gemma)
    with pytest.raises(PruneOptionError, match="prune_flow: information flow supports"):
        flow.check_supported(PruneOptions(flow=True, diagnostics_id=1), gemma)


def test_a_checkpoint_declares_its_scout_depth():
    from transformers import LlamaConfig, LlavaConfig

    from lvlm_prune.models.shapes import released_model_dir

    def config(declared=None):
        cfg = LlavaConfig(text_config=LlamaConfig(num_hidden_layers=3))
        if declared is not None:
            cfg.lvlm_prune = declared
        return cfg

    assert options.default_prune_layer(config()) == options.DEFAULT_PRUNE_LAYER
    assert options.checkpoint_defaults(config({"prune_layer": 3})) == {"prune_layer": 3}
    released = LlavaConfig.from_pretrained(released_model_dir())
    assert options.default_prune_layer(released) == 1  # lvlm-prune-shapes: its cliff layer
    for bad, message in (
        ({"prune_layer": 4}, "at most the model's 3 decoder layers, got 4"),
        ({"prune_layer": 0}, "prune_layer must be an integer in"),
        ({"keep_ratio": 0.5}, "may set only ['prune_layer']"),
        ([1], "may set only ['prune_layer']"),
    ):
        with pytest.raises(PruneOptionError, match="config.json 'lvlm_prune'") as err:
            options.checkpoint_defaults(config(bad))
        assert message in str(err.value) and err.value.kwarg == "lvlm_prune"


# ---- in a real engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = make_llm(tiny_model_dir)
    yield engine
    close_llm(engine)


def pop_diagnostics(llm, diag_id: int) -> list[dict]:
    (result,) = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
    return result[diag_id]


def served_flow(llm, req, diag_id):
    req["mm_processor_kwargs"].update(prune_diagnostics=diag_id, prune_flow=True)
    out = llm.generate(req, SAMPLING, use_tqdm=False)[0]
    got = flow.fetch_flow(llm, diag_id, out.prompt_token_ids)
    return out, got, pop_diagnostics(llm, diag_id)


def assert_flow_matches(got, want_shares, want_maps, kept, *, atol=ATOL):
    assert len(got["layers"]) == LAYERS
    for layer, (shares, want) in enumerate(zip(got["layers"], want_shares)):
        values = [shares["system"], shares["image"], shares["question"]]
        assert abs(sum(values) - 1) < 1e-4, (layer, values)
        diff = max(abs(a - b) for a, b in zip(values, want))
        assert diff < atol, f"layer {layer}: {values} vs transformers {want} ({diff:.2e})"
    assert [m["layer"] for m in got["image_map_layers"]] == list(range(LAYERS))
    for entry in got["image_map_layers"]:
        for grid, indices, want in zip(entry["per_image"], kept, want_maps[entry["layer"]]):
            flat = [v for row in grid for v in row]
            assert len(grid) == 24 and all(len(row) == 24 for row in grid)
            assert [i for i, v in enumerate(flat) if v is not None] == indices
            values = torch.tensor([flat[i] for i in indices], dtype=torch.float64)
            diff = float((values - want).abs().max())
            # A map's values are each ~1/N: 1e-4 of its largest value, not 1e-4 absolute (that
            # would let a map 6 % off pass). Measured: ~1e-9 absolute.
            assert diff < atol * float(want.max()), (
                f"layer {entry['layer']} map differs by {diff:.2e}"
            )
    assert got["cliff_layer"] == flow.cliff_layer([s[1] for s in want_shares])


CASES = {  # name -> (images, keep_ratio)
    "keep1.0": ((0,), 1.0),
    "keep0.25": ((0,), 0.25),
    "two-images-keep0.25": ((0, 1), 0.25),
}


@pytest.mark.parametrize("case", CASES)
def test_flow_diagnostics_match_transformers_eager_attention(llm, tiny_model_dir, case):
    images, ratio = CASES[case]
    out, got, diags = served_flow(llm, request(images, keep_ratio=ratio), 500 + len(case))
    q_ids = ref.query_ids(tiny_model_dir, out.prompt_token_ids)
    k = round(N * ratio)
    kept = [ref.reference_kept(tiny_model_dir, make_image(s), q_ids, k) for s in images]
    assert [d["kept_indices"] for d in diags] == [x.tolist() for x in kept]
    rows = [ref.pruned_rows(tiny_model_dir, make_image(s), x) for s, x in zip(images, kept)]
    shares, maps = fref.prompt_flow(tiny_model_dir, out.prompt_token_ids, rows, kept)
    assert_flow_matches(got, shares, maps, [x.tolist() for x in kept])


def test_flow_comparison_can_fail(llm, tiny_model_dir, monkeypatch):
    """Negative controls: without the rotary embedding, or with the last row's attention as the
    map, the comparison above misses its tolerance."""
    out, good, _ = served_flow(llm, request(keep_ratio=0.25), 601)
    q_ids = ref.query_ids(tiny_model_dir, out.prompt_token_ids)
    kept = ref.reference_kept(tiny_model_dir, make_image(0), q_ids, 144)
    rows = [ref.pruned_rows(tiny_model_dir, make_image(0), kept)]
    shares, maps = fref.prompt_flow(tiny_model_dir, out.prompt_token_ids, rows, [kept])
    assert_flow_matches(good, shares, maps, [kept.tolist()])

    real = flow._project

    def without_rotary(attn, positions, normed):
        class NoRotary:
            def __getattr__(self, name):
                return getattr(attn, name)

            @staticmethod
            def rotary_emb(_positions, q, k):
                return q, k

        return real(NoRotary(), positions, normed)

    monkeypatch.setattr(flow, "_project", without_rotary)
    _, broken, _ = served_flow(llm, request(keep_ratio=0.25), 602)
    with pytest.raises(AssertionError, match="differs|vs transformers"):
        assert_flow_matches(broken, shares, maps, [kept.tolist()])
    monkeypatch.undo()

    _, last_row_maps = fref.prompt_flow(
        tiny_model_dir, out.prompt_token_ids, rows, [kept], map_rows="last"
    )
    with pytest.raises(AssertionError, match="map differs"):
        assert_flow_matches(good, shares, last_row_maps, [kept.tolist()])


@pytest.mark.parametrize("prune_layer", [1, 2])
def test_flow_method_keeps_what_an_independent_scout_keeps(llm, tiny_model_dir, prune_layer):
    diag_id = 700 + prune_layer
    out = llm.generate(
        request(
            keep_ratio=0.25,
            prune_method="flow",
            prune_layer=prune_layer,
            prune_diagnostics=diag_id,
        ),
        SAMPLING,
        use_tqdm=False,
    )[0]
    (diag,) = pop_diagnostics(llm, diag_id)
    q_ids = ref.query_ids(tiny_model_dir, out.prompt_token_ids)
    scores = fref.scout_scores(tiny_model_dir, make_image(0), q_ids, prune_layer)
    torch.testing.assert_close(torch.tensor(diag["scores"]), scores, atol=1e-6, rtol=1e-4)
    kept = fref.top_k(scores, 144)
    assert diag["method"] == "flow" and diag["kept_indices"] == kept.tolist()
    # The LLM ran on exactly those rows: greedy ids and logprobs as transformers'.
    rows = ref.pruned_rows(tiny_model_dir, make_image(0), kept)
    ids, hf_lp = ref.greedy(
        tiny_model_dir, out.prompt_token_ids, [rows], [kept], SAMPLING.max_tokens
    )
    assert list(out.outputs[0].token_ids) == ids
    diff = max(
        abs(lp.logprob - float(hf_lp[step, token]))
        for step, tops in enumerate(out.outputs[0].logprobs)
        for token, lp in tops.items()
    )
    assert diff < LOGPROB_ATOL
    # Negative control: ranking by the last question token alone keeps other tokens.
    last_only = fref.scout_scores(
        tiny_model_dir, make_image(0), q_ids, prune_layer, last_row_only=True
    )
    assert fref.top_k(last_only, 144).tolist() != diag["kept_indices"]
    assert not torch.equal(kept, ref.reference_kept(tiny_model_dir, make_image(0), q_ids, 144))


def test_flow_method_with_two_images_and_flow_diagnostics(llm, tiny_model_dir):
    """Both at once: each image scouted by the question, and the flow pass over the result."""
    out, got, diags = served_flow(llm, request((0, 1), keep_ratio=0.25, prune_method="flow"), 801)
    q_ids = ref.query_ids(tiny_model_dir, out.prompt_token_ids)
    kept = [
        fref.top_k(fref.scout_scores(tiny_model_dir, make_image(s), q_ids, 2), 144) for s in (0, 1)
    ]
    assert [d["kept_indices"] for d in diags] == [x.tolist() for x in kept]
    rows = [ref.pruned_rows(tiny_model_dir, make_image(s), x) for s, x in zip((0, 1), kept)]
    shares, maps = fref.prompt_flow(tiny_model_dir, out.prompt_token_ids, rows, kept)
    assert_flow_matches(got, shares, maps, [x.tolist() for x in kept])


def test_flow_data_is_taken_once_and_bounded(llm):
    out, _, _ = served_flow(llm, request(keep_ratio=0.5), 901)
    with pytest.raises(flow.FlowUnavailable, match="no flow data for diagnostics id 901"):
        flow.fetch_flow(llm, 901, out.prompt_token_ids)
    # Popping the diagnostics drops rows a flow pass never took.
    llm.generate(request(keep_ratio=0.5, prune_diagnostics=902, prune_flow=True), SAMPLING)
    (size,) = llm.collective_rpc("lvlm_prune_store_size")
    assert size == 2  # the selection's entry and the kept rows
    pop_diagnostics(llm, 902)
    assert llm.collective_rpc("lvlm_prune_store_size") == [0]
    # A prompt that is not the one the request ran is refused, not misread.
    llm.generate(request(keep_ratio=0.5, prune_diagnostics=903, prune_flow=True), SAMPLING)
    with pytest.raises(flow.FlowUnavailable, match="not the input this request ran"):
        flow.fetch_flow(llm, 903, out.prompt_token_ids[:-200])
    pop_diagnostics(llm, 903)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"prune_method": "flow", "prune_layer": 3}, "at most the model's 2 decoder layers"),
        ({"prune_layer": 0}, "prune_layer must be an integer in [1, 1024]"),
        ({"prune_flow": True}, "prune_flow needs prune_diagnostics"),
    ],
)
def test_bad_flow_kwargs_raise_and_the_engine_keeps_serving(llm, bad, message):
    with pytest.raises(ValueError) as err:
        llm.generate(request(keep_ratio=0.25, **bad), SAMPLING, use_tqdm=False)
    assert message in str(err.value)
    out = llm.generate(request(keep_ratio=0.25, prune_method="flow"), SAMPLING, use_tqdm=False)
    assert sum(t == ref.IMAGE_TOKEN_ID for t in out[0].prompt_token_ids) == 144


def test_explain_writes_the_picture_and_the_json(tiny_model_dir, tmp_path):
    """``lvlm-prune explain``: one request through the offline engine, flow method and flow
    diagnostics; the JSON is the server's ``pruning`` with diagnostics "flow"."""
    import json
    import subprocess
    import sys

    image = tmp_path / "scene.png"
    make_image(3).save(image)
    question = "What is the color of the car?"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvlm_prune.server.cli",
            "explain",
            str(image),
            question,
            "--model",
            tiny_model_dir,
            "--keep-ratio",
            "0.25",
            "--method",
            "flow",
            "--max-tokens",
            "4",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "out" / "scene"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "scene.json").read_text())
    png = (tmp_path / "out" / "scene.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 600_000
    (entry,) = result["per_image"]
    q_ids = ref.load(tiny_model_dir)[1].tokenizer.encode(question, add_special_tokens=False)
    want = fref.top_k(fref.scout_scores(tiny_model_dir, make_image(3), q_ids, 2), 144)
    assert entry["method"] == "flow" and entry["kept_indices"] == want.tolist()
    assert entry["grid"] == [24, 24] and len(entry["scores"]) == 24
    flow_out = result["flow"]
    assert len(flow_out["layers"]) == LAYERS
    assert all(abs(sum(layer.values()) - 1) < 1e-4 for layer in flow_out["layers"])
    assert [m["layer"] for m in flow_out["image_map_layers"]] == list(range(LAYERS))
    assert result["prompt_tokens"] > 144 and f"wrote {tmp_path}" in proc.stdout
