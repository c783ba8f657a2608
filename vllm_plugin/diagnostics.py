"""The worker extension's first path, kept so that command lines written for lvlm-prune 0.1
(``--worker-extension-cls lvlm_prune.vllm_plugin.diagnostics.PruneWorkerExtension``) keep working;
the code is in ``vllm_plugin/worker/``."""

from .worker.diagnostics import PruneWorkerExtension

__all__ = ["PruneWorkerExtension"]
