"""The bounded request queue and the one worker thread that turns it into pipeline calls.

    batcher = Batcher(engine.render, max_batch=8, max_queue=64)
    pictures = batcher.submit(settings, items).result()      # or await asyncio.wrap_future(...)
    batcher.close()                                          # answers everything queued, then stops

The worker takes the oldest waiting request and fills one call with its images and those of later requests
with the same settings (any prompts), up to ``max_batch`` images, without waiting for more to arrive: a lone
request runs at once, and under load calls fill up by themselves. A request larger than ``max_batch`` is
spread over several calls. Every image keeps its own seed and goes back to its own request. If a combined
call fails, each request in it is retried alone, so one bad request fails alone.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, TypeVar

S = TypeVar("S", bound=Hashable)  # settings: what a call's items share
I = TypeVar("I")  # an item
R = TypeVar("R")  # an item's result


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests: the HTTP answer is 429."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests: the HTTP answer is 503."""


@dataclass(eq=False)
class _Job(Generic[S, I, R]):
    settings: S
    items: list[I]
    future: Future = field(default_factory=Future)
    next: int = 0  # items before this one are taken by a call
    results: dict[int, R] = field(default_factory=dict)


@dataclass(frozen=True)
class _Part:
    job: _Job
    start: int
    stop: int


class Batcher(Generic[S, I, R]):
    """Runs ``render(settings, items) -> results`` on one thread, combining requests with equal settings."""

    def __init__(self, render: Callable[[S, list[I]], list[R]], max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
        self.render, self.max_batch, self.max_queue = render, max_batch, max_queue
        self._waiting: deque[_Job] = deque()
        self._busy = 0  # images in the call being rendered
        self.submitted = self.calls = self.images = 0  # requests accepted; successful render calls and their images
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="loopfree-batcher", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for (the rest of) their images to start."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Images in the pipeline call now running."""
        return self._busy

    def submit(self, settings: S, items: list[I]) -> Future:
        """Queue one request; its future gives ``render``'s results for ``items``, in order, or its error."""
        if not items:
            raise ValueError("a request needs at least one item")
        job = _Job(settings, list(items))
        job.future.set_running_or_notify_cancel()  # committed: a caller that stops waiting cannot cancel it
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again shortly")
            self._waiting.append(job)
            self.submitted += 1
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, answer every queued one, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[_Part] | None:
        """The next call's parts (oldest request first), or None once closing with nothing left."""
        with self._cond:
            while not self._waiting and not self._closing:
                self._cond.wait()
            if not self._waiting:
                return None
            settings, room, parts = self._waiting[0].settings, self.max_batch, []
            for job in list(self._waiting):
                if job.settings != settings:
                    continue
                stop = min(len(job.items), job.next + room)
                parts.append(_Part(job, job.next, stop))
                room -= stop - job.next
                job.next = stop
                if stop == len(job.items):
                    self._waiting.remove(job)
                if room == 0:
                    break
            self._busy = self.max_batch - room
            return parts

    def _work(self) -> None:
        while (parts := self._take()) is not None:
            self._run(parts)
            self._busy = 0

    def _run(self, parts: list[_Part]) -> None:
        parts = [p for p in parts if not p.job.future.done()]  # a request that failed in an earlier call
        if not parts:
            return
        items = [item for p in parts for item in p.job.items[p.start : p.stop]]
        try:
            results = self.render(parts[0].job.settings, items)
        except Exception as e:
            if len(parts) > 1:
                for part in parts:
                    self._run([part])
            else:
                self._fail(parts[0].job, e)
            return
        self.calls += 1
        self.images += len(items)
        offset = 0
        for p in parts:
            for i in range(p.start, p.stop):
                p.job.results[i] = results[offset]
                offset += 1
            if len(p.job.results) == len(p.job.items):
                p.job.future.set_result([p.job.results[i] for i in range(len(p.job.items))])

    def _fail(self, job: _Job, error: Exception) -> None:
        with self._cond:
            if job in self._waiting:  # its later parts are not run
                self._waiting.remove(job)
        job.future.set_exception(error)
