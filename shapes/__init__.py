"""ShapesVQA and the training of ``lvlm-prune-shapes``, the small LLaVA-1.5 trained on it here.

- :mod:`.scenes`: the task (``docs/shapesvqa.md``): seeded scenes, questions, answers, object
  patches, object hit rate, scoring of a reply.
- :mod:`.train`: ``lvlm-prune train shapes --out DIR``.
- :mod:`.evaluate`: accuracy of a checkpoint on fresh questions.
- ``model/``: the released checkpoint. Its builder (tokenizer, processor, config, saving and
  loading) is ``lvlm_prune.models.shapes``, with the other built-in models.
"""
