"""Helpers shared by the test modules (images, engines); fixtures live in conftest.py."""

import base64
import gc
import inspect
import io

import numpy as np
import torch
from PIL import Image


def make_image(seed: int, size: int | tuple[int, int] = 336) -> Image.Image:
    """A random RGB image, ``size`` px square or (width, height); different seeds give different
    relevance maps."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def make_llm(model_dir: str, **kwargs):
    """An in-process engine set up for exact comparisons; ``kwargs`` override the defaults."""
    from vllm import LLM

    from lvlm_prune.vllm_plugin import WORKER_EXTENSION

    options = {
        "dtype": "float32",  # exact comparison against transformers
        "enforce_eager": True,
        "max_model_len": 2048,
        "limit_mm_per_prompt": {"image": 2},
        "worker_extension_cls": WORKER_EXTENSION,
        "seed": 0,
    }
    return LLM(model_dir, **{**options, **kwargs})


def close_llm(llm) -> None:
    del llm
    gc.collect()


def pop_diagnostics(llm, diag_id: int) -> list[dict]:
    """The worker's per-image diagnostics for ``diag_id`` (single worker)."""
    (result,) = llm.collective_rpc("lvlm_prune_pop_diagnostics", args=([diag_id],))
    return result[diag_id]


class PositionsSeen:
    """Records the positions the language model receives (in-process engine): [L] for 1-D RoPE,
    [3, L] for M-RoPE, per forward call. A 1-D family served through vLLM's M-RoPE path
    (``vllm_plugin/positions.py``) passes its language model one row of the three."""

    def __init__(self, llm) -> None:
        (model,) = llm.apply_model(lambda m: m)
        self._inner = model.language_model.model
        self._forward = self._inner.forward
        signature = inspect.signature(self._forward)
        self.calls: list[torch.Tensor] = []

        def forward(*args, **kwargs):
            positions = signature.bind(*args, **kwargs).arguments["positions"]
            self.calls.append(positions.clone())
            return self._forward(*args, **kwargs)

        self._inner.forward = forward

    def all(self) -> torch.Tensor:
        return torch.cat(self.calls, dim=-1)

    def close(self) -> None:
        self._inner.forward = self._forward


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
