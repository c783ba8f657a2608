"""Oversized images are the client's error: HTTP 400, not 500.

NOTE(vLLM 0.32): ``ImageMediaIO.load_bytes`` (vllm/multimodal/media/image.py) refuses an image
over ``VLLM_MAX_IMAGE_PIXELS`` with a ``ValueError`` (HTTP 400), but it opens the image with PIL
first, and PIL raises its own ``DecompressionBombError`` for anything over twice
``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels, vLLM's default limit too). That error is neither
a ``ValueError`` nor one of the ``OSError``s vLLM turns into one, so a small PNG that declares
20000 x 20000 pixels came back as a 500. The wrapper below turns it into the ``ValueError`` vLLM
raises for every other undecodable image; nothing else changes.
"""

from __future__ import annotations

_PATCHED = "_lvlm_prune_oversized_is_400"


def answer_oversized_images_with_400() -> None:
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    original = ImageMediaIO.load_bytes
    if getattr(original, _PATCHED, False):
        return

    def load_bytes(self, data: bytes):
        try:
            return original(self, data)
        except Image.DecompressionBombError as err:
            raise ValueError(f"Failed to load image: {err}") from err

    setattr(load_bytes, _PATCHED, True)
    ImageMediaIO.load_bytes = load_bytes
