"""What runs in the GPU worker: the model mixin (selection of the kept rows inside
``embed_multimodal``), the diagnostics store the API process reads over ``collective_rpc``, and the
flow pass. ``PruneWorkerExtension`` is vLLM's ``--worker-extension-cls``."""

from .diagnostics import PruneWorkerExtension

__all__ = ["PruneWorkerExtension"]
