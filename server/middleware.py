"""ASGI middleware that adds pruning to vLLM's own chat and completion routes.

Request: validates ``pruning`` (pydantic), maps it onto vLLM's ``mm_processor_kwargs``, gives each
image its own relevance query (the text of the user message that carries it, not the chat template;
``image_queries``), and tags the request so the processor's token counts can be read back. vLLM's OpenAI serving does everything
else. Response: adds a ``pruning`` object (counts always; scores, kept indices, top query tokens, a
heatmap and the information flow when asked) to the JSON body, or as one more chunk before
``data: [DONE]`` when streaming. Flow diagnostics hold one of the server's few flow slots from the
moment the request is accepted to the end of its flow pass; without a free slot the answer is an
immediate 429.

It sits inside vLLM's authentication middleware (it is added before it), so a request without the
API key is refused before anything here runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field

import pydantic
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lvlm_prune.vllm_plugin import options
from lvlm_prune.vllm_plugin.processing.accounting import LEDGER
from lvlm_prune.vllm_plugin.worker.flow import FlowUnavailable

from . import metrics, presets
from .heatmap import render_heatmap
from .schemas import ImagePruning, ImageView, PruningInfo, PruningRequest, QueryToken

logger = logging.getLogger(__name__)

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
IMAGE_PART_TYPES = {"image_url", "image", "image_pil", "image_embeds", "input_image"}
TOP_QUERY_TOKENS = 5


class BadRequest(Exception):
    status = 400
    kind = "BadRequestError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class TooManyFlowPasses(BadRequest):
    """Every flow slot is taken: refused at once (429) rather than queued."""

    status = 429
    kind = "RateLimitError"


class PruningMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        state = getattr(scope.get("app") and scope["app"].state, "lvlm_prune", None)
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or path not in ROUTES
            or state is None
        ):
            return await self.app(scope, receive, send)
        if not state.prunes:
            return await answer_on_unpruned_model(self.app, scope, receive, send, state)
        state.idle_trimmer.started()
        try:
            await self._handle(scope, receive, send, path, state)
        finally:
            state.idle_trimmer.finished()

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str, state) -> None:
        body = await _read_body(receive)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # vLLM answers malformed bodies itself
            return await self.app(scope, _replay(body, receive), send)
        had_pruning = "pruning" in payload
        try:
            request = prepare_request(payload, ROUTES[path], state)
        except BadRequest as err:
            if isinstance(err, TooManyFlowPasses):
                metrics.FLOW_REJECTED.labels(state.model_name).inc()
            return await _send_error(send, err.message, err.param, status=err.status, kind=err.kind)
        if request is None and not had_pruning:
            return await self.app(scope, _replay(body, receive), send)

        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        if request is None:
            return await self.app(scope, _replay(body, receive), send)
        rewriter = ResponseRewriter(request, state, send)
        try:
            await self.app(scope, _replay(body, receive), rewriter)
        finally:
            await rewriter.release()  # a disconnect or an error must not leave entries behind


async def answer_on_unpruned_model(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, state
) -> None:
    """A model lvlm-prune does not prune (``plugin.UnprunedModel``): a request that asks for
    pruning is refused with a 400 naming why, rather than answered unpruned as if it had been;
    any other goes to vLLM as it came, less a no-op ``pruning`` object (keep_ratio 1.0)."""
    body = await _read_body(receive)
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        if asked := state.pruning_asked(payload):
            return await _send_error(send, state.refusal(asked), asked[0])
        if "pruning" in payload:
            del payload["pruning"]
            body = json.dumps(payload).encode()
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    await app(scope, _replay(body, receive), send)


@dataclass
class PreparedRequest:
    tag: str
    diagnostics_id: int | None
    heatmap: bool
    preset: str | None = None  # the preset model name the request asked for (presets.py)
    images: list[str | None] = field(default_factory=list)  # inline data URLs, for heatmaps
    flow: bool = False  # holds one of the server's flow slots until released


def prepare_request(payload: dict, kind: str, state) -> PreparedRequest | None:
    """Validate and rewrite ``payload`` in place; None when there is nothing for us to do."""
    preset = presets.apply(state.presets, payload)
    raw_pruning = payload.pop("pruning", None)
    raw_kwargs = payload.get("mm_processor_kwargs")
    raw_flow = None
    if raw_kwargs is not None:
        if not isinstance(raw_kwargs, dict):
            raise BadRequest("mm_processor_kwargs must be an object", "mm_processor_kwargs")
        # Raw prune_flow asks what pruning.diagnostics "flow" asks: the server supplies the id.
        raw_flow = raw_kwargs.pop(options.FLOW, None)
        with _at_door(None):
            if raw_flow is not None:
                options.BY_KWARG[options.FLOW].parse(raw_flow)
            check_raw_kwargs(raw_kwargs)

    pruning = PruningRequest()
    if raw_pruning is not None:
        if not isinstance(raw_pruning, dict):
            raise BadRequest("pruning must be an object", "pruning")
        try:  # the same Option.parse as the raw kwargs, field by field (schemas.py)
            pruning = PruningRequest.model_validate(raw_pruning)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            param = f"pruning.{first['loc'][0]}" if first["loc"] else "pruning"
            raise BadRequest(f"{param}: {first['msg']}", param) from None
    flow = pruning.diagnostics == "flow" or bool(raw_flow)
    if (pruning.diagnostics or flow) and state.diagnostics_unavailable:
        raise BadRequest(state.diagnostics_unavailable, "pruning.diagnostics")
    if flow and state.flow_unavailable:
        raise BadRequest(state.flow_unavailable, "pruning.diagnostics")

    # vLLM's /v1/completions takes text and token prompts only: pruning is validated there, but
    # there is no image to prune, as in a chat request without one.
    images = image_urls(payload) if kind == "chat" else []
    if not images:
        return None
    mm_kwargs = dict(raw_kwargs or {})
    mm_kwargs.update(pruning.mm_processor_kwargs())
    if mm_kwargs.get(options.METHOD) == "flow" and state.flow_method_unavailable:
        param = (
            "pruning.method"
            if pruning.method == "flow"
            else f"mm_processor_kwargs.{options.METHOD}"
        )
        raise BadRequest(f'{param} "flow": {state.flow_method_unavailable}', param)
    check_query_count(mm_kwargs, len(images), "pruning" if pruning.query is not None else None)
    check_prune_layer(mm_kwargs, state.num_layers, "pruning" if pruning.prune_layer else None)
    if pruning.requery and options.QUERY in mm_kwargs:
        raise BadRequest(
            "pruning.requery re-selects every image for the latest question; it cannot be "
            "combined with an explicit query (pruning.query or mm_processor_kwargs.prune_query)",
            "pruning.requery",
        )
    # Even when empty: then simignore falls back to uniform instead of ranking template words.
    mm_kwargs.setdefault(
        options.QUERY, image_queries(payload.get("messages"), requery=pruning.requery)
    )
    request = PreparedRequest(
        tag=uuid.uuid4().hex,
        diagnostics_id=None,
        heatmap=pruning.diagnostics == "heatmap",
        preset=preset,
    )
    if pruning.diagnostics or flow:
        request.diagnostics_id = secrets.randbits(63) or 1
        request.images = images
    # A tag or diagnostics id the client sent itself stays, for vLLM's gate to refuse (plugin.py).
    if request.diagnostics_id is not None:
        mm_kwargs.setdefault(options.DIAGNOSTICS, request.diagnostics_id)
    mm_kwargs.setdefault(options.TAG, request.tag)
    if flow:
        mm_kwargs[options.FLOW] = True
        if not state.try_start_flow():
            raise TooManyFlowPasses(
                f'pruning.diagnostics "flow": the server runs at most {state.max_flow_passes} '
                "flow passes at a time and all are busy; retry shortly, or ask without flow",
                "pruning.diagnostics",
            )
        request.flow = True
    payload["mm_processor_kwargs"] = mm_kwargs
    LEDGER.expect(request.tag, request.diagnostics_id)
    return request


def check_raw_kwargs(raw: dict) -> None:
    """Raw ``mm_processor_kwargs``: our options checked by the offline engine's own parser, the
    field named in the error. Other keys, and keys only the server may set, are for vLLM's gate
    to refuse (plugin.py)."""
    with _at_door(None):
        options.PruneOptions.from_kwargs(raw)


def check_query_count(mm_kwargs: dict, num_images: int, source: str | None) -> None:
    """A list of queries has one entry per image (``options.check_query_count``, the rule the
    processor applies too), refused here with the field's name."""
    query = mm_kwargs.get(options.QUERY)
    if isinstance(query, (list, tuple)):
        with _at_door(source) as name:
            options.check_query_count(query, num_images, name=name(options.QUERY))


