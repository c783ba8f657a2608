"""Both doors give the same answer: every invalid value of every option (generated from the
declarations in ``vllm_plugin/options.py``) is a ``ValueError`` naming the kwarg from the offline
engine, and an HTTP 400 naming the field from a real ``lvlm-prune serve``, and both messages state
the option's rule. One engine and one server for the whole module."""

import json
from pathlib import Path

import pytest
import requests
from helpers import close_llm, data_url, make_image, make_llm
from server_api.conftest import API_KEY, serve
from vllm import SamplingParams

from lvlm_prune.vllm_plugin import options

MODEL = "lvlm-prune-tiny"
SAMPLING = SamplingParams(max_tokens=2, temperature=0.0)


def _cases(pick):
    return [
        pytest.param(opt, value, id=f"{opt.name}-{value!r}"[:60])
        for opt in options.OPTIONS
        if (kind := pick(opt)) is not None
        for value in kind.invalid_examples()
    ]


ENGINE_CASES = _cases(lambda opt: opt.kind if opt in options.PARSED else None)
API_CASES = _cases(lambda opt: opt.kind if opt.api else None)
RAW_CASES = _cases(lambda opt: opt.kind if opt.kwarg and opt.who_sets == "client" else None)
SERVER_SET = [opt for opt in options.OPTIONS if opt.kwarg and opt.who_sets == "server"]


def num_layers(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config["text_config"]["num_hidden_layers"]


def rule_cases(layers: int):
    """The rules between options, and against the model: (name, kwargs, pruning, what the
    message says after the option's name). ``pruning`` None: not reachable over HTTP."""
    too_deep = f"must be at most the model's {layers} decoder layers, got {layers + 1}"
    return [
        ("prune_layer-simignore", {options.PRUNE_LAYER: layers + 1}, {}, too_deep),
        (
            "prune_layer-flow",
            {options.PRUNE_LAYER: layers + 1, options.METHOD: "flow"},
            {"method": "flow"},
            too_deep,
        ),
        ("query-count", {options.QUERY: ["a", "b"]}, {}, "has 2 queries for 1 image(s)"),
        ("flow-without-diagnostics", {options.FLOW: True}, None, f"needs {options.DIAGNOSTICS}"),
    ]


RULE_NAMES = [name for name, *_ in rule_cases(2)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = make_llm(tiny_model_dir)
    yield engine
    close_llm(engine)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    args = [
        *("tiny", "--api-key", API_KEY, "--enforce-eager", "--max-model-len", "2048"),
        *("--limit-mm-per-prompt", '{"image": 2}'),
    ]
    with serve(args, tmp_path_factory.mktemp("doors")) as srv:
        yield srv


def offline_error(llm, kwargs) -> str:
    request = {
        "prompt": "USER: <image>\nWhat is on the table? ASSISTANT:",
        "multi_modal_data": {"image": [make_image(0)]},
        "mm_processor_kwargs": kwargs,
    }
    with pytest.raises(ValueError) as err:
        llm.generate(request, SAMPLING, use_tqdm=False)
    return str(err.value)


def http_error(server, **body) -> dict:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(make_image(0))}},
                {"type": "text", "text": "What is on the table?"},
            ],
        }
    ]
    response = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 2, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError", error
    return error


def test_every_option_has_invalid_examples_at_each_door():
    """The generated cases cover every declared option a client or caller can set."""
    assert {p.values[0].name for p in ENGINE_CASES} == {opt.name for opt in options.PARSED}
    assert {p.values[0].name for p in API_CASES} == {opt.name for opt in options.BY_API.values()}
    assert {p.values[0].kwarg for p in RAW_CASES} == {
        opt.kwarg for opt in options.PARSED if opt.who_sets == "client"
    }


@pytest.mark.parametrize("opt,value", ENGINE_CASES)
def test_offline_engine_names_the_kwarg(llm, opt, value):
    message = offline_error(llm, {opt.kwarg: value})
    assert message.startswith(f"{opt.kwarg} must be {opt.kind.rule}, got "), message


@pytest.mark.parametrize("opt,value", API_CASES)
def test_pruning_object_names_the_field(server, opt, value):
    error = http_error(server, pruning={opt.api: value})
    rule = opt.kind.rule
    assert error["param"] == f"pruning.{opt.api}", error
    assert f"{opt.api} must be {rule}, got " in error["message"], error


@pytest.mark.parametrize("opt,value", RAW_CASES)
def test_raw_kwargs_name_the_kwarg_as_offline(server, opt, value):
    error = http_error(server, mm_processor_kwargs={opt.kwarg: value})
    assert error["param"] == f"mm_processor_kwargs.{opt.kwarg}", error
    assert error["message"].startswith(f"{opt.kwarg} must be {opt.kind.rule}, got "), error


@pytest.mark.parametrize("opt", SERVER_SET, ids=[opt.name for opt in SERVER_SET])
def test_server_set_kwargs_are_refused_from_clients(server, opt):
    error = http_error(server, mm_processor_kwargs={opt.kwarg: 5})
    assert error["param"] == f"mm_processor_kwargs.{opt.kwarg}", error
    assert opt.kwarg in error["message"], error


@pytest.mark.parametrize("name", RULE_NAMES)
def test_rules_between_options_answer_the_same_at_both_doors(llm, server, tiny_model_dir, name):
    _, kwargs, pruning, says = next(
        c for c in rule_cases(num_layers(tiny_model_dir)) if c[0] == name
    )
    (kwarg, value), *_ = kwargs.items()
    offline = offline_error(llm, kwargs)
    assert offline.startswith(f"{kwarg} {says}"), offline
    if pruning is None:
        return  # over HTTP the server supplies what the rule asks for
    raw = http_error(server, mm_processor_kwargs=kwargs)
    assert raw["param"] == f"mm_processor_kwargs.{kwarg}", raw
    assert raw["message"].startswith(f"mm_processor_kwargs.{kwarg} {says}"), raw
    api = options.BY_KWARG[kwarg].api
    via_pruning = http_error(server, pruning={**pruning, api: value})
    assert via_pruning["param"] == f"pruning.{api}", via_pruning
    assert via_pruning["message"].startswith(f"pruning.{api} {says}"), via_pruning
