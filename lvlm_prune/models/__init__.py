"""The models lvlm-prune ships or builds, by name: one resolver for the CLI, benchmarks and tests.

- ``shapes``: ``lvlm-prune-shapes``, a LLaVA-1.5-architecture model trained on ShapesVQA, shipped
  in the package; the default of ``lvlm-prune serve``.
- ``tiny``, ``bench``: LLaVA-1.5 shapes with random weights, built offline and cached (tests;
  ``bench`` keeps LLaVA-1.5-7B's LLM : vision prefill cost proportion, for speed).
- ``qwen-tiny``, ``qwen-bench``: the same for Qwen2.5-VL (``qwen-bench`` keeps Qwen2.5-VL-7B's
  proportion).
- ``qwen3-tiny``, ``qwen3-moe-tiny``, ``qwen3-bench``: the same for Qwen3-VL, dense and MoE
  (``qwen3-bench`` keeps Qwen3-VL-8B's proportion).
- ``next-tiny``, ``next-bench``, ``onevision-tiny``, ``onevision-bench``: the same for LLaVA-NeXT
  and LLaVA-OneVision (the bench ones keep the 7B models' token counts and proportion).
"""

from __future__ import annotations

DEFAULT = "shapes"


def names() -> list[str]:
    from lvlm_prune.models.tiny_llava import SPECS
    from lvlm_prune.models.tiny_llava_next import NEXT_SPECS
    from lvlm_prune.models.tiny_qwen import QWEN_SPECS
    from lvlm_prune.models.tiny_qwen3 import QWEN3_SPECS

    return [DEFAULT, *SPECS, *QWEN_SPECS, *QWEN3_SPECS, *NEXT_SPECS]


def resolve(name: str) -> tuple[str, str] | None:
    """(checkpoint folder, served model name) of a built-in model, or None for any other name."""
    if name == "shapes":
        from lvlm_prune.models.shapes import MODEL_NAME, released_model_dir

        return str(released_model_dir()), MODEL_NAME
    from lvlm_prune.models.tiny_llava import SPECS, build_tiny_llava
    from lvlm_prune.models.tiny_llava_next import NEXT_SPECS, build_tiny_llava_next
    from lvlm_prune.models.tiny_qwen import QWEN_SPECS, build_tiny_qwen
    from lvlm_prune.models.tiny_qwen3 import QWEN3_SPECS, build_tiny_qwen3

    if name in SPECS:
        return str(build_tiny_llava(SPECS[name])), f"lvlm-prune-{name}"
    if name in QWEN_SPECS:
        return str(build_tiny_qwen(QWEN_SPECS[name])), f"lvlm-prune-{name}"
    if name in QWEN3_SPECS:
        return str(build_tiny_qwen3(QWEN3_SPECS[name])), f"lvlm-prune-{name}"
    if name in NEXT_SPECS:
        return str(build_tiny_llava_next(NEXT_SPECS[name])), f"lvlm-prune-{name}"
    return None
