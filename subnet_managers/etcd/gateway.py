"""etcd watches through etcd's JSON gateway (``POST /v3/watch``) over a plain socket.

Why: a gRPC channel costs an idle agent 0.6–0.9 ms/s of CPU in gRPC's C threads (event engine
pollers waking ~10 times a second, a global timer, a lifeguard), and a lease event costs another
~0.2 ms in them; the issue 9 target is 1 ms/s for the whole agent. The watches are the only
long-lived etcd traffic, so they are read here from one TCP (or TLS) socket per watch, blocking in
``recv`` on the reading thread: no thread of ours or of a library wakes while nothing happens
(but for the liveness probe below, once per KEEPALIVE_TIME of silence: measured ~0.04 ms/s), and
the gRPC channel the unary calls use can be closed between them (registry.py).

What etcd serves (checked against 3.4.23, ``embed/serve.go``): grpc-gateway on the client port,
HTTP/1.1 next to gRPC (cmux on plaintext, ALPN/content-type on TLS). ``POST /v3/watch`` with
``{"create_request": {...}}`` answers ``200`` with a chunked stream of JSON objects, one per
watch response, each followed by ``\\n``: ``{"result": WatchResponse}`` or, if the stream breaks,
``{"error": {"grpc_code", "http_code", "message", ...}}``. Field names are the proto names,
int64s are strings, bytes are base64, zero values are omitted (a PUT event has no ``type``).
An error before the stream (a malformed request, etcd's gateway unable to reach itself) is an
HTTP status with ``{"error", "message", "code"}``. etcd's HTTP server has no read, write or
idle timeout, so an idle stream stays open for as long as the TCP connection lives; whether it
lives is what TCP keepalive and ``TCP_USER_TIMEOUT`` find out, in the kernel (``_set_keepalive``).
A *hung* etcd process (SIGSTOP, a deadlock, a frozen VM whose kernel still ACKs) answers TCP
keepalives, so the watch also probes the process itself, as gRPC's HTTP/2 pings did: after
``Keepalive.idle`` seconds without a byte (the read's socket timeout: one wake-up per period of
silence, none while responses arrive) it sends ``POST /v3/maintenance/status`` to the same
endpoint on a second connection kept open for the probes (``Prober``); no HTTP answer within
``Keepalive.timeout`` ends the watch
(``Watch.read``). The stream's chunked body is decoded here (``_Body``), not by http.client,
because a socket timeout in http.client's readers loses the bytes of a half-read line and makes
the socket file unusable; ours keeps its state across the wake-up.

Everything read here is untrusted bytes: one response line is bounded (``max_bytes``, never
buffered beyond it), and any failure of the HTTP or JSON layer (a reset, a truncated chunk,
non-JSON, bad base64, a missing field) becomes ``errors.StoreUnavailable`` (or
``ResponseTooLarge``) at this boundary. An endpoint that answers, but not as etcd's gateway
(404, another HTTP version, bytes that are not HTTP), raises ``NotGateway``: registry.py then
uses gRPC watches.
"""

from __future__ import annotations

import binascii
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from flannel import errors
from flannel.subnet_managers.etcd.store import ResponseTooLarge

log = logging.getLogger(__name__)

WATCH_PATH = "/v3/watch"
AUTH_PATH = "/v3/auth/authenticate"
#: the liveness probe: answered by the etcd process itself, without raft (no leader needed) and
#: cheap; under auth it may be refused (a user that is not root), which still proves the process alive
PROBE_PATH = "/v3/maintenance/status"
#: bytes asked of the socket per ``recv`` of a watch stream
RECV_BYTES = 64 * 1024
#: the longest chunk-size line of a chunked body we accept (a hex number and maybe extensions)
MAX_CHUNK_LINE = 1024
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
#: the most we read of an answer that is not a watch stream (an error, a token)
MAX_SMALL_BODY = 64 * 1024
#: HTTP statuses that mean "no gateway here" (etcd < 3.4 has no ``/v3/``; --enable-grpc-gateway=false)
_NO_GATEWAY_STATUS = (404, 405, 501)

#: one watch event: (deleted, key, value, mod_revision, etcd lease id)
Event = tuple[bool, bytes, bytes, int, int]


class NotGateway(Exception):
    """The endpoint answered, but not as etcd's JSON gateway: use gRPC watches (the message says why)."""


