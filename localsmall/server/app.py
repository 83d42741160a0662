"""The ASGI application: routes, authentication, limits, CORS and error objects.

Every failure a client can cause is answered with an OpenAI-style error object and the
server keeps serving; an unexpected exception becomes a 500 error object, never a
traceback on the wire.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from localsmall.chat.toolparse import ToolCallParser
from localsmall.chat.tools import ToolCall, reply_constraint
from localsmall.engine.types import Constraint, PromptPiece, SamplingSettings
from localsmall.errors import ToolsError
from localsmall.server import responses as r
from localsmall.server import warmup
from localsmall.server.errors import ApiError, busy, internal, invalid
from localsmall.server.image_urls import ImageLimits, known_image, load_image
from localsmall.server.requests import ChatRequest, ImageRef, parse_chat_request
from localsmall.server.scheduler import Delta, Failed, Finished, Job, Scheduler
from localsmall.server.trace import mark, new_trace

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from localsmall.server.prompting import PromptBuilder

MAX_BODY_BYTES = 32 * 1024 * 1024
LOADING_RETRY_S = 5
INLINE_PREPARE_CHARS = 16_000  # conversations laid out on the event loop (see below)
PICK_WAIT_S = 0.002  # the event loop's longest wait for an idle worker to take a job


@dataclass(frozen=True)
class ServerConfig:
    """How the server answers (see `localsmall serve --help`)."""

    model_ids: tuple[str, ...]          # the first is the one /v1/models lists first
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = MAX_BODY_BYTES
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass
class ServerState:
    """What the routes work with. `scheduler` is None while the model loads; `config`
    is replaced once it has loaded."""

    config: ServerConfig
    builder: PromptBuilder | None = None
    scheduler: Scheduler | None = None
    created: int = field(default_factory=r.now)
    requests: int = 0

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.builder is not None


def error_response(error: ApiError) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request: Request, limit: int, trace: dict[str, float] | None = None
                    ) -> Any:
    """The body as JSON, refusing more than `limit` bytes (413) before reading it all."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than {limit // 2**20} MiB",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    mark(trace, "body")
    import orjson  # twice as fast as json on a conversation with an image in it

    try:
        return orjson.loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise invalid("body", f"the request body is not valid JSON ({exc})") from None


def sampling_for(request: ChatRequest, base: SamplingSettings) -> SamplingSettings:
    """The server's defaults with the request's parameters."""
    return replace(
        base,
        temperature=request.temperature if request.temperature is not None else base.temperature,
        top_p=request.top_p if request.top_p is not None else base.top_p,
        seed=request.seed if request.seed is not None else base.seed,
        max_tokens=request.max_tokens if request.max_tokens is not None else base.max_tokens,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty)


async def prepare_images(request: ChatRequest, limits: ImageLimits
                         ) -> dict[ImageRef, Any]:
    """The request's images, prepared. Those seen recently (a resent conversation) are
    looked up here, without a task each; the others are decoded or fetched together."""
    refs = [p for m in request.messages for p in m.parts if isinstance(p, ImageRef)]
    images = {ref: known for ref in refs if (known := known_image(ref, limits)) is not None}
    new = [(i, ref) for i, ref in enumerate(refs) if ref not in images]
    if new:
        loaded = await asyncio.gather(*(load_image(ref, limits, i + 1) for i, ref in new))
        images.update(zip((ref for _, ref in new), loaded, strict=True))
    return images


def constraint_for(chat: ChatRequest) -> Constraint | None:
    """The grammar a reply is held to (tool calls, JSON), or None for free text."""
    try:
        return reply_constraint(tools=chat.tools, tool_choice=chat.tool_choice,
                                parallel_tool_calls=chat.parallel_tool_calls,
                                response_format=chat.response_format)
    except ToolsError as exc:
        raise invalid(exc.param or "tools", str(exc)) from None


