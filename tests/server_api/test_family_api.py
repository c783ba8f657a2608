"""Every model family through the API: a real ``lvlm-prune serve`` per family, the real ``openai``
client, ``pruning.diagnostics``. The HTTP part of the family suite (``tests/family/``); it lives
here to share the API tests' server (LLaVA) instead of starting another.

Each image's diagnostics, heatmap and counts must follow its own token grid (rows x cols), not
assume LLaVA's square one; the selection must be the torch reference's for the user's question.
"""

from __future__ import annotations

import base64
import io
import json
import re

import openai
import pytest
import torch
from family.families import FAMILIES, WITHOUT_FLOW
from helpers import data_url, make_image
from hf_reference import reference
from PIL import Image

from server_api.browser import ask_in_page, browser_page, png_bytes
from server_api.serving import API_KEY, serve

QUESTION = "What color is the car parked beside the tree?"
HEATMAP_PX = 336  # the heatmap's longer side
ANYRES = [f for f in FAMILIES if f.images[0].crops is not None]
VIEW_PATCH = re.compile(
    r"(Base view|Crops), patch row (\d+), column (\d+): score (-?\d+\.\d{4}), rank (\d+) of "
    r"(\d+), (kept|dropped)"
)


@pytest.fixture(scope="module", params=FAMILIES, ids=str)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def family_server(family, request, tmp_path_factory):
    if family.serve_name == "tiny":
        # The API tests' shared server (conftest.py) serves this family already.
        yield request.getfixturevalue("server")
        return
    limits = {"image": 2, **family.engine_kwargs.get("limit_mm_per_prompt", {})}
    args = [
        *(family.serve_name, "--dtype", "float32", "--enforce-eager"),
        *("--max-model-len", "2048", "--limit-mm-per-prompt", json.dumps(limits)),
    ]
    with serve(args, tmp_path_factory.mktemp(f"{family.name}-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def family_client(family_server):
    return openai.OpenAI(
        base_url=f"{family_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def ref(family, request):
    return reference(family.reference, request.getfixturevalue(family.model_dir_fixture))


def chat(client, family, images, *, pruning=None, **extra_body):
    """A chat completion for ``images`` ((seed, case) each) and QUESTION."""
    content = [
        {"type": "image_url", "image_url": {"url": data_url(make_image(seed, case.size))}}
        for seed, case in images
    ]
    body = dict(extra_body)
    if pruning is not None:
        body["pruning"] = pruning
    return client.chat.completions.create(
        model=f"lvlm-prune-{family.serve_name}",
        messages=[{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}],
        max_tokens=2,
        temperature=0.0,
        extra_body=body or None,
    )


def pruning_of(response) -> dict:
    return response.model_extra["pruning"]


@pytest.mark.parametrize("seed,ratio", [(0, 0.25), (3, 0.5)])
def test_diagnostics_follow_the_images_grid_and_match_the_reference(
    family, family_client, ref, seed, ratio
):
    images = [(seed, family.images[0])]
    case = family.images[0]
    k = case.keep(ratio)
    stock = chat(family_client, family, images, pruning={"keep_ratio": 1.0})
    pruned = chat(family_client, family, images, pruning={"keep_ratio": ratio, "diagnostics": True})
    # The counts are the prompt: usage moves by exactly the tokens pruned.
    assert stock.usage.prompt_tokens - pruned.usage.prompt_tokens == case.tokens - k
    info = pruning_of(pruned)
    assert (info["image_tokens_before"], info["image_tokens_after"]) == (case.tokens, k)
    (image,) = info["per_image"]
    rows, cols = case.grid
    assert image["grid"] == [rows, cols]
    if case.crops is None:
        assert len(image["scores"]) == rows and all(len(row) == cols for row in image["scores"])
        got = torch.tensor(image["scores"]).flatten()
    else:  # AnyRes: the grid is the base view's; scores flat over all N rows, null: newline
        base = rows * cols
        assert [v["offset"] for v in image["views"]] == [0, base]
        assert [v["grid"] for v in image["views"]] == [[rows, cols], list(case.crops)]
        got = torch.tensor([float("nan") if s is None else s for s in image["scores"]])
    q_ids = ref.encode(QUESTION)
    assert ref.image_token_id not in q_ids
    scores = ref.scores(make_image(seed, case.size), q_ids)
    torch.testing.assert_close(got, scores, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert image["kept_indices"] == ref.kept(make_image(seed, case.size), q_ids, k).tolist()
    assert image["method"] == "simignore" and "heatmap_png" not in image
    top = image["top_query_tokens"]
    assert 0 < len(top) <= 5
    assert all(t["id"] in q_ids and t["votes"] > 0 for t in top)
    assert [t["votes"] for t in top] == sorted((t["votes"] for t in top), reverse=True)


def test_two_images_of_different_sizes_each_with_diagnostics(family, family_client, ref):
    images = list(enumerate(family.images))
    response = chat(
        family_client, family, images, pruning={"keep_ratio": 0.25, "diagnostics": True}
    )
    info = pruning_of(response)
    ks = [case.keep(0.25) for _, case in images]
    assert info["image_tokens_before"] == sum(case.tokens for _, case in images)
    assert info["image_tokens_after"] == sum(ks)
    q_ids = ref.encode(QUESTION)
    for (seed, case), k, image in zip(images, ks, info["per_image"], strict=True):
        assert image["grid"] == list(case.grid)
        assert image["kept_indices"] == ref.kept(make_image(seed, case.size), q_ids, k).tolist()


def test_heatmap_is_a_png_with_the_images_aspect(family, family_client):
    case = family.images[0]
    response = chat(
        family_client, family, [(0, case)], pruning={"keep_ratio": 0.25, "diagnostics": "heatmap"}
    )
    (image,) = pruning_of(response)["per_image"]
    png = Image.open(io.BytesIO(base64.b64decode(image["heatmap_png"])))
    rows, cols = case.grid
    side = max(rows, cols)
    assert png.format == "PNG"
    assert png.size == (round(HEATMAP_PX * cols / side), round(HEATMAP_PX * rows / side))
    assert len(image["kept_indices"]) == case.keep(0.25)


@pytest.mark.parametrize("family", WITHOUT_FLOW, indirect=True, ids=str)
@pytest.mark.parametrize(
    "extra_body,param",
    [
        ({"pruning": {"keep_ratio": 0.25, "method": "flow"}}, "pruning.method"),
        ({"mm_processor_kwargs": {"prune_method": "flow"}}, "mm_processor_kwargs.prune_method"),
        ({"pruning": {"diagnostics": "flow"}}, "pruning.diagnostics"),
    ],
    ids=["method", "raw-method", "diagnostics"],
)
def test_flow_is_refused_where_the_family_has_none(family, family_client, extra_body, param):
    """The flow method and flow diagnostics rerun Llama-family layers: a 400 naming the field."""
    images = [(0, family.images[0])]
    with pytest.raises(openai.BadRequestError) as err:
        chat(family_client, family, images, **extra_body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert "information flow supports llama" in err.value.body["message"]
    response = chat(family_client, family, images, pruning={"keep_ratio": 0.25})
    assert pruning_of(response)["image_tokens_after"] == family.images[0].keep(0.25)


@pytest.mark.parametrize("family", ANYRES, indirect=True, ids=str)
def test_inspector_draws_each_anyres_view_as_the_api_reports_it(family, family_server, browser):
    """The inspector page of an AnyRes model: one button per view (base view, crops); each view
    drawn on its own grid, a patch's score, rank and fate the API's for that row of the image."""
    case = family.images[0]
    with browser_page(browser, f"{family_server.url}/inspect") as page:
        ask_in_page(page, QUESTION, key=API_KEY, ratio=0.25, image_size=case.size)
        assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
        # The request the page made, sent by the test: the same PNG, question and options.
        url = "data:image/png;base64," + base64.b64encode(png_bytes(0, case.size)).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTION},
        ]
        api = openai.OpenAI(base_url=f"{family_server.url}/v1", api_key=API_KEY).with_options(
            max_retries=0, timeout=120
        )
        response = api.chat.completions.create(
            model=f"lvlm-prune-{family.serve_name}",
            messages=[{"role": "user", "content": content}],
            max_tokens=4,
            temperature=0,
            extra_body={"pruning": {"keep_ratio": 0.25, "diagnostics": True}},
        )
        (image,) = pruning_of(response)["per_image"]
        views = image["views"]
        buttons = page.locator("#view-picker button")
        assert buttons.all_inner_texts() == [
            f"{'Base view' if v['view'] == 'base' else 'Crops'} {v['grid'][0]}×{v['grid'][1]}"
            for v in views
        ]
        competing = sum(s is not None for s in image["scores"])
        shots = []
        for i, view in enumerate(views):
            buttons.nth(i).click()
            assert buttons.nth(i).get_attribute("aria-pressed") == "true"
            shots.append(page.locator("#heatmap").screenshot())
            rows, cols = view["grid"]
            stride = cols + (1 if view["newline"] else 0)
            page.locator("#heatmap").scroll_into_view_if_needed()
            box = page.locator("#heatmap").bounding_box()
            for r, c in ((0, 0), (rows - 1, cols // 2), (rows // 2, cols - 1)):
                page.mouse.move(
                    box["x"] + (c + 0.5) * box["width"] / cols,
                    box["y"] + (r + 0.5) * box["height"] / rows,
                )
                found = VIEW_PATCH.fullmatch(page.inner_text("#patch-info"))
                assert found, page.inner_text("#patch-info")
                row = view["offset"] + r * stride + c
                assert found[1] == ("Base view" if view["view"] == "base" else "Crops")
                assert (int(found[2]), int(found[3])) == (r, c)
                assert float(found[4]) == pytest.approx(image["scores"][row], abs=1e-4)
                assert int(found[6]) == competing
                assert found[7] == ("kept" if row in image["kept_indices"] else "dropped")
        assert shots[0] != shots[1]
