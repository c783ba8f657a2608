"""keep_count, option parsing and plugin registration: pure functions, no engine."""

import importlib.metadata
import math
from pathlib import Path

import pytest

from lvlm_prune.kernels import keep_count
from lvlm_prune.vllm_plugin.options import PruneOptionError, PruneOptions, select_images


@pytest.mark.parametrize(
    "n,ratio,k",
    [
        (576, 1.0, 576),
        (576, 0.5, 288),
        (576, 0.25, 144),
        (576, 0.11, 64),
        (576, 1e-9, 1),
        (100, 0.07, 7),
        (1, 0.5, 1),
        (577, 0.5, 289),
        (0, 0.5, 0),
    ],
)
def test_keep_count(n, ratio, k):
    assert keep_count(n, ratio) == k


def test_keep_count_min_keep_and_bounds():
    assert keep_count(576, 0.001, min_keep=16) == 16
    assert keep_count(8, 0.1, min_keep=16) == 8
    for ratio in (0, -0.5, 1.01, math.nan, "0.5", True, 10**400):
        with pytest.raises(ValueError, match="keep_ratio must be a number in"):
            keep_count(576, ratio)


def test_options_defaults_are_stock():
    opts = PruneOptions.from_kwargs({"do_resize": True})
    assert opts == PruneOptions() and not opts.active


def test_options_parse_and_hash_the_query():
    opts = PruneOptions.from_kwargs(
        {"keep_ratio": 0.25, "prune_method": "random", "prune_merge": True, "prune_diagnostics": 9}
    )
    assert (opts.keep_ratio, opts.method, opts.merge, opts.diagnostics_id) == (
        0.25,
        "random",
        True,
        9,
    )
    a, b = opts.hashed_kwargs([[5, 6, 7]]), opts.hashed_kwargs([[5, 6, 8]])
    assert a != b and opts.seed_for([5, 6, 7]) != opts.seed_for([5, 6, 8])
    assert opts.hashed_kwargs([[5, 6, 7]]) == a
    assert a["prune_query_ids"] == ((5, 6, 7),)
    seeded = PruneOptions.from_kwargs({"prune_method": "random", "prune_seed": 3})
    assert seeded.seed_for([5, 6, 7]) == seeded.seed_for([9]) == 3


def test_one_query_per_image():
    """A list of queries is one per image in prompt order; a single string serves every image."""
    opts = PruneOptions.from_kwargs({"keep_ratio": 0.25, "prune_query": ["a car", "the door"]})
    assert opts.query == ("a car", "the door")
    assert opts.queries_for(2) == ("a car", "the door")
    assert PruneOptions.from_kwargs({"prune_query": "a car"}).queries_for(3) == ("a car",) * 3
    assert PruneOptions().queries_for(2) is None  # the prompt's text, for every image
    for count in (1, 3):
        with pytest.raises(PruneOptionError, match=rf"prune_query has 2 queries for {count} image"):
            opts.queries_for(count)
    # Each image's ids are their own entry; the shared options are the same for all of them.
    hashed = opts.hashed_kwargs([[1, 2], [3]])
    assert hashed["prune_query_ids"] == ((1, 2), (3,))
    assert select_images(hashed, [1]) == {**hashed, "prune_query_ids": ((3,),)}
    assert select_images(hashed, []) == {**hashed, "prune_query_ids": ()}


@pytest.mark.parametrize("query", [5, ["a", 5], [None], {"a": 1}])
def test_query_must_be_a_string_or_a_list_of_strings(query):
    with pytest.raises(PruneOptionError, match="prune_query must be a string or a list of strings"):
        PruneOptions.from_kwargs({"prune_query": query})


@pytest.mark.parametrize(
    "kwargs", [{"keep_ratio": 2}, {"prune_method": "top"}, {"prune_seed": "1"}]
)
def test_options_errors_are_value_errors_naming_the_kwarg(kwargs):
    with pytest.raises(PruneOptionError, match=next(iter(kwargs))):
        PruneOptions.from_kwargs(kwargs)


def test_entry_point_and_idempotent_register():
    (ep,) = [
        ep
        for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
        if ep.name == "lvlm_prune"
    ]
    register = ep.load()
    register()
    register()
    from vllm import ModelRegistry

    cls = ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration")
    assert cls.__name__ == "LlavaPruneForConditionalGeneration"


# ---- the declarations and what comes from them ------------------------------------------------


def test_docs_table_is_the_generated_one():
    """docs/serving.md's options table is ``markdown_table()``; regenerate it with
    ``python -m lvlm_prune.vllm_plugin.options --write docs/serving.md``."""
    from lvlm_prune.vllm_plugin import options

    doc = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    assert options.TABLE_START in doc and options.TABLE_END in doc
    assert options.with_table(doc) == doc, "docs/serving.md: run " + (
        "python -m lvlm_prune.vllm_plugin.options --write docs/serving.md"
    )
    for opt in options.OPTIONS:
        assert f"`{opt.kwarg or opt.api}`" in options.markdown_table()


