"""vLLM endpoint plugin (``vllm.endpoint_plugins``): the HTTP half of lvlm-prune.

vLLM 0.32 pairs a general plugin (engine side: our model, processor, worker RPCs) with an endpoint
plugin (HTTP side). This one adds ``PruningMiddleware`` to vLLM's own app, so chat requests gain
``pruning`` without a second chat-completions implementation, lets the pruning options through
vLLM's per-request ``mm_processor_kwargs`` gate, and drains the workers' selection timings into
Prometheus. Loaded when ``VLLM_PLUGINS`` names ``lvlm_prune_api`` (``lvlm-prune serve`` does; with
``vllm serve`` set it yourself).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from argparse import Namespace

from fastapi import FastAPI

from lvlm_prune import memory
from lvlm_prune.vllm_plugin import MODELS, WORKER_EXTENSION, options
from lvlm_prune.vllm_plugin.processing.accounting import LEDGER
from lvlm_prune.vllm_plugin.worker import flow

from . import metrics, supervision
from .inspector import router as inspect_router
from .media_limits import answer_oversized_images_with_400
from .middleware import PruningMiddleware

logger = logging.getLogger(__name__)

POLL_SECONDS = 5.0
RPC_TIMEOUT_SECONDS = 10.0
MAX_FLOW_PASSES = 2
"""Requests with flow diagnostics in flight at once; one more is answered 429 at once. Each costs
one extra forward of its prompt, during which its engine runs nothing else."""
FLOW_WAIT_SECONDS = 300.0
"""How long a response waits for its flow pass before it goes out without ``flow``. The engine
side has no timeout: a worker RPC abandoned half-way would leave its reply in the queue for the
next call to read."""
TRIM_IDLE_SECONDS = 1.0
"""How long the server must have nothing in flight before it trims (``IdleTrimmer``)."""
TRIM_MIN_INTERVAL_SECONDS = 10.0
"""At most one trim per this many seconds, however often traffic stops and starts."""

# NOTE(vLLM 0.32): the modules that import vllm.entrypoints.generate.base.protocol's
# validate_request_mm_kwargs by name and call it on every request that can carry images
# (tests/test_vllm_internals.py checks this list against vLLM's source).
GATED_MODULES = ("vllm.renderers.online_renderer", "vllm.entrypoints.pooling.base.serving")


def allow_pruning_kwargs_per_request() -> None:
    """Let the pruning options through vLLM's per-request ``mm_processor_kwargs`` gate.

    vLLM refuses every per-request processor kwarg unless the server runs with
    ``--trust-request-mm-kwargs``. Ours are validated and only ever shrink the work, so they pass
    on every route; any other key still meets vLLM's own check, untouched, and so does
    ``media_io_kwargs``. The server-set keys (request tag, diagnostics id, query ids) pass only
    as our middleware issued them, trusted server or not, so a client cannot forge them.
    """
    missing = []
    for name in GATED_MODULES:
        module = importlib.import_module(name)
        original = getattr(module, "validate_request_mm_kwargs", None)
        if original is None:
            missing.append(name)
        elif not getattr(original, "_lvlm_prune", False):
            module.validate_request_mm_kwargs = _gate_allowing_pruning(original)
    if missing:
        # Started anyway, every per-request pruning option would be refused with vLLM's 400.
        import vllm

        raise RuntimeError(
            f"lvlm-prune cannot let its per-request options through vLLM {vllm.__version__}'s "
            f"gate: {', '.join(missing)} has no validate_request_mm_kwargs (this lvlm-prune "
            "supports vLLM 0.32.x)"
        )


def _gate_allowing_pruning(original):
    def validate_request_mm_kwargs(
        *, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs
    ):
        if mm_processor_kwargs:
            _check_server_set_kwargs(mm_processor_kwargs)
            if not trust_request_mm_kwargs:
                mm_processor_kwargs = options.without_own_kwargs(mm_processor_kwargs) or None
        return original(
            mm_processor_kwargs=mm_processor_kwargs,
            media_io_kwargs=media_io_kwargs,
            trust_request_mm_kwargs=trust_request_mm_kwargs,
        )

    validate_request_mm_kwargs._lvlm_prune = True
    return validate_request_mm_kwargs


def _check_server_set_kwargs(kwargs: dict) -> None:
    from vllm.exceptions import VLLMValidationError

    tag, diag = kwargs.get(options.TAG), kwargs.get(options.DIAGNOSTICS)
    if options.QUERY_IDS in kwargs or (
        (tag is not None or diag is not None) and not LEDGER.is_expected(tag, diag)
    ):
        key = next(k for k in (options.QUERY_IDS, options.DIAGNOSTICS, options.TAG) if k in kwargs)
        raise VLLMValidationError(
            f"mm_processor_kwargs.{key} is set by the server, not by clients",
            parameter=f"mm_processor_kwargs.{key}",
        )


def serves_pruned_model(model_config) -> bool:
    """Whether the engine serves one of our pruned model classes (``vllm_plugin.MODELS``: LLaVA,
    Qwen2.5-VL); Pixtral-HF checkpoints share LLaVA's architecture name and are served unpruned."""
    hf_config = model_config.hf_config
    vision = getattr(hf_config, "vision_config", None)
    return bool(set(model_config.architectures or ()) & set(MODELS)) and (
        getattr(vision, "model_type", None) != "pixtral"
    )


