"""Environment defaults for vLLM on a machine without a GPU or a model hub.

The tests, the benchmarks and the built-in tiny model all run this way; each variable is only a
default (``setdefault``), so a user's own setting wins. Must run before vLLM is imported.
"""

from __future__ import annotations

import os

OFFLINE_CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Unset, vLLM on CPU takes most of the machine's memory for KV cache.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # In-process engine: loads in seconds instead of ~30 s, and the caller reaches the worker.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def use_offline_cpu_env() -> None:
    for key, value in OFFLINE_CPU_ENV.items():
        os.environ.setdefault(key, value)
