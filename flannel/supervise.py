"""Supervision of the daemon's worker threads: what a failure costs.

A worker (watch, network, lease, traffic, health) runs one long loop. When it raises:

* an **operational error** (``retry.is_operational``: a ``FlannelError`` that is not a
  ``ConfigError`` — a store, backend or busy-tool error —, ``OSError``, a ``subprocess`` timeout,
  a ``ValueError`` from parsing a tool's output) is the environment failing, and a restart gets
  past it: the worker is restarted after the ``retry.worker`` backoff (1 s, 2 s, ... 30 s), each
  failure is logged with the wait, and the ``WorkerBoard`` behind ``/healthz`` shows it;
* a ``ConfigError`` (e.g. ``ConfigChanged``: the network in the store changed) stops the agent
  with exit 1 and a message naming the thread and what changed, so that its supervisor restarts
  it with the new config;
* anything else is a bug in our code: the traceback is logged and the agent stops (exit 1) with
  a message naming the thread — a restart of the thread would only repeat the bug, and a
  half-working agent is worse than a visible crash. Loops that guard their own steps
  (``RoutedNetwork.run``, the udp loop) keep their guard: a failing step is retried there.

A loop that must run until stop (``until_stop``) and returns early counts as an operational
failure (restarted). A failure while the agent is stopping is only logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import tenacity

from flannel import errors, retry
from flannel.health import WorkerBoard, describe_error

log = logging.getLogger(__name__)


def run(name: str, target: Callable[[], None], *, stop: threading.Event, board: WorkerBoard,
        until_stop: bool = False) -> None:
    """Run ``target`` on this thread under the policy above.

    Returns when ``target`` returns (or, with ``until_stop``, once ``stop`` is set); raises the
    error that must stop the agent (see ``stop_error``), or the last error if ``stop`` was set
    while the worker was failing.
    """
    def once() -> None:
        if stop.is_set():       # stop came during the backoff: no restart
            return
        board.started(name)
        try:
            target()
            if until_stop and not stop.is_set():
                raise errors.FlannelError(f"the {name} loop ended unexpectedly")
        except BaseException as e:
            board.failed(name, e)
            raise

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        board.retrying(name, delay)
        status = board.snapshot()[name]
        log.warning("the %s thread failed: %s; restarting it in %.1fs (failure %d in a row)",
                    name, describe_error(exc) if exc else "?", delay, status.streak)
        if exc is not None:
            log.debug("the %s thread failed here:", name, exc_info=exc)

    try:
        for attempt in retry.worker(stop, streak=lambda: board.streak(name), before_sleep=before_sleep):
            with attempt:
                once()
    finally:
        board.stopped(name)


def stop_error(name: str, exc: BaseException) -> errors.FlannelError:
    """The error that stops the agent because worker ``name`` raised ``exc`` (not restartable).

    The message names the thread and the cause; the original is chained as ``__cause__``.
    """
    if isinstance(exc, errors.ConfigChanged):
        msg = (f"{exc} (noticed by the {name} thread); exiting with status 1 so that the supervisor "
               "(systemd, the DaemonSet) restarts flannel with the new configuration")
    elif isinstance(exc, errors.ConfigError):
        msg = f"configuration error in the {name} thread: {exc}"
    elif retry.is_operational(exc):
        msg = f"the {name} thread failed: {describe_error(exc)}"
    else:
        log.error("internal error in the %s thread", name, exc_info=exc)
        msg = (f"internal error (a bug) in the {name} thread: {describe_error(exc)}; stopping flannel "
               "(the traceback is in the log above; please report it)")
    err: errors.FlannelError = errors.FlannelError(msg)
    if isinstance(exc, errors.ConfigError):
        try:   # keep the class (ConfigChanged, StoreTLSError, ...): callers and tests tell them apart
            err = type(exc)(msg)
        except TypeError:
            pass
    err.__cause__ = exc
    return err
