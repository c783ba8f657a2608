"""lvlm-prune: question-aware image-token pruning inside vLLM's prefill.

The map of the code (which file runs in which process, one request walked through) is
``docs/architecture.md``.
"""

__version__ = "0.1.0"
