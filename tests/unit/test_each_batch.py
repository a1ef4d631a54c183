"""backends.base.each_batch: a run loop with nothing periodic sleeps on its queue (no wake-up
while idle), yet yields every batch and ends at once on stop or on the daemon's end marker."""

from __future__ import annotations

import queue
import threading
import time

from flannel.backends.base import each_batch
from flannel.lease import Batch
from tests.support import wait_for, wakeups

WINDOW = 1.5   # long enough for the old 0.5 s poll to show


def _reader(q: queue.Queue[Batch | None], stop: threading.Event, got: list[Batch]) -> threading.Thread:
    t = threading.Thread(target=lambda: got.extend(each_batch(q, stop)), daemon=True)
    t.start()
    return t


def test_idle_loop_sleeps_and_stop_ends_it() -> None:
    q: queue.Queue[Batch | None] = queue.Queue()
    stop = threading.Event()
    got: list[Batch] = []
    t = _reader(q, stop, got)

    def quiet() -> bool:
        before = wakeups(t)
        time.sleep(WINDOW)   # the measuring window
        return wakeups(t) == before
    wait_for(quiet, "an idle window without a wake-up of the loop", timeout=20)
    batch = Batch()
    q.put(batch)
    wait_for(lambda: got == [batch], "the batch")
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_the_end_marker_ends_the_loop() -> None:
    q: queue.Queue[Batch | None] = queue.Queue()
    stop = threading.Event()
    got: list[Batch] = []
    t = _reader(q, stop, got)
    q.put(None)
    t.join(5)
    assert not t.is_alive() and got == []


def test_a_stop_set_before_the_loop_starts_yields_nothing() -> None:
    q: queue.Queue[Batch | None] = queue.Queue()
    stop = threading.Event()
    stop.set()
    q.put(Batch())
    assert list(each_batch(q, stop)) == []