class GatewayError(errors.StoreError):
    """etcd's gateway answered with an error: ``code`` is the gRPC status code (an int), ``message`` etcd's text."""

    def __init__(self, code: int, message: str, where: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"{where}: gRPC code {code}: {message}")


class NoAnswer(errors.StoreUnavailable):
    """The connection was closed without a byte of answer: etcd restarting, or a server that does
    not speak HTTP/1.1 and hangs up (registry.py falls back after several in a row)."""


@dataclass(frozen=True)
class Endpoint:
    host: str                        # without brackets
    port: int
    tls: ssl.SSLContext | None

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


@dataclass(frozen=True)
class Keepalive:
    """When a silent connection is declared dead: a probe after ``idle`` seconds without traffic,
    and the connection is aborted once ``idle + timeout`` seconds passed without an answer."""

    idle: float
    timeout: float


def tls_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    """As the gRPC credentials: the CA bundle (system roots if empty), and the client certificate
    only when both files are given; the server's name (or IP) is checked."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    if certfile and keyfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def _set_keepalive(sock: socket.socket, ka: Keepalive) -> None:
    """Dead-peer detection in the kernel, costing this process nothing: keepalive probes after
    ``idle`` seconds of silence, and TCP_USER_TIMEOUT aborts the connection (the blocked ``recv``
    fails) once ``idle + timeout`` seconds passed with probes unanswered, as gRPC keepalive did."""
    idle = max(1, int(ka.idle))
    interval = max(1, int(ka.timeout / 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # http.client sends head and body apart
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", int((ka.idle + ka.timeout) * 1000))):
        opt = getattr(socket, name, None)
        if opt is not None:   # Linux has all four
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


def _connect(ep: Endpoint, timeout: float, ka: Keepalive) -> http.client.HTTPConnection:
    conn: http.client.HTTPConnection
    if ep.tls is not None:
        conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout, context=ep.tls)
    else:
        conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        _set_keepalive(conn.sock, ka)
    except BaseException:
        conn.close()
        raise
    return conn


def _post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any], token: str,
          where: str) -> http.client.HTTPResponse:
    """Send one request and read the answer's head: a 200 from etcd's gateway, or the error raised."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token   # etcd reads the token from "authorization" as from "token"
    conn.request("POST", path, body=json.dumps(body).encode("ascii"), headers=headers)
    try:
        resp = conn.getresponse()
    except http.client.RemoteDisconnected as e:
        raise NoAnswer(f"{where}: the connection was closed without an answer") from e
    except (http.client.BadStatusLine, http.client.LineTooLong) as e:
        raise NotGateway(f"it does not answer HTTP/1.1 ({type(e).__name__}: {str(e)[:80]!r})") from e
    if resp.version != 11:
        raise NotGateway(f"it answered with HTTP version {resp.version / 10:.1f}, not 1.1")
    if resp.status == 200:
        ctype = resp.getheader("Content-Type", "")
        if not ctype.startswith("application/json"):
            raise NotGateway(f"it answered {path} with Content-Type {ctype[:80]!r}, not etcd's JSON")
        return resp
    if resp.status in _NO_GATEWAY_STATUS:
        raise NotGateway(f"it answered {path} with HTTP {resp.status} {resp.reason[:80]}")
    raw = resp.read(MAX_SMALL_BODY)
    try:
        err = json.loads(raw)
        code, message = int(err["code"]), str(err.get("message") or err.get("error"))
    except Exception:  # the boundary: anything but etcd's error object
        answer = f"HTTP {resp.status} {resp.reason[:80]} and no etcd error ({raw[:80]!r})"
        if resp.status >= 500:   # a proxy in front of an etcd that is down, say: try again later
            raise errors.StoreUnavailable(f"{where}: {answer}") from None
        raise NotGateway(f"it answered {path} with {answer}") from None
    raise GatewayError(code, message, where)


def _unavailable(where: str, e: BaseException) -> errors.StoreUnavailable:
    if isinstance(e, ssl.SSLCertVerificationError):
        return errors.StoreUnavailable(f"{where}: TLS: etcd's server certificate was refused: {e.verify_message}")
    if isinstance(e, TimeoutError) and e.errno is not None:
        return errors.StoreUnavailable(f"{where}: the connection timed out (etcd stopped answering: TCP keepalive "
                                       f"or TCP_USER_TIMEOUT)")
    if isinstance(e, TimeoutError):
        return errors.StoreUnavailable(f"{where}: timed out")
    return errors.StoreUnavailable(f"{where}: {type(e).__name__}: {str(e)[:200]}")


