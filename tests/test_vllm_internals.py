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
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
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
from lvlm_prune.vllm_plugin.qwen2_5_vl import (
    Qwen2_5_VLPruneForConditionalGeneration,
    Qwen2_5_VLPruneMultiModalProcessor,
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
]


def test_vllm_version_is_the_one_pinned():
    assert vllm.__version__.startswith("0.32."), vllm.__version__


@pytest.mark.parametrize(
    ("base", "name", "params"), OVERRIDDEN, ids=[f"{c.__name__}.{n}" for c, n, _ in OVERRIDDEN]
)
def test_overridden_vllm_method_keeps_its_signature(base, name, params):
    assert _params(getattr(base, name)) == params


OURS = [
    LlavaPruneMultiModalProcessor,
    LlavaPruneForConditionalGeneration,
    Qwen2_5_VLPruneMultiModalProcessor,
    Qwen2_5_VLPruneForConditionalGeneration,
]


@pytest.mark.parametrize("ours", OURS, ids=lambda c: c.__name__)
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
    # The pass builds its input with vLLM's own merge of the kept rows into the prompt.
    assert _params(LlavaForConditionalGeneration.embed_input_ids) == [
        "self",
        "input_ids",
        "multimodal_embeddings",
        "is_multimodal",
    ]


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
    replacement (``pruning._shorten`` wraps it), the HF processor built from the request's
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


def test_feature_specs_we_widen():
    import dataclasses

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
