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
import json
import logging
import time
from argparse import Namespace

from fastapi import FastAPI

from lvlm_prune import memory
from lvlm_prune.vllm_plugin import WORKER_EXTENSION, options, vllm_internals
from lvlm_prune.vllm_plugin.processing.accounting import LEDGER
from lvlm_prune.vllm_plugin.support import pruning_asked, unpruned_reason
from lvlm_prune.vllm_plugin.worker import flow

from . import metrics, supervision
from .inspector import router as inspect_router
from .media_limits import answer_oversized_images_with_400
from .middleware import PruningMiddleware

# NOTE(vLLM 0.32): under vLLM's own logger, so its handler, level and --logging-config apply. The
# root logger's level does not reach WARNING in the API server: importing vLLM's SageMaker routes
# imports model_hosting_container_standards, which sets it to ERROR.
logger = logging.getLogger(f"vllm.{__name__}")

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


def allow_pruning_kwargs_per_request() -> None:
    """Let the pruning options through vLLM's per-request ``mm_processor_kwargs`` gate
    (``vllm_internals.screen_per_request_mm_kwargs``).

    Ours are validated and only ever shrink the work, so they pass on every route; any other key
    still meets vLLM's own check, untouched. The server-set keys (request tag, diagnostics id,
    query ids) pass only as our middleware issued them, trusted server or not, so a client
    cannot forge them.
    """
    vllm_internals.screen_per_request_mm_kwargs(_screen_pruning_kwargs)


def _screen_pruning_kwargs(mm_processor_kwargs: dict, trusted: bool) -> dict | None:
    _refuse_on_unpruned_model(mm_processor_kwargs)
    _check_server_set_kwargs(mm_processor_kwargs)
    if trusted:
        return mm_processor_kwargs
    return options.without_own_kwargs(mm_processor_kwargs) or None


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


class UnprunedModelError(RuntimeError):
    """The server-wide options ask for pruning a model lvlm-prune does not prune."""


def check_server_wide_options(reason: str, mm_processor_kwargs, presets=None) -> None:
    """Refuse server-wide ``mm_processor_kwargs`` or pruning presets that ask for pruning a
    model ``reason`` (``unpruned_reason``) says is not pruned: their requests would be answered
    unpruned.

    Raises:
        UnprunedModelError: naming the model's architecture, the supported ones and the options.
    """
    kwargs = mm_processor_kwargs or {}
    asked = [a.split(".", 1)[1] for a in pruning_asked(kwargs, prefix="mm_processor_kwargs")]
    settings = [f"{name}={kwargs[name]!r}" for name in asked]
    for served, pruning in (presets or {}).items():
        if pruning_asked(pruning, prefix="pruning", ours_only=False):
            settings.append(f"the preset {served} ({json.dumps(pruning)})")
    if settings:
        raise UnprunedModelError(
            f"{reason}, but the server-wide options ask for pruning: {', '.join(settings)}. "
            "Serve this model without them (unpruned, as plain vLLM serves it) or serve a model "
            "lvlm-prune prunes."
        )


class UnprunedModel:
    """``app.state.lvlm_prune`` when the served model is not one lvlm-prune prunes: the
    middleware refuses a request that asks for pruning (HTTP 400, ``refusal``) rather than answer
    it unpruned, and passes every other request to vLLM untouched."""

    prunes = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def pruning_asked(self, payload: dict) -> list[str]:
        """The fields of a chat or completion request body that ask for pruning."""
        return pruning_asked(
            payload.get("pruning"), prefix="pruning", ours_only=False
        ) + pruning_asked(payload.get("mm_processor_kwargs"), prefix="mm_processor_kwargs")

    def refusal(self, asked: list[str]) -> str:
        return (
            f"{self.reason}: this server serves its model unpruned, so it refuses "
            f"{', '.join(asked)}; send the request without pruning"
        )


_unpruned_model: UnprunedModel | None = None
"""Set by ``init_state`` when the served model is not one lvlm-prune prunes."""


def _refuse_on_unpruned_model(kwargs: dict) -> None:
    """Our options on a route the middleware does not see (``/v1/responses``, ``/tokenize``)
    meet the middleware's refusal here rather than being dropped unseen."""
    from vllm.exceptions import VLLMValidationError

    if _unpruned_model is not None and (
        asked := pruning_asked(kwargs, prefix="mm_processor_kwargs")
    ):
        raise VLLMValidationError(_unpruned_model.refusal(asked), parameter=asked[0])


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


def presets_of(args: Namespace) -> dict[str, dict]:
    """``{"MODEL:NAME": pruning}`` as ``lvlm-prune serve --preset`` parsed them (none under
    plain ``vllm serve``)."""
    return getattr(args, "lvlm_prune_presets", None) or {}


def served_model_name(args: Namespace) -> str:
    """The ``model_name`` label of our metrics: vLLM's own (the first served name)."""
    names = getattr(args, "served_model_name", None)
    return names[0] if names else args.model


class ServerState:
    """What the middleware needs from the engine, on ``app.state.lvlm_prune``."""

    prunes = True

    def __init__(self, engine_client, args: Namespace) -> None:
        self.engine_client = engine_client
        self.model_name = served_model_name(args)
        self.presets = presets_of(args)
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
        process; answers as ``[engine][worker]``."""
        return await vllm_internals.collective_rpc_every_engine(
            self.engine_client, method, args=args, timeout=timeout
        )

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

    async def trim_engines(self) -> None:
        """``lvlm_prune.memory.trim`` in every engine core process and every worker."""
        await vllm_internals.trim_engine_cores(self.engine_client)
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
        model_config = engine_client.model_config
        model_name = served_model_name(args)
        reason = unpruned_reason(model_config.architecture, model_config.hf_config)
        metrics.MODEL_PRUNED.labels(model_name).set(reason is None)
        if reason is not None:
            # `lvlm-prune serve` refused this before the engine loaded (cli.py); `vllm serve`
            # with our plugins, and what a checkpoint's config alone cannot tell (e.g.
            # --model-impl transformers), end here.
            multimodal = model_config.multimodal_config
            check_server_wide_options(
                reason, getattr(multimodal, "mm_processor_kwargs", None), presets_of(args)
            )
            logger.warning(
                "lvlm-prune: %s is served unpruned: %s. Requests that ask for pruning are "
                "refused with HTTP 400.",
                model_name,
                reason,
            )
            global _unpruned_model
            state.lvlm_prune = _unpruned_model = UnprunedModel(reason)
            return
        logger.info("lvlm-prune: pruning %s (%s)", model_name, model_config.architecture)
        server = ServerState(engine_client, args)
        state.lvlm_prune = server
        if server.diagnostics_unavailable is None:
            server.poller = asyncio.get_running_loop().create_task(server.poll_workers())
