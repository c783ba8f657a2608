"""The kernel benchmark's CPU modes: --smoke runs in seconds; without a GPU it says so and stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

MODULE = "lvlm_prune.benchmarks.bench_kernels"


def _run(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # its own choice
    return subprocess.run(
        [sys.executable, "-m", MODULE, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_smoke_mode(tmp_path):
    out = tmp_path / "kernels-smoke.json"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke torch  B=3 T=4" in proc.stdout
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        assert "kept identical to torch: True" in proc.stdout, proc.stdout
    run = json.loads(out.read_text())["runs"][-1]
    assert run["device"] == "cpu" and run["command"].startswith(f"python -m {MODULE} --smoke")
    assert run["torch"] == torch.__version__
    assert all(row["torch_ms"] > 0 for row in run["rows"] if "torch_ms" in row)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_gpu_exits_cleanly_with_a_message():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
