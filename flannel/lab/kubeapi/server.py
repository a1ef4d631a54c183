"""HTTP front of the stand-in API server (see the package docstring for what it does and doesn't do).

``http.server`` with a thread per connection, HTTP/1.1 keep-alive, and chunked streaming for
watches, which is what the real API server sends to the ``kubernetes`` client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flannel.lab.kubeapi.state import (
    JSON,
    APIError,
    ClusterState,
    Event,
    make_node,
    make_pod,
    now_rfc3339,
)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = "system:serviceaccount:kube-flannel:flannel"
_CT_JSON = "application/json"
_PATCH_TYPES = {"application/strategic-merge-patch+json": True, "application/merge-patch+json": False}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: KubeAPIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _raw_body = b""

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("kubeapi %s " + fmt, self.client_address[0], *args)

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.api._track(self.connection, False)

    # -- plumbing --------------------------------------------------------------------------

    def _send_json(self, code: int, obj: JSON) -> None:
        self._send_bytes(code, json.dumps(obj, separators=(",", ":")).encode())

    def _send_bytes(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", _CT_JSON)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: APIError) -> None:
        self._send_json(err.code, err.status())

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self._raw_body = self.rfile.read(length) if length else b""
        if self.path.startswith("/_test/"):
            return None  # test hooks take raw bytes or query parameters
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            raise APIError(400, "BadRequest", f"the body of the request was in an unknown format: {e}") from None

    def _authorize(self, verb: str, resource: str, name: str = "") -> None:
        api = self.server.api
        if api.token is not None and self.headers.get("Authorization") != f"Bearer {api.token}":
            raise APIError(401, "Unauthorized", "Unauthorized")
        if (verb, resource) in api.denied:
            kind = resource.split("/")[0]
            who = f'{kind} "{name}"' if name else kind
            raise APIError(403, "Forbidden",
                           f'{who} is forbidden: User "{SERVICE_ACCOUNT}" cannot {verb} resource "{resource}" '
                           'in API group "" at the cluster scope', {"name": name, "kind": kind})

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            self._route(method, parts, query)
        except APIError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- routes ----------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str], query: dict[str, str]) -> None:
        state = self.server.api.state
        body = self._body() if method in ("POST", "PATCH", "PUT") else None
        if parts == ["version"] and method == "GET":
            return self._send_json(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0-flannel-standin"})
        if parts[:1] == ["_test"] and method == "POST":
            self._authorize("create", "_test")
            return self._test_hook(parts[1:], query)
        if parts[:2] != ["api", "v1"]:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        rest = parts[2:]
        if rest == ["nodes"]:
            if self._route_nodes(method, query, body):
                return None
        elif len(rest) in (2, 3) and rest[0] == "nodes" and (len(rest) == 2 or rest[2] == "status"):
            if self._route_node(method, rest[1], rest[2] if len(rest) == 3 else None, body):
                return None
        elif len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "pods" and method == "GET":
            self._authorize("get", "pods", rest[3])
            return self._send_json(200, state.get_pod(rest[1], rest[3]))
        raise APIError(405 if rest[:1] in (["nodes"], ["namespaces"]) else 404,
                       "MethodNotAllowed" if rest[:1] in (["nodes"], ["namespaces"]) else "NotFound",
                       f"{method} {self.path} is not supported by the stand-in API server")

    def _route_nodes(self, method: str, query: dict[str, str], body: Any) -> bool:
        """``/api/v1/nodes``: watch, list, create. False if ``method`` is not served there."""
        state = self.server.api.state
        if method == "GET" and query.get("watch") in ("1", "true", "True"):
            self._authorize("watch", "nodes")
            self._watch(query)
            return True
        if method == "GET":
            self._authorize("list", "nodes")
            try:
                limit = int(query.get("limit") or 0)
            except ValueError:
                raise APIError(400, "BadRequest", f"invalid limit {query.get('limit')!r}") from None
            items, rv, token, rest = state.list_page(limit=limit, token=query.get("continue", ""))
            self.server.api.list_requests += 1
            meta: JSON = {"resourceVersion": str(rv)}
            if token:
                meta.update({"continue": token, "remainingItemCount": rest})
            # list items carry no kind/apiVersion, like the real server
            data = (b'{"kind":"NodeList","apiVersion":"v1","metadata":' + json.dumps(meta).encode()
                    + b',"items":[' + b",".join(state.item_json(item) for item in items) + b"]}")
            self._send_bytes(200, data)
            return True
        if method == "POST":
            self._authorize("create", "nodes")
            if not isinstance(body, dict):
                raise APIError(400, "BadRequest", "node body must be a JSON object")
            self._send_json(201, state.create_node(body))
            return True
        return False

    def _route_node(self, method: str, name: str, sub: str | None, body: Any) -> bool:
        """``/api/v1/nodes/<name>[/status]``: get, patch, delete. False if ``method`` is not served there."""
        state = self.server.api.state
        resource = "nodes/status" if sub else "nodes"
        if method == "GET":
            self._authorize("get", resource, name)
            self._send_json(200, state.get_node(name))
            return True
        if method == "PATCH":
            self._authorize("patch", resource, name)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype not in _PATCH_TYPES:
                raise APIError(415, "UnsupportedMediaType", f'the body of the request was in an unknown format - '
                               f'accepted media types include: {", ".join(_PATCH_TYPES)}')
            if not isinstance(body, dict):
                raise APIError(400, "BadRequest", "patch body must be a JSON object")
            self._send_json(200, state.patch_node(name, body, strategic=_PATCH_TYPES[ctype], subresource=sub))
            return True
        if method == "DELETE" and not sub:
            self._authorize("delete", "nodes", name)
            state.delete_node(name)
            self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                  "status": "Success", "details": {"name": name, "kind": "nodes"}})
            return True
        return False

    def _test_hook(self, parts: list[str], query: dict[str, str]) -> None:
        api = self.server.api
        outage = 0.0
        if parts == ["cut-watches"]:
            api.cut_watches()
        elif parts == ["compact"]:
            api.compact()
        elif parts == ["outage"]:
            try:
                outage = float(query.get("seconds", ""))
            except ValueError:
                raise APIError(400, "BadRequest", "outage needs ?seconds=N") from None
            if not 0 < outage <= 3600:
                raise APIError(400, "BadRequest", "outage seconds must be in (0, 3600]")
        elif parts == ["heartbeat"]:  # ?count=N: the first N nodes (by name), default all
            count = int(query.get("count") or 0)
            names = sorted(api.state.list_page()[0], key=lambda n: n["metadata"]["name"]) if count else None
            done = api.state.heartbeat_nodes([n["metadata"]["name"] for n in names[:count]] if names else None)
            return self._send_json(200, {"ok": True, "heartbeats": done,
                                         "resourceVersion": str(api.state.resource_version)})
        elif parts == ["inject-line"]:
            api.state.inject_raw(self._raw_body)
        else:
            raise APIError(404, "NotFound", f"unknown test hook {'/'.join(parts)}")
        self._send_json(200, {"ok": True, "resourceVersion": str(api.state.resource_version)})
        if outage:  # after answering: the outage also breaks this connection
            threading.Thread(target=api.outage, args=(outage,), name="kubeapi-outage", daemon=True).start()

    # -- watch -----------------------------------------------------------------------------

    def _chunk(self, obj: JSON) -> None:
        self._chunk_bytes(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def _chunk_bytes(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, query: dict[str, str]) -> None:
        """Like the watch cache: events after the version, a BOOKMARK about every
        ``bookmark_interval`` seconds (real servers: once a minute) and 2 s before the deadline when
        ``allowWatchBookmarks`` is set, and a normal end of the stream at ``timeoutSeconds``."""
        api, state = self.server.api, self.server.api.state
        rv_text = query.get("resourceVersion", "")
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
        try:
            cursor = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            raise APIError(400, "BadRequest", f"invalid resourceVersion {rv_text!r}") from None
        # the epoch is read before the request counts as arrived: a cut_watches() made by anyone
        # who saw it arrive (watch_requests, the access log) must reach this stream too
        with state.cond:
            epoch = state.epoch
        with api._conns_lock:
            api.watch_requests += 1
            seq = api.watch_requests
        if api.hang_watches.is_set():  # accept, never answer (an overloaded or wedged server)
            while api.hang_watches.is_set() and not state.closed:
                time.sleep(0.05)
            return self._drop_connection()
        self.send_response(200)
        self.send_header("Content-Type", _CT_JSON)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if cursor is None:  # "get state and start at most recent": synthetic ADDED for everything
            items, cursor = state.list_nodes()
            for item in items:
                self._chunk({"type": "ADDED", "object": item})
        start = time.monotonic()
        deadline = start + timeout
        next_bookmark = start + api.bookmark_interval
        final_bookmark = deadline - 2.0 if timeout > 2.0 else None
        while True:
            wake = min(deadline, next_bookmark, final_bookmark or deadline)
            events, expired, cut, current = self._wait_events(cursor, epoch, wake)
            if seq <= api.frozen_upto and not cut:  # wedged: the connection stays up, nothing is sent
                time.sleep(0.1)
                continue
            if cut:
                return self._vanish() if api.aborting else self._drop_connection()
            if expired is not None:
                self._chunk({"type": "ERROR", "object": expired.status()})
                return self._end_stream()
            for ev in events:
                self._chunk_bytes(ev.data)
                cursor = ev.rv
            now = time.monotonic()
            if now >= deadline:
                return self._end_stream()
            due = now >= next_bookmark or (final_bookmark is not None and now >= final_bookmark)
            if bookmarks and due:
                cursor = max(cursor, current)
                self._chunk({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                             "metadata": {"resourceVersion": str(cursor)}}})
                api.bookmarks_sent += 1
            if now >= next_bookmark:
                next_bookmark = now + api.bookmark_interval
            if final_bookmark is not None and now >= final_bookmark:
                final_bookmark = None

    def _wait_events(self, cursor: int, epoch: int, until: float) -> tuple[list[Event], APIError | None, bool, int]:
        """Wait (at most until the monotonic time ``until``) for events after ``cursor``.

        Returns (events, the 410 if ``cursor`` fell out of the window, whether the watch was cut
        by a restart or close of the state, the current resource version)."""
        state = self.server.api.state
        expired: APIError | None = None
        with state.cond:
            try:
                events = state.events_after(cursor)
            except APIError as e:
                events, expired = [], e
            while not events and expired is None and state.epoch == epoch and not state.closed:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                state.cond.wait(remaining)
                try:
                    events = state.events_after(cursor)
                except APIError as e:
                    expired = e
            return events, expired, state.epoch != epoch or state.closed, state.resource_version

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop_connection(self) -> None:
        """What a dying server or a broken network looks like: the stream stops mid-way."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _vanish(self) -> None:
        """What a host that vanished looks like: this end of the connection is gone with a reset
        (which the client only sees if the path to it is open), and nothing is sent again."""
        self.close_connection = True
        _abort(self.connection)