class IdleTrimmer:
    """Trims the API process and the engines (``lvlm_prune.memory``) once the server has had
    nothing in flight for ``TRIM_IDLE_SECONDS`` after serving requests; never under load, at most
    once per ``TRIM_MIN_INTERVAL_SECONDS``. The middleware reports each request's start and end."""

    def __init__(self, trim_engines) -> None:
        self.trim_engines = trim_engines
        self.in_flight = 0
        self.served_since_trim = False
        self.last_trim = -TRIM_MIN_INTERVAL_SECONDS
        self._task: asyncio.Task | None = None

    def started(self) -> None:
        self.in_flight += 1
        self.served_since_trim = True

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._trim_when_idle())

    async def _trim_when_idle(self) -> None:
        try:
            while self.served_since_trim:
                wait = self.last_trim + TRIM_MIN_INTERVAL_SECONDS - time.monotonic()
                await asyncio.sleep(max(TRIM_IDLE_SECONDS, wait))
                if self.in_flight:  # busy again: the last of those requests calls finished()
                    return
                self.served_since_trim = False
                self.last_trim = time.monotonic()
                await asyncio.to_thread(memory.trim)  # ctypes lets go of the GIL meanwhile
                await self.trim_engines()
                metrics.MEMORY_TRIMS.inc()
        except Exception:
            logger.exception("lvlm-prune: trimming memory failed")
        finally:
            self._task = None


