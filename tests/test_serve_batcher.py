"""The batcher: which requests share a call (worked out by hand), results back to their own request, a
failing request fails alone, the bounded queue, and close() answering what it holds."""

import threading
import time

import pytest

from loopfree.serve.batcher import Batcher, Closed, QueueFull


class Recorder:
    """A render function that records its calls, answers (settings, item, call size) per item, fails on an
    item "boom", and can be held at a gate to let requests pile up."""

    def __init__(self):
        self.calls: list[tuple[str, list]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def __call__(self, settings, items):
        self.entered.set()
        assert self.gate.wait(10)
        self.calls.append((settings, list(items)))
        if "boom" in items:
            raise RuntimeError("boom")
        return [(settings, item, len(items)) for item in items]


def blocked(max_batch: int, max_queue: int = 64) -> tuple[Recorder, Batcher]:
    """A batcher whose worker is busy with a first request ("first") until ``recorder.gate`` is set."""
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch, max_queue)
    recorder.hold()
    batcher.submit("s", ["first"])
    assert recorder.entered.wait(10)
    return recorder, batcher


def test_a_lone_request_runs_at_once_in_its_own_call():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=8)
    assert batcher.submit("s", ["a", "b"]).result(10) == [("s", "a", 2), ("s", "b", 2)]
    assert recorder.calls == [("s", ["a", "b"])]
    batcher.close()


def test_waiting_requests_with_equal_settings_share_calls_oldest_first():
    recorder, batcher = blocked(max_batch=4)
    futures = [batcher.submit(s, items) for s, items in
               [("x", [1, 2]), ("y", [3]), ("x", [4, 5, 6]), ("x", [7])]]
    assert batcher.queued == 4 and batcher.in_flight == 1
    recorder.gate.set()
    results = [f.result(10) for f in futures]
    # by hand: x fills a call of 4 (1, 2 and 4, 5: the third request is split), then y (now the oldest), then the rest of x
    assert recorder.calls == [("s", ["first"]), ("x", [1, 2, 4, 5]), ("y", [3]), ("x", [6, 7])]
    assert results == [[("x", 1, 4), ("x", 2, 4)], [("y", 3, 1)], [("x", 4, 4), ("x", 5, 4), ("x", 6, 2)], [("x", 7, 2)]]
    assert (batcher.calls, batcher.images) == (4, 8)
    batcher.close()


def test_a_request_larger_than_max_batch_spreads_over_calls_in_order():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=3)
    items = list(range(7))
    assert [r[1] for r in batcher.submit("s", items).result(10)] == items
    assert [len(call[1]) for call in recorder.calls] == [3, 3, 1]
    batcher.close()


def test_a_failing_request_fails_alone_and_the_worker_goes_on():
    recorder, batcher = blocked(max_batch=8)
    good1, bad, good2 = batcher.submit("s", ["a"]), batcher.submit("s", ["boom"]), batcher.submit("s", ["b", "c"])
    recorder.gate.set()
    assert good1.result(10) == [("s", "a", 1)]
    assert good2.result(10) == [("s", "b", 2), ("s", "c", 2)]
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(10)
    # the combined call failed, then each request ran alone
    assert [c[1] for c in recorder.calls] == [["first"], ["a", "boom", "b", "c"], ["a"], ["boom"], ["b", "c"]]
    assert batcher.submit("s", ["d"]).result(10) == [("s", "d", 1)]
    batcher.close()


def test_a_request_that_fails_in_its_first_call_runs_no_further_calls():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=2)
    with pytest.raises(RuntimeError):
        batcher.submit("s", ["boom", "b", "c", "d"]).result(10)
    assert batcher.submit("s", ["e"]).result(10) == [("s", "e", 1)]
    assert [c[1] for c in recorder.calls] == [["boom", "b"], ["e"]]
    batcher.close()


def test_a_full_queue_refuses_and_the_accepted_requests_complete():
    recorder, batcher = blocked(max_batch=1, max_queue=2)
    accepted = [batcher.submit("s", [i]) for i in range(2)]
    with pytest.raises(QueueFull, match="queue is full"):
        batcher.submit("s", [2])
    recorder.gate.set()
    assert [f.result(10) for f in accepted] == [[("s", 0, 1)], [("s", 1, 1)]]
    assert batcher.submit("s", [3]).result(10) == [("s", 3, 1)]  # room again
    batcher.close()


def test_close_answers_everything_queued_then_refuses():
    recorder, batcher = blocked(max_batch=2)
    queued = [batcher.submit("s", [i, i]) for i in range(3)]
    closing = threading.Thread(target=batcher.close)
    closing.start()
    while not batcher._closing:  # close() has begun: nothing new gets in
        time.sleep(0.001)
    with pytest.raises(Closed):
        batcher.submit("s", ["late"])
    recorder.gate.set()
    closing.join(10)
    assert not closing.is_alive()
    assert [f.result(0) for f in queued] == [[("s", i, 2), ("s", i, 2)] for i in range(3)]
