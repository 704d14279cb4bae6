"""One process, one app: the API routes and the Gradio page on one FastAPI app, served by uvicorn.

    loopfree serve --model runs/tiue --port 7860

or from Python: ``serve(model="runs/tiue")``, or ``create_app(engine, batcher)`` to host it yourself.
SIGTERM or Ctrl-C: uvicorn stops accepting connections and waits for the requests in flight, which the
batcher finishes; then the batcher stops and the process exits with code 0 — every accepted request was
answered.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import gradio as gr
import uvicorn
from fastapi import FastAPI

from loopfree.utils.devices import cpu_threads
from loopfree.utils.errors import LoopfreeError
from loopfree.serve.batcher import Batcher
from loopfree.serve.engine import Engine, check_serve_models, load_engine
from loopfree.serve.page import CSS, build_page
from loopfree.serve.routes import api_router, install_error_handlers
from loopfree.toy.world import heldout_prompts


def create_app(engine: Engine, batcher: Batcher, examples: list[str] | None = None) -> FastAPI:
    """The API at ``/v1/…`` and ``/health``, the page at ``/``; shutting the app down closes ``batcher``
    (after answering what it holds)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="loopfree", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(api_router(engine, batcher))
    return gr.mount_gradio_app(app, build_page(engine, batcher, examples), path="/", css=CSS)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), or a one-line LoopfreeError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except socket.gaierror:
        raise LoopfreeError(f"cannot listen on {host}:{port}: unknown host {host!r}") from None
    except OverflowError:
        raise LoopfreeError(f"cannot listen on {host}:{port}: the port must be in 0..65535") from None
    except OSError as e:
        raise LoopfreeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def _drained_signal_ends_cleanly() -> Iterator[None]:
    """uvicorn re-raises the SIGTERM/SIGINT it drained on, which would kill the process once the work is done;
    inside, that re-raised signal is ignored, so the process exits normally. Handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(model: str | Path | None = None, teacher: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860,
          device: str | None = None, dtype: str = "fp32", max_batch: int = 8, max_queue: int = 64,
          threads: int | None = None, on_ready: Callable[[str], None] = print, tiny_vae: str | Path | None = None,
          lora: str | Path | None = None, fuse: bool = False, style_lora: str | Path | None = None,
          style_scale: float = 1.0, backend: str = "torch") -> None:
    """Check the model folders and the address, load the models, then serve until SIGTERM/SIGINT; ``on_ready``
    gets the URL once requests are answered. Without ``model``: the bundled toy student and teacher; ``lora``: a LoRA
    student on ``model``; ``style_lora``: any diffusers-format LoRA on the student at ``style_scale`` (``fuse``: folded
    into its weights); ``backend="onnxruntime"``: ``model`` is a folder of ``loopfree export``, run by onnxruntime.
    ``threads``: the CPU threads while serving, torch's or onnxruntime's (None: torch's default)."""
    spec = check_serve_models(model, teacher, device, dtype, tiny_vae, lora, fuse, style_lora, style_scale, backend)  # bad folders fail here, before anything starts
    if max_batch < 1 or max_queue < 1:
        raise LoopfreeError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
    sock = listen(host, port)
    with closing(sock), cpu_threads(threads):
        engine = load_engine(spec)
        batcher = Batcher(engine.render, max_batch, max_queue)
        examples = heldout_prompts(8) if model is None else None
        server = uvicorn.Server(uvicorn.Config(create_app(engine, batcher, examples), log_level="warning"))
        on_ready(url_of(sock))
        with _drained_signal_ends_cleanly():
            server.run(sockets=[sock])
