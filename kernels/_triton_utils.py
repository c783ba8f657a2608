"""Guarded Triton import, and the check that a kernel can run where its tensors are.

Triton is optional (the CPU install has no GPU to run it on), so every kernel module imports it
from here and defines its kernels only when ``HAS_TRITON``; ``import lvlm_prune.kernels`` works
without it.

Triton has no CPU backend: on CPU tensors kernels run only in Triton's interpreter, and only when
``TRITON_INTERPRET=1`` was set before ``triton`` was first imported (``@triton.jit``, Triton's own
``tl.cumsum`` among them, decides at import). Slow: for correctness checks on small shapes.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = tl = JITFunction = None

HAS_TRITON = triton is not None


def interpreter_active() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1``)."""
    # Triton's own jit helpers (tl.cumsum) were decorated at import: they tell the real mode.
    return HAS_TRITON and not isinstance(tl.cumsum, JITFunction)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host-built tensor (offsets) to ``device`` without a stream sync: a plain
    ``.to("cuda")`` of pageable memory waits for all queued GPU work first."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def require_triton(device: torch.device) -> None:
    """Raise a clear error where the Triton path cannot run on ``device``."""
    if not HAS_TRITON:
        raise RuntimeError(
            "the Triton backend needs the `triton` package (pip install triton); "
            "set LVLM_PRUNE_BACKEND=torch to use the torch path"
        )
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"Triton kernels cannot run on {device.type} tensors: Triton has no CPU backend. "
            "Set TRITON_INTERPRET=1 before triton is imported to run them in its interpreter "
            "(slow), or use LVLM_PRUNE_BACKEND=torch"
        )
