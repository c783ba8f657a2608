"""A PNG of one image's relevance scores: what the question looked at (LVLM-Interpret's heatmaps).

Scores are min-max scaled and coloured per patch, laid over the image when the request carried it
inline; patches the selection dropped are dimmed, so the picture shows both the map and the cut.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# dark blue -> teal -> yellow -> red
_STOPS = np.array([[20, 20, 90], [30, 150, 150], [250, 220, 50], [220, 40, 30]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8."""
    pos = np.clip(values, 0, 1) * (len(_STOPS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_STOPS) - 2)
    frac = (pos - lo)[..., None]
    return (_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).astype(np.uint8)


def render_heatmap(
    scores: np.ndarray,
    kept: list[int],
    *,
    image: Image.Image | None = None,
    size: int = 336,
) -> str:
    """Base64 PNG of ``scores`` ([rows, cols] grid) with dropped patches dimmed, ``size`` px on
    its longer side and the grid's aspect (each image token covers a square of the image: a
    square grid gives a square picture, LLaVA-1.5's; a 10 x 6 grid a portrait one)."""
    grid = np.asarray(scores, dtype=np.float32)
    span = float(grid.max() - grid.min())
    scaled = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    kept_mask = np.zeros(grid.size, dtype=bool)
    kept_mask[np.asarray(kept, dtype=int)] = True
    colour = colorize(scaled).astype(np.float32)
    colour[~kept_mask.reshape(grid.shape)] *= 0.35
    rows, cols = grid.shape
    width = max(1, round(size * cols / max(rows, cols)))
    height = max(1, round(size * rows / max(rows, cols)))
    overlay = Image.fromarray(colour.astype(np.uint8)).resize((width, height), Image.NEAREST)
    if image is not None:
        base = image.convert("RGB").resize((width, height), Image.BICUBIC)
        overlay = Image.blend(base, overlay, alpha=0.6)
    buf = io.BytesIO()
    overlay.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