def test_every_option_refuses_its_invalid_examples_naming_itself():
    from lvlm_prune.vllm_plugin import options

    for opt in options.PARSED:
        assert opt.default == getattr(PruneOptions(), opt.name)
        for value in opt.kind.invalid_examples():
            with pytest.raises(PruneOptionError, match=f"^{opt.kwarg} must be ") as err:
                PruneOptions.from_kwargs({opt.kwarg: value})
            assert err.value.kwarg == opt.kwarg and opt.kind.rule in str(err.value)


def test_schema_and_serve_flags_come_from_the_declarations():
    from lvlm_prune.server.cli import _own_parser
    from lvlm_prune.server.schemas import PruningRequest
    from lvlm_prune.vllm_plugin import options

    assert list(PruningRequest.model_fields) == [
        "keep_ratio",
        "method",
        "merge",
        "positions",
        "diagnostics",
        "query",
        "requery",
        "seed",
        "prune_layer",
    ]
    given = PruningRequest.model_validate({"method": "random", "query": ["a"], "seed": 3})
    assert given.mm_processor_kwargs() == {
        "prune_method": "random",
        "prune_query": ("a",),
        "prune_seed": 3,
    }
    assert PruningRequest().mm_processor_kwargs() == {}  # the server's defaults apply
    assert PruningRequest(diagnostics="flow").mm_processor_kwargs() == {"prune_flow": True}
    assert [opt.flag for opt in options.FLAGS] == [
        "--keep-ratio",
        "--prune-method",
        "--prune-positions",
    ]
    ours, rest = _own_parser().parse_known_args(
        ["--keep-ratio", "0.5", "--prune-method", "random", "--prune-positions", "compact"]
    )
    assert vars(ours) == {
        "keep_ratio": 0.5,
        "prune_method": "random",
        "prune_positions": "compact",
        "presets": None,  # --preset: named pruning objects, not an option (server/presets.py)
    }
    assert rest == []


def test_image_fields_round_trip():
    """What the processor encodes per image is what the worker decodes."""
    from lvlm_prune.vllm_plugin import options

    opts = PruneOptions.from_kwargs(
        {
            "keep_ratio": 0.5,
            "prune_method": "flow",
            "prune_merge": True,
            "prune_diagnostics": 7,
            "prune_flow": True,
            "prune_layer": 1,
        }
    )
    images = [options.ImageInfo(3, (5, 6), 12), options.ImageInfo(4, (), 16)]
    kwargs = {**options.image_fields(opts, images), "pixel_values": 0}
    assert set(kwargs) == {*options.FIELDS, "pixel_values"}
    fields = options.read_image_fields(kwargs)
    assert kwargs == {"pixel_values": 0}  # popped
    assert fields[options.KEEP_FIELD] == [3, 4]
    assert fields[options.METHOD_FIELD] == ["flow", "flow"]
    assert fields[options.MERGE_FIELD] == [True, True] and fields[options.FLOW_FIELD] == [True] * 2
    assert fields[options.DIAGNOSTICS_FIELD] == [7, 7] and fields[options.LAYER_FIELD] == [1, 1]
    assert fields[options.SEED_FIELD] == [opts.seed_for((5, 6)), opts.seed_for(())]
    assert [t.tolist() for t in fields[options.QUERY_FIELD]] == [[5, 6], []]
    assert fields[options.POSITION_SPAN_FIELD] == [12, 16]  # original: N
    assert options.read_image_fields({"pixel_values": 0}) is None


def test_positions_span_n_or_k_and_are_hashed_only_when_tokens_are_dropped():
    """The span is what ``get_mrope_input_positions`` reads of a (maybe prefix-cached) image:
    kept on the CPU with the request; compact is K, original N."""
    from lvlm_prune.vllm_plugin import options

    images = [options.ImageInfo(3, (), 12)]
    compact = PruneOptions.from_kwargs({"keep_ratio": 0.25, "prune_positions": "compact"})
    fields = options.read_image_fields(options.image_fields(compact, images))
    assert fields[options.POSITION_SPAN_FIELD] == [3]
    assert options.POSITION_SPAN_FIELD in options.CPU_FIELDS
    assert PruneOptions.from_kwargs({}).positions == "original"
    assert compact.hashed_kwargs([[]])[options.POSITIONS] == "compact"
    unpruned = PruneOptions.from_kwargs({"prune_positions": "compact"})
    assert options.POSITIONS not in unpruned.hashed_kwargs([[]])
    with pytest.raises(options.PruneOptionError, match="prune_positions must be"):
        PruneOptions.from_kwargs({"prune_positions": "sideways"})


def test_later_hooks_read_the_normalised_kwargs():
    opts = PruneOptions.from_kwargs(
        {"keep_ratio": 0.25, "prune_method": "flow", "prune_seed": 4, "prune_query": "q"}
    )
    back = PruneOptions.from_hashed(opts.hashed_kwargs([[1]]))
    assert back == PruneOptions(keep_ratio=0.25, method="flow", seed=4)  # query: its ids instead
