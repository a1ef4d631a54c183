"""The API client of the kube subnet manager: raw JSON in, flannel errors out.

Two transports with the same calls (``CoreV1Api``'s names, raw responses): our own over urllib3
(``rest.NativeCoreV1``, configuration from ``kubeconfig``) for in-cluster service accounts and plain
kubeconfigs, and the ``kubernetes`` package (``fallback``) for what only it implements (exec
plugins, auth providers, impersonation, proxies), imported only then: ``import kubernetes`` alone
costs ~22 MB of RSS.

Why raw JSON: the manager needs a handful of fields per node, and deserialising thousands of
``V1Node`` models on every relist costs far more than the JSON parse.
Why a thread per watch: a blocking request or read on the watch socket cannot observe the agent's
stop event, so the watch is opened and read on its own thread into a queue, and ``close()`` shuts
the socket down to end it promptly.

Why keepalive and a read timeout on the watch: a watch socket only ever receives. If the API
server's host vanishes (a crash, a load-balancer failover: packets dropped, no reset) nothing tells
the client, and urllib3 would wait for its read timeout. Three things notice a dead watch:

* the real API server sends a BOOKMARK about once a minute (the watch cache's
  ``defaultBookmarkFrequency``) and 2 s before the watch's deadline, so a watch that has been
  silent for ``WATCH_READ_TIMEOUT`` (90 s, well under the 300-600 s ``timeoutSeconds``) is dead or
  wedged: the read times out and the manager re-watches from its last resourceVersion;
* TCP keepalive (``KEEPALIVE``: probe after 15 s idle, every 5 s, give up after 3): a peer that
  does not answer for ~30 s is declared dead by the kernel, and a host that came back without the
  connection answers the first probe with a reset, so the agent re-watches within seconds of the
  network healing instead of waiting for a timeout;
* re-watching opens a new connection; a request that gets no answer times out after
  ``WATCH_READ_TIMEOUT`` as well.

Every line of the watch stream is untrusted: one that does not decode (bad JSON, non-UTF-8, nested
too deeply, larger than ``MAX_EVENT_BYTES``) or is not an event object is skipped and counted
(``skips``), and the stream goes on, so later events are not lost.

Errors are converted here, once (kopf's ``check_response`` pattern): connection problems, 429 and
5xx → ``StoreUnavailable`` (retried by the caller); 401/403 → ``PermissionDenied`` naming the verb
and resource; 404 → ``NotFound``; 410 → ``Expired`` (relist). Error bodies are cut to 256
characters so nothing large or secret reaches the logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import urllib3

from flannel import errors, threadname
from flannel.records import SkippedRecords
from flannel.subnet_managers.kube import kubeconfig, skips
from flannel.subnet_managers.kube.rest import ApiStatus, NativeCoreV1

log = logging.getLogger(__name__)

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
REQUEST_TIMEOUT = (5.0, 15.0)  # (connect, read) seconds for every non-watch call
LIST_TIMEOUT = (5.0, 30.0)  # one page of a node list
#: Nodes per LIST page. client-go's pager uses 500, but a decoded 10 KB node is ~40 KB of Python
#: objects: 100 per page keeps the transient peak of a relist at ~4 MB whatever the cluster size,
#: for 50 requests at 5000 nodes.
LIST_PAGE_SIZE = 100
WATCH_CONNECT_TIMEOUT = 5.0
#: Longest silence on a watch before it is treated as dead (the server sends bookmarks ~every 60 s).
WATCH_READ_TIMEOUT = 90.0
#: TCP keepalive (idle seconds, probe interval, probes) on every connection to the API server.
KEEPALIVE = (15, 5, 3)
#: Longest watch line accepted; a larger one is skipped (the API server limits objects to ~1.5 MB).
MAX_EVENT_BYTES = 8 * 1024 * 1024
#: Decoded watch events waiting for the watch loop. When it is full the reader stops reading and
#: TCP pushes back on the server, so a burst of events costs bounded memory (~40 KB per event).
WATCH_QUEUE_SIZE = 64
_BODY_LIMIT = 256


class NotFound(errors.StoreError):
    """The object does not exist (HTTP 404)."""


class Expired(errors.StoreError):
    """The resourceVersion we watch from is older than the server's history (HTTP 410): relist."""


