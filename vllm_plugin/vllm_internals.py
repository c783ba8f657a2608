"""Every place lvlm-prune reaches below vLLM's public API, in one module.

vLLM's processor, engine and serving internals change between releases, and an upgrade that
breaks one of them breaks quietly: a stock, unpruned model, every pruned request answered 400, a
server a supervisor never restarts. So the runtime patches are applied here and the private reads
happen here (callers call the small functions below), and ``TOUCH_POINTS`` lists every touch
point, those that stay in the family modules too (the overridden processor and model hooks, the
copied factory, the decoder-layer steps the flow pass reruns). Each entry names the pin in
``tests/test_vllm_internals.py`` that fails when vLLM moves it.

A vLLM upgrade: set ``VLLM_VERSION``, run ``tests/test_vllm_internals.py``, read what broke.

NOTE(vLLM 0.32): ``SupportsMultiModalPruning`` (``model_executor/models/interfaces.py``) exists,
and we add it to none of our classes. It is vLLM's interface for its own video pruning (EVS):
the runner calls the model's ``recompute_mrope_positions`` only when ``--video-pruning-rate`` is
above 0, and only for M-RoPE models. Qwen2.5-VL's vLLM class declares it, so our subclass
inherits it, for vLLM's video pruning alone (our processor refuses image pruning while that is on;
``vllm_plugin/qwen2_5_vl.py`` says why our positions do not take that path). LLaVA must not: it has
no video and no ``recompute_mrope_positions``, and our pruning needs no runner support (the
processor decides each request's K and placeholders).
"""

from __future__ import annotations

import functools
import importlib
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass

VLLM_VERSION = "0.32"
"""The vLLM minor version every pin below was read from."""

PATCH, PRIVATE_READ, OVERRIDE, COPIED = "patch", "private read", "override", "copied code"


@dataclass(frozen=True)
class TouchPoint:
    kind: str
    """``PATCH`` (we replace or add vLLM code at run time), ``PRIVATE_READ`` (we call or read a
    vLLM internal, or rely on what it does), ``OVERRIDE`` (our subclass replaces a vLLM hook),
    ``COPIED`` (our code repeats vLLM's)."""
    vllm: str
    """The vLLM symbol, ``module:qualname``."""
    ours: str
    """Where we use it, ``module:qualname``."""
    pins: tuple[str, ...]
    """Test functions in ``tests/test_vllm_internals.py`` that check it."""
    checks: str
    """What the pins check."""


_PROCESSOR = "lvlm_prune.vllm_plugin.processing.processor:PruneProcessorMixin"
_MODEL = "lvlm_prune.vllm_plugin.worker.model:PruneModelMixin"
_QWEN = "lvlm_prune.vllm_plugin.qwen2_5_vl:Qwen2_5_VLPruneForConditionalGeneration"
_VLLM_QWEN = "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration"
_QWEN3 = "lvlm_prune.vllm_plugin.qwen3_vl:Qwen3VLPruneForConditionalGeneration"
_VLLM_QWEN3 = "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration"
_VLLM_QWEN3_PROCESSOR = "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor"
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_SIGNATURE = (
    "test_overridden_vllm_method_keeps_its_signature",
    "test_every_override_matches_the_method_it_replaces",
)


def _override(vllm: str, ours: str) -> TouchPoint:
    return TouchPoint(
        OVERRIDE, vllm, ours, _SIGNATURE, "parameter names, in order, vLLM's and ours"
    )


