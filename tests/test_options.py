"""keep_count, option parsing and plugin registration: pure functions, no engine."""

import importlib.metadata
import math

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