def check_prune_layer(mm_kwargs: dict, num_layers: int, source: str | None) -> None:
    """A scout cannot run more decoder layers than the model has, whatever the method
    (``options.check_prune_layer``, the rule the processor applies too)."""
    layer = mm_kwargs.get(options.PRUNE_LAYER)
    with _at_door(source) as name:
        options.check_prune_layer(layer, num_layers, name=name(options.PRUNE_LAYER))


@contextlib.contextmanager
def _at_door(source: str | None):
    """A ``PruneOptionError`` inside as a 400 whose ``param`` is the field the client set:
    ``pruning.<name>`` when ``source`` is "pruning", else ``mm_processor_kwargs.<kwarg>``.
    Yields the field's name for a kwarg, for the message."""

    def param(kwarg: str) -> str:
        opt = options.BY_KWARG[kwarg]
        return f"pruning.{opt.api}" if source == "pruning" else f"mm_processor_kwargs.{kwarg}"

    try:
        yield param
    except options.PruneOptionError as err:
        raise BadRequest(str(err), param(err.kwarg)) from None


def image_urls(payload: dict) -> list[str | None]:
    """One entry per image part, in prompt order: the URL when it is inline data, else None."""
    found: list[str | None] = []
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                found.append(url if isinstance(url, str) and url.startswith("data:") else None)
    return found


