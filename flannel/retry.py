"""Named retry policies (tenacity). Never retry on bare Exception.

* ``store``        – the store (etcd / API server) is unreachable: back off 100 ms → 5 s, forever
                     until the stop event is set. Logs each wait so an operator sees what happens.
* ``lease_race``   – a create-if-absent lost a race: try another subnet, up to LEASE_RACE_ATTEMPTS.
* ``netlink``      – a transient netlink failure (EBUSY/EAGAIN/ENOBUFS): 10 tries, 100 ms·2ⁿ.
* ``firewall``     – iptables/nft was busy (``errors.ResourceBusy``: the xtables lock, a command
                     timeout): FIREWALL_ATTEMPTS tries, 0.5 s·2ⁿ; then the error goes to the worker.
* ``worker``       – a daemon worker thread failed on an operational error (``is_operational``):
                     restart it after 1 s·2ⁿ (n = failures in a row), at most 30 s, until stop.
* ``watch``        – a long-running watch broke: re-establish it after 100 ms → 5 s, reset after
                     progress. A ``Backoff`` object, because a watch is a generator and a tenacity
                     attempt must not span a ``yield``.
* ``keep_lease``   – the lease keeper's store calls (read our key, watch it): any FlannelError,
                     100 ms → 5 s, until stop (the keeper never dies: etcd may come back, creds may
                     be fixed, a certificate may be rotated).
* ``renewal_backoff`` – when to try a failed renewal again: a quarter of the time the lease has
                     left, between 0.5 s and 60 s (flannel: always 1 min, too late for short TTLs).
* ``reacquire``    – acquiring a lost lease again failed for a non-transient reason (network full,
                     a refused write): every 10 s until stop, logged as an error.
"""

from __future__ import annotations

import logging
import random
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import tenacity

from flannel import errors

log = logging.getLogger(__name__)

LEASE_RACE_ATTEMPTS = 50
FIREWALL_ATTEMPTS = 3
WORKER_BACKOFF_MIN = 1.0
WORKER_BACKOFF_MAX = 30.0

#: what the environment throws at a worker: a tool that timed out or printed something we cannot
#: parse, a socket or file that failed, the store or the kernel refusing. ``FlannelError`` minus
#: ``ConfigError`` (see ``is_operational``). Anything else (TypeError, KeyError, RuntimeError, ...)
#: is a bug in our code, and restarting a thread does not fix a bug.
OPERATIONAL_ERRORS: tuple[type[BaseException], ...] = (
    errors.FlannelError, OSError, subprocess.SubprocessError, ValueError)


class _StopOnEvent(tenacity.stop.stop_base):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: Any) -> bool:
        return self.event.is_set()


class _SleepOnEvent:
    """Sleep that wakes up as soon as the stop event is set (so SIGTERM is honoured promptly)."""

    def __init__(self, event: threading.Event | None) -> None:
        self.event = event

    def __call__(self, seconds: float) -> None:
        if self.event is None:
            threading.Event().wait(seconds)
        else:
            self.event.wait(seconds)


def store(stop: threading.Event | None, *, what: str, max_wait: float = 5.0) -> tenacity.Retrying:
    """Retry while the store is unavailable, until ``stop`` is set (then re-raise the last error)."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors.StoreUnavailable),
        wait=tenacity.wait_exponential(multiplier=0.1, min=0.1, max=max_wait),
        stop=_StopOnEvent(stop) if stop is not None else tenacity.stop_never,
        sleep=_SleepOnEvent(stop),
        before_sleep=_log_wait(what),
        reraise=True,
    )


def keep_lease(stop: threading.Event, *, what: str) -> tenacity.Retrying:
    """Retry any FlannelError of the lease keeper's store calls, 100 ms → 5 s, until ``stop``."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors.FlannelError),
        wait=tenacity.wait_exponential(multiplier=0.1, min=0.1, max=5.0),
        stop=_StopOnEvent(stop),
        sleep=_SleepOnEvent(stop),
        before_sleep=_log_wait(what),
        reraise=True,
    )


REACQUIRE_WAIT_SECONDS = 10.0