TOUCH_POINTS: tuple[TouchPoint, ...] = (
    # ---- patches: applied by the functions of this module ------------------------------------
    TouchPoint(
        PATCH,
        "vllm.v1.engine.core:EngineCoreProc._handle_client_request",
        "lvlm_prune.vllm_plugin.vllm_internals:add_engine_core_utilities",
        ("test_engine_core_runs_our_utility_by_name",),
        "a utility call is resolved with getattr on the engine core; ours is there and runs",
    ),
    TouchPoint(
        PATCH,
        "vllm.entrypoints.generate.base.protocol:validate_request_mm_kwargs",
        "lvlm_prune.vllm_plugin.vllm_internals:screen_per_request_mm_kwargs",
        (
            "test_gate_wrap_covers_every_module_that_calls_vllms_gate",
            "test_gate_refuses_untrusted_kwargs_and_the_wrap_lets_ours_through",
            "test_gate_wrap_refuses_to_start_when_it_patches_nothing",
        ),
        "GATED_MODULES is exactly the modules importing the gate; its keyword-only signature; "
        "vLLM refuses untrusted kwargs and the wrap passes only the screened ones",
    ),
    TouchPoint(
        PATCH,
        "vllm.multimodal.media.image:ImageMediaIO.load_bytes",
        "lvlm_prune.vllm_plugin.vllm_internals:refuse_images_raising",
        ("test_image_loader_turns_a_decompression_bomb_into_a_value_error",),
        "(self, data); vLLM's loader lets PIL's DecompressionBombError out, ours a ValueError",
    ),
    TouchPoint(
        PATCH,
        "vllm.multimodal.processing.context:InputProcessingContext.call_hf_processor",
        "lvlm_prune.vllm_plugin.vllm_internals:refuse_pruning_kwargs_on_unpruned_models",
        ("test_hf_processor_call_refuses_pruning_kwargs_on_an_unpruned_model",),
        "(self, hf_processor, data, kwargs); every processor calls the HF processor through it "
        "with the merged kwargs; ours refuses our kwargs for an unpruned architecture only",
    ),
    # ---- private reads done by this module ----------------------------------------------------
    TouchPoint(
        PRIVATE_READ,
        "vllm.multimodal.hasher:MultiModalHasher.hash_kwargs",
        "lvlm_prune.vllm_plugin.vllm_internals:rehash_image",
        ("test_rehash_is_vllms_kwargs_hash",),
        "(algorithm, /, **kwargs); deterministic, keyed by every kwarg; the configured algorithm",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.v1.engine.utils:CoreEngineProcManager.monitor_engine_liveness",
        "lvlm_prune.vllm_plugin.vllm_internals:engine_core_died",
        ("test_engine_death_is_told_from_a_stop",),
        "failed_proc_name set only for an engine that exits non-zero unasked; engine_dead is "
        "set by every shutdown, so it cannot tell the two apart alone",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.v1.engine.core_client:AsyncMPClient.call_utility_all_async",
        "lvlm_prune.vllm_plugin.vllm_internals:collective_rpc_every_engine",
        ("test_rpc_to_every_data_parallel_engine",),
        "(self, method, *args) on the MP clients; EngineCore.collective_rpc's parameters",
    ),
    TouchPoint(
        COPIED,
        "vllm.entrypoints.launchers.api_server.entry:main",
        "lvlm_prune.vllm_plugin.vllm_internals:serve_args",
        ("test_serve_steps_are_vllms_own_in_its_order",),
        "the same calls, in vLLM's order (argument parsing in server.cli.vllm_serve_parser)",
    ),
    # ---- the processor hooks PruneProcessorMixin overrides (processing/processor.py) ----------
    _override("vllm.multimodal.processing:BaseMultiModalProcessor.apply", f"{_PROCESSOR}.apply"),
    _override(
        "vllm.multimodal.processing:BaseMultiModalProcessor.get_dummy_inputs",
        f"{_PROCESSOR}.get_dummy_inputs",
    ),
    _override(
        "vllm.multimodal.processing:BaseMultiModalProcessor._get_mm_hashes",
        f"{_PROCESSOR}._get_mm_hashes",
    ),
    _override(
        "vllm.multimodal.processing:BaseMultiModalProcessor._get_cache_missing_processor_kwargs",
        f"{_PROCESSOR}._get_cache_missing_processor_kwargs",
    ),
    _override(
        "vllm.multimodal.processing:BaseMultiModalProcessor._call_hf_processor",
        f"{_PROCESSOR}._call_hf_processor",
    ),
    _override(
        "vllm.multimodal.processing:BaseMultiModalProcessor._apply_hf_processor_main",
        f"{_PROCESSOR}._apply_hf_processor_main",
    ),
    _override(
        "vllm.model_executor.models.llava:LlavaMultiModalProcessor._get_mm_fields_config",
        f"{_PROCESSOR}._get_mm_fields_config",
    ),
    _override(
        "vllm.model_executor.models.llava:LlavaMultiModalProcessor._get_prompt_updates",
        f"{_PROCESSOR}._get_prompt_updates",
    ),
    _override(
        "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._get_mm_fields_config",
        f"{_PROCESSOR}._get_mm_fields_config",
    ),
    _override(
        "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._get_prompt_updates",
        f"{_PROCESSOR}._get_prompt_updates",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.multimodal.processing:InputProcessingContext.call_hf_processor",
        f"{_PROCESSOR}._call_hf_processor",
        ("test_processor_inputs_and_context_we_read",),
        "ProcessorInputs' fields, get_merged_mm_kwargs / call_hf_processor's parameters, and "
        "that the multimodal hash covers the processor kwargs but not the prompt",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.transformers_utils.processor:cached_get_processor",
        f"{_PROCESSOR}._get_prompt_updates",
        ("test_hf_processors_are_cached_by_their_kwargs",),
        "HF processors are lru-cached by their kwargs (why ours are stripped first)",
    ),
    # ---- the model hooks (worker/model.py, qwen2_5_vl.py) ------------------------------------
    _override(
        "vllm.model_executor.models.llava:LlavaForConditionalGeneration.embed_multimodal",
        f"{_MODEL}.embed_multimodal",
    ),
    _override(f"{_VLLM_QWEN}.embed_multimodal", f"{_MODEL}.embed_multimodal"),
    _override(f"{_VLLM_QWEN}.get_mrope_input_positions", f"{_QWEN}.get_mrope_input_positions"),
    _override(f"{_VLLM_QWEN}.embed_input_ids", f"{_QWEN}.embed_input_ids"),
    _override(f"{_VLLM_QWEN}.forward", f"{_QWEN}.forward"),
    # Qwen3-VL (qwen3_vl.py): vLLM's Qwen3-VL processor and model define these hooks themselves.
    *(
        _override(f"{_VLLM_QWEN3_PROCESSOR}.{name}", f"{_PROCESSOR}.{name}")
        for name in (
            "_get_mm_hashes",
            "_get_cache_missing_processor_kwargs",
            "_get_mm_fields_config",
            "_get_prompt_updates",
        )
    ),
    _override(
        f"{_VLLM_QWEN3_PROCESSOR}._apply_hf_processor_main",
        "lvlm_prune.vllm_plugin.qwen3_vl:_Qwen3VLProcessorWithoutOwnKwargs._apply_hf_processor_main",
    ),
    *(
        _override(f"{_VLLM_QWEN3}.{name}", f"{_QWEN3}.{name}")
        for name in ("embed_multimodal", "get_mrope_input_positions", "embed_input_ids", "forward")
    ),
    TouchPoint(
        OVERRIDE,
        f"{_VLLM_QWEN}.__init__",
        f"{_MODEL}.__init__",
        ("test_our_model_classes_are_built_as_vllm_builds_models",),
        "(self, vllm_config, prefix) on vLLM's class and ours",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.model_executor.models.interfaces:SupportsMultiModalPruning",
        _QWEN,
        ("test_supports_multimodal_pruning_is_vllms_video_interface",),
        "Qwen2.5-VL inherits vLLM's declaration (video EVS), LLaVA has none; the runner turns it "
        "on only with video pruning (this module's docstring says why we declare nothing)",
    ),
    # ---- original positions for 1-D RoPE families (positions.py) ----------------------------
    TouchPoint(
        PATCH,
        "vllm.model_executor.models.config:MODELS_CONFIG_MAP",
        "lvlm_prune.vllm_plugin.vllm_internals:add_model_config_hooks",
        ("test_model_config_hook_switches_llava_to_the_mrope_path",),
        "ModelConfig.__post_init__ runs MODELS_CONFIG_MAP[architecture]"
        ".verify_and_update_model_config(model_config) before uses_mrope is read; our entry "
        "keeps vLLM's own hook",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.transformers_utils.config:uses_mrope",
        "lvlm_prune.vllm_plugin.positions:switch_on_original_positions",
        ("test_model_config_hook_switches_llava_to_the_mrope_path",),
        "mrope_section in the text config's rope_parameters turns on uses_mrope, and get_rope "
        "builds MRotaryEmbedding for it (rope_type default); three equal rows give 1-D RoPE",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.multimodal.utils:strip_covered_mm_data",
        "lvlm_prune.vllm_plugin.positions:position_span",
        ("test_model_config_hook_switches_llava_to_the_mrope_path",),
        "a prefix-cached item of an M-RoPE model keeps its keep_on_cpu fields (our span)",
    ),
    _override(
        "vllm.model_executor.models.llava:LlavaForConditionalGeneration.embed_input_ids",
        "lvlm_prune.vllm_plugin.positions:PositionCarrierMixin.embed_input_ids",
    ),
    _override(
        "vllm.model_executor.models.llava:LlavaForConditionalGeneration.forward",
        "lvlm_prune.vllm_plugin.positions:PositionCarrierMixin.forward",
    ),
    # ---- Qwen2.5-VL's M-RoPE machinery (qwen2_5_vl.py relies on vLLM's runner) --------------
    TouchPoint(
        PRIVATE_READ,
        f"{_VLLM_QWEN3}._compute_deepstack_embeds",
        "lvlm_prune.vllm_plugin.qwen3_vl:DeepStackPruneModelMixin._pruned_embeddings",
        ("test_qwen3_deepstack_split_follows_the_rows_of_each_image",),
        "each image's rows [main | levels] split by columns [visual_dim, multiscale_dim] and by "
        "rows per image: the levels of a kept row stay on its token",
    ),
    TouchPoint(
        PRIVATE_READ,
        f"{_VLLM_QWEN3}._iter_mm_grid_hw",
        "lvlm_prune.vllm_plugin.qwen2_5_vl:pruned_mrope_positions",
        ("test_qwen3_mrope_positions_read_grids_and_video_frames_by_token_id",),
        "images placed from the grid at their offset; video frames found by token id, so the "
        "widened copy must carry the real prompt ids",
    ),
    TouchPoint(
        PRIVATE_READ,
        f"{_VLLM_QWEN}.iter_mm_grid_thw",
        f"{_QWEN}.get_mrope_input_positions",
        ("test_qwen_mrope_positions_read_only_offsets_modalities_and_grids",),
        "vLLM's positions read only offsets, modalities and grids of the features we widen",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.multimodal.inputs:MultiModalFeatureSpec",
        f"{_QWEN}.get_mrope_input_positions",
        ("test_feature_specs_we_widen",),
        "a dataclass with data, modality, identifier, mm_position",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor._get_prompt_updates",
        "lvlm_prune.vllm_plugin.qwen2_5_vl:Qwen2_5_VLPruneMultiModalProcessor",
        (
            "test_qwen_prompt_updates_count_tokens_from_the_grid",
            "test_qwen_token_count_from_the_image_size",
        ),
        "N from the grid, one PromptReplacement per modality; get_num_image_tokens' keywords",
    ),
    TouchPoint(
        PRIVATE_READ,
        f"{_VLLM_QWEN}.embed_multimodal",
        f"{_MODEL}.embed_multimodal",
        ("test_qwen_embed_multimodal_returns_one_tensor_per_item",),
        "one tensor per item; vLLM's EVS rewrite only when its pruning is on",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.model_executor.models.utils:_merge_multimodal_embeddings",
        f"{_QWEN}.embed_input_ids",
        ("test_the_runner_merges_rows_in_mask_order_and_accepts_wider_rows",),
        "rows fill the mask's true entries in order; the encoder check accepts wider rows",
    ),
    TouchPoint(
        PRIVATE_READ,
        f"{_RUNNER}._preprocess",
        f"{_QWEN}.forward",
        (
            "test_v1_runner_positions_then_encoder_then_embed_then_forward",
            "test_the_cpu_runner_is_the_v1_runner_and_never_turns_evs_on",
            "test_v2_runner_positions_and_embeddings_go_through_the_same_model_calls",
        ),
        "positions, encoder, gather, embed_input_ids, forward: in that order, on V1, CPU, V2",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.config:CompilationConfig",
        f"{_QWEN}.unsupported_engine_config",
        ("test_what_the_guards_read_of_vllms_config",),
        "the config fields and defaults the start-up guards read",
    ),
    # ---- copied code in the family modules ----------------------------------------------------
    TouchPoint(
        COPIED,
        "vllm.model_executor.models.llava:_build_llava_or_pixtral_hf_processor",
        "lvlm_prune.vllm_plugin.llava:_build_processor",
        ("test_llava_processor_factory_matches_vllms",),
        "for a LLaVA and a Pixtral-HF config, vLLM's info factory (used as is) picks the same "
        "info, ours the same processor (ours the pruning subclass); same info classes",
    ),
    TouchPoint(
        COPIED,
        "vllm.model_executor.models.llama:LlamaDecoderLayer.forward",
        "lvlm_prune.vllm_plugin.worker.flow:run_layers",
        ("test_decoder_layer_parts_the_flow_pass_runs",),
        "the layer's and attention's steps and submodule names, in vLLM's order",
    ),
    TouchPoint(
        COPIED,
        "vllm.model_executor.models.qwen3:Qwen3Attention.forward",
        "lvlm_prune.vllm_plugin.worker.flow:run_layers",
        ("test_qwen_decoder_layers_the_flow_pass_runs",),
        "Qwen2, Qwen3 and Qwen3-MoE layers have the Llama steps, q/k norms per head before the "
        "rotary embedding; the attention parts the pass reads",
    ),
    TouchPoint(
        COPIED,
        "vllm.model_executor.models.qwen3_vl:Qwen3LLMModel.forward",
        "lvlm_prune.vllm_plugin.worker.flow:deepstack_adder",
        ("test_qwen_decoder_layers_the_flow_pass_runs",),
        "DeepStack level i added to the hidden states right after decoder layer i (dense, MoE)",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.multimodal.inputs:MultiModalKwargsItem",
        "lvlm_prune.vllm_plugin.qwen2_5_vl:MRopePruneModelMixin.served_positions",
        ("test_what_the_mrope_flow_pass_reads_of_vllm",),
        "a feature's data built from one MultiModalFieldElem(data, field=MultiModalBatchedField())",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.forward_context:create_forward_context",
        "lvlm_prune.vllm_plugin.worker.flow:forward_context",
        ("test_what_the_mrope_flow_pass_reads_of_vllm",),
        "(attn_metadata, vllm_config) and override_forward_context: vLLM's MoE layers look "
        "themselves up in the forward context; the language models' embed_input_ids(input_ids)",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.distributed:tensor_model_parallel_all_reduce",
        "lvlm_prune.vllm_plugin.worker.flow:scout_scores",
        ("test_what_the_flow_pass_reads_of_vllm",),
        "the TP collectives, Worker.get_model, MultiModalInput.prompt_token_ids, embed_input_ids",
    ),
    # ---- LLaVA-NeXT / OneVision (llava_next.py) -----------------------------------------------
    *(
        _override(f"vllm.model_executor.models.{module}.{name}", f"{_PROCESSOR}.{name}")
        for module, name in (
            ("llava_next:LlavaNextMultiModalProcessor", "_get_mm_fields_config"),
            ("llava_onevision:LlavaOnevisionMultiModalProcessor", "_get_mm_fields_config"),
            ("llava_onevision:LlavaOnevisionMultiModalProcessor", "_get_prompt_updates"),
        )
    ),
    _override(
        "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor."
        "_apply_hf_processor_main",
        "lvlm_prune.vllm_plugin.llava_next:_OnevisionProcessorWithoutOwnKwargs."
        "_apply_hf_processor_main",
    ),
    *(
        _override(
            f"vllm.model_executor.models.{name}.embed_multimodal", f"{_MODEL}.embed_multimodal"
        )
        for name in (
            "llava_next:LlavaNextForConditionalGeneration",
            "llava_onevision:LlavaOnevisionForConditionalGeneration",
        )
    ),
    # Original positions (positions.py's carrier), as LLaVA-1.5's; OneVision's embed_input_ids
    # is vLLM's SupportsMultiModal default.
    *(
        _override(
            f"vllm.model_executor.models.{name}.{method}",
            f"lvlm_prune.vllm_plugin.positions:PositionCarrierMixin.{method}",
        )
        for name in (
            "llava_next:LlavaNextForConditionalGeneration",
            "llava_onevision:LlavaOnevisionForConditionalGeneration",
        )
        for method in ("embed_input_ids", "forward")
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration."
        "_merge_image_patch_embeddings",
        "lvlm_prune.vllm_plugin.llava_next:anyres_layout",
        ("test_anyres_rows_are_laid_out_as_our_layout_says",),
        "per image: the base view's rows, then the crops' rows each closed by image_newline "
        "(OneVision: shrunk to anyres_max_9), from the image's size; embed_multimodal reads "
        "image_sizes [B, 2] (height, width)",
    ),
    TouchPoint(
        PRIVATE_READ,
        "vllm.model_executor.models.llava_next:LlavaNextProcessingInfo.get_num_image_tokens",
        "lvlm_prune.vllm_plugin.llava_next:AnyResPruneProcessorMixin._budget_tokens",
        ("test_anyres_rows_are_laid_out_as_our_layout_says",),
        "N = the layout's rows, for NeXT's and OneVision's counts; the prompt updates replace "
        "each <image> with N image tokens",
    ),
)


