"""The health server (reference §12.1): ``/healthz`` (liveness) and ``/readyz`` (subnet.env written).

Plain HTTP on its own thread, exact paths, anything else 404. ``/debug/leases`` is our extension:
the remote leases the agent currently tracks, as JSON, so tests and operators can see what the
agent believes without reading its log.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from flannel import errors

log = logging.getLogger(__name__)

LIVE_BODY = b"flanneld is running"
READY_BODY = b"flanneld is ready"
NOT_READY_BODY = b"flanneld is not ready yet"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], ready: threading.Event, debug: Callable[[], Any] | None) -> None:
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(addr[0]).version == 6 else socket.AF_INET
        self.ready = ready
        self.debug = debug
        super().__init__(addr, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _answer(self, *, head: bool = False) -> None:
        status, body = self._route()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body.startswith((b"[", b"{")) else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self) -> tuple[int, bytes]:
        if self.path == "/healthz":
            return 200, LIVE_BODY
        if self.path == "/readyz":
            return (200, READY_BODY) if self.server.ready.is_set() else (503, NOT_READY_BODY)
        if self.path == "/debug/leases" and self.server.debug is not None:
            return 200, json.dumps(self.server.debug()).encode()
        return 404, b"404 page not found\n"

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
    """Serve on ``ip:port`` from a thread. ``ready`` is set by the daemon once subnet.env exists."""

    def __init__(self, ip: str, port: int, *, ready: threading.Event,
                 debug: Callable[[], Any] | None = None) -> None:
        self.ip, self.port = ip, port
        self.ready = ready
        self.debug = debug
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve. A bind failure is fatal (flannel panics; we exit 1 with the reason)."""
        try:
            self._server = _Server((self.ip, self.port), self.ready, self.debug)
        except OSError as e:
            raise errors.FlannelError(f"cannot serve /healthz on {self.ip}:{self.port}: {e.strerror or e}") from e
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="health", daemon=True)
        self._thread.start()
        log.info("health server listening on %s:%d (/healthz, /readyz)", self.ip, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
