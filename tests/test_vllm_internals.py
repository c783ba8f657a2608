"""The vLLM internals lvlm-prune overrides, wraps or copies, pinned.

vLLM's processor and serving internals are not a public API. Each test here fails when a vLLM
upgrade renames, moves or re-signs one of them, so the upgrade fails in CI instead of on live
requests (a silently stock, unpruned model, or every pruned request answered 400).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import vllm
from vllm.model_executor.models.llava import (
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
)
from vllm.multimodal.processing import (
    BaseMultiModalProcessor,
    InputProcessingContext,
    ProcessorInputs,
    PromptReplacement,
)

from lvlm_prune.server import cli, plugin
from lvlm_prune.vllm_plugin.llava import (
    LlavaPruneForConditionalGeneration,
    LlavaPruneMultiModalProcessor,
)


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
]


def test_vllm_version_is_the_one_pinned():
    assert vllm.__version__.startswith("0.32."), vllm.__version__


@pytest.mark.parametrize(
    ("base", "name", "params"), OVERRIDDEN, ids=[f"{c.__name__}.{n}" for c, n, _ in OVERRIDDEN]
)
def test_overridden_vllm_method_keeps_its_signature(base, name, params):
    assert _params(getattr(base, name)) == params


@pytest.mark.parametrize(
    "ours",
    [LlavaPruneMultiModalProcessor, LlavaPruneForConditionalGeneration],
    ids=lambda c: c.__name__,
)
def test_every_override_matches_the_method_it_replaces(ours):
    """Every method our classes define (the family's class and the shared mixins it inherits)
    that a vLLM class also has: same parameters as the first vLLM class in the MRO that defines
    it, and in the pinned list above (so a new override cannot skip being pinned)."""
    pinned = {name for _, name, _ in OVERRIDDEN}
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
            assert name in pinned, f"{own.__name__}.{name} overrides vLLM but is not pinned here"
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
    assert _modules_calling_the_gate() == set(plugin.GATED_MODULES)
    for name in plugin.GATED_MODULES:
        gate = importlib.import_module(name).validate_request_mm_kwargs
        assert set(_params(gate)) == {
            "mm_processor_kwargs",
            "media_io_kwargs",
            "trust_request_mm_kwargs",
        }


def test_gate_wrap_refuses_to_start_when_it_patches_nothing(monkeypatch):
    module = importlib.import_module(plugin.GATED_MODULES[0])
    monkeypatch.delattr(module, "validate_request_mm_kwargs")
    with pytest.raises(RuntimeError, match="validate_request_mm_kwargs"):
        plugin.allow_pruning_kwargs_per_request()


def test_serve_steps_are_vllms_own_in_its_order():
    """``lvlm-prune serve`` repeats vLLM's ``main`` of the API server entry point; the same calls,
    in the same order, must still be what vLLM does."""
    from vllm.entrypoints.launchers.api_server import entry

    steps = [
        "cli_env_setup",
        "make_arg_parser",
        "configure_logging_from_args",
        "validate_parsed_serve_args",
        "run_server",
    ]
    theirs = inspect.getsource(entry.main)
    ours = inspect.getsource(cli.serve) + inspect.getsource(cli.vllm_serve_parser)
    for source in (theirs, ours):
        at = [source.find(f"{step}(") for step in steps]
        assert all(i >= 0 for i in at), dict(zip(steps, at))
    assert [theirs.find(f"{s}(") for s in steps] == sorted(theirs.find(f"{s}(") for s in steps)
    assert _params(entry.run_server)[0] == "args"


def test_rpc_to_every_data_parallel_engine():
    """``ServerState.rpc_every_engine`` calls ``EngineCore.collective_rpc`` on every engine
    through the MP clients' ``call_utility_all_async``."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import AsyncMPClient, DPLBAsyncMPClient

    assert _params(EngineCore.collective_rpc) == ["self", "method", "timeout", "args", "kwargs"]
    for client in (AsyncMPClient, DPLBAsyncMPClient):
        assert _params(client.call_utility_all_async) == ["self", "method", "args"]


def test_decoder_layer_parts_the_flow_pass_runs():
    """``vllm_plugin.flow`` reruns vLLM's ``LlamaDecoderLayer.forward`` with its own submodules and
    replaces only ``self.attn(q, k, v)`` (paged attention): the steps and names must still be
    vLLM's, in its order."""
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer

    from lvlm_prune.vllm_plugin import flow

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
    # The pass builds its input with vLLM's own merge of the kept rows into the prompt.
    assert _params(LlavaForConditionalGeneration.embed_input_ids) == [
        "self",
        "input_ids",
        "multimodal_embeddings",
        "is_multimodal",
    ]
