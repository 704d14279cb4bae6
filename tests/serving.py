"""Helpers of the serve tests: the toy engine (loaded once per test process) and an app served by uvicorn in a
background thread on a free loopback port."""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from loopfree.serve.app import listen, url_of
from loopfree.serve.engine import Engine, check_serve_models, load_engine


@functools.cache
def toy_engine() -> Engine:
    """The bundled toy student and teacher on the CPU (read-only after loading, so tests share it)."""
    return load_engine(check_serve_models(None, None, "cpu", "fp32"))


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` until the block ends (shutting it down as SIGTERM would); its base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
