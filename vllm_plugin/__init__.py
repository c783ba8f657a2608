"""The joint with vLLM: a ``vllm.general_plugins`` entry point and per-family subclasses.

``register()`` runs in every vLLM process (API server, engine core, workers). It registers lazy
``"module:Class"`` strings and gives ``EngineCore`` one utility method (the memory trim), so it
imports no CUDA state, and it is idempotent.
"""

from __future__ import annotations

# Our subclasses are registered under the stock architecture names, so a stock checkpoint
# (e.g. llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct) uses them without flags.
MODELS = {
    "LlavaForConditionalGeneration": "lvlm_prune.vllm_plugin.llava:LlavaPruneForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": (
        "lvlm_prune.vllm_plugin.qwen2_5_vl:Qwen2_5_VLPruneForConditionalGeneration"
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
    from vllm.v1.engine.core import EngineCore

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    # The engine core resolves a utility call's method by name on itself; this one lets the API
    # process trim the engine core's memory once the server is idle (server.plugin.IdleTrimmer).
    EngineCore.lvlm_prune_trim_memory = _trim_memory
    _registered = True


def _trim_memory(self) -> bool:
    from lvlm_prune import memory

    return memory.trim()