class _End:
    """Sentinel: the server ended the watch normally (its timeoutSeconds elapsed)."""


END = _End()
#: queued by ``NodeWatch.wake()``: the waiting ``get()`` returns None
_WAKE = object()


def _rbac_hint(verb: str, resource: str) -> str:
    return (f'the service account needs verb "{verb}" on resource "{resource}" (API group "") in its '
            "ClusterRole (see the flannel ClusterRole: pods get; nodes get, list, watch; nodes/status patch)")


def _status_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that carry an HTTP status: ours, and the package's ``ApiException`` once the
    fallback has loaded it (looked up, never imported: the native path must not load the package)."""
    mod = sys.modules.get("kubernetes.client.exceptions")
    return (ApiStatus,) if mod is None else (ApiStatus, mod.ApiException)


@contextlib.contextmanager
def _mapped(verb: str, resource: str, name: str = "") -> Iterator[None]:
    """Convert client/transport exceptions raised in the block into flannel errors."""
    what = f"{verb} {resource}" + (f" {name!r}" if name else "")
    try:
        yield
    except _status_errors() as e:
        body = _status_message(e)
        status = getattr(e, "status", 0) or 0
        if status == 0 or status == 429 or status >= 500:
            raise errors.StoreUnavailable(f"API server: {what} failed ({status or 'no response'}): {body}") from e
        if status == 401:
            raise errors.PermissionDenied(f"API server refused {what}: 401 Unauthorized (the bearer token or "
                                          f"client certificate was not accepted): {body}") from e
        if status == 403:
            raise errors.PermissionDenied(f"permission denied: cannot {verb} {resource}"
                                          + (f" {name!r}" if name else "")
                                          + f": {_rbac_hint(verb, resource)}; server said: {body}") from e
        if status == 404:
            raise NotFound(f"{what}: not found") from e
        if status == 410:
            raise Expired(f"{what}: 410 Gone: {body}") from e
        raise errors.StoreError(f"API server rejected {what}: {status} {body}") from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise errors.StoreUnavailable(f"API server unreachable: {what}: {_reason(e)}") from e


def _status_message(e: BaseException) -> str:
    """The ``message`` of the Status object the server sent, else the raw body/reason (cut)."""
    text = str(getattr(e, "body", "") or getattr(e, "reason", "") or "")
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        msg = json.loads(text).get("message")
        if msg:
            text = str(msg)
    return text[:_BODY_LIMIT]


def _line_key(line: bytes) -> str:
    """A bad watch line in the log: its first 80 bytes as text (the line itself can be megabytes)."""
    return line[:80].decode(errors="replace")


def _reason(e: BaseException) -> str:
    """The useful part of a urllib3 error (``Connection refused``, not the whole retry story)."""
    reason = getattr(e, "reason", None)
    if isinstance(reason, BaseException):
        e = reason
    text = str(e)
    if isinstance(e, urllib3.exceptions.NewConnectionError) and ": " in text:
        text = text.split(": ", 1)[1]
    return text[:_BODY_LIMIT]


def keepalive_socket_options() -> list[tuple[int, int, int]]:
    """urllib3's default options (no Nagle) plus TCP keepalive with our timings (``KEEPALIVE``).
    Built here rather than taken from the client package, which only grew a helper for it lately."""
    idle, interval, count = KEEPALIVE
    opts = list(urllib3.connection.HTTPConnection.default_socket_options)
    opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


def connect(*, kubeconfig_file: str = "", api_url: str = "") -> Any:
    """The transport for this configuration: ``NativeCoreV1`` when our loader supports it, else
    the ``kubernetes`` package's ``CoreV1Api`` (logged at INFO with the reason).

    :raises errors.ConfigError: the configuration is broken, or nothing is configured and we are
        not running in a pod.
    """
    try:
        cfg = kubeconfig.load(kubeconfig_file=kubeconfig_file, api_url=api_url)
    except kubeconfig.Unsupported as e:
        log.info("using the kubernetes client package for the API connection (%s needs it: %s)",
                 f"kubeconfig {kubeconfig_file}" if kubeconfig_file else "the configuration", e)
        from flannel.subnet_managers.kube import fallback

        return fallback.PackageCoreV1(build_api_client(kubeconfig_file=kubeconfig_file, api_url=api_url))
    return NativeCoreV1(cfg, socket_options=keepalive_socket_options())


def build_api_client(*, kubeconfig_file: str = "", api_url: str = "") -> Any:
    """The ``kubernetes`` package's ``ApiClient`` for the fallback (imports the package), with our
    keepalive socket options and no retries inside urllib3.

    :raises errors.ConfigError: the configuration cannot be loaded by the package.
    """
    from flannel.subnet_managers.kube import fallback

    return fallback.build_api_client(kubeconfig_file=kubeconfig_file, api_url=api_url,
                                     socket_options=keepalive_socket_options())


class NodeWatch:
    """One ``watch`` on nodes, opened *and* read on its own thread, events into a queue.

    Nothing here blocks the caller: the request itself (which could hang on a server that accepts
    connections but never answers) and the stream both run on the reader thread, and ``get()``
    waits on the queue (without a timeout: ``wake()``, called by a stop hook, makes it return None
    so that the watch loop looks at its stop event — no periodic wake-up while nothing happens).
    ``get()`` returns ``(type, object)`` tuples, ``None`` on timeout or wake, or ``END`` when the server
    closed the stream normally; it raises ``Expired`` for a 410 (HTTP status or ERROR event) and
    ``StoreUnavailable`` when the request failed or the connection broke.
    """

    def __init__(self, opener: Callable[[], Any], *, skipped: SkippedRecords = skips.SKIPPED) -> None:
        self._opener = opener
        self._skips = skipped
        self._resp: Any = None
        self._q: queue.Queue[Any] = queue.Queue(WATCH_QUEUE_SIZE)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-watch-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        threadname.name_this_thread()
        try:
            self._resp = self._opener()
        except errors.FlannelError as e:
            self._put(e)
            return
        except Exception as e:  # a failure on this thread must reach the watch loop, not end it
            log.exception("opening the watch on nodes failed unexpectedly")
            self._put(errors.StoreUnavailable(f"watch on nodes could not be opened: {type(e).__name__}: {e}"))
            return
        if self._closed.is_set():  # closed while the request was in flight
            self._shutdown()
        self._read()

    def _read(self) -> None:
        clean = False
        try:
            for line in self._lines():
                self._line(line)
            self._put(END)
            clean = True
        except (urllib3.exceptions.HTTPError, OSError, AttributeError) as e:
            # AttributeError: urllib3 drops its fp when the socket is shut down under it
            if self._closed.is_set():
                self._put(END)
            else:
                self._put(errors.StoreUnavailable(f"watch on nodes broke: {_reason(e)}"))
        except Exception as e:  # the reader must hand every failure to the watch loop
            log.exception("the watch reader failed unexpectedly")
            self._put(errors.StoreUnavailable(f"watch on nodes failed: {type(e).__name__}: {e}"))
        finally:
            # a stream that ended cleanly can go back to the pool; a broken one must not
            with contextlib.suppress(Exception):
                if clean:
                    self._resp.release_conn()
                else:
                    self._resp.close()

    def _put(self, item: Any) -> None:
        """Queue ``item`` for the watch loop, waiting while the queue is full (until closed)."""
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _lines(self) -> Iterator[bytes]:
        """The stream split into lines; a line longer than ``MAX_EVENT_BYTES`` is dropped (counted)."""
        buf = b""
        discarding = False
        for chunk in self._resp.stream(65536, decode_content=True):
            buf = buf + chunk if buf else chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl], buf[nl + 1:]
                if discarding:
                    discarding = False
                    continue
                yield line
            if len(buf) > MAX_EVENT_BYTES:
                if not discarding:
                    self._skips.skip(_line_key(buf), skips.TOO_LARGE, f"longer than {MAX_EVENT_BYTES} bytes",
                                     kind="watch line")
                discarding, buf = True, b""
        if buf and not discarding:
            yield buf

    def _line(self, line: bytes) -> None:
        """Decode one line of the stream into the queue, or skip it (counted, rate-limited log)."""
        if not line.strip():
            return
        try:
            item = json.loads(line)
        except Exception as e:  # the trust boundary for the stream: skip this line only
            reason = skips.reason_of(e)
            self._skips.skip(_line_key(line), skips.UNDECODABLE_LINE if reason == skips.UNEXPECTED else reason,
                             skips.describe(e), kind="watch line")
            return
        if not (isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("object"), dict)):
            self._skips.skip(_line_key(line), skips.MALFORMED_EVENT,
                             f"not a watch event object (a JSON {type(item).__name__})", kind="watch line")
            return
        self._put(item)

    def get(self, timeout: float | None) -> tuple[str, dict[str, Any]] | _End | None:
        """The next item; ``timeout`` None waits until there is one or ``wake()`` is called."""
        try:
            item = self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None
        if item is _WAKE:
            return None
        if isinstance(item, (Exception, _End)):
            if isinstance(item, Exception):
                raise item
            return item
        return self._event(item)

    def wake(self) -> None:
        """Make a waiting ``get()`` return None (a stop hook: quick, never blocks). A full queue
        needs no wake-up: ``get()`` is not waiting."""
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(_WAKE)

    @staticmethod
    def _event(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        etype, obj = str(item["type"]), item["object"]
        if etype == "ERROR":
            code = obj.get("code")
            msg = str(obj.get("message", ""))[:_BODY_LIMIT]
            if code == 410:
                raise Expired(f"watch on nodes: 410 Gone ({obj.get('reason', 'Expired')}): {msg}")
            raise errors.StoreUnavailable(f"watch on nodes: server error {code}: {msg}")
        return etype, obj

    def _shutdown(self) -> None:
        resp = self._resp
        if resp is None:
            return
        with contextlib.suppress(Exception):
            resp.shutdown()  # urllib3 >= 2.3: unblocks a read in progress on another thread
        with contextlib.suppress(Exception):
            resp.close()

    def close(self) -> None:
        """End the stream now. Idempotent. A request still in flight is abandoned (its thread is
        a daemon and ends at its own timeout)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._shutdown()
        self._thread.join(timeout=1)

    def __enter__(self) -> NodeWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KubeClient:
    """The few API calls flannel makes (they are exactly what its ClusterRole allows, §5.9)."""

    def __init__(self, *, kubeconfig_file: str = "", api_url: str = "") -> None:
        self._kubeconfig_file = kubeconfig_file
        self._api_url = api_url
        self._lock = threading.Lock()
        self._core: Any = None  # NativeCoreV1 or fallback.PackageCoreV1, made on first use

    def _api(self) -> Any:
        with self._lock:
            if self._core is None:
                self._core = connect(kubeconfig_file=self._kubeconfig_file, api_url=self._api_url)
            return self._core

    @property
    def host(self) -> str:
        """Where we talk to, for logs (before the first call: where the config comes from)."""
        if self._core is not None:
            return str(self._core.host)
        if self._api_url:
            return self._api_url
        return f"from kubeconfig {self._kubeconfig_file}" if self._kubeconfig_file else "in-cluster"

    @staticmethod
    def _json(resp: Any, what: str) -> dict[str, Any]:
        try:
            obj = json.loads(resp.data)
        except ValueError as e:
            raise errors.StoreUnavailable(f"API server: {what}: response is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise errors.StoreUnavailable(f"API server: {what}: response is not a JSON object")
        return obj

    def get_node(self, name: str) -> dict[str, Any]:
        with _mapped("get", "nodes", name):
            resp = self._api().read_node(name, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            return self._json(resp, f"get node {name}")

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        with _mapped("get", "pods", f"{namespace}/{name}"):
            resp = self._api().read_namespaced_pod(name, namespace, _preload_content=False,
                                                   _request_timeout=REQUEST_TIMEOUT)
            return self._json(resp, f"get pod {namespace}/{name}")

    def list_node_pages(self, *, limit: int | None = None) -> Iterator[tuple[list[Any], str]]:
        """All nodes, one page (``limit`` nodes) at a time, with the list's resourceVersion (the
        point to watch from; every page of one list has the same).

        Items are passed on as they are (the tracker decides what is readable).
        :raises Expired: the continue token fell out of the server's history (relist from scratch).
        """
        token: str | None = None
        rv: str | None = None
        while True:
            with _mapped("list", "nodes"):
                kw: dict[str, Any] = {"limit": limit or LIST_PAGE_SIZE}
                if token:
                    kw["_continue"] = token
                resp = self._api().list_node(_preload_content=False, _request_timeout=LIST_TIMEOUT, **kw)
                obj = self._json(resp, "list nodes")
            meta = obj.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            items = obj.get("items") or []
            if not isinstance(items, list):
                raise errors.StoreUnavailable("API server: list nodes: items is not a list")
            if rv is None:
                page_rv = meta.get("resourceVersion")
                if not isinstance(page_rv, (str, int)) or not str(page_rv):
                    raise errors.StoreUnavailable("API server: list nodes returned no metadata.resourceVersion")
                rv = str(page_rv)
            token = meta.get("continue") if isinstance(meta.get("continue"), str) else None
            yield items, rv
            del items, obj
            if not token:
                return

    def list_nodes(self) -> tuple[list[Any], str]:
        """All nodes (every page) and the list's resourceVersion."""
        out: list[Any] = []
        rv = ""
        for items, page_rv in self.list_node_pages():
            out.extend(items)
            rv = page_rv
        return out, rv

    def watch_nodes(self, resource_version: str, *, timeout_seconds: int,
                    read_timeout: float = WATCH_READ_TIMEOUT) -> NodeWatch:
        """Start a watch on all nodes from ``resource_version`` (events after it), with bookmarks.

        Returns at once; the request is made on the watch's thread (see ``NodeWatch``).
        :raises errors.ConfigError: the client configuration cannot be loaded.
        """
        api = self._api()

        def open_watch() -> Any:
            with _mapped("watch", "nodes"):
                return api.list_node(
                    watch=True, resource_version=resource_version, allow_watch_bookmarks=True,
                    timeout_seconds=timeout_seconds, _preload_content=False,
                    # bookmarks come ~every minute: a longer silence means a dead or wedged watch
                    _request_timeout=(WATCH_CONNECT_TIMEOUT, read_timeout))

        return NodeWatch(open_watch)

    def patch_node_status(self, name: str, body: dict[str, Any], *,
                          content_type: str = STRATEGIC_MERGE) -> dict[str, Any]:
        """PATCH ``nodes/<name>/status`` (annotations and conditions both go through it, §5.9)."""
        with _mapped("patch", "nodes/status", name):
            resp = self._api().patch_node_status(name, body, _content_type=content_type,
                                                 _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            return self._json(resp, f"patch node {name} status")

    def close(self) -> None:
        with self._lock:
            if self._core is not None:
                with contextlib.suppress(Exception):
                    self._core.close()
                self._core = None
