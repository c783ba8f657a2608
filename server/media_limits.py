"""Oversized images are the client's error: HTTP 400, not 500.

NOTE(vLLM 0.32): ``ImageMediaIO.load_bytes`` (vllm/multimodal/media/image.py) refuses an image
over ``VLLM_MAX_IMAGE_PIXELS`` with a ``ValueError`` (HTTP 400), but it opens the image with PIL
first, and PIL raises its own ``DecompressionBombError`` for anything over twice
``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels, vLLM's default limit too). That error is neither
a ``ValueError`` nor one of the ``OSError``s vLLM turns into one, so a small PNG that declares
20000 x 20000 pixels came back as a 500. The loader's patch (``vllm_internals``) turns it into the
``ValueError`` vLLM raises for every other undecodable image; nothing else changes.
"""

from __future__ import annotations

from lvlm_prune.vllm_plugin import vllm_internals


def answer_oversized_images_with_400() -> None:
    from PIL import Image

    vllm_internals.refuse_images_raising(Image.DecompressionBombError)
