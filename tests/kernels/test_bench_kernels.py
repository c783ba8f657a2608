"""``lvlm-prune bench kernels`` without a GPU: --smoke runs in seconds, --compile-only writes the
compile table and the roofline, and the GPU mode says it has no GPU and stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lvlm_prune.kernels._triton_utils import HAS_TRITON

COMMAND = "python -m lvlm_prune.benchmarks kernels"


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # its own choice
    return subprocess.run(
        [sys.executable, "-m", "lvlm_prune.benchmarks", "kernels", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_smoke_mode(tmp_path):
    proc = _run("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke torch  B=3 T=4" in proc.stdout
    if HAS_TRITON:
        assert "kept identical to torch: True" in proc.stdout, proc.stdout
    result = json.loads((tmp_path / "kernels-smoke.json").read_text())
    assert result["mode"] == "smoke" and result["command"].startswith(f"{COMMAND} --smoke")
    assert result["machine"]["torch"] and result["machine"]["cpu"]
    assert all(row["torch_ms"] > 0 for row in result["rows"])
    assert "| images | T |" in (tmp_path / "kernels-smoke.md").read_text()


@pytest.mark.skipif(not HAS_TRITON, reason="compiling needs triton")
def test_compile_only_writes_the_table_and_the_roofline(tmp_path):
    proc = _run("--compile-only", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "kernels-compile.json").read_text())
    assert result["failures"] == []
    assert {r["target"] for r in result["records"]} == {"sm_80", "sm_90", "sm_100"}
    kernels = {r["kernel"].split(".")[-1] for r in result["records"]}
    assert {"_relevance_kernel", "_topk_select_kernel", "_merge_assign_kernel"} <= kernels
    models = {(r["model"], r["kernel"], r["t"]) for r in result["roofline"]}
    for model in ("LLaVA-1.5-7B", "Qwen2.5-VL-7B"):
        assert {(model, "relevance", 32), (model, "relevance", 512)} <= models
    llava = next(r for r in result["roofline"] if r["model"] == "LLaVA-1.5-7B")
    assert llava["bytes"] == (576 + 32) * 4096 * 2 + 576 * 4  # image + query in, scores out
    text = (tmp_path / "kernels-compile.md").read_text()
    assert "### Static roofline" in text and "H100 SXM floor µs" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_gpu_exits_cleanly_with_a_message():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_the_console_script_knows_the_subcommand():
    from lvlm_prune.benchmarks.__main__ import build_parser

    args = build_parser().parse_args(["kernels", "--compile-only"])
    assert args.name == "kernels" and args.compile_only and not args.smoke
