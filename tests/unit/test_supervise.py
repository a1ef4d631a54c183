"""Worker supervision (flannel.supervise, retry.worker) and the WorkerBoard behind /healthz.

Pure logic: targets are plain functions, the board gets a fake clock. The daemon-level behaviour
(real threads, real HTTP) is in tests/integration/test_daemon_lifecycle.py.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import pytest

from flannel import errors, retry, supervise
from flannel.health import BACKOFF, FAILED, RUNNING, STOPPED, WorkerBoard


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "WORKER_BACKOFF_MIN", 0.01)
    monkeypatch.setattr(retry, "WORKER_BACKOFF_MAX", 0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing(errs: list[BaseException], then: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """A target that raises the given errors on its first calls, then runs ``then``."""
    calls = iter(errs)

    def target() -> None:
        e = next(calls, None)
        if e is not None:
            raise e
        then()
    return target


OPERATIONAL = [
    errors.StoreError("etcd went away"),
    errors.StoreUnavailable("no endpoint"),
    errors.BackendError("route add failed"),
    errors.ResourceBusy("xtables lock"),
    OSError(104, "Connection reset by peer"),
    subprocess.TimeoutExpired(["iptables", "-w", "5"], 30),
    subprocess.CalledProcessError(1, ["ip"]),
    ValueError("Expecting value: line 1 column 1 (char 0)"),
]


@pytest.mark.parametrize("exc", OPERATIONAL, ids=lambda e: type(e).__name__)
def test_operational_errors_restart_the_worker(exc: BaseException) -> None:
    board = WorkerBoard()
    stop = threading.Event()
    done = []
    supervise.run("w", failing([exc, exc], then=lambda: done.append(1)), stop=stop, board=board)
    assert done == [1]
    status = board.snapshot()["w"]
    assert status.restarts == 2 and status.state == STOPPED
    assert status.last_error is not None and type(exc).__name__ in status.last_error


@pytest.mark.parametrize("exc", [errors.ConfigError("SubnetLen: bad"), errors.ConfigChanged("Network changed"),
                                 RuntimeError("boom"), TypeError("x"), KeyError("k"), RecursionError("deep")],
                         ids=lambda e: type(e).__name__)
def test_config_errors_and_bugs_are_not_retried(exc: BaseException) -> None:
    board = WorkerBoard()
    calls = []

    def target() -> None:
        calls.append(1)
        raise exc
    with pytest.raises(type(exc)):
        supervise.run("w", target, stop=threading.Event(), board=board)
    assert calls == [1]
    assert board.snapshot()["w"].restarts == 0


def test_a_loop_that_ends_before_stop_is_restarted_until_stop() -> None:
    board = WorkerBoard()
    stop = threading.Event()
    runs = []

    def loop() -> None:
        runs.append(1)
        if len(runs) == 3:
            stop.set()
    supervise.run("loop", loop, stop=stop, board=board, until_stop=True)
    assert len(runs) == 3
    assert "the loop loop ended unexpectedly" in (board.snapshot()["loop"].last_error or "")


def test_stop_during_backoff_ends_with_the_last_error() -> None:
    stop = threading.Event()

    def target() -> None:
        stop.set()
        raise errors.StoreError("down")
    with pytest.raises(errors.StoreError):
        supervise.run("w", target, stop=stop, board=WorkerBoard())


def test_stop_error_names_the_thread_and_the_cause() -> None:
    changed = supervise.stop_error("watch", errors.ConfigChanged("Network in etcd changed from 10.5.0.0/16 to "
                                                                 "10.6.0.0/16"))
    assert "10.6.0.0/16" in str(changed) and "watch thread" in str(changed) and "restarts flannel" in str(changed)
    assert isinstance(changed.__cause__, errors.ConfigChanged)
    bug = supervise.stop_error("lease", KeyError("subnet"))
    assert str(bug).startswith("internal error (a bug) in the lease thread: KeyError")
    config = supervise.stop_error("traffic", errors.ConfigError("bad"))
    assert str(config) == "configuration error in the traffic thread: bad"


def test_is_operational() -> None:
    assert all(retry.is_operational(e) for e in OPERATIONAL)
    assert not retry.is_operational(errors.ConfigChanged("x"))
    assert not retry.is_operational(errors.UsageError("x"))
    assert not retry.is_operational(AttributeError("x"))


def test_worker_backoff_doubles_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "WORKER_BACKOFF_MIN", 1.0)
    monkeypatch.setattr(retry, "WORKER_BACKOFF_MAX", 30.0)
    waits = [retry.worker_backoff(n) for n in (1, 2, 3, 5, 6, 10**6)]
    for got, base in zip(waits, (1, 2, 4, 16, 30, 30), strict=True):
        assert base <= got <= base * 1.1


# ---- the board ---------------------------------------------------------------------------------

def test_board_healthy_while_retrying_unhealthy_after_the_threshold() -> None:
    clock = Clock()
    board = WorkerBoard(unhealthy_after=300, stable_after=60, clock=clock)
    board.started("traffic")
    board.started("watch")
    clock.now += 100
    assert board.failed("traffic", errors.ResourceBusy("xtables lock busy")) == 1
    board.retrying("traffic", 1.0)
    assert board.verdict() == (True, "")
    report = board.report()
    assert report["status"] == "ok"
    assert report["workers"]["traffic"]["state"] == BACKOFF
    assert report["workers"]["traffic"]["retry_in_s"] == 1.0
    assert report["workers"]["traffic"]["last_error"] == "ResourceBusy: xtables lock busy"
    assert report["workers"]["watch"] == {"state": RUNNING, "restarts": 0, "failures_in_a_row": 0,
                                          "failing_for_s": None, "last_error": None, "last_error_age_s": None,
                                          "retry_in_s": None}
    # it keeps failing shortly after each restart: one streak
    for _ in range(10):
        clock.now += 1
        board.started("traffic")
        clock.now += 30
        board.failed("traffic", errors.ResourceBusy("xtables lock busy"))
        board.retrying("traffic", 30)
    healthy, reason = board.verdict()
    assert not healthy
    assert reason == "traffic failing for 310s (11 failures in a row): ResourceBusy: xtables lock busy"
    assert board.report()["status"] == "unhealthy"
    assert board.snapshot()["traffic"].restarts == 10


def test_board_a_long_healthy_run_ends_the_streak() -> None:
    clock = Clock()
    board = WorkerBoard(unhealthy_after=300, stable_after=60, clock=clock)
    board.started("watch")
    board.failed("watch", errors.StoreError("a"))
    board.retrying("watch", 1)
    clock.now += 1
    board.started("watch")
    clock.now += 400        # runs fine for longer than stable_after and than unhealthy_after
    assert board.verdict() == (True, "")
    assert board.report()["workers"]["watch"]["failures_in_a_row"] == 0
    assert board.failed("watch", errors.StoreError("b")) == 1      # a new streak, shortest backoff
    assert board.snapshot()["watch"].state == FAILED
    assert board.verdict() == (True, "")


def test_stop_during_the_backoff_does_not_restart() -> None:
    stop = threading.Event()
    runs = []

    class StopWhileWaiting(WorkerBoard):
        def retrying(self, name: str, delay: float) -> None:
            super().retrying(name, delay)
            stop.set()          # SIGTERM arrives just as the supervisor starts its wait

    def target() -> None:
        runs.append(1)
        raise errors.StoreError("down")
    supervise.run("w", target, stop=stop, board=StopWhileWaiting())
    assert runs == [1]
