"""vLLM endpoint plugin (``vllm.endpoint_plugins``): the HTTP half of lvlm-prune.

vLLM 0.32 pairs a general plugin (engine side: our model, processor, worker RPCs) with an endpoint
plugin (HTTP side). This one adds ``PruningMiddleware`` to vLLM's own app, so chat and completion
requests gain ``pruning`` without a second chat-completions implementation, and it drains the
workers' selection timings into Prometheus. Loaded when ``VLLM_PLUGINS`` names ``lvlm_prune_api``
(``lvlm-prune serve`` does; with ``vllm serve`` set it yourself).
"""

from __future__ import annotations

import asyncio
import logging
from argparse import Namespace

from fastapi import FastAPI

from lvlm_prune.vllm_plugin import WORKER_EXTENSION

from . import metrics
from .middleware import PruningMiddleware

logger = logging.getLogger(__name__)

POLL_SECONDS = 5.0


class ServerState:
    """What the middleware needs from the engine, on ``app.state.lvlm_prune``."""

    def __init__(self, engine_client, args: Namespace, *, trust_request_mm_kwargs: bool) -> None:
        self.engine_client = engine_client
        self.trust_request_mm_kwargs = trust_request_mm_kwargs
        names = getattr(args, "served_model_name", None)
        self.model_name = names[0] if names else args.model
        self.diagnostics_available = WORKER_EXTENSION in (getattr(args, "worker_extension_cls", "") or "")
        self.tokenizer = engine_client.get_tokenizer()
        self.poller: asyncio.Task | None = None

    async def pop_diagnostics(self, diag_id: int | None) -> list[dict]:
        if diag_id is None:
            return []
        # Every tensor-parallel rank ran the same selection; pop all, use the first.
        per_worker = await self.engine_client.collective_rpc(
            "lvlm_prune_pop_diagnostics", args=([diag_id],)
        )
        for result in per_worker:
            if diag_id in result:
                return result[diag_id]
        return []

    async def poll_workers(self) -> None:
        """Move the workers' selection timings into the histogram; report store sizes."""
        while True:
            try:
                await self.drain_once()
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                logger.exception("lvlm-prune: draining worker metrics failed")
            await asyncio.sleep(POLL_SECONDS)

    async def drain_once(self) -> None:
        timings = await self.engine_client.collective_rpc("lvlm_prune_drain_timings")
        for seconds, _num_images in timings[0] if timings else []:
            metrics.SELECTION_SECONDS.labels(self.model_name).observe(seconds)
        sizes = await self.engine_client.collective_rpc("lvlm_prune_store_size")
        metrics.DIAGNOSTICS_PENDING.labels(self.model_name).set(max(sizes, default=0))


class PruningEndpointPlugin:
    name = "lvlm_prune_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        args = app.state.args
        # Pruning options only ever shrink the work and are validated, so they are accepted per
        # request; every other per-request mm_processor_kwarg still needs the user's own
        # --trust-request-mm-kwargs, enforced in the middleware. vLLM reads this flag after
        # build_app, when it builds its serving objects.
        self.trust_request_mm_kwargs = bool(args.trust_request_mm_kwargs)
        args.trust_request_mm_kwargs = True
        # Added before vLLM adds its authentication middleware, so ours runs inside it.
        app.add_middleware(PruningMiddleware)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:  # the CPU-only render server has no engine
            return
        server = ServerState(
            engine_client, args, trust_request_mm_kwargs=self.trust_request_mm_kwargs
        )
        state.lvlm_prune = server
        if server.diagnostics_available:
            server.poller = asyncio.get_running_loop().create_task(server.poll_workers())
