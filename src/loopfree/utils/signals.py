"""SIGTERM/SIGINT as a flag a training loop polls, so it can save a checkpoint before it stops::

    with stop_on_signals() as stop:
        while training:
            ...
            if stop.signum: save(); break
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and stops."""

    signum = 0

    def handle(self, signum, frame) -> None:
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """SIGTERM/SIGINT set the flag inside; the previous handlers are back afterwards (so Ctrl-C works again)."""
    flag, previous = StopFlag(), {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, flag.handle)
    except ValueError:  # not the main thread: signals stay with whoever owns them
        pass
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
