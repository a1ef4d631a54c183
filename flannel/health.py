"""The health server (reference §12.1): ``/healthz`` (liveness) and ``/readyz`` (subnet.env written).

Plain HTTP, exact paths (a query string is ignored, as by Go's mux), anything else 404.
``/debug/leases`` is our extension: the remote leases the agent currently tracks, as JSON, so tests
and operators can see what the agent believes without reading its log.

**What /healthz says** (flannel answered 200 as long as the process ran). The daemon's worker
threads (watch, network, lease, traffic, health) report to a ``WorkerBoard``; a worker that fails
on an operational error is restarted with backoff (``flannel.supervise``). /healthz is a liveness
probe — a kubelet restarts the pod when it fails — and a restart does not help against a
transient problem such as another program holding the xtables lock for a minute. So:

* ``200 flanneld is running`` while every worker runs, and also while one is failing and being
  restarted, for up to ``UNHEALTHY_AFTER_SECONDS`` (5 min);
* ``503 flanneld is unhealthy: <worker> failing for <n>s (<k> failures in a row): <last error>``
  once a worker has been failing without a healthy run of ``STABLE_AFTER_SECONDS`` for longer
  than that. A restart of the agent is then worth trying (it keeps the kernel state, §12.4) and
  the failure is visible in ``kubectl get pods`` instead of only in a log;
* ``/healthz?verbose=1`` (or ``?verbose``): the same status code with a JSON body listing every
  worker's state (running / backoff / failed / stopped), restarts, failures in a row, how long it
  has been failing, its last error and when it retries.

``/metrics``: the agent's Prometheus registry (``flannel.metrics``, docs/metrics.md), in the text
format or OpenMetrics as the scraper's ``Accept`` header asks. It is on the health port because
that is the port a DaemonSet already exposes and probes; a scrape that fails answers 500 and is
logged, it never affects /healthz.
"""

from __future__ import annotations

import dataclasses
import http.server
import ipaddress
import json
import logging
import selectors
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from flannel import errors, stophooks

log = logging.getLogger(__name__)

LIVE_BODY = b"flanneld is running"
READY_BODY = b"flanneld is ready"
NOT_READY_BODY = b"flanneld is not ready yet"
UNHEALTHY_PREFIX = "flanneld is unhealthy: "

#: a worker failing (without a healthy run in between) for longer than this makes /healthz 503
UNHEALTHY_AFTER_SECONDS = 300.0
#: a run this long without failing ends a failure streak (backoff and /healthz start over)
STABLE_AFTER_SECONDS = 60.0

RUNNING, BACKOFF, FAILED, STOPPED = "running", "backoff", "failed", "stopped"


@dataclass(frozen=True)
class WorkerStatus:
    """One worker's state; times are ``time.monotonic()`` values (None = never)."""

    name: str
    state: str = RUNNING
    started_at: float = 0.0            # when the current (or last) run started
    restarts: int = 0                  # since the agent started
    streak: int = 0                    # failures in a row (0: healthy)
    failing_since: float | None = None  # first failure of the current streak
    last_error: str | None = None
    last_error_at: float | None = None
    retry_at: float | None = None


