"""The HTTP application: Megatron's routes and the OpenAI-compatible ones over one service.

FastAPI (on Starlette) with uvicorn: a maintained ASGI stack whose streaming responses
notice a client that goes away (the generator is cancelled), which is what frees a
streaming request's place in the engine. Generation itself runs in worker threads; the
service's lock lets one batch run at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import AsyncIterator, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from megatron.inference import megatron_api, openai_api
from megatron.inference.errors import RequestError
from megatron.inference.text_service import TextGenerationService

logger = logging.getLogger(__name__)


async def read_json(request: Request, limit: int):
    """The parsed JSON body; 413 beyond ``limit`` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit} bytes "
                           "(--max-request-body-bytes)", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body exceeds the limit of {limit} bytes (--max-request-body-bytes)",
                               status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk(kind: str, ident: str, model: str, index: int, text: Optional[str] = None, finish=None,
           role: bool = False) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": ident, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def stream_response(service: TextGenerationService, parsed, kind: str, model: str) -> StreamingResponse:
    """Server-sent events of a running generation; a client that disconnects cancels it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    n = len(parsed.requests)

    def run():
        try:
            results = service.generate(parsed.requests, lambda i, t: loop.call_soon_threadsafe(queue.put_nowait, ("token", i, t)),
                                       lambda: [cancel.is_set()] * n)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", results))
        except Exception as err:  # reported to the client as an error event, logged here
            logger.exception("generation failed")
            loop.call_soon_threadsafe(queue.put_nowait, ("error", err))

    threading.Thread(target=run, daemon=True, name="generate-stream").start()
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    async def events() -> AsyncIterator[str]:
        streams = [openai_api.new_stream(service, parsed, r.prompt_tokens) for r in parsed.requests]
        try:
            for i, request in enumerate(parsed.requests):
                if kind == "chat":
                    yield _sse(_chunk(kind, ident, model, i, role=True))
                elif parsed.echo:
                    yield _sse(_chunk(kind, ident, model, i, service.detokenize(request.prompt_tokens)))
            while True:
                item = await queue.get()
                if item[0] == "token":
                    delta = streams[item[1]].add(item[2])
                    if delta:
                        yield _sse(_chunk(kind, ident, model, item[1], delta))
                    continue
                if item[0] == "error":
                    yield _sse({"error": {"message": f"generation failed: {item[1]}", "type": "server_error"}})
                    return
                results: List = item[1]
                for i, (stream, result) in enumerate(zip(streams, results)):
                    yield _sse(_chunk(kind, ident, model, i, stream.finish(),
                                      finish=openai_api.finish_reason(result, stream)))
                if parsed.include_usage:
                    final = _chunk(kind, ident, model, 0)
                    final["choices"], final["usage"] = [], openai_api.usage(results)
                    yield _sse(final)
                yield "data: [DONE]\n\n"
                return
        finally:
            cancel.set()  # finished, or the client went away: stop generating for it

    return StreamingResponse(events(), media_type="text/event-stream")


def base_app(service) -> FastAPI:
    """An application with the JSON error replies and the /v1/models and /health routes of
    ``service`` (a text generation or an encoder service); the family adds its own routes."""
    app = FastAPI(title="Megatron text generation", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, err: RequestError):
        return JSONResponse(err.payload(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, err: Exception):
        logger.exception("request failed")
        return JSONResponse(RequestError(f"internal error: {err}", status=500).payload(), status_code=500)

    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "megatron"}]}

    async def health():
        return {"status": "ok", "active_requests": service.active_requests,
                "cancelled_requests": service.cancelled_requests}

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/health", health, methods=["GET"])
    return app


def build_app(service: TextGenerationService) -> FastAPI:
    app = base_app(service)
    limit = service.limits.max_body_bytes

    @app.put("/api")
    async def api(request: Request):
        body = await read_json(request, limit)
        requests, logprobs = megatron_api.parse_api_request(body, service)
        results = await run_in_threadpool(service.generate, requests)
        return megatron_api.api_response(body["prompts"], results, service, logprobs)

    async def completions(request: Request, megatron_route: bool):
        body = await read_json(request, limit)
        parsed = openai_api.parse_completion(body, service, max_tokens_required=megatron_route)
        model = body.get("model") or service.model_name
        if parsed.stream:
            return stream_response(service, parsed, "completion", model)
        results = await run_in_threadpool(service.generate, parsed.requests)
        return openai_api.completion_response(service, parsed, results, model)

    async def chat(request: Request):
        body = await read_json(request, limit)
        parsed = openai_api.parse_chat(body, service)
        model = body.get("model") or service.model_name
        if parsed.stream:
            return stream_response(service, parsed, "chat", model)
        results = await run_in_threadpool(service.generate, parsed.requests)
        return openai_api.chat_response(service, parsed, results, model)

    async def megatron_completions(request: Request):
        return await completions(request, True)

    async def openai_completions(request: Request):
        return await completions(request, False)

    app.add_api_route("/completions", megatron_completions, methods=["POST"])
    app.add_api_route("/v1/completions", openai_completions, methods=["POST"])
    app.add_api_route("/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    return app
