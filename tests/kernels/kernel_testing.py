"""Shared by the kernel tests: Triton's interpreter on CPU, fresh seeds, poisoned outputs.

Every test module here imports this first. It is not a ``conftest.py`` on purpose: ``tests/`` has
no packages, and a second ``conftest.py`` would replace ``tests/conftest.py`` as the ``conftest``
module that other tests import from. The fixtures (``seed``, ``poison_outputs``) are in
``tests/conftest.py``.

Triton has no CPU backend; without CUDA its kernels run in the interpreter, which must be switched
on (``TRITON_INTERPRET=1``) before ``triton`` is first imported; ``tests/conftest.py`` does that.
If something imported triton earlier anyway, collection fails loudly rather than skipping the
Triton tests in silence.
"""

from __future__ import annotations

import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lvlm_prune.kernels._triton_utils import HAS_TRITON, interpreter_active  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")

if HAS_TRITON and not CUDA and not interpreter_active():
    raise RuntimeError(
        "no CUDA, and triton was imported before TRITON_INTERPRET=1 was set, so its interpreter "
        "is off: run `TRITON_INTERPRET=1 python -m pytest tests/kernels`"
    )
_SKIP = "triton is not installed (pip install triton)" if not HAS_TRITON else None
requires_triton = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-only shapes: needs a CUDA GPU")

DTYPES = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float32, id="fp32"),
]

# (dtype, atol, rtol) for cosine scores against a float64 computation on the same (rounded)
# inputs. The kernels upcast on load and bf16/fp16 values are exact in fp32/tf32, so the only
# error is fp32 accumulation over D: the input dtype does not widen the tolerance.
SCORE_TOLS = [
    pytest.param((torch.bfloat16, 2e-5, 1e-4), id="bf16"),
    pytest.param((torch.float16, 2e-5, 1e-4), id="fp16"),
    pytest.param((torch.float32, 2e-5, 1e-4), id="fp32"),
]
# Merged rows are means cast back to the model dtype: one rounding of that dtype.
ROW_TOLS = {
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-5, 1e-5),  # merged in fp32, as the reference
}


def assert_close(actual, expected, atol, rtol, what="", seed=None) -> None:
    """Like torch.testing.assert_close, but names the first mismatching indices and the seed."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())  # NaN counts as bad
    if bool(bad.any()):
        idx = bad.nonzero()[:8].tolist()
        pairs = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"first (index, got, want): {pairs}; seed={seed}"
        )


def assert_equal(actual, expected, what="", seed=None) -> None:
    """Exact comparison for index outputs, naming the first differing positions."""
    actual, expected = actual.cpu(), expected.cpu()
    if actual.shape != expected.shape or not torch.equal(actual, expected):
        diff = []
        if actual.shape == expected.shape:
            diff = (actual != expected).nonzero().flatten()[:8].tolist()
        raise AssertionError(
            f"{what}: got {actual.tolist()[:32]}, want {expected.tolist()[:32]} "
            f"(first differing positions {diff}); seed={seed}"
        )


def relevance_f64(images, queries, reduce="max") -> list[torch.Tensor]:
    """The relevance scores computed independently, in float64."""
    out = []
    for img, q in zip(images, queries):
        if q.shape[0] == 0 or img.shape[0] == 0:
            out.append(torch.zeros(img.shape[0], dtype=torch.float64))
            continue
        unit = torch.nn.functional.normalize
        x, y = img.cpu().double(), q.cpu().double()
        sim = unit(x, dim=-1, eps=1e-12) @ unit(y, dim=-1, eps=1e-12).T
        out.append(sim.amax(dim=1) if reduce == "max" else sim.mean(dim=1))
    return out


def offsets(lengths) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0)
    return out.to(DEVICE)


def clear_margin_ks(scores64: torch.Tensor, ks, tol: float) -> list[int]:
    """The K among ``ks`` where the K-th and (K+1)-th best reference scores differ by > tol: there
    the kept set is fixed by the scores, whatever the rounding."""
    ordered = torch.sort(scores64, descending=True).values
    return [k for k in ks if k >= ordered.numel() or float(ordered[k - 1] - ordered[k]) > tol]


def random_inputs(shapes, d, dtype, device=DEVICE):
    """Fresh images [N_b, D] and queries [T_b, D] for ``shapes`` = [(N_b, T_b), ...]."""
    images = [torch.randn(n, d, device=device).to(dtype) for n, _ in shapes]
    queries = [torch.randn(t, d, device=device).to(dtype) for _, t in shapes]
    return images, queries


def topk_oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top-K rule spelled out: highest score first, the lower index on ties; kept ascending."""
    values = scores.float().cpu().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return torch.tensor(sorted(order[:k]), dtype=torch.int64)


def unambiguous_positions(image, kept, margin=1e-4) -> torch.Tensor:
    """[K] bool: kept positions whose merged row does not hang on a near-tie in the assignment
    (a dropped row within ``margin`` of two kept rows, by float64 cosine), on CPU."""
    keep = torch.zeros(image.shape[0], dtype=torch.bool)
    keep[kept.cpu()] = True
    unit = torch.nn.functional.normalize
    x = image.cpu().double()
    sim = unit(x[~keep], dim=-1) @ unit(x[kept.cpu()], dim=-1).T
    ok = torch.ones(kept.shape[0], dtype=torch.bool)
    if sim.shape[1] >= 2 and sim.shape[0] > 0:
        top = sim.topk(2, dim=1)
        close = (top.values[:, 0] - top.values[:, 1]) < margin
        ok[top.indices[close].flatten()] = False
    return ok