# ---- patches ----------------------------------------------------------------------------------


def add_model_config_hooks() -> None:
    """Let our model classes adjust vLLM's in-memory model config when it is built
    (``vllm_plugin.register()``, every process, before any engine config exists).

    NOTE(vLLM 0.32): ``ModelConfig.__post_init__`` calls ``verify_and_update_model_config`` of
    ``MODELS_CONFIG_MAP[architecture]`` (``model_executor/models/config.py``), vLLM's own
    per-architecture hook, once, after the checkpoint's config is read and before anything reads
    ``uses_mrope``. For each architecture in ``MODELS`` the entry becomes a subclass of vLLM's own
    (or of ``VerifyAndUpdateConfig``) that runs vLLM's hook, then our class's
    ``update_model_config(model_config)`` where it has one (``positions.py``: original positions
    for the 1-D RoPE families switch on vLLM's M-RoPE path). The checkpoint is not touched.
    """
    from vllm.model_executor.models import config as model_configs

    from . import MODELS

    for arch, target in MODELS.items():
        stock = model_configs.MODELS_CONFIG_MAP.get(arch)
        if getattr(stock, "_lvlm_prune", False):
            continue
        model_configs.MODELS_CONFIG_MAP[arch] = _model_config_hook(
            target, stock or model_configs.VerifyAndUpdateConfig
        )