class WorkerBoard:
    """Thread-safe record of the daemon's workers, read by /healthz. ``clock`` is for tests."""

    def __init__(self, *, unhealthy_after: float = UNHEALTHY_AFTER_SECONDS,
                 stable_after: float = STABLE_AFTER_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.unhealthy_after = unhealthy_after
        self.stable_after = stable_after
        self.clock = clock
        self._workers: dict[str, WorkerStatus] = {}
        self._lock = threading.Lock()

    def _update(self, name: str, **changes: Any) -> WorkerStatus:
        with self._lock:
            status = dataclasses.replace(self._workers.get(name, WorkerStatus(name)), **changes)
            self._workers[name] = status
            return status

    def started(self, name: str) -> None:
        """A run of ``name`` starts (the first one or a restart)."""
        with self._lock:
            old = self._workers.get(name)
        restarts = 0 if old is None else old.restarts
        if old is not None and old.state == BACKOFF:
            restarts += 1
        self._update(name, state=RUNNING, started_at=self.clock(), restarts=restarts, retry_at=None)

    def failed(self, name: str, error: BaseException) -> int:
        """A run of ``name`` failed with ``error``; returns the failures in a row (for the backoff).

        A run that lasted ``stable_after`` or more starts a new streak: an error once a day is
        restarted after the shortest wait and does not count towards /healthz's threshold.
        """
        now = self.clock()
        with self._lock:
            old = self._workers.get(name, WorkerStatus(name, started_at=now))
        fresh = old.streak == 0 or now - old.started_at >= self.stable_after
        status = self._update(name, state=FAILED, streak=1 if fresh else old.streak + 1,
                              failing_since=now if fresh else old.failing_since,
                              last_error=describe_error(error), last_error_at=now)
        return status.streak

    def retrying(self, name: str, delay: float) -> None:
        self._update(name, state=BACKOFF, retry_at=self.clock() + delay)

    def stopped(self, name: str) -> None:
        self._update(name, state=STOPPED, retry_at=None)

    def streak(self, name: str) -> int:
        with self._lock:
            status = self._workers.get(name)
        return status.streak if status else 0

    def snapshot(self) -> dict[str, WorkerStatus]:
        with self._lock:
            return dict(self._workers)

    def _failing_for(self, status: WorkerStatus, now: float) -> float | None:
        """Seconds ``status`` has been failing, or None when it is healthy."""
        if status.failing_since is None or status.streak == 0:
            return None
        if status.state == RUNNING and now - status.started_at >= self.stable_after:
            return None      # restarted and has been fine for a while: the streak is over
        return now - status.failing_since

    def verdict(self) -> tuple[bool, str]:
        """(healthy, reason): unhealthy once a worker has been failing longer than ``unhealthy_after``."""
        now = self.clock()
        worst: tuple[float, WorkerStatus] | None = None
        for status in self.snapshot().values():
            failing = self._failing_for(status, now)
            if failing is not None and failing > self.unhealthy_after and (worst is None or failing > worst[0]):
                worst = (failing, status)
        if worst is None:
            return True, ""
        failing, status = worst
        return False, (f"{status.name} failing for {failing:.0f}s ({status.streak} failures in a row): "
                       f"{status.last_error}")

    def report(self) -> dict[str, Any]:
        """The verbose /healthz body."""
        now = self.clock()
        healthy, reason = self.verdict()
        workers: dict[str, Any] = {}
        for name, s in sorted(self.snapshot().items()):
            failing = self._failing_for(s, now)
            workers[name] = {
                "state": s.state,
                "restarts": s.restarts,
                "failures_in_a_row": s.streak if failing is not None else 0,
                "failing_for_s": None if failing is None else round(failing, 1),
                "last_error": s.last_error,
                "last_error_age_s": None if s.last_error_at is None else round(now - s.last_error_at, 1),
                "retry_in_s": None if s.retry_at is None else round(max(0.0, s.retry_at - now), 1),
            }
        return {"status": "ok" if healthy else "unhealthy", "reason": reason or None,
                "unhealthy_after_s": self.unhealthy_after, "workers": workers}


def describe_error(error: BaseException) -> str:
    """``BackendError: iptables ... timed out`` — the type tells a reader which kind of failure."""
    text = str(error).strip() or repr(error)
    return f"{type(error).__name__}: {text}"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], ready: threading.Event, debug: Callable[[], Any] | None,
                 board: WorkerBoard | None, metrics: CollectorRegistry | None = None) -> None:
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(addr[0]).version == 6 else socket.AF_INET
        self.ready = ready
        self.debug = debug
        self.board = board
        self.metrics = metrics
        super().__init__(addr, _Handler)
        self.timeout = 0   # serve() calls handle_request() only once the socket is readable: never wait in it


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _answer(self, *, head: bool = False) -> None:
        if urllib.parse.urlsplit(self.path).path == "/metrics" and self.server.metrics is not None:
            status, body, ctype = self._metrics(self.server.metrics)
        else:
            status, body = self._route()
            ctype = "application/json" if body.startswith((b"[", b"{")) else "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self) -> tuple[int, bytes]:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/healthz":
            return self._healthz("verbose" in urllib.parse.parse_qs(url.query, keep_blank_values=True))
        if url.path == "/readyz":
            return (200, READY_BODY) if self.server.ready.is_set() else (503, NOT_READY_BODY)
        if url.path == "/debug/leases" and self.server.debug is not None:
            return 200, json.dumps(self.server.debug()).encode()
        return 404, b"404 page not found\n"

    def _metrics(self, registry: CollectorRegistry) -> tuple[int, bytes, str]:
        try:
            encode, ctype = choose_encoder(self.headers.get("Accept", ""))
            return 200, encode(registry), ctype
        except Exception as e:  # a metrics bug must not take the health server down with it
            log.warning("/metrics: %s: %s", type(e).__name__, e)
            return 500, f"metrics unavailable: {type(e).__name__}: {e}\n".encode(), "text/plain"

    def _healthz(self, verbose: bool) -> tuple[int, bytes]:
        board = self.server.board
        healthy, reason = board.verdict() if board is not None else (True, "")
        status = 200 if healthy else 503
        if verbose:
            report = board.report() if board is not None else {"status": "ok", "workers": {}}
            return status, json.dumps(report, indent=1).encode()
        return status, LIVE_BODY if healthy else (UNHEALTHY_PREFIX + reason).encode()

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer(head=True)

    # flannel answers any method
    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health: %s " + format, self.address_string(), *args)


