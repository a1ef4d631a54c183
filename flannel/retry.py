"""Named retry policies (tenacity). Never retry on bare Exception.

* ``store``        – the store (etcd / API server) is unreachable: back off 100 ms → 5 s, forever
                     until the stop event is set. Logs each wait so an operator sees what happens.
* ``lease_race``   – a create-if-absent lost a race: try another subnet, up to LEASE_RACE_ATTEMPTS.
* ``netlink``      – a transient netlink failure (EBUSY/EAGAIN/ENOBUFS): 10 tries, 100 ms·2ⁿ.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import tenacity

from flannel import errors

log = logging.getLogger(__name__)

LEASE_RACE_ATTEMPTS = 50


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
