"""Every environment variable lvlm-prune reads or sets a default for, in one place (as vLLM's
``vllm/envs.py``).

Ours are read through the functions below. Others' (vLLM's, the model hub's, Triton's) are only
ever *defaulted* (``setdefault``), so a user's own setting wins, and must be defaulted before vLLM
or Triton is first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---- ours ----------------------------------------------------------------------------------

LVLM_PRUNE_BACKEND = "LVLM_PRUNE_BACKEND"
"""``auto`` (Triton on CUDA tensors, torch elsewhere), ``torch`` or ``triton``: forces the
selection's backend, for bisecting and tests."""

LVLM_PRUNE_CACHE = "LVLM_PRUNE_CACHE"
"""Folder for the models built offline (default ``$XDG_CACHE_HOME/lvlm-prune``, else
``~/.cache/lvlm-prune``)."""

LVLM_PRUNE_TEST_SEED = "LVLM_PRUNE_TEST_SEED"
"""Replays one test seed (tests draw a fresh one per run and print it)."""


def backend() -> str:
    return os.environ.get(LVLM_PRUNE_BACKEND, "auto")


def cache_dir() -> Path:
    if root := os.environ.get(LVLM_PRUNE_CACHE):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "lvlm-prune"


def test_seed() -> int | None:
    value = os.environ.get(LVLM_PRUNE_TEST_SEED)
    return int(value) if value else None


# ---- others', defaulted --------------------------------------------------------------------

SERVE_DEFAULTS = {
    "VLLM_NO_USAGE_STATS": "1",
}
"""For ``lvlm-prune serve`` and everything else."""

CPU_DEFAULTS = {
    # Unset, vLLM on CPU takes most of the machine's memory for its KV cache (GiB).
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
"""On machines without CUDA."""

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}
"""Tests and benchmarks: every model is built or shipped locally; nothing may reach a hub."""

IN_PROCESS_DEFAULTS = {
    # The engine in the caller's process: loads in seconds instead of ~30 s, and the caller
    # reaches the worker's diagnostics store directly.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
"""Tests and benchmarks that drive the offline ``LLM`` engine."""

TRITON_INTERPRET = "TRITON_INTERPRET"
"""Triton has no CPU backend: without CUDA, kernels run only in its interpreter, which must be on
before ``triton`` is first imported."""


def _set_defaults(defaults: dict[str, str]) -> None:
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def use_serve_defaults(*, cuda: bool) -> None:
    _set_defaults(SERVE_DEFAULTS)
    if not cuda:
        _set_defaults(CPU_DEFAULTS)


def use_offline_defaults() -> None:
    """Tests and benchmarks: offline, engine in process, CPU defaults without CUDA."""
    import torch

    use_serve_defaults(cuda=torch.cuda.is_available())
    _set_defaults({**OFFLINE_DEFAULTS, **IN_PROCESS_DEFAULTS})


def use_triton_interpreter_without_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault(TRITON_INTERPRET, "1")


def recorded() -> dict[str, str | None]:
    """The variables that shape a measurement, for benchmark result files."""
    keys = (
        LVLM_PRUNE_BACKEND,
        *SERVE_DEFAULTS,
        *CPU_DEFAULTS,
        *OFFLINE_DEFAULTS,
        *IN_PROCESS_DEFAULTS,
        TRITON_INTERPRET,
        "VLLM_CPU_OMP_THREADS_BIND",
        "OMP_NUM_THREADS",
    )
    return {key: os.environ.get(key) for key in keys}
