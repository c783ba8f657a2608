"""The API tests' server: the benchmarks' harness (``lvlm_prune.benchmarks.harness``), and what
the shared test server is started with."""

import contextlib
import os
import signal
import subprocess

from lvlm_prune.benchmarks.harness import SERVE, Server, free_port, serve

__all__ = [
    "API_KEY",
    "MAX_IMAGES",
    "MODEL",
    "PRESETS",
    "SERVER_KEEP_RATIO",
    "Server",
    "free_port",
    "preset_args",
    "refused_at_start_up",
    "serve",
]

API_KEY = "test-key"
MODEL = "lvlm-prune-tiny"
SERVER_KEEP_RATIO = 0.5
MAX_IMAGES = 2
PRESETS = {"fast": {"keep_ratio": 0.25}, "tight": {"keep_ratio": 0.11, "method": "uniform"}}
"""Served as MODEL:fast and MODEL:tight (``lvlm-prune serve --preset``)."""


def preset_args(presets: dict[str, dict]) -> list[str]:
    import json

    return [
        arg
        for name, pruning in presets.items()
        for arg in ("--preset", f"{name}={json.dumps(pruning)}")
    ]


def refused_at_start_up(args: list[str]) -> tuple[int, str]:
    """``lvlm-prune serve ARGS`` expected to exit at start-up: its status and stderr. Had it
    started a server instead, nothing of it outlives the call."""
    proc = subprocess.Popen(
        [*SERVE, *args, "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr
