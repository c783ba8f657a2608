"""The vLLM internals lvlm-prune patches, reads, overrides or copies, pinned.

vLLM's processor, engine and serving internals are not a public API. Each test here fails when a
vLLM upgrade renames, moves, re-signs or changes one of them, so the upgrade fails here instead
of on live requests (a silently stock, unpruned model, or every pruned request answered 400).
``vllm_plugin/vllm_internals.py`` lists every touch point (``TOUCH_POINTS``) with the tests here
that pin it; the first tests check that list against this file. An upgrade: set
``vllm_internals.VLLM_VERSION``, run this file, read what broke.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import importlib
import inspect
import io
import math
import multiprocessing
import re
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
import vllm
from vllm.model_executor.models.llava import (
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
)
from vllm.multimodal.processing import (
    BaseMultiModalProcessor,
    InputProcessingContext,
    ProcessorInputs,
    PromptReplacement,
)

from lvlm_prune.server import cli, media_limits, plugin
from lvlm_prune.vllm_plugin import vllm_internals
from lvlm_prune.vllm_plugin.llava import (
    LlavaPruneForConditionalGeneration,
    LlavaPruneMultiModalProcessor,
)
from lvlm_prune.vllm_plugin.qwen2_5_vl import (
    Qwen2_5_VLPruneForConditionalGeneration,
)
from lvlm_prune.vllm_plugin.vllm_internals import TOUCH_POINTS


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# (class, method, parameter names) of every vLLM method our subclasses override.
OVERRIDDEN = [
    (BaseMultiModalProcessor, "apply", ["self", "inputs", "timing_ctx"]),
    (BaseMultiModalProcessor, "get_dummy_inputs", ["self", "seq_len", "mm_counts", "mm_options"]),
    (BaseMultiModalProcessor, "_call_hf_processor", ["self", "hf_data", "hf_kwargs"]),
    (BaseMultiModalProcessor, "_apply_hf_processor_main", ["self", "mm_items", "hf_kwargs"]),
    (BaseMultiModalProcessor, "_get_mm_hashes", ["self", "inputs"]),
    (
        BaseMultiModalProcessor,
        "_get_cache_missing_processor_kwargs",
        ["self", "inputs", "mm_is_cached"],
    ),
    (
        LlavaMultiModalProcessor,
        "_get_mm_fields_config",
        ["self", "hf_inputs", "hf_processor_mm_kwargs"],
    ),
    (
        LlavaMultiModalProcessor,
        "_get_prompt_updates",
        ["self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"],
    ),
    (LlavaForConditionalGeneration, "embed_multimodal", ["self", "kwargs"]),
    (
        LlavaForConditionalGeneration,
        "embed_input_ids",
        ["self", "input_ids", "multimodal_embeddings", "is_multimodal"],
    ),
    (
        LlavaForConditionalGeneration,
        "forward",
        ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "kwargs"],
    ),
    (
        Qwen2_5_VLMultiModalProcessor,
        "_get_mm_fields_config",
        ["self", "hf_inputs", "hf_processor_mm_kwargs"],
    ),
    (
        Qwen2_5_VLMultiModalProcessor,
        "_get_prompt_updates",
        ["self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"],
    ),
    (Qwen2_5_VLForConditionalGeneration, "embed_multimodal", ["self", "kwargs"]),
    (
        Qwen2_5_VLForConditionalGeneration,
        "get_mrope_input_positions",
        ["self", "input_tokens", "mm_features"],
    ),
    (
        Qwen2_5_VLForConditionalGeneration,
        "embed_input_ids",
        ["self", "input_ids", "multimodal_embeddings", "is_multimodal"],
    ),
    (
        Qwen2_5_VLForConditionalGeneration,
        "forward",
        ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "kwargs"],
    ),
    (Qwen3VLMultiModalProcessor, "_apply_hf_processor_main", ["self", "mm_items", "hf_kwargs"]),
    (
        Qwen3VLMultiModalProcessor,
        "_get_cache_missing_processor_kwargs",
        ["self", "inputs", "mm_is_cached"],
    ),
    (
        Qwen3VLMultiModalProcessor,
        "_get_mm_fields_config",
        ["self", "hf_inputs", "hf_processor_mm_kwargs"],
    ),
    (Qwen3VLMultiModalProcessor, "_get_mm_hashes", ["self", "inputs"]),
    (
        Qwen3VLMultiModalProcessor,
        "_get_prompt_updates",
        ["self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"],
    ),
    (Qwen3VLForConditionalGeneration, "embed_multimodal", ["self", "kwargs"]),
    (
        Qwen3VLForConditionalGeneration,
        "get_mrope_input_positions",
        ["self", "input_tokens", "mm_features"],
    ),
    (
        Qwen3VLForConditionalGeneration,
        "embed_input_ids",
        ["self", "input_ids", "multimodal_embeddings", "is_multimodal"],
    ),
    (
        Qwen3VLForConditionalGeneration,
        "forward",
        ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "kwargs"],
    ),
]

# LLaVA-NeXT / OneVision (vllm_plugin/llava_next.py).
OVERRIDDEN += [
    (
        LlavaNextMultiModalProcessor,
        "_get_mm_fields_config",
        ["self", "hf_inputs", "hf_processor_mm_kwargs"],
    ),
    (
        LlavaOnevisionMultiModalProcessor,
        "_get_mm_fields_config",
        ["self", "hf_inputs", "hf_processor_mm_kwargs"],
    ),
    (
        LlavaOnevisionMultiModalProcessor,
        "_get_prompt_updates",
        ["self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"],
    ),
    (
        LlavaOnevisionMultiModalProcessor,
        "_apply_hf_processor_main",
        ["self", "mm_items", "hf_kwargs"],
    ),
    (LlavaNextForConditionalGeneration, "embed_multimodal", ["self", "kwargs"]),
    (LlavaOnevisionForConditionalGeneration, "embed_multimodal", ["self", "kwargs"]),
    *(
        (model, "embed_input_ids", ["self", "input_ids", "multimodal_embeddings", "is_multimodal"])
        for model in (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)
    ),
    *(
        (
            model,
            "forward",
            ["self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "kwargs"],
        )
        for model in (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)
    ),
]


def _resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


# ---- the declared list of touch points (vllm_internals.TOUCH_POINTS) against this file -------

_META = {
    "test_vllm_version_is_the_one_pinned",
    "test_every_touch_point_names_its_pins",
    "test_every_pin_here_is_declared",
    "test_touch_points_name_real_symbols",
    "test_every_declared_override_is_pinned_and_back",
    "test_transformers_reference_side",
}
"""Tests here that pin no vLLM touch point of their own: they check the list, or the tests'
reference."""


def _tests_here() -> set[str]:
    return {name for name in globals() if name.startswith("test_")}


def test_vllm_version_is_the_one_pinned():
    assert vllm.__version__.startswith(f"{vllm_internals.VLLM_VERSION}."), vllm.__version__


def test_every_touch_point_names_its_pins():
    kinds = {vllm_internals.PATCH, vllm_internals.PRIVATE_READ}
    kinds |= {vllm_internals.OVERRIDE, vllm_internals.COPIED}
    for point in TOUCH_POINTS:
        assert point.kind in kinds, point
        assert point.pins and point.checks, point
        missing = set(point.pins) - _tests_here()
        assert not missing, f"{point.vllm}: no test named {missing}"


def test_every_pin_here_is_declared():
    declared = {pin for point in TOUCH_POINTS for pin in point.pins}
    assert _tests_here() - declared - _META == set()


def test_touch_points_name_real_symbols():
    """Both ends of every entry exist: vLLM's symbol, and where we use it."""
    for point in TOUCH_POINTS:
        assert point.vllm.startswith("vllm."), point.vllm
        assert point.ours.startswith("lvlm_prune."), point.ours
        _resolve(point.vllm)
        _resolve(point.ours)


def test_every_declared_override_is_pinned_and_back():
    declared = {
        point.vllm.partition(":")[2]
        for point in TOUCH_POINTS
        if "test_overridden_vllm_method_keeps_its_signature" in point.pins
    }
    assert declared == {f"{cls.__name__}.{name}" for cls, name, _ in OVERRIDDEN}


@pytest.fixture(scope="module")
def llava_contexts(tmp_path_factory):
    """vLLM's processing contexts of a LLaVA-1.5 and a Pixtral-HF checkpoint: their configs
    only, written to disk and read by vLLM's ``ModelConfig`` (no weights, no tokenizer)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PixtralVisionConfig
    from vllm.config import ModelConfig

    small = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    contexts = {}
    for name, vision in (("llava", CLIPVisionConfig), ("pixtral", PixtralVisionConfig)):
        folder = tmp_path_factory.mktemp(name)
        text = LlamaConfig(**small, vocab_size=320)
        LlavaConfig(vision_config=vision(**small), text_config=text).save_pretrained(folder)
        model_config = ModelConfig(model=str(folder), skip_tokenizer_init=True)
        # The processors only require a tokenizer to be there when built.
        contexts[name] = InputProcessingContext(model_config=model_config, tokenizer=object())
    return contexts


@pytest.mark.parametrize(
    ("base", "name", "params"), OVERRIDDEN, ids=[f"{c.__name__}.{n}" for c, n, _ in OVERRIDDEN]
)
def test_overridden_vllm_method_keeps_its_signature(base, name, params):
    assert _params(getattr(base, name)) == params


def _our_classes() -> list[type]:
    """Every model class ``register()`` registers and the processor classes of its module."""
    from lvlm_prune.vllm_plugin import MODELS

    found = []
    for target in MODELS.values():
        model = _resolve(target)
        module = sys.modules[model.__module__]
        found.append(model)
        found += [
            c
            for c in vars(module).values()
            if isinstance(c, type)
            and issubclass(c, BaseMultiModalProcessor)
            and c.__module__ == module.__name__
        ]
    return list(dict.fromkeys(found))


OURS = _our_classes()


def _defining(cls: type, name: str) -> type:
    """The first class in ``cls``'s MRO that defines ``name``."""
    return next(c for c in cls.__mro__ if name in vars(c))


@pytest.mark.parametrize("ours", OURS, ids=lambda c: c.__name__)
def test_every_override_matches_the_method_it_replaces(ours):
    """Every method our classes define (the family's class and the shared mixins it inherits)
    that a vLLM class also has: same parameters as the first vLLM class in the MRO that defines
    it, and in the pinned list above (so a new override cannot skip being pinned)."""
    pinned = {(_defining(cls, name), name) for cls, name, _ in OVERRIDDEN}
    vllm_bases = [c for c in ours.__mro__ if c.__module__.split(".")[0] == "vllm"]
    assert vllm_bases, f"{ours.__name__} subclasses no vLLM class"
    checked = set()
    for own in ours.__mro__:
        if not own.__module__.startswith("lvlm_prune."):
            continue
        for name, fn in vars(own).items():
            if not callable(fn) or name.startswith("__") or name in checked:
                continue
            base = next((c for c in vllm_bases if name in vars(c)), None)
            if base is None:
                continue  # our own helper
            checked.add(name)
            assert (base, name) in pinned, (
                f"{own.__name__}.{name} overrides {base.__name__}.{name} but is not pinned here"
            )
            assert _params(fn) == _params(getattr(base, name)), f"{own.__name__}.{name}"
    assert checked, "no override found: the walk is broken"


def test_processor_inputs_and_context_we_read():
    fields = {f for f in ProcessorInputs.__dataclass_fields__}
    assert {"prompt", "mm_data_items", "hf_processor_mm_kwargs"} <= fields
    assert _params(InputProcessingContext.get_merged_mm_kwargs)[:2] == ["self", "kwargs"]
    assert _params(InputProcessingContext.call_hf_processor)[:4] == [
        "self",
        "hf_processor",
        "data",
        "kwargs",
    ]
    # The multimodal hash covers the processor kwargs (our query ids go there), not the prompt.
    source = inspect.getsource(ProcessorInputs.get_mm_hashes)
    assert "hf_processor_mm_kwargs" in source and "prompt" not in source.replace(
        "prompt_updates", ""
    )
    assert {"modality", "target", "replacement"} <= set(_params(PromptReplacement))


def _modules_calling_the_gate() -> set[str]:
    """Every vLLM module that imports ``validate_request_mm_kwargs`` by name, found by reading
    vLLM's source files (importing them would load optional dependencies and change the state
    of later engines in this process)."""
    root = Path(vllm.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"import[^\n]*\bvalidate_request_mm_kwargs\b", text):
            found.add(".".join(("vllm", *path.relative_to(root).with_suffix("").parts)))
    return found


def test_gate_wrap_covers_every_module_that_calls_vllms_gate():
    assert _modules_calling_the_gate() == set(vllm_internals.GATED_MODULES)
    for name in vllm_internals.GATED_MODULES:
        gate = importlib.import_module(name).validate_request_mm_kwargs
        assert {p.name: p.kind for p in inspect.signature(gate).parameters.values()} == {
            "mm_processor_kwargs": inspect.Parameter.KEYWORD_ONLY,
            "media_io_kwargs": inspect.Parameter.KEYWORD_ONLY,
            "trust_request_mm_kwargs": inspect.Parameter.KEYWORD_ONLY,
        }


def test_gate_refuses_untrusted_kwargs_and_the_wrap_lets_ours_through(monkeypatch):
    from vllm.exceptions import VLLMValidationError

    module = importlib.import_module(vllm_internals.GATED_MODULES[0])
    for name in vllm_internals.GATED_MODULES:  # restored after the test
        gated = importlib.import_module(name)
        monkeypatch.setattr(gated, "validate_request_mm_kwargs", gated.validate_request_mm_kwargs)

    def gate(kwargs, *, trusted=False, media=None):
        module.validate_request_mm_kwargs(
            mm_processor_kwargs=kwargs, media_io_kwargs=media, trust_request_mm_kwargs=trusted
        )

    # vLLM's own gate: every untrusted kwarg refused, everything trusted passes.
    with pytest.raises(VLLMValidationError, match="--trust-request-mm-kwargs"):
        gate({"keep_ratio": 0.5})
    gate({"keep_ratio": 0.5, "do_resize": False}, trusted=True)
    plugin.allow_pruning_kwargs_per_request()
    wrapped = module.validate_request_mm_kwargs
    plugin.allow_pruning_kwargs_per_request()
    assert module.validate_request_mm_kwargs is wrapped  # idempotent: one wrap
    gate({"keep_ratio": 0.5, "prune_method": "uniform"})
    gate(None)
    for refused in ({"do_resize": False, "keep_ratio": 0.5}, {"do_resize": False}):
        with pytest.raises(VLLMValidationError, match="--trust-request-mm-kwargs"):
            gate(refused)
    with pytest.raises(VLLMValidationError, match="media_io_kwargs"):
        gate({"keep_ratio": 0.5}, media={"image": {"image_mode": "L"}})
    with pytest.raises(VLLMValidationError, match="set by the server"):
        gate({"prune_query_ids": [[1, 2]]}, trusted=True)


def test_gate_wrap_refuses_to_start_when_it_patches_nothing(monkeypatch):
    module = importlib.import_module(vllm_internals.GATED_MODULES[0])
    monkeypatch.delattr(module, "validate_request_mm_kwargs")
    with pytest.raises(RuntimeError, match="validate_request_mm_kwargs"):
        plugin.allow_pruning_kwargs_per_request()


def test_engine_core_runs_our_utility_by_name():
    """``register()`` adds ``lvlm_prune_trim_memory`` to ``EngineCore``; the engine core runs a
    utility call by looking its name up on itself, so the API process can call it."""
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCore, EngineCoreProc

    assert "super()._handle_client_request(" in inspect.getsource(
        DPEngineCoreProc._handle_client_request
    )
    assert issubclass(EngineCoreProc, EngineCore)
    dispatch = inspect.getsource(EngineCoreProc._handle_client_request)
    _in_order(
        dispatch,
        [
            "elif request_type == EngineCoreRequestType.UTILITY:",
            "client_idx, call_id, method_name, args = request",
            "(method := getattr(self, method_name))",
            "method(*self._convert_msgspec_args(method, args))",
        ],
    )
    vllm_internals.add_engine_core_utilities()
    utility = EngineCore.lvlm_prune_trim_memory
    assert _params(utility) == ["self"]
    assert isinstance(utility(None), bool)  # it uses nothing of the engine core


def test_hf_processor_call_refuses_pruning_kwargs_on_an_unpruned_model():
    """Every multimodal processor reaches the HF processor through ``call_hf_processor`` with the
    request's kwargs merged with the engine-wide ones; the wrap refuses our kwargs there when the
    model is not one we prune, and otherwise is vLLM's own call."""
    from types import SimpleNamespace

    from transformers import LlavaConfig, Qwen2VLConfig
    from vllm.multimodal.processing.context import InputProcessingContext

    vllm_internals.refuse_pruning_kwargs_on_unpruned_models()
    call = InputProcessingContext.call_hf_processor
    assert _params(call.__wrapped__) == ["self", "hf_processor", "data", "kwargs"]
    _in_order(
        inspect.getsource(call.__wrapped__),
        ["merged_kwargs = self.get_merged_mm_kwargs(kwargs)", "hf_processor(**data, **allowed"],
    )

    def context(architecture: str, hf_config, engine_wide=None):
        return SimpleNamespace(
            model_config=SimpleNamespace(architecture=architecture, hf_config=hf_config),
            get_merged_mm_kwargs=lambda kwargs: {**(engine_wide or {}), **kwargs},
            _postprocess_output=lambda output: output,
        )

    calls = []

    def hf_processor(**kwargs):
        calls.append(kwargs)
        return {}

    qwen2_vl = "Qwen2VLForConditionalGeneration"
    with pytest.raises(ValueError, match=f"does not prune {qwen2_vl}.*keep_ratio"):
        call(context(qwen2_vl, Qwen2VLConfig()), hf_processor, {}, {"keep_ratio": 0.25})
    with pytest.raises(ValueError, match="prune_method"):  # engine-wide, merged in
        call(context(qwen2_vl, Qwen2VLConfig(), {"prune_method": "uniform"}), hf_processor, {})
    assert calls == []
    # A no-op on an unpruned model, and anything on a pruned one, reach the HF processor.
    call(context(qwen2_vl, Qwen2VLConfig()), hf_processor, {}, {"keep_ratio": 1.0})
    call(context("LlavaForConditionalGeneration", LlavaConfig()), hf_processor, {}, {"x": 1})
    assert len(calls) == 2


def test_image_loader_turns_a_decompression_bomb_into_a_value_error(monkeypatch):
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    from lvlm_prune.benchmarks.soak import oversized_png_url

    monkeypatch.setattr(ImageMediaIO, "load_bytes", ImageMediaIO.load_bytes)  # restored after
    assert _params(ImageMediaIO.load_bytes) == ["self", "data"]
    bomb = base64.b64decode(oversized_png_url().split(",", 1)[1])
    small = io.BytesIO()
    Image.new("RGB", (8, 6)).save(small, format="PNG")
    loader = ImageMediaIO()
    with pytest.raises(Image.DecompressionBombError):  # vLLM's own: a 500
        loader.load_bytes(bomb)
    with pytest.raises(ValueError, match="Failed to load image"):  # vLLM's 400 for junk
        loader.load_bytes(b"no image")
    media_limits.answer_oversized_images_with_400()
    media_limits.answer_oversized_images_with_400()  # idempotent
    with pytest.raises(ValueError, match="Failed to load image") as err:
        loader.load_bytes(bomb)
    assert not isinstance(err.value, Image.DecompressionBombError)
    assert loader.load_bytes(small.getvalue()).media.size == (8, 6)


def test_rehash_is_vllms_kwargs_hash(llava_contexts):
    """``_get_mm_hashes`` rehashes each image's hash with its own query ids, with vLLM's hasher
    and the server's configured algorithm."""
    from vllm.multimodal.hasher import MultiModalHasher

    signature = inspect.signature(MultiModalHasher.hash_kwargs)
    assert [(p.name, p.kind) for p in signature.parameters.values()] == [
        ("algorithm", inspect.Parameter.POSITIONAL_ONLY),
        ("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
    ctx = llava_contexts["llava"]
    algorithm = ctx.get_mm_config().mm_hasher_algorithm
    ours = vllm_internals.rehash_image(ctx, "abc", {"prune_query_ids": [1, 2]})
    assert ours == MultiModalHasher.hash_kwargs(algorithm, image="abc", prune_query_ids=[1, 2])
    assert ours == vllm_internals.rehash_image(ctx, "abc", {"prune_query_ids": [1, 2]})
    assert ours != vllm_internals.rehash_image(ctx, "abc", {"prune_query_ids": [1, 3]})
    assert ours != vllm_internals.rehash_image(ctx, "abd", {"prune_query_ids": [1, 2]})


def _manager_of(target, *args):
    """vLLM's engine process manager over one real child process running ``target(*args)``
    (its ``__init__``, which starts engine cores, skipped; the fields it sets, set)."""
    from vllm.v1.engine.utils import CoreEngineProcManager

    proc = multiprocessing.get_context("fork").Process(
        target=target, args=args, name="EngineCore_DP0"
    )
    proc.start()
    manager = object.__new__(CoreEngineProcManager)
    manager.processes = [proc]
    manager._request_shutdown_timeout = 0
    manager.failed_proc_name = None
    manager.manager_stopped = threading.Event()
    manager._finalizer = weakref.finalize(manager, lambda: None)
    return manager


def test_engine_death_is_told_from_a_stop():
    """``lvlm-prune serve`` exits 1 when its engine core died and 0 after a requested stop
    (``supervision``), from what vLLM's own liveness monitor records."""
    import zmq
    from vllm.v1.engine.core_client import BackgroundResources, MPClient

    # vLLM's client marks itself dead in its liveness monitor, before it shuts down...
    _in_order(
        inspect.getsource(MPClient.start_engine_core_monitor),
        [
            "engine_manager.monitor_engine_liveness()",
            "_self.resources.engine_dead = True",
            "_self.shutdown()",
        ],
    )
    # ... and in every shutdown, a requested one too: engine_dead alone tells nothing.
    resources = BackgroundResources(ctx=zmq.Context())
    assert resources.engine_dead is False
    resources()
    assert resources.engine_dead is True

    def client(manager) -> _Client:
        resources = BackgroundResources(ctx=zmq.Context(), engine_manager=manager)
        resources()  # every path ends in the client's shutdown
        return _Client(resources)

    died = _manager_of(sys.exit, 3)  # an engine core exiting non-zero, unasked
    died.monitor_engine_liveness()
    assert died.failed_proc_name == "EngineCore_DP0"
    stopped = _manager_of(time.sleep, 60)  # a running engine core, stopped on request
    threading.Timer(0.2, stopped.shutdown).start()
    stopped.monitor_engine_liveness()
    assert stopped.processes[0].exitcode != 0 and stopped.failed_proc_name is None

    assert vllm_internals.engine_core_died(client(died))
    assert not vllm_internals.engine_core_died(client(stopped))
    assert not vllm_internals.engine_core_died(client(None))  # engines started elsewhere
    assert not vllm_internals.engine_core_died(_Client(None))  # an in-process engine


class _Client:
    """An engine client as ``supervision.watch`` holds it: ``AsyncLLM.engine_core.resources``."""

    def __init__(self, resources) -> None:
        self.engine_core = type("MPClient", (), {"resources": resources})()


def _imported_in(fn, package: str) -> dict[str, object]:
    """The names ``fn`` imports in its body, resolved (relative imports from ``package``)."""
    out = {}
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module("." * node.level + (node.module or ""), package)
            out.update({a.asname or a.name: getattr(module, a.name) for a in node.names})
    return out


def test_serve_steps_are_vllms_own_in_its_order():
    """``lvlm-prune serve`` repeats vLLM's ``main`` of the API server entry point
    (``vllm_internals.serve_args`` then ``run_api_server``): the same functions, called in the
    same order, must still be what vLLM does."""
    from vllm.entrypoints.launchers.api_server import entry

    steps = [
        "cli_env_setup",
        "make_arg_parser",
        "configure_logging_from_args",
        "validate_parsed_serve_args",
        "run_server",
    ]
    theirs = inspect.getsource(entry.main)
    ours = inspect.getsource(vllm_internals.serve_args) + inspect.getsource(
        vllm_internals.run_api_server
    )
    _in_order(theirs, [f"{step}(" for step in steps])
    # Our argument parsing (vLLM's parser, our flags folded in) is build_serve_args'.
    _in_order(ours, [f"{step}(" for step in steps if step != "make_arg_parser"])
    assert "make_arg_parser(" in inspect.getsource(cli.vllm_serve_parser)
    assert "vllm_internals.serve_args(" in inspect.getsource(cli.serve)
    # The very functions vLLM's main calls (a step that moved module fails here first).
    their_functions = {**vars(entry), **_imported_in(entry.main, entry.__package__)}
    our_functions = {}
    for fn in (vllm_internals.serve_args, vllm_internals.run_api_server, cli.vllm_serve_parser):
        our_functions.update(_imported_in(fn, "lvlm_prune"))
    for step in steps:
        assert our_functions[step] is their_functions[step], step
    assert _params(entry.run_server)[0] == "args"


def test_rpc_to_every_data_parallel_engine():
    """``vllm_internals.collective_rpc_every_engine`` calls ``EngineCore.collective_rpc`` on
    every engine through the MP clients' ``call_utility_all_async``; only the load-balancing
    client's ``call_utility_async`` answers for engine 0 alone."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import AsyncMPClient, DPLBAsyncMPClient

    assert _params(EngineCore.collective_rpc) == ["self", "method", "timeout", "args", "kwargs"]
    for client in (AsyncMPClient, DPLBAsyncMPClient):
        assert _params(client.call_utility_all_async) == ["self", "method", "args"]
    _in_order(
        inspect.getsource(AsyncMPClient.call_utility_all_async),
        ["asyncio.gather(", "for engine in self.core_engines"],
    )


def test_llava_processor_factory_matches_vllms(llava_contexts):
    """``vllm_plugin.llava._build_processor`` is vLLM's LLaVA / Pixtral-HF processor factory with
    our processor for LLaVA; vLLM's info factory is used as is."""
    from vllm.model_executor.models import llava
    from vllm.model_executor.models.llava import LlavaDummyInputsBuilder

    from lvlm_prune.vllm_plugin import llava as ours

    # What vLLM builds per request: the model class's registered factories, run on a context.
    factories = ours.LlavaPruneForConditionalGeneration._processor_factory
    assert factories.info is llava._build_llava_or_pixtral_hf_info
    assert factories.processor is ours._build_processor
    assert factories.dummy_inputs is LlavaDummyInputsBuilder
    stock = LlavaForConditionalGeneration._processor_factory
    expected = {
        "llava": LlavaPruneMultiModalProcessor,
        "pixtral": llava.PixtralHFMultiModalProcessor,
    }
    for name, ctx in llava_contexts.items():
        theirs, mine = stock.build_processor(ctx), factories.build_processor(ctx)
        assert type(mine) is expected[name], name
        assert isinstance(mine, type(theirs)), (name, type(theirs))
        assert type(mine.info) is type(theirs.info), name

    # The same info classes decided, in the same order, and anything else refused.
    def dispatch(fn) -> list[str]:
        tree = ast.parse(inspect.getsource(fn).strip())
        return [
            node.args[1].id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
        ]

    assert dispatch(llava._build_llava_or_pixtral_hf_processor) == dispatch(ours._build_processor)
    assert dispatch(ours._build_processor) == ["PixtralHFProcessingInfo", "LlavaProcessingInfo"]
    for fn in (llava._build_llava_or_pixtral_hf_processor, ours._build_processor):
        assert "raise NotImplementedError(type(info))" in inspect.getsource(fn)


def test_supports_multimodal_pruning_is_vllms_video_interface():
    """Why we declare ``SupportsMultiModalPruning`` on nothing (``vllm_internals``' docstring):
    it is vLLM's video pruning (EVS), on only with ``video_pruning_rate`` > 0."""
    from vllm.model_executor.models.interfaces import (
        SupportsMultiModalPruning,
        supports_multimodal_pruning,
    )
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert supports_multimodal_pruning(Qwen2_5_VLPruneForConditionalGeneration)  # vLLM's
    assert SupportsMultiModalPruning in Qwen2_5_VLForConditionalGeneration.__mro__
    assert not supports_multimodal_pruning(LlavaPruneForConditionalGeneration)
    assert "recompute_mrope_positions" not in vars(Qwen2_5_VLPruneForConditionalGeneration)
    assert _params(SupportsMultiModalPruning.recompute_mrope_positions) == [
        "self",
        "input_ids",
        "multimodal_embeddings",
        "mrope_positions",
        "num_computed_tokens",
    ]
    load = inspect.getsource(GPUModelRunner.load_model)
    _in_order(
        load,
        [
            "supports_multimodal_pruning(self.get_model())",
            "mm_config.is_multimodal_pruning_enabled()",
        ],
    )


def test_decoder_layer_parts_the_flow_pass_runs():
    """``vllm_plugin.flow`` reruns vLLM's ``LlamaDecoderLayer.forward`` with its own submodules and
    replaces only ``self.attn(q, k, v)`` (paged attention): the steps and names must still be
    vLLM's, in its order."""
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer

    from lvlm_prune.vllm_plugin.worker import flow

    layer_steps = [
        "self.input_layernorm(hidden_states)",
        "self.input_layernorm(hidden_states, residual)",
        "self.self_attn(",
        "self.post_attention_layernorm(hidden_states, residual)",
        "self.mlp(hidden_states)",
    ]
    attention_steps = [
        "self.qkv_proj(hidden_states)",
        "qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)",
        "self.rotary_emb(positions, q, k)",
        "self.attn(q, k, v)",
        "self.o_proj(attn_output)",
    ]
    for fn, steps in (
        (LlamaDecoderLayer.forward, layer_steps),
        (LlamaAttention.forward, attention_steps),
    ):
        source = inspect.getsource(fn)
        at = [source.find(step) for step in steps]
        assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(steps, at))
    init = inspect.getsource(LlamaDecoderLayer.__init__) + inspect.getsource(
        LlamaAttention.__init__
    )
    for name in (*flow.LAYER_PARTS, *flow.ATTENTION_PARTS):
        assert f"self.{name} =" in init or name == "rotary_emb", name
    assert "self.rotary_emb =" in inspect.getsource(LlamaAttention._init_rotary_emb)


def test_what_the_flow_pass_reads_of_vllm():
    from vllm.distributed import (
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )
    from vllm.inputs import MultiModalInput
    from vllm.v1.worker.gpu_worker import Worker

    assert callable(tensor_model_parallel_all_reduce)
    assert callable(get_tensor_model_parallel_world_size)
    # The processor hands the prompt as the engine runs it to the server (accounting.LEDGER).
    assert "prompt_token_ids" in MultiModalInput.__annotations__
    # The worker extension reaches the model through the worker it is mixed into.
    assert _params(Worker.get_model) == ["self"]
    # The served forward merges the kept rows at the image positions (the pass places them so).
    assert _params(LlavaForConditionalGeneration.embed_input_ids) == [
        "self",
        "input_ids",
        "multimodal_embeddings",
        "is_multimodal",
    ]


def test_qwen_decoder_layers_the_flow_pass_runs():
    """The Qwen-VL families' language models (Qwen2; Qwen3, dense and MoE) have the Llama layer's
    steps, with the q/k norms per head before the rotary embedding where the attention has them;
    Qwen3-VL adds DeepStack level i to the hidden states right after decoder layer i."""
    from vllm.model_executor.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer
    from vllm.model_executor.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeAttention, Qwen3MoeDecoderLayer
    from vllm.model_executor.models.qwen3_vl import Qwen3LLMModel
    from vllm.model_executor.models.qwen3_vl_moe import Qwen3MoeLLMModel

    from lvlm_prune.vllm_plugin.worker import flow

    layer_steps = [
        "self.input_layernorm(hidden_states, residual)",
        "self.self_attn(",
        "self.post_attention_layernorm(hidden_states, residual)",
        "self.mlp(hidden_states)",
    ]
    for layer in (Qwen2DecoderLayer, Qwen3DecoderLayer, Qwen3MoeDecoderLayer):
        _in_order(inspect.getsource(layer.forward), layer_steps)
    for attention in (Qwen2Attention, Qwen3Attention, Qwen3MoeAttention):
        source = inspect.getsource(attention.forward)
        steps = ["self.qkv_proj(hidden_states)", "self.rotary_emb(positions, q, k)"]
        if "q_norm" in source:
            steps[1:1] = ["self.q_norm(", "self.k_norm("]
        _in_order(source, [*steps, "self.attn(q, k, v)", "self.o_proj(attn_output)"])
        init = inspect.getsource(attention.__init__)
        for name in flow.ATTENTION_PARTS:
            assert f"self.{name} =" in init, (attention.__name__, name)
    for model in (Qwen3LLMModel, Qwen3MoeLLMModel):
        _in_order(
            inspect.getsource(model.forward),
            [
                "hidden_states, residual = layer(",
                "layer_idx in range(",
                "0, len(deepstack_input_embeds)",
                'deepstack_input_embeds[f"deepstack_input_embeds_{layer_idx}"]',
            ],
        )


def test_what_the_mrope_flow_pass_reads_of_vllm():
    """``MRopePruneModelMixin.served_positions`` builds one-field feature specs for vLLM's
    ``get_mrope_input_positions``; the pass embeds text with the language model's own
    ``embed_input_ids`` and runs MoE layers in a forward context it creates."""
    import torch
    from vllm.forward_context import create_forward_context, override_forward_context
    from vllm.model_executor.layers.fused_moe.runner import moe_runner
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFieldElem,
        MultiModalKwargsItem,
    )

    item = MultiModalKwargsItem(
        {"image_grid_thw": MultiModalFieldElem(data=torch.ones(3), field=MultiModalBatchedField())}
    )
    assert torch.equal(item["image_grid_thw"].data, torch.ones(3))
    assert _params(create_forward_context)[:2] == ["attn_metadata", "vllm_config"]
    assert _params(override_forward_context) == ["forward_context"]
    assert "get_forward_context()" in inspect.getsource(moe_runner.get_layer_from_name)
    for lm in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM):
        assert _params(lm.embed_input_ids) == ["self", "input_ids"]


# ---- Qwen2.5-VL: what the M-RoPE position mechanism relies on (vllm_plugin/qwen2_5_vl.py) -------


def _in_order(source: str, steps: list[str]) -> None:
    at = [source.find(step) for step in steps]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(steps, at))


def test_our_model_classes_are_built_as_vllm_builds_models():
    for ours in (LlavaPruneForConditionalGeneration, Qwen2_5_VLPruneForConditionalGeneration):
        assert _params(ours.__init__) == ["self", "vllm_config", "prefix"]
    assert _params(Qwen2_5_VLForConditionalGeneration.__init__) == ["self", "vllm_config", "prefix"]


def test_qwen_prompt_updates_count_tokens_from_the_grid():
    """N = grid_thw.prod() // merge**2, one ``PromptReplacement`` per modality with a callable
    replacement (``_pruned_replacement`` wraps it), the HF processor built from the request's
    kwargs (why ours are stripped before the call)."""
    source = inspect.getsource(Qwen2_5_VLMultiModalProcessor._get_prompt_updates)
    _in_order(
        source,
        [
            "self.info.get_hf_processor(**hf_processor_mm_kwargs)",
            'out_item[f"{modality}_grid_thw"].data',
            "int(grid_thw.prod()) // merge_length",
            "PromptReplacement(",
            "replacement=partial(",
            'for modality in ("image", "video")',
        ],
    )


def test_qwen_token_count_from_the_image_size():
    """The server's count of an image whose grid the request does not carry (processor-cache
    hit): vLLM's own resize rule, by keyword."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLProcessingInfo

    params = _params(Qwen2_5_VLProcessingInfo.get_num_image_tokens)
    assert params == ["self", "image_width", "image_height", "image_processor", "mm_kwargs"]


def test_qwen_mrope_positions_read_only_offsets_modalities_and_grids():
    """``get_mrope_input_positions`` is run on a widened copy of the request's features: it
    must read only ``len(input_tokens)``, each feature's ``mm_position.offset``, ``modality`` and
    ``data[<modality>_grid_thw]``, and place t*h*w positions per item."""
    source = inspect.getsource(Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions)
    assert "self.iter_mm_grid_thw(mm_features)" in source
    assert "len(input_tokens)" in source and "input_tokens[" not in source
    assert "st = offset + llm_grid_t * llm_grid_h * llm_grid_w" in source
    grids = inspect.getsource(Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw)
    _in_order(
        grids,
        [
            "sorted(mm_features, key=lambda f: f.mm_position.offset)",
            'data["image_grid_thw"].data',
            "yield offset, 1, h // spatial_merge_size, w // spatial_merge_size",
        ],
    )


def test_model_config_hook_switches_llava_to_the_mrope_path(tmp_path):
    """Original positions for a 1-D family (``vllm_plugin/positions.py``): vLLM's per-architecture
    hook runs when the ``ModelConfig`` is built and, for a plain rope, turns on ``uses_mrope`` in
    vLLM's copy of the config only; vLLM then builds ``MRotaryEmbedding``, which with three equal
    rows is 1-D RoPE; the scheduler keeps a prefix-cached item's ``keep_on_cpu`` fields."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PixtralVisionConfig
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding, get_rope
    from vllm.model_executor.models import config as model_configs
    from vllm.multimodal.utils import strip_covered_mm_data
    from vllm.v1.core.sched.output import NewRequestData

    from lvlm_prune.vllm_plugin import register

    register()
    _in_order(
        inspect.getsource(ModelConfig.__post_init__),
        ["self.hf_config = hf_config", "self._try_verify_and_update_model_config()"],
    )
    _in_order(
        inspect.getsource(ModelConfig._try_verify_and_update_model_config),
        ["MODELS_CONFIG_MAP.get(architecture, None)", "cls.verify_and_update_model_config(self)"],
    )
    hook = model_configs.MODELS_CONFIG_MAP["LlavaForConditionalGeneration"]
    assert issubclass(hook, model_configs.VerifyAndUpdateConfig)

    small = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    served = {}
    for name, vision in (("llava", CLIPVisionConfig), ("pixtral", PixtralVisionConfig)):
        folder = tmp_path / name
        text = LlamaConfig(**small, vocab_size=320)
        arch = ["LlavaForConditionalGeneration"]  # as a checkpoint's config.json names it
        config = LlavaConfig(vision_config=vision(**small), text_config=text, architectures=arch)
        config.save_pretrained(folder)
        served[name] = ModelConfig(model=str(folder), skip_tokenizer_init=True)
        on_disk = LlavaConfig.from_pretrained(folder).text_config.rope_parameters
        assert "mrope_section" not in on_disk, "the checkpoint is not touched"
    assert served["llava"].uses_mrope and not served["pixtral"].uses_mrope
    params = served["llava"].hf_config.get_text_config().rope_parameters
    assert sum(params["mrope_section"]) == 32 // 2  # head_dim 32: the rotary half

    with set_current_vllm_config(VllmConfig()):
        mrope = get_rope(32, 256, rope_parameters=params)
        plain = {k: v for k, v in params.items() if "mrope" not in k}
        plain = get_rope(32, 256, rope_parameters=plain)
    assert isinstance(mrope, MRotaryEmbedding) and not isinstance(plain, MRotaryEmbedding)
    positions = torch.tensor([0, 1, 2, 7, 30, 31, 200])
    q, k = torch.randn(7, 64), torch.randn(7, 64)
    q1, k1 = plain.forward_native(positions, q.clone(), k.clone())
    q3, k3 = mrope.forward_native(positions.expand(3, -1), q.clone(), k.clone())
    assert torch.equal(q1, q3) and torch.equal(k1, k3)
    # What the 1-D families' language model is given: one row (positions.py says why).
    q0, k0 = mrope.forward_native(positions, q.clone(), k.clone())
    assert torch.equal(q1, q0) and torch.equal(k1, k0)

    assert "uses_mrope=uses_mrope" in inspect.getsource(NewRequestData.from_request)
    _in_order(
        inspect.getsource(strip_covered_mm_data),
        ["if uses_mrope:", "if elem.field.keep_on_cpu"],
    )


def test_qwen3_deepstack_split_follows_the_rows_of_each_image():
    """Qwen3-VL's embedding rows are [main | one slice per DeepStack level]; vLLM splits the
    concatenated rows by columns (main, levels) and then by each image's row count, so keeping
    whole rows keeps every level on its token."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration as Qwen3

    source = inspect.getsource(Qwen3._compute_deepstack_embeds)
    _in_order(
        source,
        [
            "visual_lens = [len(x) for x in multimodal_embeddings]",
            "torch.cat(multimodal_embeddings, dim=0)",
            "[self.visual_dim, self.multiscale_dim]",
            "multimodal_embeddings_main, visual_lens, dim=0",
            "multimodal_embeddings_multiscale, visual_lens, dim=0",
        ],
    )
    assert "self.deepstack_num_level * inputs_embeds.size(1)" in source


def test_qwen3_mrope_positions_read_grids_and_video_frames_by_token_id():
    """Qwen3-VL's positions come from each item's grid at its offset (images), and video frames
    are found by their token ids in the prompt: the widened copy ``pruned_mrope_positions`` runs
    vLLM's code on must carry the prompt's real ids."""
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration as Qwen3

    assert "self._get_mrope_input_positions(" in inspect.getsource(Qwen3.get_mrope_input_positions)
    _in_order(
        inspect.getsource(Qwen3._iter_mm_grid_hw),
        [
            "sorted(mm_features, key=lambda f: f.mm_position.offset)",
            'data["image_grid_thw"].data',
            "yield offset, llm_grid_h, llm_grid_w, llm_grid_h * llm_grid_w",
            "input_tokens.index(vision_start_token_id, offset)",
        ],
    )


def test_feature_specs_we_widen():

    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    assert dataclasses.is_dataclass(MultiModalFeatureSpec)
    fields = {f.name for f in dataclasses.fields(MultiModalFeatureSpec)}
    assert {"data", "modality", "identifier", "mm_position"} <= fields
    assert PlaceholderRange(offset=3, length=5).length == 5


def test_qwen_embed_multimodal_returns_one_tensor_per_item():
    source = inspect.getsource(Qwen2_5_VLForConditionalGeneration.embed_multimodal)
    assert "multimodal_embeddings += tuple(image_embeddings)" in source
    # vLLM's own pruning (EVS) rewrites image rows here only when it is on; we refuse image
    # pruning while it is (the processor's check) and rely on it being off otherwise.
    assert "if self.is_multimodal_pruning_enabled:" in source


def test_the_runner_merges_rows_in_mask_order_and_accepts_wider_rows():
    """``_merge_multimodal_embeddings`` fills ``is_multimodal``'s true entries in order (the rows
    ``_split_offsets`` assigns the offsets to); ``sanity_check_mm_encoder_outputs`` checks 2-D
    only, so rows carrying the position channels pass through the encoder cache."""
    import torch
    from vllm.model_executor.models import utils
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    assert "inputs_embeds[is_multimodal] = mm_embeds_flat" in inspect.getsource(
        utils._merge_multimodal_embeddings
    )
    sanity_check_mm_encoder_outputs([torch.zeros(3, 70), torch.zeros(2, 64)], expected_num_items=2)
    assert _params(Qwen2_5_VLForConditionalGeneration.embed_input_ids) == [
        "self",
        "input_ids",
        "multimodal_embeddings",
        "is_multimodal",
    ]


def test_v1_runner_positions_then_encoder_then_embed_then_forward():
    """The order the mechanism relies on in vLLM's V1 runner (the CPU runner's too):
    positions from ``get_mrope_input_positions`` once per request; each step's slice copied into
    the persistent buffer; then the encoder (``embed_multimodal`` unless an encoder CUDA graph
    replays it), the gather (a slice of the cached rows, channels included), ``embed_input_ids``
    with the mask, and the forward with a view of that same buffer."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    init = inspect.getsource(GPUModelRunner._init_mrope_positions)
    assert "mrope_model.get_mrope_input_positions(" in init
    assert "input_tokens," in init and "mrope_features," in init
    calc = re.sub(r"\s+", "", inspect.getsource(GPUModelRunner._calc_mrope_positions))
    assert "=req.mrope_positions[:,src_start:src_end]" in calc
    encoder = inspect.getsource(GPUModelRunner._execute_mm_encoder)
    _in_order(
        encoder,
        [
            "self.encoder_cudagraph_manager is not None",
            "batch_outputs = model.embed_multimodal(**mm_kwargs_batch)",
            "sanity_check_mm_encoder_outputs(",
        ],
    )
    gather = inspect.getsource(GPUModelRunner._gather_mm_embeddings)
    assert "mm_embeds_item = encoder_output[start_idx:end_idx]" in gather
    # vLLM's own recompute path (EVS) stays off unless its video pruning is on.
    assert "if self.is_multimodal_pruning_enabled and self.uses_mrope:" in gather
    preprocess = inspect.getsource(GPUModelRunner._preprocess)
    _in_order(
        preprocess,
        [
            "self._execute_mm_encoder(scheduler_output)",
            "self._gather_mm_embeddings(scheduler_output)",
            "self.model.embed_input_ids(",
            "is_multimodal=is_mm_embed,",
            "positions = self.mrope_positions.gpu[:, :num_input_tokens]",
        ],
    )
    assert "self._calc_mrope_positions(scheduler_output)" in inspect.getsource(
        GPUModelRunner._prepare_inputs
    )
    execute = inspect.getsource(GPUModelRunner.execute_model)
    _in_order(execute, ["self._prepare_inputs(", "self._preprocess(", "self._model_forward("])
    forward = inspect.getsource(GPUModelRunner._model_forward)
    assert "positions=positions" in forward


def test_the_cpu_runner_is_the_v1_runner_and_never_turns_evs_on():
    from vllm.config.multimodal import MultiModalConfig
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    assert "is_multimodal_pruning_enabled" not in inspect.getsource(CPUModelRunner.load_model)
    gpu_load = inspect.getsource(GPUModelRunner.load_model)
    assert "mm_config.is_multimodal_pruning_enabled()" in gpu_load
    assert not MultiModalConfig(video_pruning_rate=0.0).is_multimodal_pruning_enabled()
    assert MultiModalConfig(video_pruning_rate=0.5).is_multimodal_pruning_enabled()


def test_v2_runner_positions_and_embeddings_go_through_the_same_model_calls():
    """vLLM's V2 runner (the CUDA default): positions from ``get_mrope_input_positions`` at
    request creation, a view of the persistent positions buffer handed to the forward, and the
    merge through ``model.embed_input_ids`` with the mask."""
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.mm.rope import RopeState
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    assert "mrope_model.get_mrope_input_positions(" in inspect.getsource(
        RopeState.init_prefill_positions
    )
    assert "return self.positions[:, :num_tokens]" in inspect.getsource(RopeState.get_positions)
    assert "self.encoder_runner.get_inputs_embeds(" in inspect.getsource(
        DefaultModelState.prepare_inputs_embeds
    )
    assert "self.model.embed_input_ids(" in inspect.getsource(EncoderRunner.get_inputs_embeds)


