"""Pruning presets served as model names (``lvlm-prune serve --preset NAME=JSON``), through the
shared real server (started with ``PRESETS``) and the real ``openai`` client with no extra body:
listing, use, per-field override, vLLM's 404 for an unknown name, the metrics' ``preset`` label,
and definitions refused at start-up with the preset named."""

from __future__ import annotations

import openai
import pytest
from helpers import data_url, make_image

from lvlm_prune.benchmarks.harness import metric, scrape
from lvlm_prune.kernels import keep_count
from lvlm_prune.server.plugin import UnprunedModelError, check_server_wide_options
from lvlm_prune.server.presets import PresetError, apply, parse_presets
from server_api.serving import MODEL, PRESETS, SERVER_KEEP_RATIO, refused_at_start_up

N = 576  # the tiny LLaVA's image tokens


def ask(client, model: str, seed: int, **extra):
    return client.chat.completions.create(
        model=model,
        max_tokens=2,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(make_image(seed))}},
                    {"type": "text", "text": "what is in the picture?"},
                ],
            }
        ],
        **extra,
    )


def test_every_preset_is_listed_as_a_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, *(f"{MODEL}:{name}" for name in PRESETS)]


def test_a_preset_prunes_a_request_that_sends_no_extra_body(client):
    fast = ask(client, f"{MODEL}:fast", 1).model_extra["pruning"]
    assert fast["image_tokens_after"] == keep_count(N, PRESETS["fast"]["keep_ratio"])
    assert fast["keep_ratio"] == 0.25 and fast["preset"] == f"{MODEL}:fast"
    tight = ask(client, f"{MODEL}:tight", 2).model_extra["pruning"]
    assert tight["image_tokens_after"] == keep_count(N, 0.11) and tight["method"] == "uniform"
    plain = ask(client, MODEL, 3).model_extra["pruning"]  # the server-wide default
    assert plain["image_tokens_after"] == keep_count(N, SERVER_KEEP_RATIO)
    assert "preset" not in plain


def test_the_request_s_own_pruning_overrides_the_preset_field_by_field(client):
    reply = ask(client, f"{MODEL}:tight", 4, extra_body={"pruning": {"keep_ratio": 0.5}})
    pruning = reply.model_extra["pruning"]
    assert pruning["image_tokens_after"] == keep_count(N, 0.5)
    assert pruning["method"] == "uniform"  # the preset's, not overridden
    bad = {"pruning": {"keep_ratio": 0}}
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, f"{MODEL}:fast", 5, extra_body=bad)
    assert err.value.body["param"] == "pruning.keep_ratio"


def test_an_unknown_model_name_is_vllm_s_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, f"{MODEL}:nope", 6)
    assert err.value.status_code == 404 and f"{MODEL}:nope" in str(err.value)


def test_metrics_carry_the_preset(server, client):
    before = scrape(server.url)
    ask(client, f"{MODEL}:fast", 7)
    ask(client, MODEL, 8)
    after = scrape(server.url)

    def grew(name: str, preset: str) -> float:
        return metric(after, name, model_name=MODEL, preset=preset) - metric(
            before, name, model_name=MODEL, preset=preset
        )

    assert grew("lvlm_prune_requests_total", f"{MODEL}:fast") == 1
    assert grew("lvlm_prune_image_tokens_after_total", f"{MODEL}:fast") == keep_count(N, 0.25)
    assert grew("lvlm_prune_requests_total", "none") == 1


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ('fast={"keep_ratio": 2}', "--preset fast: keep_ratio:"),
        ('fast={"keep_ratio": "0.5"}', "--preset fast: keep_ratio:"),
        ('fast={"kep_ratio": 0.5}', "--preset fast: kep_ratio:"),
        ("fast=0.25", "--preset fast: expected a non-empty JSON object"),
        ("fast={}", "--preset fast: expected a non-empty JSON object"),
        ("fast={keep_ratio: 0.25}", "--preset fast: not JSON"),
        ('fast={"query": ["a cat"]}', "--preset fast: query is per request"),
        ('two words={"keep_ratio": 0.5}', "expected NAME=JSON"),
        ('{"keep_ratio": 0.5}', "expected NAME=JSON"),
    ],
)
def test_a_bad_definition_is_refused_naming_the_preset(definition, message):
    with pytest.raises(PresetError) as err:
        parse_presets([definition], MODEL)
    assert message in str(err.value)


def test_definitions_become_model_names_and_a_name_is_defined_once():
    presets = parse_presets(['fast={"keep_ratio": 0.25}', 'x.y-1={"method": "cover"}'], "m")
    assert presets == {"m:fast": {"keep_ratio": 0.25}, "m:x.y-1": {"method": "cover"}}
    with pytest.raises(PresetError, match="--preset fast: defined twice"):
        parse_presets(['fast={"keep_ratio": 0.25}', 'fast={"keep_ratio": 0.5}'], "m")
    payload = {"model": "m:fast", "pruning": {"seed": 3}}
    assert apply(presets, payload) == "m:fast"
    assert payload["pruning"] == {"keep_ratio": 0.25, "seed": 3}
    other = {"model": "m", "pruning": {"seed": 3}}
    assert apply(presets, other) is None and other["pruning"] == {"seed": 3}


def test_a_preset_that_prunes_is_refused_for_a_model_served_unpruned():
    presets = parse_presets(['fast={"keep_ratio": 0.25}', 'same={"keep_ratio": 1.0}'], "m")
    with pytest.raises(UnprunedModelError, match=r"the preset m:fast \(") as err:
        check_server_wide_options("no", {}, presets)
    assert "m:same" not in str(err.value)  # keep_ratio 1.0 is what an unpruned model does
    check_server_wide_options("no", {}, {"m:same": {"keep_ratio": 1.0}})


def test_serve_stops_at_start_up_on_a_bad_preset(tiny_model_dir):
    returncode, stderr = refused_at_start_up(["tiny", "--preset", 'fast={"keep_ratio": 2}'])
    assert returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lvlm-prune serve: --preset fast: keep_ratio:"), stderr[-3000:]
    assert "Traceback" not in stderr
