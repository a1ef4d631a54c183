"""etcd's unary gRPC calls over our own small HTTP/2 client (the pure-Python ``h2`` library), without grpcio.

Why: grpcio's C library alone was ~10 MB of the agent's RSS (issue 9's line is 60 MB at 5000
peers), and etcd's JSON gateway, the other way around it, marshals a page of 1000 leases in 17-25 ms
against ~5 ms as protobuf (and costs etcd ~4x the CPU of a relist storm). So we speak gRPC itself:
the same protobuf requests over HTTP/2 that grpcio sends, the same bytes on the wire, the same cost
to etcd. Only unary calls (etcd's KV, Lease and Auth services) live here; watches stay on the JSON
gateway (gateway.py), one event at a time being cheap there.

What a call is (gRPC over HTTP/2): HEADERS ``:method POST``, ``:path /etcdserverpb.KV/Range``,
``content-type: application/grpc``, ``te: trailers``, ``grpc-timeout``, and the auth token as the
``token`` metadata header; then DATA: a 5-byte prefix (flag 0, big-endian length) and the serialized
request, END_STREAM. The answer: HEADERS (``:status 200``), DATA carrying the prefixed message, and
trailers with ``grpc-status`` (and a percent-encoded ``grpc-message``), or all of it in the headers
of a trailers-only answer. Plaintext is HTTP/2 with prior knowledge (h2c, as grpcio; etcd's cmux
recognises gRPC by the ``content-type`` of the first HEADERS); TLS negotiates ``h2`` by ALPN.

One connection per endpoint, kept open between calls and guarded by a lock: the registry calls
from several threads, and calls are short, so serialising them costs nothing that matters. A kept
connection that turns out closed when a call starts (GOAWAY, EOF, a reset, before any answer to
this call) is replaced and the call sent once on the new one, as ``gateway.Unary`` does; a call
that was sent and then timed out is never retried (it may have been applied). A message whose
length prefix is over ``max_bytes`` is refused as soon as the prefix is seen: the stream is reset,
the connection dropped, nothing buffered beyond it (``gateway.TooLarge``, which the registry handles
as it handles grpcio's "larger than max").

Everything read here is untrusted: every failure of the socket, TLS, HTTP/2 or protobuf layer is
converted at this boundary into ``gateway.GatewayError`` (etcd's gRPC status), ``gateway.TooLarge``,
``gateway.TLSFailure`` or ``errors.StoreUnavailable``; no h2 or protobuf exception escapes.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from flannel import errors
from flannel.subnet_managers.etcd import etcdpb, gateway

log = logging.getLogger(__name__)

RANGE = "/etcdserverpb.KV/Range"
PUT = "/etcdserverpb.KV/Put"
DELETE_RANGE = "/etcdserverpb.KV/DeleteRange"
TXN = "/etcdserverpb.KV/Txn"
LEASE_GRANT = "/etcdserverpb.Lease/LeaseGrant"
LEASE_REVOKE = "/etcdserverpb.Lease/LeaseRevoke"
LEASE_TIME_TO_LIVE = "/etcdserverpb.Lease/LeaseTimeToLive"
AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"

#: the flow-control window we advertise per stream and widen the connection's to: a page of up to
#: MAX_RECEIVE_BYTES (32 MiB) arrives without waiting for a WINDOW_UPDATE (received data is also
#: acknowledged as it arrives, so nothing ever stalls)
WINDOW_BYTES = 64 * 1024 * 1024
#: the largest header list we accept (etcd's answers carry a few short headers)
MAX_HEADER_LIST_BYTES = 64 * 1024
RECV_BYTES = 256 * 1024
_PREFIX = struct.Struct(">BI")
_USER_AGENT = b"pyflannel-h2grpc"
#: gRPC status codes used here
_UNKNOWN, _INTERNAL, _UNAVAILABLE = 2, 13, 14


class _Stale(Exception):
    """The connection was closed (EOF, reset, GOAWAY) before any answer to this call: on a kept
    connection, the call is sent again on a new one."""


class _Broken(Exception):
    """The server broke the protocol or the connection in a way worth reporting as unavailable."""


def tls_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    """The gateway's TLS context (same CA and client certificate), offering only ``h2`` by ALPN."""
    ctx = gateway.tls_context(cafile, certfile, keyfile)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _grpc_timeout(seconds: float) -> bytes:
    """``grpc-timeout`` in milliseconds (at most 8 digits, as the spec allows)."""
    return f"{max(1, min(int(seconds * 1000), 99_999_999))}m".encode("ascii")