def _model_config_hook(target: str, base: type) -> type:
    def verify_and_update_model_config(model_config) -> None:
        base.verify_and_update_model_config(model_config)
        module, _, name = target.partition(":")
        update = getattr(
            getattr(importlib.import_module(module), name), "update_model_config", None
        )
        if update is not None:
            update(model_config)

    return type(
        f"LvlmPrune{base.__name__}",
        (base,),
        {
            "_lvlm_prune": True,
            "verify_and_update_model_config": staticmethod(verify_and_update_model_config),
        },
    )


def add_engine_core_utilities() -> None:
    """Give ``EngineCore`` our utility methods (``vllm_plugin.register()``, every process).

    The engine core resolves a utility call's method by name on itself; ``lvlm_prune_trim_memory``
    lets the API process trim the engine core's memory once the server is idle
    (``server.plugin.IdleTrimmer``, through ``trim_engine_cores``).
    """
    from vllm.v1.engine.core import EngineCore

    EngineCore.lvlm_prune_trim_memory = _trim_memory


def _trim_memory(self) -> bool:
    from lvlm_prune import memory

    return memory.trim()


def refuse_pruning_kwargs_on_unpruned_models() -> None:
    """Make vLLM's call of a model's HF processor refuse our kwargs (``ValueError``) when the
    model is not one we prune (``support.unpruned_reason``), instead of the HF processor dropping
    them unseen (``vllm_plugin.register()``, every process).

    NOTE(vLLM 0.32): every multimodal processor reaches the HF processor through
    ``InputProcessingContext.call_hf_processor``, with the request's kwargs merged with the
    engine-wide ones: an engine-wide ``keep_ratio`` fails every request with an image (the
    engine's start-up warm-up logs the error and goes on, so it cannot stop the engine; the
    server refuses it before starting, ``server/cli.py``), a per-request one fails that request.
    Our own processors strip our kwargs inside the callable they pass, so for a pruned model this
    only reads its architecture.
    """
    from vllm.multimodal.processing.context import InputProcessingContext

    original = InputProcessingContext.call_hf_processor
    if getattr(original, "_lvlm_prune", False):
        return

    @functools.wraps(original)
    def call_hf_processor(self, hf_processor, data, kwargs={}):  # noqa: B006 - vLLM's signature
        from .support import pruning_asked, unpruned_reason

        config = self.model_config
        reason = unpruned_reason(config.architecture, config.hf_config)
        if reason and (asked := pruning_asked(self.get_merged_mm_kwargs(kwargs), prefix="")):
            names = ", ".join(a.lstrip(".") for a in asked)
            raise ValueError(f"{reason}; refusing {names}: serve it without them (unpruned)")
        return original(self, hf_processor, data, kwargs)

    call_hf_processor._lvlm_prune = True
    InputProcessingContext.call_hf_processor = call_hf_processor