def test_hf_processors_are_cached_by_their_kwargs():
    """Why ``_get_prompt_updates`` strips our kwargs: vLLM caches HF processors by kwargs, and
    Qwen2.5-VL's builds one from the request's kwargs."""
    from vllm.transformers_utils import processor

    assert hasattr(processor.cached_get_processor, "cache_info")
    assert "_merge_mm_kwargs" in inspect.getsource(processor)


def test_what_the_guards_read_of_vllms_config():
    """``Qwen2_5_VLPruneForConditionalGeneration.unsupported_engine_config`` refuses, at engine
    start, configurations under which the kept tokens' positions would not reach the forward;
    tower / connector LoRA is refused for every family (``PruneModelMixin``)."""
    from vllm.config import CompilationConfig, LoRAConfig, ParallelConfig, SpeculativeConfig
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert ParallelConfig().pipeline_parallel_size == 1
    assert ParallelConfig().use_ubatching is False
    assert CompilationConfig().cudagraph_mm_encoder is False
    assert LoRAConfig().enable_tower_connector_lora is False
    assert "def use_eagle(self) -> bool:" in inspect.getsource(SpeculativeConfig)
    assert CUDAGraphMode.FULL.mixed_mode() == CUDAGraphMode.FULL
    assert CUDAGraphMode.FULL_AND_PIECEWISE.mixed_mode() == CUDAGraphMode.PIECEWISE
    assert "self.compilation_config.cudagraph_mm_encoder" in inspect.getsource(
        GPUModelRunner._create_encoder_cudagraph_manager
    )
    # Later pipeline stages never merge the rows, so they never see the offsets.
    assert "is_first_rank = get_pp_group().is_first_rank" in inspect.getsource(
        GPUModelRunner._preprocess
    )
    # Tower / connector LoRA sizes its mappings by the placeholder count (K, once pruned).
    assert "num_mm_embeds=pos_info.get_num_embeds()" in inspect.getsource(
        GPUModelRunner._execute_mm_encoder
    )


def test_transformers_reference_side():
    """The tests' reference: transformers' own Qwen2.5-VL positions and image features."""
    from transformers import Qwen2_5_VLModel

    params = _params(Qwen2_5_VLModel.get_rope_index)
    assert params[:2] == ["self", "input_ids"]
    assert {"mm_token_type_ids", "image_grid_thw"} <= set(params)
    assert _params(Qwen2_5_VLModel.get_image_features)[:3] == [
        "self",
        "pixel_values",
        "image_grid_thw",
    ]


# ---- LLaVA-NeXT / OneVision (vllm_plugin/llava_next.py) -----------------------------------------


def _anyres_contexts(tmp_path_factory) -> dict:
    """vLLM's processing contexts of a small LLaVA-NeXT (CLIP 112 px / 14, llava-v1.6's
    pinpoints scaled) and LLaVA-OneVision (SigLIP 104 px / 14, every grid up to 6 x 6)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from vllm.config import ModelConfig

    small = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    next_grids = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
    ov_grids = [(r, c) for r in range(1, 7) for c in range(1, 7)]
    configs = {
        "next": LlavaNextConfig(
            vision_config=CLIPVisionConfig(**small, image_size=112, patch_size=14),
            text_config=LlamaConfig(**small, vocab_size=320),
            image_grid_pinpoints=[[112 * r, 112 * c] for r, c in next_grids],
            architectures=["LlavaNextForConditionalGeneration"],
        ),
        "onevision": LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**small, image_size=104, patch_size=14),
            text_config=Qwen2Config(**small, vocab_size=320),
            image_grid_pinpoints=[[104 * r, 104 * c] for r, c in ov_grids],
            vision_feature_select_strategy="full",
            architectures=["LlavaOnevisionForConditionalGeneration"],
        ),
    }
    contexts = {}
    for name, config in configs.items():
        folder = tmp_path_factory.mktemp(name)
        config.save_pretrained(folder)
        model_config = ModelConfig(model=str(folder), skip_tokenizer_init=True)
        contexts[name] = InputProcessingContext(model_config=model_config, tokenizer=object())
    return contexts


def test_anyres_rows_are_laid_out_as_our_layout_says(tmp_path_factory):
    """vLLM's merge puts the base view's rows first, then the crops' rows each closed by the
    ``image_newline`` row (OneVision: the crops shrunk to anyres_max_9), at the rows
    ``llava_next.anyres_layout`` computes from the image's size; vLLM's token count N is that
    layout's; its model reads each image's ``image_sizes``."""
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    from vllm.model_executor.models.llava_next import LlavaNextProcessingInfo
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionProcessingInfo

    from lvlm_prune.vllm_plugin.llava_next import ONEVISION_MAX_CROPS, anyres_layout

    contexts = _anyres_contexts(tmp_path_factory)
    cases = {
        "next": (LlavaNextProcessingInfo, LlavaNextForConditionalGeneration, None),
        "onevision": (
            LlavaOnevisionProcessingInfo,
            LlavaOnevisionForConditionalGeneration,
            ONEVISION_MAX_CROPS,
        ),
    }
    sizes = [(112, 112), (300, 120), (120, 300), (208, 208), (600, 400), (97, 333), (1000, 90)]
    for name, (info_class, model_class, max_crops) in cases.items():
        info = info_class(contexts[name])
        config = info.get_hf_config()
        side = config.vision_config.image_size // config.vision_config.patch_size
        newline = torch.randn(8)
        model = SimpleNamespace(config=config, image_newline=newline)
        for width, height in sizes:
            layout = anyres_layout(config, height, width, max_crops=max_crops)
            count = info.get_num_image_tokens(image_width=width, image_height=height)
            assert count == layout.tokens, (name, width, height)
            crops = math.prod(
                get_anyres_image_grid_shape(
                    (height, width), config.image_grid_pinpoints, config.vision_config.image_size
                )
            )
            patches = torch.randn(1 + crops, side * side, 8)
            extra = {"image_newline": newline} if max_crops else {}
            merged = model_class._merge_image_patch_embeddings(
                model, torch.tensor([height, width]), patches, strategy="spatial_unpad", **extra
            )
            assert merged.shape[0] == layout.tokens, (name, width, height)
            assert torch.equal(merged[: side * side], patches[0])
            is_newline = (merged == newline).all(dim=-1)
            assert is_newline.nonzero().flatten().tolist() == layout.newline_rows.tolist()
            assert torch.equal(layout.content_rows, (~is_newline).nonzero().flatten())
        source = inspect.getsource(model_class._process_image_input)
        assert 'image_input.get("image_sizes")' in source and "image_sizes[i]" in source
