"""The inspector page (``GET /inspect``), in a real headless Chromium against a real server.

Random weights: the answers are gibberish, so the tests compare counts, scores and errors with
what the API itself returns, and check that the canvases were drawn; never the answer text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import data_url, make_image

from lvlm_prune.server import inspector
from server_api.browser import ANSWER_TIMEOUT_MS, ask_in_page, browser_page
from server_api.serving import API_KEY, MODEL

QUESTION = "What color is the car parked beside the tree?"
RATIO = 0.25
PATCH_TEXT = re.compile(
    r"Patch row (\d+), column (\d+): score (-?\d+\.\d{4}), rank (\d+) of (\d+), (kept|dropped)"
)


def api_chat(server, pruning: dict, images=(0,), key: str | None = API_KEY) -> requests.Response:
    """The request the page makes, sent by the test itself."""
    content = [{"type": "image_url", "image_url": {"url": data_url(make_image(s))}} for s in images]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}],
        "max_tokens": 4,
        "temperature": 0,
        "pruning": pruning,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(
        f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120
    )


# ---- without a browser: what the routes serve, with and without an API key --------------------


@pytest.mark.parametrize("tokens", [["secret"], None], ids=["api-key", "no-api-key"])
def test_page_and_assets_load_with_or_without_an_api_key(tokens):
    """vLLM's authentication middleware guards only /v1, /v2, /inference and /cohere: the page
    loads so the user can type the key; the API it calls stays guarded."""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    app = FastAPI()
    app.include_router(inspector.router)
    app.get("/v1/models")(lambda: {"data": []})
    if tokens:
        app.add_middleware(AuthenticationMiddleware, tokens=tokens)
    client = TestClient(app)
    page = client.get("/inspect")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(inspect/static/[^"]+)"', page.text):
        response = client.get(f"/{asset}")
        assert response.status_code == 200, asset
    assert client.get("/v1/models").status_code == (401 if tokens else 200)
    headers = {"Authorization": "Bearer secret"}
    assert client.get("/v1/models", headers=headers).status_code == 200


def test_static_route_serves_only_the_shipped_files():
    client = TestClient(FastAPI())
    client.app.include_router(inspector.router)
    for name in ("inspect.js", "inspect.css"):
        assert client.get(f"/inspect/static/{name}").status_code == 200
    for name in ("missing.js", "..%2Finspect.py", "__init__.py", ".hidden.js"):
        assert client.get(f"/inspect/static/{name}").status_code == 404, name


def test_page_needs_nothing_from_outside():
    """Offline machines: no CDN, no font service, nothing but this server."""
    for path in Path(inspector.STATIC_DIR).iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//cdn|@import", text), path.name


def test_real_server_serves_the_page_without_the_key(server):
    response = requests.get(f"{server.url}/inspect", timeout=30)
    assert response.status_code == 200 and "lvlm-prune inspector" in response.text
    assert requests.get(f"{server.url}/inspect/static/inspect.js", timeout=30).status_code == 200
    assert requests.get(f"{server.url}/v1/models", timeout=30).status_code == 401


# ---- in the browser ---------------------------------------------------------------------------


@pytest.fixture
def page(browser, server):
    with browser_page(browser, f"{server.url}/inspect") as page:
        yield page


def ask(page, *, key=API_KEY, ratio=RATIO, images=(0,), image_size=(336, 336)):
    """Fill the form as a user would and submit; returns when the page says done or error."""
    ask_in_page(page, QUESTION, key=key, ratio=ratio, images=images, image_size=image_size)


def distinct_colours(page, canvas_id: str) -> int:
    return page.evaluate(
        """(id) => {
            const c = document.getElementById(id);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < d.length; i += 4 * 7) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
            return seen.size;
        }""",
        canvas_id,
    )


def test_page_shows_pruned_and_unpruned_as_the_api_does(page, server):
    ask(page)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    api = api_chat(server, {"keep_ratio": RATIO, "diagnostics": True}).json()
    full = api_chat(server, {"keep_ratio": 1.0}).json()
    pruning = api["pruning"]
    image = pruning["per_image"][0]

    # The counts shown are the API's.
    assert page.inner_text("#pruned-before") == str(pruning["image_tokens_before"])
    assert page.inner_text("#pruned-after") == str(pruning["image_tokens_after"]) == "144"
    assert page.inner_text("#pruned-prompt") == str(api["usage"]["prompt_tokens"])
    assert page.inner_text("#unpruned-after") == str(full["pruning"]["image_tokens_after"])
    assert page.inner_text("#unpruned-prompt") == str(full["usage"]["prompt_tokens"])
    for which in ("pruned", "unpruned"):
        assert page.get_attribute(f"#{which}", "data-state") == "done"
        assert re.fullmatch(r"\d+\.\d\d s", page.inner_text(f"#{which}-time"))
    timing = page.inner_text("#status")
    assert timing.startswith("Both answers in")
    print(timing)

    # Drawn: the heatmap over the picture, the score curve, the row and column histograms.
    for canvas in ("heatmap", "curve", "rows", "cols"):
        assert distinct_colours(page, canvas) > 8, canvas
    assert f"K = 144 of N = {image['tokens_before']}" in page.inner_text("#curve-note")
    assert page.locator("#query-tokens li").count() == len(image["top_query_tokens"])

    # Hover: the patch's score, rank and fate, as the API reports them.
    page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.locator("#heatmap").bounding_box()
    rows, cols = image["grid"]
    for r, c in ((3, 7), (20, 1)):
        page.mouse.move(
            box["x"] + (c + 0.5) * box["width"] / cols, box["y"] + (r + 0.5) * box["height"] / rows
        )
        found = PATCH_TEXT.fullmatch(page.inner_text("#patch-info"))
        assert found, page.inner_text("#patch-info")
        assert (int(found[1]), int(found[2])) == (r, c)
        assert float(found[3]) == pytest.approx(image["scores"][r][c], abs=1e-4)
        assert found[6] == ("kept" if r * cols + c in image["kept_indices"] else "dropped")
        assert page.is_visible("#tooltip")

    # The kept/dropped view draws something else than the heatmap.
    heatmap = page.locator("#heatmap").screenshot()
    page.check("input[name=view][value=mask]")
    assert page.locator("#heatmap").screenshot() != heatmap
    # The flow panel exactly when the server gives flow diagnostics.
    flow = api_chat(server, {"keep_ratio": RATIO, "diagnostics": "flow"})
    assert page.is_visible("#flow") == (flow.ok and "flow" in flow.json()["pruning"])


def test_two_images_and_a_non_square_one(page, server):
    ask(page, images=(0, 1), image_size=(400, 300))
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert page.inner_text("#pruned-after") == "288"
    assert page.locator("#image-picker button").count() == 2
    first = page.locator("#heatmap").screenshot()
    page.click("#image-picker button:nth-child(2)")
    assert page.get_attribute("#image-picker button:nth-child(2)", "aria-pressed") == "true"
    assert page.locator("#heatmap").screenshot() != first


def test_bad_ratio_shows_the_servers_message(page, server):
    ask(page, ratio=1.5)
    assert page.get_attribute("body", "data-state") == "error"
    said = api_chat(server, {"keep_ratio": 1.5}).json()["error"]["message"]
    assert "keep_ratio" in said
    shown = page.inner_text("#error")
    assert page.is_visible("#error") and shown == f"HTTP 400: {said}"
    assert page.get_attribute("#pruned", "data-state") == "error"


def test_missing_api_key_is_explained(page, server):
    ask(page, key=None)
    assert page.get_attribute("body", "data-state") == "error"
    shown = page.inner_text("#error")
    assert shown.startswith("HTTP 401 Unauthorized") and "API key field" in shown
    # With the key typed in, the same page then works.
    ask(page, key=API_KEY, images=())
    assert page.get_attribute("body", "data-state") == "done"


def test_flow_diagnostics_fallback_and_panel(page, server):
    """A server without flow diagnostics refuses ``"flow"`` naming the field: the page asks again
    with ``"heatmap"`` and hides the panel. With flow in the response, the panel draws it."""
    seen: list[object] = []
    flow_layers = 6

    def without_flow(route):
        body = json.loads(route.request.post_data)
        seen.append(body["pruning"].get("diagnostics"))
        if body["pruning"].get("diagnostics") == "flow":
            message = 'pruning.diagnostics: must be true, false or "heatmap"'
            return route.fulfill(
                status=400,
                json={"error": {"message": message, "param": "pruning.diagnostics", "code": 400}},
            )
        return route.continue_()

    page.route("**/v1/chat/completions", without_flow)
    ask(page)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert seen == ["flow", "heatmap", None] and not page.is_visible("#flow")
    assert not page.is_visible("#error")
    page.unroute("**/v1/chat/completions")

    def with_flow(route):
        body = json.loads(route.request.post_data)
        if body["pruning"].get("diagnostics") not in ("flow", "heatmap"):
            return route.continue_()
        body["pruning"]["diagnostics"] = "heatmap"
        response = route.fetch(post_data=json.dumps(body))
        data = response.json()
        image = data["pruning"]["per_image"][0]
        rows, cols = image["grid"]
        kept = set(image["kept_indices"])
        grid = [
            [float(r) if r * cols + c in kept else None for c in range(cols)] for r in range(rows)
        ]
        data["pruning"]["flow"] = {
            "layers": [
                {"system": 0.1, "image": 0.6 if i < 2 else 0.1, "question": 0.2}
                for i in range(flow_layers)
            ],
            "cliff_layer": 2,
            "image_map_layers": [{"layer": 0, "per_image": [grid]}],
        }
        route.fulfill(response=response, json=data)

    page.route("**/v1/chat/completions", with_flow)
    page.fill("#keep-ratio", "0.5")  # a new request, not one the page has answered already
    page.click("#run")
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=ANSWER_TIMEOUT_MS)
    assert page.is_visible("#flow")
    assert page.inner_text("#flow-note").startswith("Cliff at layer 2")
    assert distinct_colours(page, "flow-layers") > 3 and distinct_colours(page, "flow-map") > 8