class _Connection:
    """One HTTP/2 connection (socket and h2 state machine)."""

    def __init__(self, ep: gateway.Endpoint, timeout: float, ka: gateway.Keepalive) -> None:
        #: a GOAWAY was received, or the socket reached EOF: no new call on this connection
        self.closed = False
        #: any byte received at all (a TLS error before the first one is a refused handshake)
        self.heard = False
        raw = socket.create_connection((ep.host, ep.port), timeout=timeout)
        sock: socket.socket = raw
        try:
            gateway._set_keepalive(raw, ka)
            if ep.tls is not None:
                sock = ep.tls.wrap_socket(raw, server_hostname=ep.host)
                proto = sock.selected_alpn_protocol()
                if proto != "h2":
                    raise _Broken(f"the TLS server did not agree to HTTP/2 by ALPN (it chose {proto!r})")
            config = h2.config.H2Configuration(client_side=True, header_encoding=None)
            self.h2 = h2.connection.H2Connection(config=config)
            self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW_BYTES,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            })
            self.h2.initiate_connection()
            self.h2.increment_flow_control_window(WINDOW_BYTES - 65535)   # the connection's window, once
            self.sock = sock
            self.flush()
        except BaseException:
            sock.close()
            raise

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def receive(self) -> list[h2.events.Event]:
        """The events of the next bytes from the socket (blocks up to the socket's timeout)."""
        data = self.sock.recv(RECV_BYTES)
        if not data:
            self.closed = True
            raise _Stale("the connection was closed")
        if not self.heard and len(data) >= 9 and (data[3] != 4 or data[5:9] != b"\0\0\0\0"):
            # an HTTP/2 server's first frame is its SETTINGS (RFC 9113 3.4); h2 would wait for the
            # rest of whatever "frame" an HTTP/1.1 answer or junk seems to start
            raise _Broken(f"not an HTTP/2 server: it answered {bytes(data[:40])!r}")
        self.heard = True
        events = self.h2.receive_data(data)
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
        return events

    def usable(self) -> bool:
        """Whether a kept connection can carry a call: reads whatever arrived while it was idle
        (a GOAWAY, a PING, settings, an EOF) without blocking."""
        while not self.closed:
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                pass
            elif not select.select([self.sock], [], [], 0)[0]:
                return True
            try:
                self.sock.settimeout(1.0)   # (readable: only the rest of a TLS record may be awaited)
                self.receive()
                self.flush()   # (a PING's answer, a SETTINGS ack)
            except Exception as e:  # closed, reset, garbage: whatever it is, this connection is done
                log.debug("the kept HTTP/2 connection is not usable: %s: %s", type(e).__name__, e)
                return False
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Reply:
    """The answer to one call as it arrives: headers, the one length-prefixed message, trailers."""

    def __init__(self) -> None:
        self.head: dict[bytes, bytes] | None = None
        self.trailers: dict[bytes, bytes] | None = None
        self.buf = bytearray()
        self.length = -1

    def headers(self, head: dict[bytes, bytes]) -> None:
        status = head.get(b":status", b"")
        if status != b"200":
            raise _Broken(f"HTTP/2 status {status.decode('latin-1')[:20]} instead of 200 (not a gRPC server?)")
        self.head = head
        if b"grpc-status" in head:
            self.trailers = head   # a trailers-only answer

    def data(self, data: bytes) -> int:
        """Take a DATA frame's bytes: the message's length once its prefix is in (-1 before)."""
        if self.head is None:
            raise _Broken("DATA before the response headers")
        self.buf += data
        if self.length < 0 and len(self.buf) >= _PREFIX.size:
            compressed, self.length = _PREFIX.unpack_from(self.buf)
            if compressed:
                raise _Broken("a compressed message (none was asked for)")
        if self.length >= 0 and len(self.buf) > _PREFIX.size + self.length:
            raise _Broken("more than one message in a unary answer")
        return self.length

    def message(self, where: str) -> bytes:
        """The answer's message once the stream ended; etcd's error status raised."""
        trailers = self.trailers
        if trailers is None or b"grpc-status" not in trailers:
            raise _Broken("the answer ended without a grpc-status")
        try:
            code = int(trailers[b"grpc-status"])
        except ValueError:
            raise _Broken(f"grpc-status {trailers[b'grpc-status'][:20]!r} is not a number") from None
        if code != 0:
            message = unquote(trailers.get(b"grpc-message", b"").decode("latin-1"))[:500]
            raise gateway.GatewayError(code, message, where)
        if self.length < 0 or len(self.buf) != _PREFIX.size + self.length:
            raise _Broken(f"the answer's message is truncated ({len(self.buf)} bytes, its prefix says "
                          f"{self.length})")
        return bytes(self.buf[_PREFIX.size:])