# NOTE(vLLM 0.32): the modules that import vllm.entrypoints.generate.base.protocol's
# validate_request_mm_kwargs by name and call it on every request that can carry images.
GATED_MODULES = ("vllm.renderers.online_renderer", "vllm.entrypoints.pooling.base.serving")


def screen_per_request_mm_kwargs(screen: Callable[[dict, bool], dict | None]) -> None:
    """Put ``screen(mm_processor_kwargs, trusted)`` in front of vLLM's per-request
    ``mm_processor_kwargs`` gate: vLLM's own check then sees what it returns.

    vLLM refuses every per-request processor kwarg unless the server runs with
    ``--trust-request-mm-kwargs``; ``media_io_kwargs`` always meet vLLM's check unchanged.

    Raises:
        RuntimeError: a gated module has no gate to wrap (started anyway, every per-request
            pruning option would be refused with vLLM's 400).
    """
    missing = []
    for name in GATED_MODULES:
        module = importlib.import_module(name)
        original = getattr(module, "validate_request_mm_kwargs", None)
        if original is None:
            missing.append(name)
        elif not getattr(original, "_lvlm_prune", False):
            module.validate_request_mm_kwargs = _screened_gate(original, screen)
    if missing:
        import vllm

        raise RuntimeError(
            f"lvlm-prune cannot let its per-request options through vLLM {vllm.__version__}'s "
            f"gate: {', '.join(missing)} has no validate_request_mm_kwargs (this lvlm-prune "
            f"supports vLLM {VLLM_VERSION}.x)"
        )


