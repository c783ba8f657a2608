"""The benchmarks, run for real in their seconds-long --smoke form on the tiny model.

One ``python -m lvlm_prune.benchmarks all --smoke`` subprocess (one shared in-process engine) per
module; the tests assert on the JSON it writes: structure, and the things that can go wrong
(token counts per ratio, KV capacity growing as the ratio falls, stock agreeing with itself,
instrumentation that actually saw the pieces it claims to time).
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lvlm_prune.benchmarks import common, fidelity
from lvlm_prune.kernels import keep_count

N = 576
SMOKE_RATIOS = (1.0, 0.5, 0.25, 0.11)
PRUNED_CONFIGS = [f"{m}@{r:g}" for r in SMOKE_RATIOS[1:] for m in ("simignore", "uniform")]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "lvlm_prune.benchmarks", "all", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {p.stem.split("-tiny")[0]: json.loads(p.read_text()) for p in out.glob("*.json")}
    return {"out": out, "results": results, "stdout": proc.stdout}


def test_all_writes_every_benchmark_and_a_summary(smoke):
    assert set(smoke["results"]) == {
        "latency",
        "throughput",
        "overhead",
        "fidelity",
        "prefill-gpu",
        "multiturn",
    }
    summary = (smoke["out"] / "summary-tiny.md").read_text()
    for title in (
        "### Latency",
        "### Throughput",
        "### Overhead",
        "### Fidelity",
        "### LLM prefill",
        "### Multi-turn conversations",
    ):
        assert title in summary
    for result in smoke["results"].values():
        machine = result["machine"]
        assert machine["cpu"] and machine["torch"] and machine["memory_gib"] > 0
        assert result["command"].startswith("python -m lvlm_prune.benchmarks all --smoke")


def test_latency_rows_token_counts_and_ratios(smoke):
    result = smoke["results"]["latency"]
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["stock", *PRUNED_CONFIGS]
    stock = rows["stock"]
    assert stock["ttft_ratio"] == 1.0 and stock["token_bound"] == 1.0
    for name in PRUNED_CONFIGS:
        row = rows[name]
        k = keep_count(N, row["keep_ratio"])
        assert stock["prompt_tokens"] - row["prompt_tokens"] == N - k, name
        assert row["token_bound"] == pytest.approx(row["prompt_tokens"] / stock["prompt_tokens"])
        assert row["ttft_ratio"] == pytest.approx(row["ttft"]["median"] / stock["ttft"]["median"])
    assert rows["simignore@0.11"]["prompt_tokens"] == stock["prompt_tokens"] - (N - 64)
    quiet = result["quiet"]
    measured = len(quiet["rounds"])
    assert quiet["repeats"] == result["settings"]["repeats"] <= measured
    for row in rows.values():
        for key in ("ttft", "engine_prefill", "e2e"):
            s = row[key]
            assert s["n"] == (quiet["quiet_rounds"] or measured) == len(s["values"])
            assert len(row["all_rounds"][key]) == measured
            assert 0 < s["min"] <= s["median"] <= s["max"]
        assert row["engine_prefill"]["median"] <= row["ttft"]["median"]
        assert row["ttft"]["median"] < row["e2e"]["median"]
    assert "first_token_latency" in result["ttft_source"]
    assert result["settings"]["prefix_caching"] is False
    if _has_matplotlib():
        assert (smoke["out"] / "latency-tiny.png").stat().st_size > 1000


@pytest.mark.parametrize(("model", "size"), [("qwen-tiny", "168x280"), ("qwen3-tiny", "192x320")])
def test_latency_on_qwen_follows_the_image_size(tmp_path, model, size):
    """Qwen's image tokens follow the image: 168 x 280 px is 6 x 10 = 60 tokens for Qwen2.5-VL
    (28 px a token), 192 x 320 px the same for Qwen3-VL (32 px); the size names the result files
    so two resolutions never overwrite each other."""
    cmd = [sys.executable, "-m", "lvlm_prune.benchmarks", "latency", "--model", model]
    cmd += ["--smoke", "--image-size", size, "--ratios", "1.0", "0.25", "--out", str(tmp_path)]
    proc = subprocess.run(
        cmd + ["--methods", "simignore"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / f"latency-{model}-{size}.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["stock"]["prompt_tokens"] - rows["simignore@0.25"]["prompt_tokens"] == 60 - 15
    assert size in result["settings"]["image_per_request"]


@pytest.mark.parametrize("text", ["672", "672x", "x448", "axb", "20x448"])
def test_image_size_option_refuses_what_is_not_width_x_height(text):
    import argparse

    assert common.image_size("672x448") == (672, 448)
    with pytest.raises(argparse.ArgumentTypeError, match="672x448|28 px"):
        common.image_size(text)


def test_defaults_follow_smoke_unless_given():
    from lvlm_prune.benchmarks.__main__ import build_parser

    args = common.resolve_scaled(build_parser().parse_args(["latency", "--smoke"]))
    assert (args.repeats, args.warmup, args.max_tokens) == (2, 1, 4)
    args = common.resolve_scaled(build_parser().parse_args(["latency", "--repeats", "3"]))
    assert (args.repeats, args.warmup, args.max_tokens) == (3, 2, 16)


@pytest.mark.parametrize("name", ["latency", "throughput", "overhead", "multiturn"])
def test_every_timed_benchmark_records_the_machine_around_each_round(smoke, name):
    """The quiet-machine guard's record: before and during every measured round, noisy exactly
    when other processes used more than the limit during it."""
    result = smoke["results"][name]
    records = result["quiet"].values() if name == "multiturn" else [result["quiet"]]
    if name == "overhead":
        records = [result["quiet"], result["flow_quiet"]]
    for record in records:
        assert record["cotenant_limit"] == common.COTENANT_LIMIT
        assert len(record["rounds"]) >= record["repeats"] >= 1
        for r in record["rounds"]:
            assert 0 <= r["cotenant_before"] <= 1 and 0 <= r["cotenant_during_max"] <= 1
            assert r["noisy"] == (r["cotenant_during_max"] > record["cotenant_limit"])
            assert len(r["loadavg_before"]) == 3
        assert record["quiet_rounds"] == sum(not r["noisy"] for r in record["rounds"])
        assert record["marked"] == (record["quiet_rounds"] < record["repeats"])
    assert "Quiet-machine guard" in (smoke["out"] / f"{name}-tiny.md").read_text()


def test_throughput_kv_capacity_grows_as_keep_ratio_falls(smoke):
    result = smoke["results"]["throughput"]
    kv = result["kv_cache"]
    assert kv["num_blocks"] > 0 and kv["block_size"] > 0
    assert kv["tokens"] == kv["num_blocks"] * kv["block_size"]
    rows = result["rows"]
    assert [r["keep_ratio"] for r in rows] == sorted(SMOKE_RATIOS, reverse=True)
    max_tokens = result["settings"]["max_tokens"]
    for row in rows:
        blocks = math.ceil((row["prompt_tokens_per_request"] + max_tokens) / kv["block_size"])
        assert row["kv_capacity_requests"] == kv["num_blocks"] // blocks
        assert row["requests_per_s"] > 0 and row["prompt_tokens_per_s"] > 0
    capacity = [r["kv_capacity_requests"] for r in rows]
    by_tokens = [r["kv_capacity_requests_token_granular"] for r in rows]
    assert capacity == sorted(capacity) and len(set(capacity)) == len(capacity), capacity
    assert by_tokens == sorted(by_tokens) and len(set(by_tokens)) == len(by_tokens), by_tokens
    assert rows[0]["kv_capacity_ratio"] == 1.0 and rows[-1]["kv_capacity_ratio"] > 2


def test_overhead_instrumentation_saw_every_piece(smoke):
    result = smoke["results"]["overhead"]
    rows = {r["config"]: r for r in result["rows"]}
    for name, row in rows.items():
        m = row["median_seconds"]
        assert m["ttft"] > 0 and m["processor"] > 0, name
        assert m["vision_tower"] > 0 and m["projector"] > 0, name
        assert m["llm_forward"] > 0, f"{name}: the LLM forward wrapper never fired"
        assert m["embed_multimodal"] >= m["vision_tower"], name
        assert 0 <= row["selection_share_of_ttft"] < 1
    assert rows["stock"]["median_seconds"]["selection"] == 0, (
        "keep_ratio 1.0 must skip the selection"
    )
    for name in PRUNED_CONFIGS:
        row = rows[name]
        assert row["median_seconds"]["selection"] > 0, name
        # The plugin's own clock runs around the call the benchmark's wrapper times, and inside
        # embed_multimodal: the three must nest.
        m = row["median_seconds"]
        assert m["selection"] <= m["selection_recorded_by_plugin"] <= m["embed_multimodal"], name
    flops = result["estimated_flops_stock"]
    assert flops["vision_layers_run"] == 1  # TINY: 2 CLIP layers, feature layer -2
    assert flops["llm"] > 0 and flops["vision_tower"] > 0


def test_fidelity_stock_agrees_with_itself_and_intervals_hold(smoke):
    result = smoke["results"]["fidelity"]
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["stock", *PRUNED_CONFIGS, "stock (repeat)"]
    assert rows["stock"]["agreement_with_stock"] == 1.0
    assert rows["stock (repeat)"]["agreement_with_stock"] == 1.0
    assert rows["stock (repeat)"]["predictions"] == rows["stock"]["predictions"]
    for row in rows.values():
        assert row["n"] == result["n_items"] == 6
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi
        lo, hi = row["agreement_ci95"]
        assert lo <= row["agreement_with_stock"] <= hi
        assert set(row["predictions"]) <= set("ABCD")
    assert "only agreement" in result["note"]


def test_prefill_gpu_smoke_through_the_console_script(tmp_path):
    script = Path(sys.executable).with_name("lvlm-prune")
    proc = subprocess.run(
        [str(script), "bench", "prefill-gpu", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "prefill-gpu-tiny-cpu.json").read_text())
    assert [r["image_tokens"] for r in result["rows"]] == [576, 288, 144, 64]
    assert [r["prompt_tokens"] for r in result["rows"]] == [636, 348, 204, 124]
    assert result["rows"][0]["ratio"] == 1.0
    assert result["command"].startswith("lvlm-prune bench prefill-gpu --smoke")


def test_prefill_gpu_without_cuda_exits_cleanly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the full prefill-gpu benchmark would run")
    proc = subprocess.run(
        [sys.executable, "-m", "lvlm_prune.benchmarks", "prefill-gpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs a CUDA GPU" in proc.stdout
    assert not list(tmp_path.glob("*.json"))


def test_wilson_interval():
    assert common.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert common.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert common.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert common.wilson_interval(0, 0) == (0.0, 1.0)


def test_synthetic_set_round_trips_and_images_load_every_way(tmp_path):
    path = tmp_path / "set.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvlm_prune.benchmarks",
            "fidelity",
            "--make-synthetic",
            str(path),
            "--items",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    items = fidelity.load_jsonl(path)
    assert len(items) == 5
    for item in items:
        assert 2 <= len(item["options"]) <= 4
        assert 0 <= fidelity.answer_index(item) < len(item["options"])
        assert fidelity.load_image(item).size == (336, 336)
        assert fidelity.prompt_for(item).startswith("USER: <image>\n")
    image = fidelity.load_image(items[0])
    image.save(tmp_path / "a.png")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    for ref in ("a.png", str(tmp_path / "a.png"), data_url):
        loaded = fidelity.load_image({"image": ref, "_base": tmp_path})
        assert list(loaded.getdata())[:10] == list(image.getdata())[:10]
    assert fidelity.answer_index({"answer": "b", "options": ["x", "y"]}) == 1
    assert fidelity.answer_index({"answer": 0, "options": ["x", "y"]}) == 0
    with pytest.raises(ValueError, match="out of range"):
        fidelity.answer_index({"answer": "C", "options": ["x", "y"]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "question": "q", "options": ["x", "y"]}) + "\n")
    with pytest.raises(ValueError, match="missing"):
        fidelity.load_jsonl(bad)


def test_fidelity_reads_a_jsonl_with_image_files(tmp_path):
    """A user's set on disk (images as files beside the JSONL) through the real engine."""
    items = fidelity.make_synthetic(4, seed=3)
    for i, item in enumerate(items):
        fidelity.load_image(item).save(tmp_path / f"img{i}.png")
        item["image"] = f"img{i}.png"
        item["answer"] = fidelity.answer_index(item)  # as an index this time
    fidelity.write_jsonl(items, tmp_path / "set.jsonl")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvlm_prune.benchmarks",
            "fidelity",
            "--smoke",
            "--data",
            str(tmp_path / "set.jsonl"),
            "--ratios",
            "1.0",
            "0.25",
            "--methods",
            "uniform",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "fidelity-tiny.json").read_text())
    assert [r["config"] for r in result["rows"]] == ["stock", "uniform@0.25", "stock (repeat)"]
    assert result["n_items"] == 4 and result["data"].endswith("set.jsonl")
    assert result["rows"][-1]["agreement_with_stock"] == 1.0
    assert "only agreement" in result["note"]