def _abort(conn: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel forgets the connection at once and sends a RST (no FIN
    that would be retransmitted until the client hears it)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.close()


class KubeAPIServer:
    """The stand-in, in-process. ``start()``/``stop()`` may be called repeatedly (the state and the
    port survive a stop, like an API server restart in front of the same etcd).

    :param netns: create the listening socket inside this named network namespace (the serving
        threads may run anywhere: accepted sockets belong to the listener's namespace).
    :param token: bearer token required on every request (``None``: no authentication).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 netns: str | None = None, history_limit: int = 1000, bookmark_interval: float = 60.0) -> None:
        self.host, self.port, self.token, self.netns = host, port, token, netns
        self.state = ClusterState(history_limit=history_limit)
        self.bookmark_interval = bookmark_interval
        self.denied: set[tuple[str, str]] = set()
        #: while set, watch requests are accepted but never answered
        self.hang_watches = threading.Event()
        #: how many watch / list requests arrived and bookmarks went out (tests wait on them)
        self.watch_requests = 0
        self.list_requests = 0
        self.bookmarks_sent = 0
        #: set by abort_connections(): cut watches vanish instead of closing
        self.aborting = False
        #: watches up to this request number are wedged (freeze_watches)
        self.frozen_upto = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> KubeAPIServer:
        if self._server is not None:
            return self
        if self.netns:
            from flannel.lab.netns import in_netns

            with in_netns(self.netns):
                server = _Server((self.host, self.port), _Handler)
        else:
            server = _Server((self.host, self.port), _Handler)
        server.api = self
        self.port = server.server_address[1]
        with self.state.cond:
            self.state.closed = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"kubeapi-{self.port}", daemon=True)
        self._thread.start()
        log.info("stand-in API server listening on %s%s", self.url, f" (netns {self.netns})" if self.netns else "")
        return self

    def stop(self) -> None:
        """Stop listening and break every open connection (watches see a dropped stream)."""
        server, self._server = self._server, None
        if server is None:
            return
        with self.state.cond:
            self.state.closed = True
            self.state.cond.notify_all()
        server.shutdown()
        server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    close = stop

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # -- test hooks ------------------------------------------------------------------------

    def add_node(self, name: str, pod_cidrs: list[str] | tuple[str, ...] = (), **kw: Any) -> JSON:
        """Register a node (see ``make_node`` for the keyword arguments)."""
        return self.state.create_node(make_node(name, pod_cidrs=pod_cidrs, **kw))

    def modify_node(self, name: str, patch: JSON, *, strategic: bool = True, subresource: str | None = None) -> JSON:
        """Change a node as another client would (a patch of the main resource by default)."""
        return self.state.patch_node(name, patch, strategic=strategic, subresource=subresource)

    def set_annotations(self, name: str, annotations: dict[str, str | None]) -> JSON:
        """Set (or, with ``None``, remove) annotations on a node."""
        return self.modify_node(name, {"metadata": {"annotations": annotations}})

    def heartbeat(self, name: str) -> JSON:
        """What the kubelet does every few seconds: a status change flannel must ignore."""
        return self.state.patch_node(name, {"status": {"conditions": [
            {"type": "Ready", "lastHeartbeatTime": now_rfc3339(), "message": f"beat {time.monotonic()}"}]}},
            strategic=True, subresource="status")

    def delete_node(self, name: str) -> JSON:
        return self.state.delete_node(name)

    def get_node(self, name: str) -> JSON:
        return self.state.get_node(name)

    def add_pod(self, namespace: str, name: str, node_name: str) -> JSON:
        return self.state.put_pod(make_pod(namespace, name, node_name))

    def deny(self, verb: str, resource: str) -> None:
        """Answer 403 Forbidden for ``verb`` on ``resource`` (e.g. ``("patch", "nodes/status")``)."""
        self.denied.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        self.denied.discard((verb, resource))

    def cut_watches(self) -> None:
        """Break every open watch connection mid-stream (clients must re-watch)."""
        self.state.cut_watches()

    def compact(self) -> int:
        """Drop the watch history: re-watching from any older version gets 410 Gone."""
        return self.state.compact()

    def outage(self, seconds: float) -> None:
        """Be down for ``seconds`` (connections refused, open ones broken), then serve again on the
        same port with the same state, like an API server restart. Blocks for the outage."""
        self.stop()
        time.sleep(seconds)
        self.start()

    def abort_connections(self) -> None:
        """The server's host vanishes and comes back: every open connection is forgotten with a
        reset and nothing more is sent on it. If the path to the client is blocked at that moment
        (e.g. DROP rules in the client's namespace), the client never hears of it: only its own
        keepalive probes or read timeout can tell it the connection is dead."""
        self.aborting = True
        try:
            with self._conns_lock:
                conns = list(self._conns)
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.state.cut_watches()
            for conn in conns:  # idle keep-alive connections: wake their readers, which then close
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                with self._conns_lock:
                    if not (self._conns & set(conns)):
                        break
                time.sleep(0.02)
        finally:
            self.aborting = False

    def freeze_watches(self) -> None:
        """The watches open now are wedged: their connections stay up (TCP answers, keepalive
        probes too) but no event or bookmark is sent on them again. New watches work normally."""
        with self._conns_lock:
            self.frozen_upto = self.watch_requests

    def add_nodes(self, nodes: list[JSON]) -> int:
        """Load many nodes at once (see ``generate``); returns the resourceVersion after them."""
        return self.state.add_nodes(nodes)

    def inject_watch_line(self, data: bytes) -> None:
        """Send raw ``data`` as one line to every open watch (and to watches replaying past it)."""
        self.state.inject_raw(data)
