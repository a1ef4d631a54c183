"""flannel.stophooks: a hook runs once when its stop event is set (or at once if it already is),
an unregistered hook never runs, a failing hook does not keep the others from running, and the
helper thread leaves once the event fired."""

from __future__ import annotations

import logging
import threading

import pytest

from flannel import stophooks
from tests.support import wait_for


def test_a_hook_runs_once_when_stop_is_set() -> None:
    stop = threading.Event()
    calls: list[str] = []
    stophooks.on_stop(stop, lambda: calls.append("a"))
    assert calls == []
    stop.set()
    wait_for(lambda: calls == ["a"], "the hook to run")
    wait_for(lambda: id(stop) not in stophooks._helpers, "the helper to leave")
    assert calls == ["a"]


def test_a_hook_registered_after_stop_runs_at_once() -> None:
    stop = threading.Event()
    stop.set()
    calls: list[int] = []
    unhook = stophooks.on_stop(stop, lambda: calls.append(1))
    assert calls == [1]
    unhook()  # harmless


def test_an_unregistered_hook_never_runs() -> None:
    stop = threading.Event()
    calls: list[str] = []
    unhook = stophooks.on_stop(stop, lambda: calls.append("gone"))
    stophooks.on_stop(stop, lambda: calls.append("kept"))
    unhook()
    unhook()  # idempotent
    stop.set()
    wait_for(lambda: calls == ["kept"], "the remaining hook to run")


def test_a_failing_hook_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    calls: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")
    stophooks.on_stop(stop, boom)
    stophooks.on_stop(stop, lambda: calls.append("after"))
    with caplog.at_level(logging.ERROR, logger="flannel.stophooks"):
        stop.set()
        wait_for(lambda: calls == ["after"], "the second hook to run")
    assert "stop hook" in caplog.text and "boom" in caplog.text


def test_one_helper_per_stop_event() -> None:
    stop = threading.Event()
    for _ in range(5):
        stophooks.on_stop(stop, lambda: None)
    helper = stophooks._helpers[id(stop)]
    assert len(helper.hooks) == 5
    stop.set()
    helper.thread.join(10)
    assert not helper.thread.is_alive()
