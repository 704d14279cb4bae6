"""The HTTP API, in the OpenAI Images API's shape, so the official ``openai`` client works unchanged.

    POST /v1/images/generations   {"prompt", "n", "size", "response_format", "model", "seed", "steps", "guidance", "mode"}
                                  → {"created", "data": [{"b64_json"}, …], "seed"}
    GET  /v1/models               the served models (student first)
    GET  /health                  status, queue length, images in flight; requests, calls and images so far

Errors have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` with a one-line message:
400 a value the model can't take, 422 a wrong type or unknown field, 429 the queue is full, 503 shutting
down, 500 the generation itself failed (the server keeps serving).
"""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from loopfree.utils.errors import LoopfreeError, first_line
from loopfree.serve.batcher import Batcher, Closed, QueueFull
from loopfree.serve.engine import Engine
from loopfree.serve.schemas import ImageRequest, resolve, validation_message


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the OpenAI shape, its message on one line."""
    body = {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Request-parsing and request-value errors of ``app`` answer in the OpenAI error shape."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = next((str(p) for p in first.get("loc", ()) if p != "body"), None)
        return error_response(422, validation_message(exc.errors()), param=param)

    @app.exception_handler(LoopfreeError)
    async def bad_value(request: Request, exc: LoopfreeError) -> JSONResponse:
        return error_response(400, str(exc), param=getattr(exc, "param", None))

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, str(exc), "server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(Closed)
    async def closed(request: Request, exc: Closed) -> JSONResponse:
        return error_response(503, str(exc), "server_error")


def api_router(engine: Engine, batcher: Batcher) -> APIRouter:
    """The API's routes, answering from ``engine`` through ``batcher``."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(engine.models), "queued": batcher.queued, "in_flight": batcher.in_flight,
                "max_batch": batcher.max_batch, "max_queue": batcher.max_queue, "submitted": batcher.submitted,
                "calls": batcher.calls, "images": batcher.images}

    @router.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": m.id, "object": "model", "created": m.created, "owned_by": "loopfree"}
                                           for m in engine.models.values()]}

    @router.post("/v1/images/generations")
    async def generations(request: ImageRequest):
        order = resolve(request, engine)
        future = batcher.submit(order.settings, order.items)
        try:
            pictures = await asyncio.wrap_future(future)
        except LoopfreeError:
            raise
        except Exception as e:  # the model failed on this request; the server goes on
            first = first_line(e)
            return error_response(500, f"generation failed: {first}", "server_error")
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(p.png).decode()} for p in pictures],
                "seed": order.seed}

    return router