class ChatCompletions:
    """POST /v1/chat/completions."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __call__(self, request: Request) -> Response:
        import anyio
        from starlette.responses import JSONResponse, StreamingResponse

        state = self.state
        if not state.ready:
            raise busy(LOADING_RETRY_S, "the model is still loading; retry once GET /health "
                       "answers 200", status=503, code="model_loading")
        assert state.scheduler is not None and state.builder is not None
        trace = new_trace()
        mark(trace, "route")
        body = await read_json(request, state.config.max_body_bytes, trace)
        chat = parse_chat_request(body, model_ids=state.config.model_ids)
        mark(trace, "parsed")
        if any(isinstance(p, ImageRef) for m in chat.messages for p in m.parts) and \
                not state.scheduler.engine.info.has_vision:
            raise invalid("messages", "this server runs without a vision projector, so it "
                          "cannot read images")
        images = await prepare_images(chat, state.config.image_limits)
        mark(trace, "images")
        builder, engine = state.builder, state.scheduler.engine

        def prepare() -> tuple[list[PromptPiece], Constraint | None]:
            prompt = builder.build(chat, images)
            needed = engine.count_tokens(prompt)
            if needed >= engine.n_ctx:
                raise invalid("messages", f"the conversation needs {needed} tokens but the "
                              f"context holds {engine.n_ctx}", code="context_length_exceeded")
            return prompt, constraint_for(chat)

        # A short conversation without grammars to build is laid out here (~2 ms): a
        # round trip to a worker thread costs as much again on a busy CPU, on the way to
        # the first token. The rest goes to a thread so as not to hold up other
        # requests' streams.
        if not chat.tools and chat.response_format.kind == "text" and \
                sum(len(m.text) for m in chat.messages) <= INLINE_PREPARE_CHARS:
            prompt, constraint = prepare()
        else:
            prompt, constraint = await anyio.to_thread.run_sync(prepare)
        mark(trace, "prompt")
        state.requests += 1
        sampling = replace(sampling_for(chat, state.config.sampling), constraint=constraint)
        job = Job(id=r.completion_id(), prompt=prompt, loop=asyncio.get_running_loop(),
                  sampling=sampling, stops=chat.stop, spell_control=bool(chat.tools),
                  trace=trace)
        if state.scheduler.submit(job):
            # The idle worker needs the GIL to take the job and start the evaluation,
            # and this thread would keep it while it sends the response headers: wait
            # (GIL released) until the worker has the job, so the evaluation starts
            # ~0.3 ms sooner. Bounded, so a stalled worker never holds up the loop.
            job.picked.wait(PICK_WAIT_S)
        mark(trace, "submitted")
        if chat.stream:
            return StreamingResponse(self._stream(job, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return JSONResponse(await self._collect(job, chat, request))

    def _remember_calls(self, event: Finished, content: str | None,
                        calls: Sequence[ToolCall]) -> None:
        """A reply with tool calls comes back as its calls: know it by them (see
        prompting.ReplyMemory)."""
        if calls and not event.cut and self.state.builder is not None:
            self.state.builder.replies.remember_calls(content=content, calls=calls,
                                                      token_ids=event.token_ids)

    async def _collect(self, job: Job, chat: ChatRequest, request: Request) -> dict[str, Any]:
        assert self.state.scheduler is not None
        scheduler = self.state.scheduler

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            scheduler.cancel(job)

        watcher = asyncio.create_task(watch())
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    message, calls = r.reply_message(event.text, tools=bool(chat.tools))
                    self._remember_calls(event, message["content"], calls)
                    finish = "tool_calls" if calls else event.finish_reason
                    return r.completion(id=job.id, model=chat.model, created=r.now(),
                                        message=message, finish_reason=finish,
                                        usage=r.usage(event.stats, len(event.token_ids)),
                                        timings=r.timings(event.stats, job.trace))
        finally:
            watcher.cancel()
            scheduler.cancel(job)  # no-op once finished; stops it if this task was cancelled

    async def _stream(self, job: Job, chat: ChatRequest) -> AsyncIterator[bytes]:
        assert self.state.scheduler is not None
        created, model = r.now(), chat.model
        with_usage = chat.include_usage

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return r.sse(r.chunk(id=job.id, model=model, created=created, delta=delta,
                                 finish_reason=finish, with_usage=with_usage))

        parser = ToolCallParser() if chat.tools else None
        try:
            yield chunk({"role": "assistant", "content": ""})
            mark(job.trace, "head_sent")
            while True:
                event = await job.events.get()
                if isinstance(event, Delta):
                    mark(job.trace, "delta_received")
                    if parser is not None:
                        for delta in parser.feed(event.text):
                            yield chunk(r.stream_delta(delta))
                    elif event.text:
                        yield chunk({"content": event.text})
                        mark(job.trace, "content_sent")
                elif isinstance(event, Finished):
                    finish: str = event.finish_reason
                    if parser is not None:
                        for delta in parser.finish():
                            yield chunk(r.stream_delta(delta))
                        finish = "tool_calls" if parser.calls else finish
                        self._remember_calls(event, parser.content or None, parser.calls)
                    last = r.chunk(id=job.id, model=model, created=created, delta={},
                                   finish_reason=finish, with_usage=with_usage)
                    yield r.sse(last | {"timings": r.timings(event.stats, job.trace)})
                    if with_usage:
                        yield r.sse(r.usage_chunk(id=job.id, model=model, created=created,
                                                  usage=r.usage(event.stats,
                                                                len(event.token_ids))))
                    yield r.sse("[DONE]")
                    return
                else:
                    yield r.sse(event.error.body())
                    return
        finally:
            self.state.scheduler.cancel(job)


def _models(state: ServerState) -> Callable[[Request], Awaitable[Response]]:
    async def models(request: Request) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse(r.model_list(state.config.model_ids, state.created))
    return models


def _health(state: ServerState) -> Callable[[Request], Awaitable[Response]]:
    async def health(request: Request) -> Response:
        from starlette.responses import JSONResponse

        # llama.cpp's server convention: 503 {"status": "loading"}, then 200 "ok".
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503,
                                headers={"Retry-After": str(LOADING_RETRY_S)})
        assert state.scheduler is not None
        return JSONResponse({"status": "ok", "model": state.config.model_ids[0],
                             "waiting": state.scheduler.waiting,
                             "slots": len(state.scheduler.pool),
                             **warmup.health(state.scheduler.pool.system_prompt)})
    return health


def _guarded(handler: Callable[[Request], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
    """Turn every exception of a route into an error object."""
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)
        except Exception as exc:  # never a traceback on the wire
            return error_response(internal(f"internal error: {type(exc).__name__}: {exc}"))
    return route


def create_app(state: ServerState) -> Starlette:
    """The Starlette application for a server state."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    middleware = [Middleware(AuthMiddleware, api_key=state.config.api_key)]
    if state.config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(state.config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"]))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error = ApiError(404, f"no route {request.method} {request.url.path}",
                             code="not_found")
        else:
            error = ApiError(exc.status_code, str(exc.detail), code="http_error")
        return error_response(error)

    routes = [
        Route("/v1/chat/completions", _guarded(ChatCompletions(state)), methods=["POST"]),
        Route("/v1/models", _guarded(_models(state)), methods=["GET"]),
        Route("/health", _guarded(_health(state)), methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error})


class AuthMiddleware:
    """Bearer-token check (constant-time) on everything but /health and CORS preflight."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (self.expected is None or scope["type"] != "http" or scope["path"] == "/health"
                or scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            from starlette.responses import JSONResponse

            error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             type="invalid_request_error", code="invalid_api_key")
            response = JSONResponse(error.body(), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
