"""Which models lvlm-prune prunes, and whether options ask for pruning: one rule for every door.

The server refuses server-wide pruning at start-up and a pruning request with a 400 on any other
model (``server/cli.py``, ``server/plugin.py``); the offline engine refuses the same kwargs with a
``ValueError`` (``vllm_internals.refuse_pruning_kwargs_on_unpruned_models``). Without these, vLLM's
processor of an unpruned model drops our kwargs unseen and the caller believes it is pruning.
"""

from __future__ import annotations

from . import MODELS


def unpruned_reason(architecture: str, hf_config) -> str | None:
    """Why lvlm-prune does not prune a model vLLM serves as ``architecture``; None when it does.

    Our classes are registered under the architecture names in ``MODELS``, except that Pixtral-HF
    checkpoints share LLaVA's name and vLLM serves them with its own Pixtral vision tower,
    unpruned.
    """
    vision = getattr(hf_config, "vision_config", None)
    if architecture not in MODELS:
        what = architecture
    elif getattr(vision, "model_type", None) == "pixtral":
        what = f"{architecture} with a Pixtral vision tower (Pixtral-HF)"
    else:
        return None
    return f"lvlm-prune does not prune {what} models (it prunes {', '.join(MODELS)})"


def pruning_asked(kwargs, *, prefix: str, ours_only: bool = True) -> list[str]:
    """The options in ``kwargs`` that need a pruned model, as ``prefix.name``.

    Every option counts (a method, a query, diagnostics: the caller believes it is pruning),
    except a no-op: None, false, or keep_ratio 1.0, which is exactly what a model served unpruned
    does. ``ours_only``: ``mm_processor_kwargs``, where only our names are ours; else a
    ``pruning`` object, all of whose fields are. Anything but an object asks, unless empty.
    """
    from .options import KEEP_RATIO, OWN_KWARGS

    if not isinstance(kwargs, dict):
        return [prefix] if kwargs else []
    return [
        f"{prefix}.{name}"
        for name, value in kwargs.items()
        if (name in OWN_KWARGS or not ours_only)
        and value is not None
        and value is not False
        and not (name == KEEP_RATIO and type(value) in (int, float) and value == 1)
    ]
