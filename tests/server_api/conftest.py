"""A real ``lvlm-prune serve`` on 127.0.0.1 (vLLM's OpenAI server, multiprocess engine), shared by
the API tests, and the real ``openai`` client pointed at it."""

import pytest

from server_api.serving import API_KEY, MAX_IMAGES, PRESETS, SERVER_KEEP_RATIO, preset_args, serve


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    args = [
        *("tiny", "--keep-ratio", str(SERVER_KEEP_RATIO), "--api-key", API_KEY),
        *("--dtype", "float32"),  # diagnostics are compared with the torch reference
        *("--enforce-eager", "--max-model-len", "2048"),
        *("--limit-mm-per-prompt", f'{{"image": {MAX_IMAGES}}}'),
        *preset_args(PRESETS),
    ]
    with serve(args, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless (``server_api/browser.py``). One per module, closed at its end:
    playwright's sync API keeps an event loop running in the main thread while it lives, and a
    later module's ``asyncio.run`` would fail."""
    from server_api.browser import launch

    yield from launch()