def reacquire(stop: threading.Event) -> tenacity.Retrying:
    """Acquire a lost lease again: any FlannelError is logged and retried every 10 s until ``stop``
    (StoreUnavailable is already retried inside the acquisition, with the ``store`` policy)."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors.FlannelError),
        wait=tenacity.wait_fixed(REACQUIRE_WAIT_SECONDS),
        stop=_StopOnEvent(stop),
        sleep=_SleepOnEvent(stop),
        before_sleep=_log_wait("acquiring a lease again", logging.ERROR),
        reraise=True,
    )


RENEW_RETRY_MAX_SECONDS = 60.0


def renewal_backoff(seconds_left: float) -> float:
    """Seconds to wait before retrying a failed renewal of a lease with ``seconds_left`` to live."""
    return min(RENEW_RETRY_MAX_SECONDS, max(0.5, seconds_left / 4))


class Backoff:
    """A named exponential backoff for a loop that tenacity cannot wrap: a watch generator (an
    attempt must not span a ``yield``: tenacity would swallow GeneratorExit). ``failed`` logs and
    sleeps the next delay (waking up at once when ``stop`` is set); ``reset`` after progress."""

    def __init__(self, stop: threading.Event, *, what: str, wait: tenacity.wait.wait_base) -> None:
        self._stop, self._what, self._wait = stop, what, wait
        self.attempt = 0

    def next_delay(self) -> float:
        self.attempt += 1
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self.attempt
        return float(self._wait(state))

    def failed(self, error: BaseException, *, level: int = logging.WARNING, resume: str = "") -> None:
        delay = self.next_delay()
        log.log(level, "%s failed (attempt %d): %s; %sretrying in %.1fs", self._what, self.attempt, error,
                f"{resume} " if resume else "", delay)
        self._stop.wait(delay)

    def reset(self) -> None:
        self.attempt = 0


def watch(stop: threading.Event, *, what: str) -> Backoff:
    """Re-establish a broken watch after 100 ms, doubling to 5 s; reset after a good response."""
    return Backoff(stop, what=what, wait=tenacity.wait_exponential(multiplier=0.1, min=0.1, max=5.0))


def lease_race() -> tenacity.Retrying:
    """Retry a lost create race (another node took the subnet between our list and our create)."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors.LeaseConflict),
        wait=tenacity.wait_random(0, 0.05),
        stop=tenacity.stop_after_attempt(LEASE_RACE_ATTEMPTS),
        before_sleep=_log_wait("creating the lease (lost a race for the subnet)", logging.INFO),
        reraise=True,
    )


def _log_wait(what: str, level: int = logging.WARNING) -> Any:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.log(level, "%s failed (attempt %d): %s; retrying in %.1fs", what, state.attempt_number, exc, wait)
    return before_sleep


def firewall(what: str) -> tenacity.Retrying:
    """Retry an iptables/nft call that found the tool busy (``errors.ResourceBusy``).

    A few quick tries ride out another program's short iptables-restore (kube-proxy holds the
    xtables lock for a few seconds on a busy node); a longer hold is reported to the caller, whose
    worker is then restarted with the ``worker`` backoff and shows up in ``/healthz?verbose``.
    """
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors.ResourceBusy),
        wait=tenacity.wait_exponential(multiplier=0.5, min=0.5, max=4.0),
        stop=tenacity.stop_after_attempt(FIREWALL_ATTEMPTS),
        before_sleep=_log_wait(what),
        reraise=True,
    )


def is_operational(exc: BaseException) -> bool:
    """True for an error a restart of the failing worker can get past (see OPERATIONAL_ERRORS).

    A ``ConfigError`` (including ``ConfigChanged``) is not: the agent must stop and say what to fix.
    """
    return isinstance(exc, OPERATIONAL_ERRORS) and not isinstance(exc, errors.ConfigError)


def worker_backoff(streak: int) -> float:
    """Seconds before restart number ``streak`` (failures in a row, ≥ 1): 1, 2, 4, ... 30, +≤10 % jitter."""
    doublings = min(max(0, streak - 1), 16)      # bounded: a worker may fail for days
    base = min(WORKER_BACKOFF_MAX, WORKER_BACKOFF_MIN * 2.0 ** doublings)
    return base * (1 + random.uniform(0, 0.1))


def worker(stop: threading.Event, *, streak: Callable[[], int],
           before_sleep: Callable[[tenacity.RetryCallState], None]) -> tenacity.Retrying:
    """Restart a worker that failed on an operational error, with backoff, until ``stop`` is set.

    ``streak`` returns the worker's failures in a row (the supervisor resets it after a long
    healthy run, so an error once a day does not wait 30 s); ``before_sleep`` reports the
    failure and the wait (log line, /healthz). A non-operational error, or any error once ``stop``
    is set, is re-raised to the supervisor.
    """
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_operational),
        wait=lambda state: worker_backoff(streak()),
        stop=_StopOnEvent(stop),
        sleep=_SleepOnEvent(stop),
        before_sleep=before_sleep,
        reraise=True,
    )
