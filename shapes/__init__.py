"""ShapesVQA v2 and ``lvlm-prune-shapes``, the small LLaVA-1.5 trained on it here.

- :mod:`.scenes`: the task (SHAPES.md): seeded scenes, questions, answers, object patches,
  object hit rate, scoring of a reply.
- :mod:`.model`: the model's tokenizer, processor, config, saving and loading.
- :mod:`.train`: ``lvlm-prune train shapes --out DIR``.
- :func:`released_model_dir`: the trained checkpoint shipped inside the package.
"""

from .model import MODEL_NAME, is_shapes_model, released_model_dir

__all__ = ["MODEL_NAME", "is_shapes_model", "released_model_dir"]