class Unary:
    """gRPC unary calls to one endpoint over one kept HTTP/2 connection (see the module docstring).

    The typed calls (``range``, ``put``, ...) build etcd's protobuf requests and decode its answers;
    ``call`` is the transport.
    """

    def __init__(self, ep: gateway.Endpoint, *, timeout: float, keepalive: gateway.Keepalive,
                 max_bytes: int) -> None:
        self._ep, self._timeout, self._ka, self._max = ep, timeout, keepalive, max_bytes
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._pb = etcdpb.rpc()
        #: TCP connections opened (one, unless etcd or a proxy closed one)
        self.connections = 0

    @property
    def endpoint(self) -> gateway.Endpoint:
        return self._ep

    def call(self, method: str, request: bytes, token: str, what: str) -> bytes:
        """One unary call: the serialized answer.

        :raises gateway.GatewayError: etcd answered with a gRPC status other than OK.
        :raises gateway.TooLarge: the answer is over ``max_bytes`` (not read beyond its prefix).
        :raises gateway.TLSFailure: the TLS handshake failed (or etcd refused our certificate).
        :raises errors.StoreUnavailable: anything else (refused, timed out, closed, garbage).
        """
        where = f"etcd ({self._ep.describe()}) {what}"
        with self._lock:
            deadline = time.monotonic() + self._timeout
            try:
                if self._conn is not None and not self._conn.usable():
                    log.debug("%s: the kept connection was closed meanwhile; connecting again", where)
                    self._drop()
                reused = self._conn is not None
                try:
                    return self._ask(method, request, token, where, deadline)
                except (_Stale, BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                    # closed before any answer to this call: on a kept connection, ask once on a new one
                    if not reused:
                        raise
                    self._drop()
                    log.debug("%s: the kept connection was closed (%s); asking on a new one", where, e)
                    return self._ask(method, request, token, where, deadline)
            except gateway.GatewayError:
                raise   # etcd's answer: the connection is fine
            except errors.StoreError:   # TooLarge (the stream was reset: drop what is still in flight)
                self._drop()
                raise
            except _Broken as e:
                self._drop()
                raise errors.StoreUnavailable(f"{where}: {e}") from None
            except (ssl.SSLError, ConnectionResetError, _Stale) as e:
                heard = self._conn is not None and self._conn.heard
                self._drop()
                if self._ep.tls is not None and not heard:   # a TLS connection refused at or right after the handshake
                    raise gateway.TLSFailure(where, e if isinstance(e, OSError) else ssl.SSLEOFError(str(e))) from e
                if isinstance(e, _Stale):
                    raise errors.StoreUnavailable(f"{where}: {e}") from None
                raise gateway._unavailable(where, e) from e
            except Exception as e:  # the boundary: whatever the socket, TLS, HTTP/2 or protobuf layer raised
                self._drop()
                raise gateway._unavailable(where, e) from e

    def _ask(self, method: str, request: bytes, token: str, where: str, deadline: float) -> bytes:
        if self._conn is None:
            self._conn = _Connection(self._ep, max(0.01, deadline - time.monotonic()), self._ka)
            self.connections += 1
        conn = self._conn
        h2c = conn.h2
        sid = h2c.get_next_available_stream_id()
        remaining = deadline - time.monotonic()
        headers = [(b":method", b"POST"), (b":scheme", b"https" if self._ep.tls else b"http"),
                   (b":path", method.encode("ascii")), (b":authority", self._authority()),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                   (b"grpc-timeout", _grpc_timeout(remaining)), (b"user-agent", _USER_AGENT)]
        if token:
            headers.append((b"token", token.encode("utf-8")))
        h2c.send_headers(sid, headers)
        body = _PREFIX.pack(0, len(request)) + request
        self._send_body(conn, sid, body, deadline)
        return self._answer(conn, sid, where, deadline)

    def _authority(self) -> bytes:
        host = f"[{self._ep.host}]" if ":" in self._ep.host else self._ep.host
        return f"{host}:{self._ep.port}".encode("idna")

    def _wait(self, conn: _Connection, deadline: float) -> list[h2.events.Event]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        conn.sock.settimeout(left)
        events = conn.receive()
        conn.flush()
        return events

    def _send_body(self, conn: _Connection, sid: int, body: bytes, deadline: float) -> None:
        """The request's DATA, as the peer's flow-control window lets it go (a request is small: one frame)."""
        h2c = conn.h2
        sent = 0
        while True:
            window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            n = min(window, len(body) - sent)
            if n > 0 or sent == len(body):
                h2c.send_data(sid, body[sent:sent + n], end_stream=sent + n == len(body))
                sent += n
            conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            conn.flush()
            if sent == len(body):
                return
            for ev in self._wait(conn, deadline):   # wait for a WINDOW_UPDATE
                if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise _Broken(f"etcd reset the stream (HTTP/2 error {ev.error_code}) before the request was sent")
                if isinstance(ev, h2.events.ConnectionTerminated):
                    raise _Stale(f"etcd closed the connection (GOAWAY, HTTP/2 error {ev.error_code})")

    def _answer(self, conn: _Connection, sid: int, where: str, deadline: float) -> bytes:
        reply = _Reply()
        while True:
            try:
                events = self._wait(conn, deadline)
            except (_Stale, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                if reply.head is not None:   # not a stale connection: it broke in the middle of our answer
                    raise _Broken(f"the connection was closed during the answer ({e or type(e).__name__})") from None
                raise
            for ev in events:
                if isinstance(ev, h2.events.ConnectionTerminated):
                    if ev.last_stream_id is None or ev.last_stream_id < sid:   # not processed: safe to send again
                        raise _Stale(f"etcd closed the connection (GOAWAY, HTTP/2 error {ev.error_code})")
                    continue   # a graceful GOAWAY: our call is still answered (no new one goes here)
                if getattr(ev, "stream_id", sid) != sid:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    reply.headers(dict(ev.headers))
                elif isinstance(ev, h2.events.TrailersReceived):
                    reply.trailers = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    conn.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
                    length = reply.data(ev.data or b"")
                    if length > self._max:
                        if conn.h2.streams.get(sid) is not None and not conn.h2.streams[sid].closed:
                            conn.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)   # (the connection is dropped too)
                            conn.flush()
                        raise gateway.TooLarge(f"{where}: the answer is {length} bytes, more than the "
                                               f"{self._max} we accept")
                    conn.flush()
                elif isinstance(ev, h2.events.StreamReset):
                    raise _Broken(f"etcd reset the stream (HTTP/2 error {ev.error_code})")
                elif isinstance(ev, h2.events.StreamEnded):
                    return reply.message(where)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- the calls ------------------------------------------------------------------------------

    def _rpc(self, method: str, request: Any, answer: Any, token: str, what: str) -> Any:
        raw = self.call(method, request.SerializeToString(), token, what)
        try:
            return answer.FromString(raw)
        except Exception as e:  # the boundary: protobuf's DecodeError (or anything it raises)
            raise gateway._malformed(self._ep, what, e) from None

    def range(self, key: bytes, range_end: bytes, token: str, what: str, *, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> gateway.RangeResult:
        pb = self._pb
        req = pb.RangeRequest(key=key, range_end=range_end, limit=limit, revision=revision, keys_only=keys_only)
        resp = self._rpc(RANGE, req, pb.RangeResponse, token, what)
        # the protobuf KeyValues have the attributes the registry reads (key, value, mod_revision, lease)
        return gateway.RangeResult(list(resp.kvs), bool(resp.more), int(resp.count), int(resp.header.revision))

    def put(self, key: bytes, value: bytes, lease: int, token: str, what: str) -> None:
        pb = self._pb
        self._rpc(PUT, pb.PutRequest(key=key, value=value, lease=lease), pb.PutResponse, token, what)

    def delete(self, key: bytes, token: str, what: str) -> None:
        pb = self._pb
        self._rpc(DELETE_RANGE, pb.DeleteRangeRequest(key=key), pb.DeleteRangeResponse, token, what)

    def put_if(self, key: bytes, value: bytes, lease: int, token: str, what: str, *, version: int | None = None,
               mod_revision: int | None = None) -> bool:
        """A txn: put ``key`` (attached to ``lease``) only if its version (0: absent) or mod revision is
        the one given. Whether it was put."""
        pb = self._pb
        if version is not None:
            compare = pb.Compare(key=key, result=pb.Compare.EQUAL, target=pb.Compare.VERSION, version=version)
        else:
            compare = pb.Compare(key=key, result=pb.Compare.EQUAL, target=pb.Compare.MOD, mod_revision=mod_revision)
        put = pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))
        resp = self._rpc(TXN, pb.TxnRequest(compare=[compare], success=[put]), pb.TxnResponse, token, what)
        return bool(resp.succeeded)

    def grant(self, ttl: int, token: str, what: str) -> tuple[int, int]:
        """A new etcd lease: (its id, its TTL in seconds)."""
        pb = self._pb
        resp = self._rpc(LEASE_GRANT, pb.LeaseGrantRequest(TTL=ttl), pb.LeaseGrantResponse, token, what)
        if resp.error or not resp.ID:
            raise gateway._malformed(self._ep, what, ValueError(str(resp.error or "no lease ID")[:200]))
        return int(resp.ID), int(resp.TTL)

    def revoke(self, lease_id: int, token: str, what: str) -> None:
        pb = self._pb
        self._rpc(LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lease_id), pb.LeaseRevokeResponse, token, what)

    def time_to_live(self, lease_id: int, token: str, what: str) -> int:
        """The lease's remaining seconds (-1: expired or unknown)."""
        pb = self._pb
        return int(self._rpc(LEASE_TIME_TO_LIVE, pb.LeaseTimeToLiveRequest(ID=lease_id), pb.LeaseTimeToLiveResponse,
                             token, what).TTL)

    def authenticate(self, name: str, password: str) -> str:
        """A token for ``name``.

        :raises gateway.GatewayError: etcd refused (wrong password: code 3; auth not enabled: code 9).
        """
        pb = self._pb
        resp = self._rpc(AUTHENTICATE, pb.AuthenticateRequest(name=name, password=password),
                         pb.AuthenticateResponse, "", f"authenticating as {name}")
        if not resp.token:
            raise gateway._malformed(self._ep, f"authenticating as {name}", ValueError("no token in the answer"))
        return str(resp.token)
