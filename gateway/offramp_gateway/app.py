"""The ASGI app (FastAPI): routes, streaming (server-sent events), disconnects and errors.

``create_app`` takes the Triton backend as an object (``TritonBackend``, or a fake one in unit
tests) with ``generate(text, sampling, stream)`` returning an async iterator of ``Delta`` with a
synchronous ``cancel()``, ``ready()`` and ``close()``.

A streamed request's first response is awaited before the ``200`` goes out, so that input the
model refuses, a full queue or a timeout still get their own status (400 / 503 / 504); a later
error becomes an ``{"error": ...}`` event, which the ``openai`` client raises. A client that goes
away (a closed stream, or a dropped connection while waiting) cancels the Triton request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from offramp_gateway.errors import OpenAIError
from offramp_gateway.prompts import PromptRenderer
from offramp_gateway.protocol import GenerationRequest, parse_body, parse_chat, parse_completion
from offramp_gateway.responses import ResponseBuilder, sse, usage

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


async def until_disconnect(request: Request, work: Awaitable):
    """``await work`` unless the client disconnects first (then ``ClientGone``)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientGone()
        return task.result()
    finally:
        watch.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(backend, renderer: PromptRenderer, models: list[str]) -> FastAPI:
    """The gateway for ``models`` (names a request may use; the first is the Triton model's)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await backend.close()

    app = FastAPI(title="Offramp OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    started = int(time.time())
    _add_error_handlers(app)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(m, started) for m in models]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict:
        if model not in models:
            raise OpenAIError(404, f"model {model!r} does not exist", "model", "model_not_found")
        return _model_card(model, started)

    @app.get("/health")
    async def health() -> Response:
        ok = await backend.ready()
        return JSONResponse({"status": "ok" if ok else "triton not ready"}, status_code=200 if ok else 503)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_chat(parse_body(await request.body()), models)
        return await _respond(request, req, backend, renderer)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_completion(parse_body(await request.body()), models)
        return await _respond(request, req, backend, renderer)

    return app


def _model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "offramp"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        error = OpenAIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(OpenAIError(500, f"internal error: {exc!r}").body(), status_code=500)


async def _respond(request: Request, req: GenerationRequest, backend, renderer: PromptRenderer) -> Response:
    text = await renderer.text(req.messages) if req.messages else req.prompt
    stream = backend.generate(text, req.sampling, req.stream)
    builder = ResponseBuilder(req.kind, req.model)
    try:
        first = await until_disconnect(request, stream.__anext__())
    except BaseException:
        stream.cancel()
        raise
    if req.stream:
        events = _events(req, stream, builder, first)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    stream.cancel()  # a no-op after the final response; the one response of a non-streaming request
    text = (req.prompt if req.echo else "") + first.text
    counts = usage(first.num_input_tokens, first.num_output_tokens)
    return JSONResponse(builder.completion(text, first.finish_reason, first.exit_layers, counts))


async def _events(req: GenerationRequest, stream, builder: ResponseBuilder, delta):
    """The SSE body: one chunk per Triton response, the usage chunk if asked for, ``[DONE]``."""
    try:
        if req.echo:
            yield sse(_with_usage(req, builder.chunk(req.prompt, [], first=True)))
        first = not req.echo
        while True:
            chunk = builder.chunk(delta.text, delta.exit_layers, delta.finish_reason if delta.final else "", first)
            yield sse(_with_usage(req, chunk))
            first = False
            if delta.final:
                break
            delta = await stream.__anext__()
        if req.include_usage:
            yield sse(builder.usage_chunk(usage(delta.num_input_tokens, delta.num_output_tokens)))
        yield sse("[DONE]")
    except OpenAIError as exc:
        yield sse(exc.body())
    finally:
        stream.cancel()  # the client went away (this generator was closed or cancelled), or an error


def _with_usage(req: GenerationRequest, chunk: dict) -> dict:
    if req.include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last one
    return chunk
