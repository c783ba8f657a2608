"""lvlm-prune: question-aware image-token pruning inside vLLM's prefill.

Subpackages: ``vllm_plugin`` (the joint with vLLM), ``kernels`` (the selection math),
``server`` (OpenAI-compatible API, diagnostics, metrics), ``benchmarks``.
"""

__version__ = "0.1.0"