class ServerState:
    """What the middleware needs from the engine, on ``app.state.lvlm_prune``."""

    def __init__(self, engine_client, args: Namespace) -> None:
        self.engine_client = engine_client
        names = getattr(args, "served_model_name", None)
        self.model_name = names[0] if names else args.model
        self.diagnostics_unavailable = None
        if WORKER_EXTENSION not in (getattr(args, "worker_extension_cls", "") or ""):
            self.diagnostics_unavailable = (
                f"pruning.diagnostics needs the server started with --worker-extension-cls "
                f"{WORKER_EXTENSION} (lvlm-prune serve sets it)"
            )
        self.flow_unavailable = self.diagnostics_unavailable
        if (getattr(args, "pipeline_parallel_size", 1) or 1) > 1:
            self.flow_unavailable = (
                'pruning.diagnostics "flow" needs every decoder layer on each worker: it is not '
                "available with pipeline parallelism"
            )
        text_config = engine_client.model_config.hf_text_config
        # The processor refuses flow for such a model too (flow.check_supported), but without
        # the request's field; the middleware names it.
        self.flow_method_unavailable = flow.unsupported_model(text_config)
        if self.flow_method_unavailable:
            self.flow_unavailable = f'pruning.diagnostics "flow": {self.flow_method_unavailable}'
        self.num_layers = text_config.num_hidden_layers
        self.max_flow_passes = MAX_FLOW_PASSES
        self.flow_passes = 0
        self.tokenizer = engine_client.get_tokenizer()
        self.poller: asyncio.Task | None = None
        self.idle_trimmer = IdleTrimmer(self.trim_engines)

    def try_start_flow(self) -> bool:
        """Take one of the flow slots, if one is free (the event loop is the only caller)."""
        if self.flow_passes >= self.max_flow_passes:
            return False
        self.flow_passes += 1
        return True

    def end_flow(self) -> None:
        self.flow_passes = max(0, self.flow_passes - 1)

    async def run_flow(self, diag_id: int, prompt_ids: list[int]) -> dict:
        """The ``flow`` object of a finished request: its engine's workers rerun its prompt with
        the kept rows in place (``PruneWorkerExtension.lvlm_prune_flow``).

        Raises:
            FlowUnavailable: no engine held the request's rows, or the pass could not run.
        """
        per_engine = await asyncio.wait_for(
            self.rpc_every_engine("lvlm_prune_flow", args=(diag_id, prompt_ids), timeout=None),
            FLOW_WAIT_SECONDS,
        )
        for per_worker in per_engine:
            answers = [a for a in per_worker if a is not None]
            if answers:
                result = flow.combine_flow(answers)
                seconds = max(a["seconds"] for a in answers)
                metrics.FLOW_SECONDS.labels(self.model_name).observe(seconds)
                return result
        raise flow.FlowUnavailable("no worker held this request's kept rows")

    async def rpc_every_engine(
        self, method: str, *, args: tuple = (), timeout: float | None = RPC_TIMEOUT_SECONDS
    ) -> list[list]:
        """A worker-extension RPC on every worker of every data-parallel engine behind this API
        process; answers as ``[engine][worker]``.

        NOTE(vLLM 0.32): ``AsyncLLM.collective_rpc`` goes through ``call_utility_async``, which
        under the data-parallel load balancer (``DPLBAsyncMPClient``) runs the call on every
        engine but returns engine 0's answers only (v1/engine/core_client.py): a pop there would
        delete the other engines' entries unseen. ``call_utility_all_async`` returns one answer
        per engine (one engine without data parallelism).
        """
        call_all = self._call_every_engine_core()
        if call_all is None:  # an in-process engine client: one engine
            return [await self.engine_client.collective_rpc(method, timeout=timeout, args=args)]
        # EngineCore.collective_rpc(method, timeout, args, kwargs)
        return await call_all("collective_rpc", method, timeout, tuple(args), None)

    async def pop_diagnostics(self, diag_id: int | None) -> list[dict]:
        if diag_id is None:
            return []
        try:
            per_engine = await self.rpc_every_engine(
                "lvlm_prune_pop_diagnostics", args=([diag_id],)
            )
        except Exception:
            logger.exception("lvlm-prune: fetching diagnostics from the workers failed")
            return []
        # One engine ran the request; each of its tensor-parallel ranks ran the same selection
        # and all were popped: use the first.
        for per_worker in per_engine:
            for result in per_worker:
                if diag_id in result:
                    return result[diag_id]
        return []

    def _call_every_engine_core(self):
        """The engine client's ``call_utility_all_async`` (an ``EngineCore`` method on every
        engine, one answer each), or None when the engine runs in this process."""
        core = getattr(self.engine_client, "engine_core", None)
        return getattr(core, "call_utility_all_async", None)

    async def trim_engines(self) -> None:
        """``lvlm_prune.memory.trim`` in every engine core process and every worker."""
        if call_all := self._call_every_engine_core():  # register() added the method
            await call_all("lvlm_prune_trim_memory")
        if self.diagnostics_unavailable is None:  # the workers carry our extension
            await self.rpc_every_engine("lvlm_prune_trim_memory")

    async def poll_workers(self) -> None:
        """Move the workers' selection timings into the histogram; report store sizes."""
        while True:
            try:
                await self.drain_once()
            except Exception:
                logger.exception("lvlm-prune: draining worker metrics failed")
            await asyncio.sleep(POLL_SECONDS)

    async def drain_once(self) -> None:
        for per_worker in await self.rpc_every_engine("lvlm_prune_drain_timings"):
            # Tensor-parallel rank 0 of each engine: one entry per selection.
            for seconds, _num_images in per_worker[0] if per_worker else []:
                metrics.SELECTION_SECONDS.labels(self.model_name).observe(seconds)
        sizes = await self.rpc_every_engine("lvlm_prune_store_size")
        pending = sum(max(per_worker, default=0) for per_worker in sizes)
        metrics.DIAGNOSTICS_PENDING.labels(self.model_name).set(pending)


class PruningEndpointPlugin:
    name = "lvlm_prune_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        allow_pruning_kwargs_per_request()
        answer_oversized_images_with_400()
        # Added before vLLM adds its authentication middleware, so ours runs inside it.
        app.add_middleware(PruningMiddleware)
        app.include_router(inspect_router)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None:  # the CPU-only render server has no engine
            return
        supervision.watch(engine_client)
        if not serves_pruned_model(engine_client.model_config):
            logger.warning(
                "lvlm-prune: %s is not a model lvlm-prune prunes; API layer off", args.model
            )
            return
        server = ServerState(engine_client, args)
        state.lvlm_prune = server
        if server.diagnostics_unavailable is None:
            server.poller = asyncio.get_running_loop().create_task(server.poll_workers())