class HealthServer:
    """The server on ``ip:port``. ``ready`` is set by the daemon once subnet.env exists.

    ``bind()`` then ``serve(stop)`` on a worker thread (the daemon supervises it like its other
    workers), ``close()`` at the end. ``metrics``: the registry served at ``/metrics`` (404 without).
    """

    def __init__(self, ip: str, port: int, *, ready: threading.Event,
                 debug: Callable[[], Any] | None = None, board: WorkerBoard | None = None,
                 metrics: CollectorRegistry | None = None) -> None:
        self.ip, self.port = ip, port
        self.ready = ready
        self.debug = debug
        self.board = board
        self.metrics = metrics
        self._server: _Server | None = None

    def bind(self) -> None:
        """Bind the socket. A failure is fatal (flannel panics; we exit 1 with the reason)."""
        try:
            self._server = _Server((self.ip, self.port), self.ready, self.debug, self.board, self.metrics)
        except OSError as e:
            raise errors.FlannelError(f"cannot serve /healthz on {self.ip}:{self.port}: {e.strerror or e}") from e
        self.port = self._server.server_address[1]
        log.info("health server listening on %s:%d (/healthz, /readyz%s)", self.ip, self.port,
                 ", /metrics" if self.metrics is not None else "")

    def serve(self, stop: threading.Event) -> None:
        """Answer requests (each on its own thread) until ``stop`` is set.

        Why a selector with a wake-up socket instead of ``handle_request()`` with a timeout: the
        timeout (it was 0.2 s) woke this thread 5 times a second for the whole life of the agent
        only to look at ``stop`` — the biggest single source of idle wake-ups with --healthz-port.
        Now the thread sleeps until a client connects or a stop hook writes to the wake-up socket.
        """
        server = self._server
        if server is None:
            raise errors.FlannelError("the health server is not bound")
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        unregister = stophooks.on_stop(stop, lambda: _poke(wake_w))
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(server.socket, selectors.EVENT_READ)
                sel.register(wake_r, selectors.EVENT_READ)
                while not stop.is_set():
                    for key, _ in sel.select():
                        if key.fileobj is server.socket and not stop.is_set():
                            server.handle_request()   # accept, then a handler thread (timeout 0: no wait)
        finally:
            unregister()
            wake_r.close()
            wake_w.close()

    def close(self) -> None:
        if self._server is None:
            return
        self._server.server_close()
        self._server = None


def _poke(sock: socket.socket) -> None:
    """Wake a ``select`` on the other end of ``sock`` (a stop hook: quick, never raises)."""
    try:
        sock.send(b"\0")
    except OSError:   # full (already poked) or closed (serve() has returned)
        pass