def image_queries(messages, *, requery: bool = False) -> list[str]:
    """Each image's relevance query, one per image part in prompt order (as ``image_urls``).

    An image is selected by the question it came with: the text of the user message that carries
    it, else of the next user message that has text, else "" (no question: uniform). Later turns
    never change it, so in a conversation the image keeps its multimodal hash, its kept tokens and
    its place in the prefix cache. ``requery``: every image takes the latest user text instead.
    """
    turns: list[tuple[int, str | None]] = []  # (images, user text or None) per message
    for message in messages or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = content if isinstance(content, list) else []
        images = sum(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in parts)
        text = message_text(content) if message.get("role") == "user" else ""
        turns.append((images, text or None))
    if requery:
        latest = next((text for _, text in reversed(turns) if text), "")
        return [latest] * sum(images for images, _ in turns)
    queries: list[str] = []
    for at, (images, text) in enumerate(turns):
        if images:
            own = text or next((t for _, t in turns[at + 1 :] if t), "")
            queries += [own] * images
    return queries


def message_text(content) -> str:
    """The text of one message's content (no template, no role): its text parts, one per line."""
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
    else:
        texts = []
    return "\n".join(t for t in texts if t.strip())


class ResponseRewriter:
    """The ``send`` of one request: adds ``pruning`` to a 200 response, passes the rest through."""

    def __init__(self, request: PreparedRequest, state, send: Send) -> None:
        self.request, self.state, self.send = request, state, send
        self.start: Message | None = None
        self.mode = "passthrough"
        self.buffer: list[bytes] = []
        self.last_chunk: dict = {}
        self.done = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] != 200:
                self.mode = "passthrough"
            elif content_type.startswith(b"text/event-stream"):
                self.mode = "stream"
            else:
                self.mode = "json"
                self.start = message
                return
            return await self.send(message)
        if message["type"] != "http.response.body":
            return await self.send(message)
        more = message.get("more_body", False)
        if self.mode == "json":
            self.buffer.append(message.get("body", b""))
            if not more:
                await self._send_json()
            return
        if self.mode == "stream":
            message = await self._stream(message)
        elif not more:
            await self._finish()
        await self.send(message)

    async def _send_json(self) -> None:
        body = b"".join(self.buffer)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        info = await self._finish(model=obj.get("model") if isinstance(obj, dict) else None)
        if isinstance(obj, dict) and info is not None:
            obj["pruning"] = info
            body = json.dumps(obj).encode()
        headers = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(self, message: Message) -> Message:
        data = message.get("body", b"")
        done_at = _done_event_at(data)
        self._remember_chunk(data if done_at < 0 else data[:done_at])
        if done_at >= 0 and not self.done:
            info = await self._finish(model=self.last_chunk.get("model"))
            if info is not None:
                chunk = {
                    "id": self.last_chunk.get("id", f"pruning-{self.request.tag}"),
                    "object": self.last_chunk.get("object", "chat.completion.chunk"),
                    "created": self.last_chunk.get("created", int(time.time())),
                    "model": self.last_chunk.get("model"),
                    "choices": [],
                    "pruning": info,
                }
                event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                message = {**message, "body": data[:done_at] + event + data[done_at:]}
        elif not message.get("more_body", False) and not self.done:
            await self._finish()
        return message

    async def release(self) -> None:
        """Take the request's entries out of the stores if the response never finished; give
        back its flow slot."""
        try:
            if not self.done:
                self.done = True
                LEDGER.pop(self.request.tag)
                await self.state.pop_diagnostics(self.request.diagnostics_id)
        finally:
            self._end_flow()

    def _end_flow(self) -> None:
        if self.request.flow:
            self.request.flow = False
            self.state.end_flow()

    def _remember_chunk(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if line.startswith(b"data: {"):
                with contextlib.suppress(ValueError):
                    self.last_chunk = json.loads(line[6:])

    async def _finish(self, model: str | None = None) -> dict | None:
        """Take this request's counts and diagnostics out of the stores; build ``pruning``."""
        if self.done:
            return None
        self.done = True
        counts = LEDGER.pop(self.request.tag)
        flow, flow_error = None, None
        try:
            if self.request.flow and counts is not None and self.mode != "passthrough":
                flow, flow_error = await self._run_flow(counts.prompt_token_ids)
        finally:
            self._end_flow()
            # Also drops the kept rows of a flow pass that did not run.
            entries = await self.state.pop_diagnostics(self.request.diagnostics_id)
        if counts is None or self.mode == "passthrough":
            return None
        metrics.observe_request(model or self.state.model_name, counts, self.request.preset)
        per_image = [ImagePruning(tokens_before=b, tokens_after=a) for b, a in counts.per_image]
        if entries:  # reshaping, decoding tokens and drawing PNGs: off the event loop
            await asyncio.to_thread(self._fill_all_diagnostics, per_image, entries)
        return PruningInfo(
            image_tokens_before=counts.before,
            image_tokens_after=counts.after,
            keep_ratio=counts.keep_ratio,
            method=counts.method,
            merge=counts.merge,
            preset=self.request.preset,
            per_image=per_image,
            flow=flow,
            flow_error=flow_error,
        ).model_dump(exclude_none=True)

    async def _run_flow(self, prompt_ids: list[int] | None) -> tuple[dict | None, str | None]:
        """(flow, None), or (None, why not): the response goes out either way."""
        if not prompt_ids:
            return None, "the processor recorded no prompt for this request"
        try:
            return await self.state.run_flow(self.request.diagnostics_id, prompt_ids), None
        except FlowUnavailable as err:
            return None, str(err)
        except Exception as err:  # a failed pass must not fail the answer
            logger.exception("lvlm-prune: the flow pass failed")
            return None, f"the flow pass failed: {type(err).__name__}: {err}"

    def _fill_all_diagnostics(self, per_image: list[ImagePruning], entries: list[dict]) -> None:
        for i, (image, entry) in enumerate(zip(per_image, entries)):
            self._fill_diagnostics(image, entry, i)

    def _fill_diagnostics(self, image: ImagePruning, entry: dict, index: int) -> None:
        image.method = entry["method"]
        image.kept_indices = entry["kept_indices"]
        scores = entry["scores"]
        grid = entry["grid"]  # the image's own rows x cols of tokens (Qwen2.5-VL: any aspect)
        heat_scores, heat_kept = None, image.kept_indices
        if scores is not None and grid and grid[0] * grid[1] == len(scores):
            rows, cols = grid
            image.grid = [rows, cols]
            image.scores = [scores[r * cols : (r + 1) * cols] for r in range(rows)]
            heat_scores = image.scores
        else:
            image.scores = scores
        if entry.get("views"):
            # AnyRes: flat scores over all N rows; the heatmap is the first view's (the base).
            image.views = [ImageView(**view) for view in entry["views"]]
            image.grid = grid
            if scores is not None and grid:
                heat_scores, heat_kept = _view_part(scores, image.kept_indices, entry["views"][0])
        votes = sorted(
            zip(entry["query_votes"], entry["query_ids"]), key=lambda vi: (-vi[0], vi[1])
        )
        tokenizer = self.state.tokenizer
        image.top_query_tokens = [
            QueryToken(token=tokenizer.decode([tid]), id=tid, votes=v)
            for v, tid in votes[:TOP_QUERY_TOKENS]
            if v > 0
        ]
        if self.request.heatmap and heat_scores is not None:
            url = self.request.images[index] if index < len(self.request.images) else None
            image.heatmap_png = render_heatmap(heat_scores, heat_kept, image=_decode_data_url(url))


def _view_part(scores: list, kept: list[int], view: dict) -> tuple[list[list[float]], list[int]]:
    """One view's scores on its grid and its kept tokens, indexed within the view (a view
    without newline rows: every row has a score)."""
    rows, cols = view["grid"]
    start = view["offset"]
    part = [scores[start + r * cols : start + (r + 1) * cols] for r in range(rows)]
    return part, [i - start for i in kept if start <= i < start + rows * cols]


def _decode_data_url(url: str | None) -> Image.Image | None:
    if not url:
        return None
    try:
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    except Exception:  # noqa: BLE001 - a heatmap without the picture under it is still useful
        return None


DONE_EVENT = b"data: [DONE]"


def _done_event_at(data: bytes) -> int:
    """Where the ``[DONE]`` event starts in a body chunk, or -1; only at an event boundary, so a
    model that writes "data: [DONE]" in its text (JSON-escaped inside an event) cannot match."""
    if data.startswith(DONE_EVENT):
        return 0
    at = data.find(b"\n\n" + DONE_EVENT)
    return at + 2 if at >= 0 else -1


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The (rewritten) body once, then the client's own channel, so disconnects still arrive."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(
    send: Send,
    message: str,
    param: str | None,
    *,
    status: int = 400,
    kind: str = "BadRequestError",
) -> None:
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    body = (
        ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))
        .model_dump_json()
        .encode()
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
