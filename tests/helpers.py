"""Helpers shared by the test modules (images, engines); fixtures live in conftest.py."""

import base64
import gc
import io

import numpy as np
from PIL import Image


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


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