def authenticate(ep: Endpoint, name: str, password: str, *, timeout: float, keepalive: Keepalive) -> str:
    """A token for ``name`` (``POST /v3/auth/authenticate``).

    :raises GatewayError: etcd refused (wrong password: code 3; auth not enabled: code 9).
    :raises NotGateway: no gateway at ``ep``.
    :raises errors.StoreUnavailable: anything else.
    """
    where = f"etcd ({ep.describe()}) authenticating as {name}"
    try:
        conn = _connect(ep, timeout, keepalive)
        try:
            resp = _post(conn, AUTH_PATH, {"name": name, "password": password}, "", where)
            token = json.loads(resp.read(MAX_SMALL_BODY))["token"]
        finally:
            conn.close()
        if not isinstance(token, str) or not token:
            raise ValueError("no token in the answer")
        return token
    except (NotGateway, errors.StoreError):
        raise
    except ssl.SSLError as e:
        raise TLSFailure(where, e) from e
    except Exception as e:  # the boundary: whatever the socket, HTTP or JSON layer raised
        raise _unavailable(where, e) from e


@dataclass(frozen=True, slots=True)
class Response:
    """One watch response, decoded from JSON (nothing of it trusted beyond its types)."""

    revision: int          # the header's (store) revision
    created: bool
    canceled: bool
    cancel_reason: str
    compact_revision: int
    events: tuple[Event, ...]


def _b64(text: Any) -> bytes:
    return binascii.a2b_base64(text, strict_mode=True) if text else b""


def _event(ev: Any) -> Event:
    kind = ev.get("type", "PUT")
    if kind not in ("PUT", "DELETE"):
        raise ValueError(f"unknown event type {str(kind)[:40]!r}")
    kv = ev["kv"]
    return (kind == "DELETE", _b64(kv["key"]), _b64(kv.get("value")), int(kv["mod_revision"]), int(kv.get("lease", 0)))


def parse_response(line: bytes, where: str) -> Response:
    """One line of the stream → a Response.

    :raises GatewayError: the line is etcd's ``{"error": ...}`` (the stream broke).
    :raises errors.StoreUnavailable: anything malformed (not JSON, a wrong type, bad base64, ...).
    """
    try:
        msg = json.loads(line)
        if "error" in msg:
            err = msg["error"]
            raise GatewayError(int(err.get("grpc_code", 2)), str(err.get("message", ""))[:500], where)
        res = msg["result"]
        header = res.get("header") or {}
        return Response(int(header.get("revision", 0)), res.get("created") is True, res.get("canceled") is True,
                        str(res.get("cancel_reason", ""))[:500], int(res.get("compact_revision", 0)),
                        tuple(map(_event, res.get("events", ()))))
    except GatewayError:
        raise
    except Exception as e:  # the boundary: a malformed response is a broken stream, never a crash
        raise errors.StoreUnavailable(f"{where}: malformed watch response ({type(e).__name__}: "
                                      f"{str(e)[:200]})") from None


