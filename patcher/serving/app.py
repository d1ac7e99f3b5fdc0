"""The Starlette application: OpenAI's chat completions, the model list, health and Prometheus metrics.

Each request is validated (body size, JSON, schema, model name, images) on the event loop, then handed to
the scheduler; a worker thread prepares the prompt (its token count is checked against the context),
generates, and sends the text back through a per-request channel, which the response reads (all at once,
or as server-sent events). A streaming client that goes away sets its cancel flag: the worker stops at
the next token and takes the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sasa_patcher.serving import protocol
from sasa_patcher.serving.images import ImageLimits, load_image
from sasa_patcher.serving.metrics import Metrics
from sasa_patcher.serving.protocol import ApiError
from sasa_patcher.serving.runtime import Outcome, ServedModel
from sasa_patcher.serving.scheduler import QueueFull, Scheduler

LOG = logging.getLogger("sasa_patcher.serving")


@dataclass(frozen=True)
class ServerConfig:
    """The server's limits (`sasa-serve --help` and the README list the same defaults)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    default_max_tokens: int = 256
    workers: int = 1
    queue_size: int = 16
    allow_remote_images: bool = False


class _Channel:
    """Events from a worker thread to the request's task: (kind, value) with kind prepared|text|done|error."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


def create_app(served: ServedModel, config: ServerConfig) -> Starlette:
    scheduler = Scheduler(config.workers, config.queue_size)
    metrics = Metrics()
    image_limits = ImageLimits(config.max_image_pixels, config.max_body_bytes, config.allow_remote_images)

    def error_response(error: ApiError) -> JSONResponse:
        metrics.request(error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        too_large = ApiError(413, f"the request body exceeds {config.max_body_bytes} bytes (--max-body-bytes): send "
                             "smaller images", code="request_too_large")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > config.max_body_bytes:
                raise too_large
        return bytes(body)

    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            try:
                body = json.loads(await read_body(request))
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
            chat = protocol.parse_chat_request(body, config.max_images)
            if chat.model != served.name:
                raise ApiError(404, f"the model {chat.model!r} does not exist: this server serves {served.name!r}",
                               code="model_not_found", param="model")
            images = [await asyncio.to_thread(load_image, url, image_limits) for url in chat.image_urls]
        except ApiError as error:
            return error_response(error)
        channel, cancelled = _Channel(), threading.Event()

        def job() -> None:
            try:
                prepared = served.prepare(chat.text, images)
                budget = served.budget(prepared.prompt_tokens, chat.max_tokens, config.default_max_tokens)
                channel.put("prepared", prepared.prompt_tokens)
                outcome = served.complete(prepared, budget, chat.stop, lambda text: channel.put("text", text),
                                          cancelled)
                if outcome is None:
                    metrics.cancel()
                channel.put("done", outcome)
            except ApiError as error:
                channel.put("error", error)
            except Exception:  # noqa: BLE001 - any other failure is the server's: a 500, and the worker lives on
                LOG.exception("generation failed")
                channel.put("error", ApiError(500, "the server failed to generate an answer (see its log)",
                                              kind="server_error", code="internal_error"))

        try:
            future = scheduler.submit(job)
        except QueueFull as full:
            return error_response(ApiError(429, f"{full}: the queue holds {config.queue_size} requests "
                                           "(--queue-size)", kind="rate_limit_error", code="queue_full",
                                           headers={"Retry-After": str(full.retry_after)}))
        try:
            kind, value = await channel.queue.get()
        except asyncio.CancelledError:
            cancelled.set()
            future.cancel()
            raise
        if kind == "error":
            return error_response(value)
        answer = _Answer(served.name, chat, arrived, metrics)
        if chat.stream:
            return StreamingResponse(answer.events(channel, cancelled), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            outcome = await answer.collect(channel)
        except ApiError as error:
            return error_response(error)
        finally:
            cancelled.set()  # a no-op once finished; stops the worker if this task was cancelled
        return JSONResponse(answer.completion(outcome))

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                                          "owned_by": "sasa-patcher"}]})

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served.name, "runtime": served.kind,
                             "queue_depth": scheduler.waiting, "running": scheduler.running})

    async def prometheus(_: Request) -> Response:
        return PlainTextResponse(metrics.render(scheduler.waiting, scheduler.running),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        scheduler.shutdown()  # uvicorn has drained the requests in flight by now

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health), Route("/metrics", prometheus)],
                     exception_handlers={HTTPException: http_error}, lifespan=lifespan)


class _Answer:
    """One request's answer: collected into a completion, or streamed as chunks; metrics on completion."""

    def __init__(self, model: str, chat: protocol.ChatRequest, arrived: float, metrics: Metrics):
        self.model, self.chat, self.arrived, self.metrics = model, chat, arrived, metrics
        self.id = protocol.new_id()
        self.first_text: float | None = None

    def _text(self) -> None:
        if self.first_text is None:
            self.first_text = time.perf_counter()

    def _finished(self, outcome: Outcome) -> None:
        now = time.perf_counter()
        self.metrics.request(200)
        self.metrics.answered(outcome.flagged, outcome.completion_tokens, outcome.decode_seconds,
                              (self.first_text or now) - self.arrived, now - self.arrived)

    async def collect(self, channel: _Channel) -> Outcome:
        while True:
            kind, value = await channel.queue.get()
            if kind == "text":
                self._text()
            elif kind == "error":
                raise value
            elif kind == "done":
                self._finished(value)
                return value

    def completion(self, outcome: Outcome) -> dict[str, Any]:
        return protocol.completion(self.id, self.model, outcome.text, outcome.finish_reason, outcome.prompt_tokens,
                                   outcome.completion_tokens, protocol.verdict(outcome.unsafe_prob, outcome.flagged))

    async def events(self, channel: _Channel, cancelled: threading.Event):
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            yield sse(protocol.chunk(self.id, self.model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await channel.queue.get()
                if kind == "text":
                    self._text()
                    yield sse(protocol.chunk(self.id, self.model, {"content": value}))
                elif kind == "error":
                    self.metrics.request(value.status)
                    yield sse(value.body())
                    return
                elif kind == "done" and value is not None:
                    self._finished(value)
                    yield sse(protocol.chunk(self.id, self.model, {}, value.finish_reason,
                                             sasa=protocol.verdict(value.unsafe_prob, value.flagged)))
                    if self.chat.include_usage:
                        yield sse(protocol.chunk(self.id, self.model, None,
                                                 usage=protocol.usage(value.prompt_tokens, value.completion_tokens)))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            cancelled.set()  # the client went away (or the answer is complete): the worker stops at its next token
