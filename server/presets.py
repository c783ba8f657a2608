"""Named pruning presets, each served as its own model name, for clients that send no extra body.

``lvlm-prune serve MODEL --preset fast='{"keep_ratio": 0.25}'`` serves ``MODEL:fast`` beside
``MODEL``: an OpenAI client that only sets ``model`` (lmms-eval, LangChain, chat UIs, agents)
gets that pruning, and ``extra_body.pruning`` still overrides it field by field. The spelling is
vLLM's own for named things on the command line (``--lora-modules name=path``); the name is
``MODEL:NAME`` (a tag, as in ``llava:13b``) so the base model stays readable in logs and
dashboards and a preset can never shadow the model itself. vLLM serves each name as an alias of
the model (``--served-model-name``): ``/v1/models`` lists it, an unknown name is vLLM's 404, and
responses name the model by its first name, while ``pruning.preset`` says which preset applied.
"""

from __future__ import annotations

import json
import re

import pydantic

from .schemas import PruningRequest

FLAG = "--preset"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NOT_IN_A_PRESET = ("query",)
"""Fields that belong to one request's content: a query names that request's images."""


class PresetError(ValueError):
    """A preset definition the server refuses to start with; the message names the preset."""


def parse_presets(definitions: list[str] | None, model_name: str) -> dict[str, dict]:
    """``NAME=JSON`` definitions -> ``{"MODEL:NAME": pruning object}``, each checked by the same
    rules as a request's ``pruning`` (``PruningRequest``).

    Raises:
        PresetError: a malformed definition, a repeated name, or a pruning object a request
            would be refused for.
    """
    presets: dict[str, dict] = {}
    for definition in definitions or ():
        name, sep, text = definition.partition("=")
        name = name.strip()
        if not sep or not NAME.fullmatch(name):
            raise PresetError(
                f"{FLAG} {definition!r}: expected NAME=JSON, NAME of letters, digits, '.', '_' "
                "or '-', e.g. fast='{\"keep_ratio\": 0.25}'"
            )
        where = f"{FLAG} {name}"
        try:
            pruning = json.loads(text)
        except ValueError as err:
            raise PresetError(f"{where}: not JSON ({err})") from None
        if not isinstance(pruning, dict) or not pruning:
            raise PresetError(f"{where}: expected a non-empty JSON object of pruning fields")
        if refused := [key for key in NOT_IN_A_PRESET if key in pruning]:
            raise PresetError(f"{where}: {refused[0]} is per request, not part of a preset")
        try:
            PruningRequest.model_validate(pruning)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            field = first["loc"][0] if first["loc"] else "pruning"
            raise PresetError(f"{where}: {field}: {first['msg']}") from None
        served = f"{model_name}:{name}"
        if served in presets:
            raise PresetError(f"{where}: defined twice")
        presets[served] = pruning
    return presets


def apply(presets: dict[str, dict], payload: dict) -> str | None:
    """Put the preset the request's ``model`` names under its own ``pruning`` fields (the
    request's win, field by field); the preset's served name, or None."""
    model = payload.get("model")
    if not isinstance(model, str) or model not in presets:
        return None
    own = payload.get("pruning")
    if own is None:
        payload["pruning"] = dict(presets[model])
    elif isinstance(own, dict):
        payload["pruning"] = {**presets[model], **own}
    # Anything else stays as it came, for prepare_request to refuse in the usual words.
    return model