class Prober:
    """Liveness probes of the etcd process behind ``ep`` (``POST /v3/maintenance/status``), over one
    HTTP/1.1 connection kept open between them.

    Why kept open: a quiet cluster probes once per ``Keepalive.idle`` (30 s) per watch, and 5000
    agents each opening a fresh TCP (and TLS) connection per probe made ~170 connection set-ups a
    second on etcd, where gRPC's keepalive pings travelled on the open connection. A connection
    that went stale meanwhile (closed by etcd or a proxy: the request cannot be sent, or the
    answer is a close) is replaced once, at once, within the same timeout; a probe that gets no
    answer in time is never retried -- that is the hung process it looks for.
    """

    def __init__(self, ep: Endpoint, token: str, keepalive: Keepalive) -> None:
        self._ep, self._token, self._ka = ep, token, keepalive
        self._conn: http.client.HTTPConnection | None = None
        #: TCP connections opened for probes (one, unless etcd or a proxy closed one)
        self.connections = 0

    def probe(self, timeout: float, connected: Any = None) -> int:
        """One probe: the HTTP status of its answer, whatever it is (a 401/403 under auth, a 5xx,
        still comes from a live process). Connecting and reading the answer both fit in
        ``timeout`` (roughly: each step gets what is left of it).

        ``connected(sock)``, if given, is called with the socket the probe uses (so that another
        thread can shut it down: a watch cancelled meanwhile).

        :raises Exception: whatever the socket, TLS or HTTP layer raised (refused, timed out,
            closed): the process did not answer. The connection is dropped then.
        """
        deadline = time.monotonic() + timeout
        reused = self._conn is not None
        try:
            return self._ask(deadline, connected)
        except (http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError,
                ConnectionResetError) as e:
            self.close()
            if not reused or time.monotonic() >= deadline:
                raise
            log.debug("etcd (%s): the kept probe connection was closed (%s); probing on a new one",
                      self._ep.describe(), type(e).__name__)
            try:
                return self._ask(deadline, connected)
            except BaseException:
                self.close()
                raise
        except BaseException:
            self.close()
            raise

    def _ask(self, deadline: float, connected: Any) -> int:
        if self._conn is None:
            self._conn = _connect(self._ep, max(0.01, deadline - time.monotonic()), self._ka)
            self.connections += 1
        conn = self._conn
        assert conn.sock is not None
        if connected is not None:
            connected(conn.sock)
        conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        conn.request("POST", PROBE_PATH, body=b"{}", headers=headers)
        resp = conn.getresponse()
        resp.read(MAX_SMALL_BODY)   # the whole (small) answer, so that the connection can carry the next
        if not resp.isclosed() or resp.will_close:
            self.close()             # a larger answer, or the server closes: the next probe connects again
        return resp.status

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Body:
    """The body of the watch answer as lines, read straight from the socket: HTTP/1.1 chunked
    (what etcd sends) or, without Transfer-Encoding, bytes up to the connection's end. The state
    (undecoded bytes, the chunk being read, the body bytes not yet a line) lives here, so a socket
    timeout between two ``recv`` loses nothing and reading can go on after it.

    Untrusted bytes: a chunk-size line is at most MAX_CHUNK_LINE bytes, a line at most ``max_bytes``
    (+ one ``recv``), and a malformed chunk is a ValueError."""

    _SIZE, _DATA, _CRLF, _END = range(4)

    def __init__(self, sock: socket.socket, first: bytes, chunked: bool, max_bytes: int) -> None:
        self._sock, self._max = sock, max_bytes
        self._raw = bytearray(first)     # received, not yet de-chunked
        self._data = bytearray()         # de-chunked body bytes, not yet returned as a line
        self._scanned = 0                # bytes of _data known to hold no newline
        self._state = self._SIZE if chunked else self._DATA
        self._left = -1 if not chunked else 0   # data bytes left in the chunk (-1: unbounded)
        self._eof = False
        self._decode()

    def readline(self, on_timeout: Any) -> bytes:
        """The next line with its ``\\n``; without it at the body's end (b"" if nothing is left),
        or longer than ``max_bytes`` (the caller refuses it). A socket timeout calls ``on_timeout()``
        (which raises to give up) and reading goes on."""
        while True:
            i = self._data.find(b"\n", self._scanned)
            if i >= 0:
                line = bytes(self._data[:i + 1])
                del self._data[:i + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._data)
            if self._scanned > self._max or self._eof or self._state == self._END:
                line = bytes(self._data)
                self._data.clear()
                self._scanned = 0
                return line
            try:
                got = self._sock.recv(RECV_BYTES)
            except TimeoutError as e:
                if e.errno is not None:   # ETIMEDOUT: TCP keepalive / TCP_USER_TIMEOUT aborted the connection
                    raise
                on_timeout()
                continue
            if not got:
                self._eof = True
                continue
            self._raw += got
            self._decode()

    def _decode(self) -> None:
        raw = self._raw
        while raw:
            if self._state == self._DATA:
                take = len(raw) if self._left < 0 else min(self._left, len(raw))
                self._data += raw[:take]
                del raw[:take]
                if self._left > 0:
                    self._left -= take
                    if self._left == 0:
                        self._state = self._CRLF
            elif self._state == self._CRLF:
                if len(raw) < 2:
                    return
                if raw[:2] != b"\r\n":
                    raise ValueError("a chunk does not end with CRLF")
                del raw[:2]
                self._state = self._SIZE
            elif self._state == self._SIZE:
                end = raw.find(b"\n", 0, MAX_CHUNK_LINE + 1)
                if end < 0:
                    if len(raw) > MAX_CHUNK_LINE:
                        raise ValueError("a chunk-size line is too long")
                    return
                text = bytes(raw[:end]).rstrip(b"\r").split(b";", 1)[0].strip()
                del raw[:end + 1]
                if not _CHUNK_SIZE.fullmatch(text):
                    raise ValueError(f"a bad chunk size {text[:40]!r}")
                self._left = int(text, 16)
                self._state = self._DATA if self._left else self._END
            else:   # the last chunk was read: trailers and what follows are not ours
                raw.clear()