def _screened_gate(original, screen):
    def validate_request_mm_kwargs(
        *, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs
    ):
        if mm_processor_kwargs:
            mm_processor_kwargs = screen(mm_processor_kwargs, trust_request_mm_kwargs)
        return original(
            mm_processor_kwargs=mm_processor_kwargs,
            media_io_kwargs=media_io_kwargs,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    validate_request_mm_kwargs._lvlm_prune = True
    return validate_request_mm_kwargs


def refuse_images_raising(*errors: type[Exception]) -> None:
    """Make vLLM's image loader raise ``errors`` as the ``ValueError`` it raises for every other
    undecodable image (HTTP 400).

    NOTE(vLLM 0.32): ``ImageMediaIO.load_bytes`` turns ``OSError`` and
    ``UnidentifiedImageError`` into ``ValueError``; anything else it lets out, a 500.
    """
    from vllm.multimodal.media.image import ImageMediaIO

    original = ImageMediaIO.load_bytes
    if getattr(original, "_lvlm_prune", False):
        return

    def load_bytes(self, data: bytes):
        try:
            return original(self, data)
        except errors as err:
            raise ValueError(f"Failed to load image: {err}") from err

    load_bytes._lvlm_prune = True
    ImageMediaIO.load_bytes = load_bytes


# ---- private reads ----------------------------------------------------------------------------


def rehash_image(ctx, item_hash: str, extra: Mapping[str, object]) -> str:
    """vLLM's multimodal hash of an image already hashed as ``item_hash``, with ``extra`` kwargs
    (``ctx``: the processor's ``InputProcessingContext``, for the configured algorithm)."""
    from vllm.multimodal.hasher import MultiModalHasher

    algorithm = ctx.get_mm_config().mm_hasher_algorithm
    return MultiModalHasher.hash_kwargs(algorithm, image=item_hash, **extra)


def engine_core_died(engine_client) -> bool:
    """Whether an engine core process behind ``engine_client`` died, as opposed to being shut
    down.

    NOTE(vLLM 0.32): ``BackgroundResources.engine_dead`` (v1/engine/core_client.py) is set by every
    shutdown, a requested one too, so it cannot tell the two apart alone; the process manager's
    ``failed_proc_name`` is set only for an engine that exited non-zero while nobody was stopping
    it (``CoreEngineProcManager.monitor_engine_liveness``, v1/engine/utils.py). An in-process
    engine client has neither.
    """
    resources = getattr(getattr(engine_client, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return bool(getattr(resources, "engine_dead", False)) and (
        getattr(manager, "failed_proc_name", None) is not None
    )


def _call_utility_all(engine_client):
    """The engine client's ``call_utility_all_async`` (an ``EngineCore`` method on every engine,
    one answer each), or None when the engine runs in this process."""
    return getattr(getattr(engine_client, "engine_core", None), "call_utility_all_async", None)


async def collective_rpc_every_engine(
    engine_client, method: str, *, args: tuple, timeout: float | None
) -> list[list]:
    """A worker RPC on every worker of every data-parallel engine; answers ``[engine][worker]``.

    NOTE(vLLM 0.32): ``AsyncLLM.collective_rpc`` goes through ``call_utility_async``, which under
    the data-parallel load balancer (``DPLBAsyncMPClient``) runs the call on every engine but
    returns engine 0's answers only (v1/engine/core_client.py): a pop there would delete the other
    engines' entries unseen. ``call_utility_all_async`` returns one answer per engine.
    """
    call_all = _call_utility_all(engine_client)
    if call_all is None:  # an in-process engine client: one engine
        return [await engine_client.collective_rpc(method, timeout=timeout, args=args)]
    # EngineCore.collective_rpc(method, timeout, args, kwargs)
    return await call_all("collective_rpc", method, timeout, tuple(args), None)


async def trim_engine_cores(engine_client) -> None:
    """``lvlm_prune.memory.trim`` in every engine core process (``add_engine_core_utilities``);
    nothing for an in-process engine, which the API process's own trim covers."""
    if call_all := _call_utility_all(engine_client):
        await call_all("lvlm_prune_trim_memory")


# ---- copied code --------------------------------------------------------------------------------


def serve_args(build_args: Callable[[], Namespace]) -> Namespace:
    """The first half of vLLM's serve entry point: its environment and logging set up around
    ``build_args()`` (vLLM's parser with our defaults folded in), and vLLM's checks of them."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    # NOTE(vLLM 0.32): the steps of vllm/entrypoints/launchers/api_server/entry.py:main.
    cli_env_setup()
    args = build_args()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    return args


def run_api_server(args: Namespace) -> None:
    """The second half: vLLM's OpenAI server, until it stops."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server

    uvloop.run(run_server(args))
