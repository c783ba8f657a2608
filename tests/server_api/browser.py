"""Debian's Chromium, headless, driven by playwright (which never downloads a browser of its own):
the inspector page as a user sees it, for tests/server_api/test_inspector.py and the family suite's
API tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from helpers import make_image

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium tries to reach the outside at start-up, which a
# closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_TIMEOUT_MS = 300_000


def launch():
    """Yields a browser (a fixture's body); skips where Chromium is not installed."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def browser_page(browser, url: str):
    """A fresh page at ``url``; fails the test on any uncaught error in the page."""
    context = browser.new_context(viewport={"width": 1200, "height": 1400})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def png_bytes(seed: int, size: tuple[int, int] = (336, 336)) -> bytes:
    buf = io.BytesIO()
    make_image(seed, size=size[0]).resize(size).save(buf, format="PNG")
    return buf.getvalue()


def ask_in_page(page, question: str, *, key, ratio, images=(0,), image_size=(336, 336)) -> None:
    """Fill the inspector's form as a user would and submit; returns when the page says done or
    error. ``images``: seeds of test images (empty: the ones already chosen)."""
    if key:
        page.fill("#api-key", key)
    if images:
        files = [
            {"name": f"image{s}.png", "mimeType": "image/png", "buffer": png_bytes(s, image_size)}
            for s in images
        ]
        page.set_input_files("#images", files=files)
        page.wait_for_selector(f"#thumbs li:nth-child({len(images)}) img")
    page.fill("#question", question)
    page.fill("#keep-ratio", str(ratio))
    page.fill("#max-tokens", "4")
    page.click("#run")
    page.wait_for_selector(
        "body[data-state=done], body[data-state=error]", state="attached", timeout=ANSWER_TIMEOUT_MS
    )