class Watch:
    """One watch stream: created (connected, request sent, creation answer read) within
    ``timeout``; then ``read`` blocks in ``recv``. A dead peer is noticed by TCP keepalive; a
    hung etcd process (alive to TCP) by a liveness probe (``probe``) after ``keepalive.idle``
    seconds of silence that gets no answer within ``keepalive.timeout``; and ``silence`` seconds
    without a byte (longer than etcd's progress notifications ever leave a watch quiet) end it as
    a backstop: a process that answers the probe but whose watch stream is stuck (a proxy that
    froze the stream, a wedged watch). ``cancel`` from any thread ends it.

    :raises NotGateway, GatewayError, errors.StoreUnavailable: from the constructor.
    """

    def __init__(self, ep: Endpoint, request: dict[str, Any], token: str, *, timeout: float,
                 keepalive: Keepalive, max_bytes: int, silence: float, what: str) -> None:
        self.where = f"etcd ({ep.describe()}) {what}"
        self._ep, self._token, self._ka = ep, token, keepalive
        self._max, self._silence = max_bytes, silence
        self._lock = threading.Lock()
        self._cancelled = self._reading = self._closed = False
        #: liveness probes sent (each answered: an unanswered one ends the watch)
        self.probes = 0
        self._probe_sock: socket.socket | None = None
        self.prober = Prober(ep, token, keepalive)
        try:
            self._conn = _connect(ep, timeout, keepalive)
        except Exception as e:  # the boundary
            raise _unavailable(self.where, e) from e
        try:
            self._resp = _post(self._conn, WATCH_PATH, {"create_request": request}, token, self.where)
            # what http.client read beyond the head (read1: the buffered bytes, or one recv if none)
            first = self._resp.fp.read1(RECV_BYTES)
            assert self._conn.sock is not None
            self._body = _Body(self._conn.sock, first, bool(self._resp.chunked), max_bytes)
            self._last = time.monotonic()
            self._creating = True   # a socket timeout now is the creation's: no probe, give up (_quiet)
            #: the creation answer (``created``; ``canceled`` with the reason if etcd refused the watch)
            self.created = self.read()
            self._creating = False
            if not self.created.created:
                raise errors.StoreUnavailable(f"{self.where}: no creation answer")
            # one poll(2) per recv: no wake-up before it expires, one per idle period of silence
            self._conn.sock.settimeout(min(keepalive.idle, silence))
        except (NotGateway, errors.StoreError):
            self._conn.close()
            raise
        except Exception as e:  # the boundary
            self._conn.close()
            raise _unavailable(self.where, e) from e

    def read(self) -> Response:
        """The next response (blocks).

        :raises ResponseTooLarge: a response line over ``max_bytes`` (the stream is unusable after it).
        :raises GatewayError: etcd ended the stream with an error.
        :raises errors.StoreUnavailable: cancelled, closed, reset, truncated, malformed, silent
            with an unanswered liveness probe, silent for ``silence`` seconds.
        """
        with self._lock:
            if self._cancelled:
                raise errors.StoreUnavailable(f"{self.where}: cancelled")
            self._reading = True
        try:
            line = self._body.readline(self._quiet)
        except errors.StoreUnavailable:
            if self._read_done():
                raise errors.StoreUnavailable(f"{self.where}: cancelled") from None
            raise
        except Exception as e:  # the boundary: reset, TLS error, a malformed chunk, ...
            if self._read_done():
                raise errors.StoreUnavailable(f"{self.where}: cancelled") from None
            raise _unavailable(self.where, e) from e
        if self._read_done():
            raise errors.StoreUnavailable(f"{self.where}: cancelled")
        self._last = time.monotonic()
        if not line.endswith(b"\n"):
            if len(line) > self._max:
                raise ResponseTooLarge(f"{self.where}: a response was larger than the {self._max} bytes we accept")
            if not line:
                raise errors.StoreUnavailable(f"{self.where}: the stream ended")
            raise errors.StoreUnavailable(f"{self.where}: the stream ended inside a response")
        return parse_response(line, self.where)

    def _quiet(self) -> None:
        """The socket was silent for its timeout: give up after ``silence`` seconds without a
        response, else probe the etcd process (StoreUnavailable if it does not answer)."""
        silent = time.monotonic() - self._last
        if self._creating:
            raise errors.StoreUnavailable(f"{self.where}: timed out waiting for the creation answer")
        if silent >= self._silence:
            raise errors.StoreUnavailable(f"{self.where}: nothing received for {self._silence:.0f}s, not even a "
                                          f"progress notification (a hung server or a dead connection)")
        with self._lock:
            if self._cancelled:
                raise errors.StoreUnavailable(f"{self.where}: cancelled")
        timeout = self._ka.timeout
        try:
            status = self.prober.probe(timeout, connected=self._probing)
        except Exception as e:  # the boundary: refused, timed out, closed, TLS, ...
            with self._lock:
                self._probe_sock = None
                if self._cancelled:
                    raise errors.StoreUnavailable(f"{self.where}: cancelled") from None
            detail = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {str(e)[:120]}"
            raise errors.StoreUnavailable(f"{self.where}: nothing received for {silent:.0f}s and etcd did not answer "
                                          f"a liveness probe within {timeout:g}s ({detail}): a hung or "
                                          f"unreachable etcd") from None
        with self._lock:
            self._probe_sock = None
        self.probes += 1
        log.debug("%s: quiet for %.0fs; etcd answered a liveness probe (HTTP %s)", self.where, silent, status)

    def _probing(self, sock: socket.socket) -> None:
        """The probe's socket, for ``cancel`` to shut down (a stop must not wait out its timeout)."""
        with self._lock:
            self._probe_sock = sock
            cancelled = self._cancelled
        if cancelled:
            raise errors.StoreUnavailable(f"{self.where}: cancelled")

    def _read_done(self) -> bool:
        """A read ended: whether the watch was cancelled meanwhile (then the connection is closed here)."""
        with self._lock:
            self._reading = False
            if self._cancelled:
                self._close()
            return self._cancelled

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            resp = getattr(self, "_resp", None)
            if resp is not None:
                resp.close()
            self._conn.close()
            self.prober.close()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """End the watch (idempotent, never raises; any thread). A ``read`` blocked meanwhile wakes
        up (the socket is shut down under it) and closes the connection itself: closing a socket
        another thread reads could hand its descriptor number to a new one."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            if not self._reading:
                self._close()
                return
            for sock in (self._conn.sock, self._probe_sock):
                if sock is not None:
                    try:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)   # the TCP socket under a TLS one too
                    except OSError:
                        pass


# -- unary calls ------------------------------------------------------------------------------------


class TooLarge(errors.StoreError):
    """An answer to a unary call was larger than we accept (``Unary``'s ``max_bytes``): it was not
    read beyond that bound. The gateway's counterpart of gRPC's "larger than max" RESOURCE_EXHAUSTED."""


class TLSFailure(errors.StoreUnavailable):
    """The TLS handshake (or the first read after it, where TLS 1.3 reports a refused client
    certificate) failed: ``details`` is the ssl error's text, with a marker registry.py recognises
    (``Hostname Verification`` for a wrong server name, as gRPC says it)."""

    def __init__(self, where: str, e: OSError) -> None:
        self.details = _ssl_details(e)
        super().__init__(f"{where}: TLS: {self.details}")


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


def _ssl_details(e: OSError) -> str:
    """The ssl error as text, with the marker of gRPC's own text for the same failure."""
    if isinstance(e, ssl.SSLEOFError | ConnectionResetError):
        # etcd (--client-cert-auth) refuses the client certificate, or its absence, by an alert that
        # may arrive as a plain close or reset right after the handshake (TLS 1.3: the client's side
        # of the handshake is already done): gRPC calls it TSI_DATA_CORRUPTED
        return f"BAD_CERTIFICATE? etcd closed the TLS connection during or right after the handshake ({e})"
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_code in _NAME_MISMATCH:
        return f"Hostname Verification Check failed: {e.verify_message}"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"CERTIFICATE_VERIFY_FAILED: {e.verify_message}"
    reason = getattr(e, "reason", None) or ""
    return f"{reason}: {str(e)[:200]}"


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key of a range answer (the attributes registry.py reads of a gRPC ``KeyValue`` too)."""

    key: bytes
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    """A range answer: its keys, whether more are left (a limit), how many matched, the header revision."""

    kvs: list[KeyValue]
    more: bool
    count: int
    revision: int


def _kv(raw: Any) -> KeyValue:
    return KeyValue(_b64(raw["key"]), _b64(raw.get("value")), int(raw.get("mod_revision", 0)),
                    int(raw.get("lease", 0)))


def _enc(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


class Unary:
    """Unary calls (``POST /v3/kv/range``, ``/v3/kv/put``, ...) to one endpoint over one HTTP/1.1
    connection kept open between them, guarded by a lock (the registry is called from several threads).

    Why kept open: a call costs one request, not a TCP (and TLS) set-up. A connection that went
    stale meanwhile (closed by etcd or a proxy: the request cannot be sent, or the answer is a close
    without a byte) is replaced once, at once, as ``Prober`` does; a call that gets no answer within
    ``timeout`` is never retried. The retried request is one etcd closed the connection on: it may
    have been carried out (a put, a txn), which is the same ambiguity as a timeout; callers already
    treat an outcome they did not see that way (a create that finds the key, a renewal that finds it
    changed, re-read it).

    An answer is read up to ``max_bytes`` and no further (``TooLarge``). Every failure of the
    socket, TLS, HTTP or JSON layer is converted here: ``GatewayError`` (etcd's error, with its
    gRPC code), ``TooLarge``, ``NotGateway``, ``TLSFailure``, ``errors.StoreUnavailable``.
    """

    def __init__(self, ep: Endpoint, *, timeout: float, keepalive: Keepalive, max_bytes: int) -> None:
        self._ep, self._timeout, self._ka, self._max = ep, timeout, keepalive, max_bytes
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        #: TCP connections opened (one, unless etcd or a proxy closed one)
        self.connections = 0

    @property
    def endpoint(self) -> Endpoint:
        return self._ep

    def call(self, path: str, body: dict[str, Any], token: str, what: str) -> dict[str, Any]:
        """``POST path`` with ``body``: etcd's answer as a JSON object."""
        where = f"etcd ({self._ep.describe()}) {what}"
        with self._lock:
            reused = self._conn is not None
            try:
                try:
                    return self._ask(path, body, token, where)
                except (NoAnswer, http.client.CannotSendRequest, BrokenPipeError, ConnectionResetError,
                        ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                    # (a TLS connection closed meanwhile: its close_notify or EOF as an ssl error)
                    self._drop()
                    if not reused:
                        raise
                    log.debug("%s: the kept connection was closed (%s); asking on a new one", where,
                              type(e).__name__)
                    return self._ask(path, body, token, where)
            except (NotGateway, errors.StoreError):
                self._drop()
                raise
            except ssl.SSLError as e:
                self._drop()
                raise TLSFailure(where, e) from e
            except ConnectionResetError as e:
                self._drop()
                if self._ep.tls is not None and not reused:   # a new TLS connection, reset before an answer
                    raise TLSFailure(where, e) from e
                raise _unavailable(where, e) from e
            except Exception as e:  # the boundary: whatever the socket, HTTP or JSON layer raised
                self._drop()
                raise _unavailable(where, e) from e

    def _ask(self, path: str, body: dict[str, Any], token: str, where: str) -> dict[str, Any]:
        if self._conn is None:
            self._conn = _connect(self._ep, self._timeout, self._ka)
            self.connections += 1
        conn = self._conn
        assert conn.sock is not None
        conn.sock.settimeout(self._timeout)
        resp = _post(conn, path, body, token, where)
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._max:
            raise TooLarge(f"{where}: the answer is {length} bytes, more than the {self._max} we accept")
        raw = resp.read(self._max + 1)
        if len(raw) > self._max:
            raise TooLarge(f"{where}: the answer is larger than the {self._max} bytes we accept")
        if not resp.isclosed() or resp.will_close:   # (all read: the connection can carry the next call)
            self._drop()
        answer = json.loads(raw)
        if not isinstance(answer, dict):
            raise ValueError(f"the answer is a JSON {type(answer).__name__}, not an object")
        return answer

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- the calls (request and answer in etcd's proto3 JSON: proto field names, int64 as strings,
    #    bytes as base64, zero values omitted) ---------------------------------------------------

    def range(self, key: bytes, range_end: bytes, token: str, what: str, *, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> RangeResult:
        body: dict[str, Any] = {"key": _enc(key)}
        if range_end:
            body["range_end"] = _enc(range_end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        ans = self.call(RANGE_PATH, body, token, what)
        try:
            return RangeResult([_kv(kv) for kv in ans.get("kvs", ())], ans.get("more") is True,
                               int(ans.get("count", 0)), int((ans.get("header") or {}).get("revision", 0)))
        except Exception as e:  # the boundary: a malformed answer
            raise _malformed(self._ep, what, e) from None

    def put(self, key: bytes, value: bytes, lease: int, token: str, what: str) -> None:
        body: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
        if lease:
            body["lease"] = str(lease)
        self.call(PUT_PATH, body, token, what)

    def delete(self, key: bytes, token: str, what: str) -> None:
        self.call(DELETE_PATH, {"key": _enc(key)}, token, what)

    def put_if(self, key: bytes, value: bytes, lease: int, token: str, what: str, *, version: int | None = None,
               mod_revision: int | None = None) -> bool:
        """A txn: put ``key`` (attached to ``lease``) only if its version (0: absent) or mod revision is
        the one given. Whether it was put."""
        compare: dict[str, Any] = {"key": _enc(key), "result": "EQUAL"}
        if version is not None:
            compare.update(target="VERSION", version=str(version))
        else:
            compare.update(target="MOD", mod_revision=str(mod_revision))
        put: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
        if lease:
            put["lease"] = str(lease)
        ans = self.call(TXN_PATH, {"compare": [compare], "success": [{"request_put": put}]}, token, what)
        succeeded = ans.get("succeeded", False)
        if not isinstance(succeeded, bool):
            raise _malformed(self._ep, what, ValueError(f"succeeded is {succeeded!r}"))
        return succeeded

    def grant(self, ttl: int, token: str, what: str) -> tuple[int, int]:
        """A new etcd lease: (its id, its TTL in seconds)."""
        ans = self.call(GRANT_PATH, {"TTL": str(ttl)}, token, what)
        try:
            lease_id, granted = int(ans["ID"]), int(ans.get("TTL", 0))
            if ans.get("error"):
                raise ValueError(str(ans["error"])[:200])
        except Exception as e:  # the boundary
            raise _malformed(self._ep, what, e) from None
        return lease_id, granted

    def revoke(self, lease_id: int, token: str, what: str) -> None:
        self.call(REVOKE_PATH, {"ID": str(lease_id)}, token, what)

    def time_to_live(self, lease_id: int, token: str, what: str) -> int:
        """The lease's remaining seconds (-1: expired or unknown)."""
        ans = self.call(TTL_PATH, {"ID": str(lease_id)}, token, what)
        try:
            return int(ans.get("TTL", 0))
        except Exception as e:  # the boundary
            raise _malformed(self._ep, what, e) from None


RANGE_PATH = "/v3/kv/range"
PUT_PATH = "/v3/kv/put"
DELETE_PATH = "/v3/kv/deleterange"
TXN_PATH = "/v3/kv/txn"
GRANT_PATH = "/v3/lease/grant"
REVOKE_PATH = "/v3/lease/revoke"
TTL_PATH = "/v3/lease/timetolive"


def _malformed(ep: Endpoint, what: str, e: BaseException) -> errors.StoreUnavailable:
    return errors.StoreUnavailable(f"etcd ({ep.describe()}) {what}: malformed answer ({type(e).__name__}: "
                                   f"{str(e)[:200]})")
