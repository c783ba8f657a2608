"""The API tests' server: the benchmarks' harness (``lvlm_prune.benchmarks.harness``), and what
the shared test server is started with."""

from lvlm_prune.benchmarks.harness import Server, free_port, serve

__all__ = [
    "API_KEY",
    "MAX_IMAGES",
    "MODEL",
    "PRESETS",
    "SERVER_KEEP_RATIO",
    "Server",
    "free_port",
    "preset_args",
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
