"""The joint with vLLM: a ``vllm.general_plugins`` entry point and per-family subclasses.

``register()`` runs in every vLLM process (API server, engine core, workers). It registers lazy
``"module:Class"`` strings, gives ``EngineCore`` one utility method (the memory trim) and our
classes vLLM's per-architecture config hook (``update_model_config``: original positions for
the 1-D RoPE families; every patch of vLLM is in ``vllm_internals``), so it imports no CUDA
state, and it is idempotent.
"""

from __future__ import annotations

# Our subclasses are registered under the stock architecture names, so a stock checkpoint
# (e.g. llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct) uses them without flags.
# The one list of what lvlm-prune prunes: ``support.unpruned_reason`` reads it to refuse pruning on
# any other architecture (at the server's start-up, per request, and in the offline engine).
MODELS = {
    "LlavaForConditionalGeneration": "lvlm_prune.vllm_plugin.llava:LlavaPruneForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": (
        "lvlm_prune.vllm_plugin.qwen2_5_vl:Qwen2_5_VLPruneForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "lvlm_prune.vllm_plugin.qwen3_vl:Qwen3VLPruneForConditionalGeneration"
    ),
    "Qwen3VLMoeForConditionalGeneration": (
        "lvlm_prune.vllm_plugin.qwen3_vl:Qwen3VLMoePruneForConditionalGeneration"
    ),
    "LlavaNextForConditionalGeneration": (
        "lvlm_prune.vllm_plugin.llava_next:LlavaNextPruneForConditionalGeneration"
    ),
    "LlavaOnevisionForConditionalGeneration": (
        "lvlm_prune.vllm_plugin.llava_next:LlavaOnevisionPruneForConditionalGeneration"
    ),
}

WORKER_EXTENSION = "lvlm_prune.vllm_plugin.worker.PruneWorkerExtension"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    # NOTE: `if arch not in ModelRegistry.get_supported_archs()` cannot guard an override of a
    # built-in architecture (the name is always there); a module flag does.
    from vllm import ModelRegistry

    from . import vllm_internals

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    vllm_internals.add_engine_core_utilities()
    vllm_internals.add_model_config_hooks()
    vllm_internals.refuse_pruning_kwargs_on_unpruned_models()
    _registered = True
