"""etcd storage for flannel's keys (reference §4.1–4.5, §4.8): the only module that imports pyetcd,
and only on the grpcio path.

What lives here: connecting (endpoints, TLS, username/password), flannel's key layout and values
(through ``flannel.wire``), create-if-absent as a transaction on ``version(key) == 0``, updates,
reservations (puts without an etcd lease), deletes, and watches from a revision. Every gateway,
pyetcd or gRPC error is converted at this boundary into ``flannel.errors`` (``StoreUnavailable``,
``PermissionDenied``, ``LeaseConflict``, ...) with ``raise ... from``; nothing above this module
ever sees a library exception.

Every record is untrusted: ``_record`` (through ``_untrusted``) is the one place where a key/value
becomes a ``Lease``; any failure there skips that record only, counted per reason in ``skipped``
and logged at a bounded rate (``flannel.records``), so a garbage value can never reach the lease
pipeline or stop a thread. Writes are never undone after an ambiguous failure (a timeout may hide
a write that happened): only a certain refusal revokes the etcd lease we granted for it.

Unary calls (behind the ``_KV`` calls the operations use) are gRPC over our own HTTP/2 client
(h2grpc.py: one kept connection per endpoint, etcd's protobuf messages loaded without pyetcd's
package by etcdpb.py); watches go through etcd's JSON gateway (gateway.py: a plain socket per
watch, no thread awake while nothing happens). This module keeps the policy: the trust boundary,
paging, too-large answers, compaction restarts, re-authentication, failover across endpoints.
``grpc`` and the ``pyetcd`` package are imported only on the grpcio path (their C library alone was
~10 MB of the agent's RSS): for watches once an endpoint turns out not to serve the gateway
(``gateway.NotGateway``: a 404, not HTTP/1.1, etcd refusing a client certificate with auth on), for
everything when forced by $FLANNEL_ETCD_TRANSPORT=grpc ($FLANNEL_ETCD_WATCH, its older name).
$FLANNEL_ETCD_TRANSPORT=gateway sends the unary calls through the JSON gateway too (``gateway.Unary``,
falling back to grpcio for everything where it is not served). On the grpcio path the client is
closed after IDLE_CHANNEL_SECONDS without a call (its C threads then sleep), to be re-created by the
next one.

Two pyetcd facts shape the gRPC path (dependency-facts §2): an endpoint is marked dead for
``Endpoint.time_retry`` seconds after one failure (default 300 s, so we set it to about a second),
and the client authenticates in its constructor, so the client is created lazily (the subnet
manager's constructor does no I/O) and re-created when etcd rejects the auth token.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import posixpath
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from flannel import errors, memory, threadname, wire
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.records import SkippedRecords
from flannel.subnet_managers.etcd import gateway, grpcwait, h2grpc
from flannel.subnet_managers.etcd.store import (
    TTL_NOT_LOOKED_UP,
    Compacted,
    ConfigUpdate,
    KeyChanged,
    Listing,
    ResponseTooLarge,
    Stored,
    Subnets,
    WatchChunk,
    WatchHandle,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds an endpoint stays "failed" after an error (pyetcd's default of 300 s would keep the
#: client down for five minutes after etcd comes back).
ENDPOINT_RETRY_SECONDS = 1.0
#: timeout of every unary RPC (and of watch creation).
RPC_TIMEOUT_SECONDS = 5.0
#: after this long with every call failing as "unavailable", the next call builds a fresh gRPC
#: connection instead of waiting for the old channel to reconnect (see ``_call``).
FRESH_CONNECTION_AFTER_SECONDS = 5.0
CONFIG_NOT_FOUND_HINT = "Did you create your config using etcdv3 API?"
#: a network config is a few hundred bytes; a larger value is refused before decoding.
MAX_CONFIG_BYTES = 64 * 1024

#: gRPC keepalive under long-running watches: a ping after KEEPALIVE_TIME seconds without traffic,
#: and a connection whose ping is not answered within KEEPALIVE_TIMEOUT is closed, which fails the
#: watch and makes us re-watch from the last revision. This is what notices an etcd host that
#: vanished without a reset (crash, failover, dropped packets): within TIME + TIMEOUT (40 s by
#: default; before the ping-timeout and pings-without-data options below it took 90 s or more).
#: Overridable (seconds) with $FLANNEL_ETCD_KEEPALIVE_TIME / $FLANNEL_ETCD_KEEPALIVE_TIMEOUT, e.g.
#: for fault tests. etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time):
#: a smaller TIME gets the connection closed with "too_many_pings". Gateway watches use the same
#: two timings for TCP keepalive and for their liveness probe (gateway.py).
KEEPALIVE_TIME_SECONDS = 30.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0
KEEPALIVE_TIME_ENV = "FLANNEL_ETCD_KEEPALIVE_TIME"
KEEPALIVE_TIMEOUT_ENV = "FLANNEL_ETCD_KEEPALIVE_TIMEOUT"
#: How the agent talks to etcd. ``h2`` (the default): unary calls as gRPC over our HTTP/2 client
#: (h2grpc.py), watches through etcd's JSON gateway (gateway.py, one plain socket per watch), falling
#: back to grpcio for the watches where the endpoint does not serve the gateway; grpc and pyetcd are
#: never imported otherwise. ``gateway``: unary calls through the JSON gateway too (falling back to
#: grpcio for everything). ``grpc``: grpcio for everything. $FLANNEL_ETCD_WATCH is its older name (it
#: forced gRPC watches only, when unary calls always used gRPC) and still works; the new name wins.
TRANSPORT_ENV = "FLANNEL_ETCD_TRANSPORT"
WATCH_ENV = "FLANNEL_ETCD_WATCH"
#: The gRPC channel (unary calls only, unless watches fell back to gRPC) is closed after this long
#: without a call: while it is open, gRPC's C threads cost an idle agent 0.6–0.9 ms/s of CPU, and
#: renewals are hours apart. The next call connects (and authenticates) again.
IDLE_CHANNEL_SECONDS = 20.0
#: A gateway watch that receives nothing at all for this long is dropped and re-established. etcd
#: sends a progress notification to a quiet watch every 10–11 min (its ticker; the first tick after an
#: event only re-arms it, so up to 22 min apart). TCP keepalive notices a dead host or connection and
#: the liveness probe (gateway.Watch: KEEPALIVE_TIME of silence, KEEPALIVE_TIMEOUT for an answer) a
#: hung etcd process, both within ~40 s; this is the backstop for what the probe cannot see: a process
#: that answers it while this watch's stream is stuck (a proxy that froze one stream, a wedged watch).
WATCH_SILENCE_SECONDS = 25 * 60.0
#: This many answers in a row of "connection closed without a byte" to a watch request make us
#: treat the endpoint as one that does not speak HTTP/1.1 (a gRPC-only server or proxy).
NO_ANSWER_FALLBACK = 3

#: The largest message we accept from etcd. gRPC's default (4 MiB) let ~70 leases of 60 KB, or
#: four 1 MB garbage values under ``subnets/``, make the lease listing fail for ever: the agent
#: could never start (a denial of service by records). Listings are read in pages (below) and one
#: etcd value is at most etcd's --max-request-bytes (1.5 MiB by default), so this only bounds
#: what one page or one watch response may cost us in memory.
MAX_RECEIVE_BYTES = 32 * 1024 * 1024
#: Keys per page of a listing (a flannel lease value is 100–300 bytes: ~0.2 MB a page). A page
#: over MAX_RECEIVE_BYTES is asked for again with half as many keys, down to one.
LIST_PAGE_KEYS = 1000
#: A listing whose revision is compacted between two of its pages starts over, this many times.
LIST_ATTEMPTS = 3
_WATCH_METHOD = "/etcdserverpb.Watch/Watch"
_DELETE = 1   # kv_pb2.Event.DELETE
#: the attributes of a REMOVED event (a delete has no value; the LeaseWatcher passes on what it tracked)
_NO_ATTRS = LeaseAttrs()


def _env_seconds(name: str, default: float, minimum: float) -> float:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise errors.UsageError(f"${name}: {text!r} is not a number of seconds") from None
    if not minimum <= value <= 3600:
        raise errors.UsageError(f"${name}: {text!r} must be between {minimum:g} and 3600 seconds")
    return value


def keepalive_seconds() -> tuple[float, float]:
    """(KEEPALIVE_TIME, KEEPALIVE_TIMEOUT) as the environment sets them."""
    return (_env_seconds(KEEPALIVE_TIME_ENV, KEEPALIVE_TIME_SECONDS, 1.0),
            _env_seconds(KEEPALIVE_TIMEOUT_ENV, KEEPALIVE_TIMEOUT_SECONDS, 0.5))


def transport_mode() -> str:
    """How unary calls go ($FLANNEL_ETCD_TRANSPORT, or its older name $FLANNEL_ETCD_WATCH): ``h2``
    (gRPC over our own HTTP/2 client, the default), ``gateway`` (etcd's JSON gateway) or ``grpc``
    (grpcio, watches too)."""
    name = TRANSPORT_ENV if os.environ.get(TRANSPORT_ENV, "").strip() else WATCH_ENV
    text = os.environ.get(name, "").strip().lower()
    if text in ("", "auto", "h2"):
        return "h2"
    if text in ("gateway", "grpc"):
        return text
    raise errors.UsageError(f"${name}: {text!r} is not one of: h2, gateway, grpc")


def grpc_options() -> list[tuple[str, int]]:
    """The gRPC channel options of every etcd connection (keepalive read from the environment)."""
    import grpc  # only on the gRPC path (see the module docstring)
    time_s, timeout_s = keepalive_seconds()
    return [
        # reconnect quickly after etcd restarts (gRPC's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # notice a silently dead connection under a long-running watch
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # grpcio ≥ 1.6x waits for a ping's answer this long (default 60 s), whatever keepalive_timeout says
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        # an idle watch sends no data: by default gRPC holds pings back after two without data
        # (measured: the next one a minute later), so a dead connection went unnoticed that long
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        # a watch is read on the thread that asked for it (see _Stream): no channel thread spinning
        # five times a second, no hand-off between threads per response
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]


#: gRPC status codes (``grpc.StatusCode``'s numbers, which etcd's JSON gateway reports as ``code``):
#: the gateway path converts errors without importing grpc
_CODE_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
               6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
               10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
               15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
_CANCELLED, _UNKNOWN, _INVALID_ARGUMENT, _DEADLINE_EXCEEDED = 1, 2, 3, 4
_PERMISSION_DENIED, _RESOURCE_EXHAUSTED, _FAILED_PRECONDITION, _ABORTED, _OUT_OF_RANGE = 7, 8, 9, 10, 11
_INTERNAL, _UNAVAILABLE, _UNAUTHENTICATED = 13, 14, 16
_UNAVAILABLE_CODES = {_UNAVAILABLE, _DEADLINE_EXCEEDED, _CANCELLED, _INTERNAL, _RESOURCE_EXHAUSTED, _ABORTED, _UNKNOWN}


def _library_errors() -> tuple[type[BaseException], ...]:
    """What pyetcd and gRPC raise (imports them: the gRPC path only)."""
    import grpc
    from pyetcd import exceptions as etcd_exc
    return (etcd_exc.Etcd3Exception, grpc.RpcError, ValueError)


def _grpc_status(e: BaseException) -> tuple[int, str] | None:
    """(code, details) of a gRPC error; None for anything else. Never imports grpc: if it was never
    imported, ``e`` cannot be one of its errors."""
    grpc = sys.modules.get("grpc")
    if grpc is None or not isinstance(e, grpc.RpcError) or not hasattr(e, "code"):
        return None
    return int(e.code().value[0]), str(e.details() or "")


def _too_large(e: BaseException) -> bool:
    """A response over MAX_RECEIVE_BYTES was refused: by the gateway client (gateway.TooLarge) or by
    gRPC (etcd's own RESOURCE_EXHAUSTED answers, a full database or too many requests, say something else)."""
    if isinstance(e, gateway.TooLarge):
        return True
    status = _grpc_status(e)
    return status is not None and status[0] == _RESOURCE_EXHAUSTED and "larger than max" in status[1]


def _compacted_range(e: BaseException) -> bool:
    """A range at a revision etcd has compacted away (etcd's ErrGRPCCompacted), through either transport."""
    if isinstance(e, gateway.GatewayError):
        return e.code == _OUT_OF_RANGE and "compacted" in e.message
    status = _grpc_status(e)
    return status is not None and status[0] == _OUT_OF_RANGE and "compacted" in status[1]


def _prefix_range_end(prefix: bytes) -> bytes:
    """The end of the range of every key starting with ``prefix`` (as etcd's clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"   # every key


class _Restart(Exception):
    """The revision a paginated listing reads at was compacted between two pages."""


class _Reauthenticate(errors.StoreUnavailable):
    """etcd rejected our auth token (expired, or auth settings changed): authenticate again.
    Handled inside this module; should one escape, callers treat it as a transient outage."""


def _split_endpoint(url: str) -> tuple[str, int, bool]:
    """``https://host:port`` → (host for gRPC, port, secure)."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(f"--etcd-endpoints: {url!r} is not an http:// or https:// URL")
    try:
        port = parts.port or 2379
    except ValueError as e:
        raise errors.ConfigError(f"--etcd-endpoints: {url!r}: {e}") from None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return host, port, parts.scheme == "https"


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise errors.ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None


class EtcdRegistry:
    """Lease and config storage under one prefix. Thread-safe: one connection per endpoint shared by all callers.

    :param endpoints: ``http://`` (plaintext) or ``https://`` (TLS) URLs; one that fails is skipped.
    :param cafile: CA bundle to verify the server (system roots if empty).
    :param certfile/keyfile: client certificate, used only if both are set (as flannel).
    """

    def __init__(self, *, endpoints: Sequence[str], prefix: str, cafile: str = "", certfile: str = "",
                 keyfile: str = "", username: str = "", password: str = "",
                 timeout: float = RPC_TIMEOUT_SECONDS, warn_insecure: bool = True) -> None:
        if not endpoints:
            raise errors.ConfigError("--etcd-endpoints: no endpoint given")
        self._endpoints = [_split_endpoint(u) for u in endpoints]
        self._urls = list(endpoints)
        self.prefix = prefix.rstrip("/") or "/"
        self.config_key = posixpath.join(self.prefix, "config")
        self.subnets_prefix = posixpath.join(self.prefix, "subnets") + "/"
        self._subnets_prefix_bytes = self.subnets_prefix.encode("utf-8")
        self._config_key_bytes = self.config_key.encode("utf-8")
        self._cafile, self._certfile, self._keyfile = cafile, certfile, keyfile
        self._username, self._password = username, password
        self._timeout = timeout
        #: guards the client and the idle bookkeeping; the idle closer waits on it
        self._lock = threading.Condition(threading.Lock())
        self._client: Any = None
        self._closed = False
        #: calls running and gRPC watch streams open on the client (it is not closed under them)
        self._users = 0
        self._last_used = time.monotonic()
        self._idle_closer: threading.Thread | None = None
        #: how unary calls go: ``h2`` (h2grpc.py, for good), ``gateway`` until an endpoint turns out not
        #: to serve it (then ``grpc``, for good), or ``grpc`` forced
        self._mode = transport_mode()
        #: watches through gRPC: forced, or an endpoint does not serve the gateway (for good)
        self._watch_grpc = self._mode == "grpc"
        #: the endpoints and their unary clients (built at the first call: ``_h2_unary`` for ``h2``,
        #: ``_gw_unary`` for ``gateway``), the one to try first, the auth token
        self._gw_endpoints: list[gateway.Endpoint] | None = None
        self._gw_unary: list[gateway.Unary] = []
        self._h2_unary: list[h2grpc.Unary] = []
        self._gw_next = 0
        self._gw_token = ""
        self._gw_lock = threading.Lock()
        self._no_answers = 0
        #: monotonic time of the first "unavailable" failure since the last successful call
        self._failing_since: float | None = None
        self._warned_insecure = not warn_insecure
        #: records skipped at the trust boundary, per reason (exported as a metric)
        self.skipped = SkippedRecords("etcd key", log, metric_store="etcd")

    # -- connection ------------------------------------------------------------------------------

    def describe(self) -> str:
        who = f" as user {self._username}" if self._username else ""
        return f"etcd at {','.join(self._urls)}{who} (prefix {self.prefix})"

    def _credentials(self, secure: bool, url: str) -> Any:
        """As etcd's Go client: the URL scheme decides (http → plaintext, https → TLS); the client
        certificate is used only when both --etcd-certfile and --etcd-keyfile are set."""
        client_cert = bool(self._certfile and self._keyfile)
        if not secure:
            self._warn_insecure(url)
            return None
        if bool(self._certfile) != bool(self._keyfile):
            log.warning("only one of --etcd-certfile/--etcd-keyfile is set: connecting without a client certificate")
        ca = _read(self._cafile, "--etcd-cafile") if self._cafile else None
        key = _read(self._keyfile, "--etcd-keyfile") if client_cert else None
        cert = _read(self._certfile, "--etcd-certfile") if client_cert else None
        import grpc
        return grpc.ssl_channel_credentials(ca, key, cert)

    def _warn_insecure(self, url: str) -> None:
        """Said once, as flannel does, whichever transport connects to a plaintext endpoint first."""
        if not self._warned_insecure:
            if self._certfile and self._keyfile:
                log.warning("etcd endpoint %s is http://: the client certificate is not used. This is "
                            "insecure (use https:// endpoints)", url)
            else:
                log.warning("no certificate provided: connecting to etcd with http. This is insecure")
            self._warned_insecure = True

    def _connect(self) -> Any:
        """The client, connecting if there is none; counted as in use until ``_release``."""
        with self._lock:
            client = self._connect_locked()
            self._users += 1
            return client

    def _release(self) -> None:
        """A call or a gRPC watch stream is done with the client: the idle clock starts again."""
        with self._lock:
            self._users -= 1
            self._last_used = time.monotonic()
            if self._users == 0:
                self._lock.notify_all()

    def _connect_locked(self) -> Any:
        if self._closed:
            raise errors.StoreUnavailable(f"{self.describe()}: client closed")
        if self._client is not None:
            return self._client
        if self._idle_closer is None:
            self._idle_closer = threading.Thread(target=self._close_when_idle, name="etcd-idle-close", daemon=True)
            self._idle_closer.start()
        self._lock.notify_all()
        import pyetcd  # the gRPC path only: importing it (and grpc) costs the agent ~12 MB of RSS
        eps = []
        options = grpc_options()
        for url, (host, port, https) in zip(self._urls, self._endpoints):
            creds = self._credentials(https, url)
            eps.append(pyetcd.Endpoint(host, port, secure=creds is not None, creds=creds,
                                       time_retry=ENDPOINT_RETRY_SECONDS, opts=options))
        auth: dict[str, str] = {}
        if self._username:
            auth = {"user": self._username, "password": self._password}
        try:
            self._client = pyetcd.MultiEndpointEtcd3Client(endpoints=eps, timeout=self._timeout,
                                                           failover=True, **auth)
        except _library_errors() as e:
            for ep in eps:
                ep.close()
            raise self._convert(e, "connecting") from e
        # pyetcd sends the auth token twice: as call credentials (which gRPC refuses on a
        # plaintext channel) and as plain metadata, which is all etcd needs.
        self._client.call_credentials = None
        return self._client

    def _drop_client(self, client: Any) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        try:
            client.close()
        except _library_errors():
            pass

    def _endpoint_failed(self, client: Any, e: BaseException) -> None:
        """What pyetcd does after a unary call fails this way: the endpoint is marked failed, so the
        next call goes to another one (or, with one endpoint, waits ENDPOINT_RETRY_SECONDS)."""
        status = _grpc_status(e)
        if status is not None and status[0] in (_UNAVAILABLE, _DEADLINE_EXCEEDED, _INTERNAL):
            with self._lock:
                try:
                    client.endpoint_in_use.fail()
                    client._clear_old_stubs()
                except _library_errors() as err:  # pyetcd's bookkeeping only
                    log.debug("marking the etcd endpoint failed: %s", err)

    def _close_when_idle(self) -> None:
        """The idle closer's thread: close the gRPC client once nothing used it for
        IDLE_CHANNEL_SECONDS, so that gRPC's threads go quiet. It sleeps on the condition (no
        periodic wake-up): one wake-up per call, one per close."""
        threadname.name_this_thread()
        while True:
            with self._lock:
                client = self._wait_idle_client()
            if client is None:
                return
            log.debug("etcd client unused for %.0fs: closing its gRPC channel until the next call",
                      IDLE_CHANNEL_SECONDS)
            try:
                client.close()
            except _library_errors() as e:
                log.debug("closing the idle etcd client: %s", e)

    def _wait_idle_client(self) -> Any:
        """(under the lock) Wait until the client is idle, take it and return it; None once closed."""
        while not self._closed:
            if self._client is None or self._users:
                self._lock.wait()
                continue
            idle = time.monotonic() - self._last_used
            if idle < IDLE_CHANNEL_SECONDS:
                self._lock.wait(IDLE_CHANNEL_SECONDS - idle)
                continue
            client, self._client = self._client, None
            return client
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            client, self._client = self._client, None
        for unary in self._gw_unary:
            unary.close()
        for h2unary in self._h2_unary:
            h2unary.close()
        if client is not None:
            try:
                client.close()
            except _library_errors():
                pass

    def _convert(self, e: BaseException, what: str) -> Exception:
        """A pyetcd / gRPC exception → the flannel error callers handle."""
        from pyetcd import exceptions as etcd_exc  # the gRPC path only
        where = f"etcd ({','.join(self._urls)}) {what}"
        if isinstance(e, etcd_exc.RevisionCompactedError):
            return Compacted(e.compacted_revision)
        cause = e.__context__ if isinstance(e, etcd_exc.Etcd3Exception) else e  # pyetcd hides the gRPC error
        cause_status = _grpc_status(cause) if cause is not None else None
        if cause_status is not None:
            tls = self._tls_problem(cause_status[1])
            if tls is not None:
                return tls
        status = _grpc_status(e)
        if status is not None:
            return self._convert_status(*status, where)
        if isinstance(e, etcd_exc.NoServerAvailableError):
            return errors.StoreUnavailable(f"{where}: no endpoint reachable (each failed within the last "
                                           f"{ENDPOINT_RETRY_SECONDS:.0f}s)")
        if isinstance(e, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError,
                          etcd_exc.NoServerAvailableError, etcd_exc.WatchTimedOut,
                          etcd_exc.InternalServerError, ValueError)):
            return errors.StoreUnavailable(f"{where}: {e or type(e).__name__}")
        if isinstance(e, etcd_exc.PreconditionFailedError):
            return errors.StoreError(f"{where}: precondition failed")
        return errors.StoreError(f"{where}: {type(e).__name__}: {e}")

    def _convert_status(self, code: int, details: str, where: str) -> Exception:
        """A gRPC status code (from gRPC, or etcd's JSON gateway's ``code``) → the flannel error."""
        if code == _UNAUTHENTICATED or "auth store is old" in details:
            return _Reauthenticate(details)
        if code == _PERMISSION_DENIED:
            return errors.PermissionDenied(f"{where}: permission denied for user "
                                           f"{self._username or '(none)'}: {details}")
        if code == _INVALID_ARGUMENT and "authentication failed" in details:
            return errors.PermissionDenied(f"{where}: authentication failed for user "
                                           f"{self._username!r}: invalid user name or password")
        if code == _INVALID_ARGUMENT and "user name is empty" in details:
            return errors.PermissionDenied(f"{where}: etcd requires authentication; set --etcd-username and "
                                           f"--etcd-password")
        if code == _FAILED_PRECONDITION and "authentication is not enabled" in details:
            return errors.ConfigError(f"{where}: --etcd-username given but etcd has authentication "
                                      f"disabled")
        name = _CODE_NAMES.get(code, f"code {code}")
        if code in _UNAVAILABLE_CODES or code not in _CODE_NAMES:
            return errors.StoreUnavailable(f"{where}: {name.lower()}: {details}")
        return errors.StoreError(f"{where}: {name}: {details}")

    def _tls_problem(self, details: str, via: str = "gRPC") -> Exception | None:
        """gRPC's connection error text → what is most likely wrong with TLS, and which flag fixes it.

        gRPC reports a refused client certificate as ``Unwrap failed (TSI_DATA_CORRUPTED)`` (the
        server's alert arrives after the handshake), an unknown CA as ``CERTIFICATE_VERIFY_FAILED``
        and a name mismatch as ``Hostname Verification Check failed``; retrying fixes none of them.
        """
        where = f"TLS handshake with etcd ({','.join(self._urls)}) failed"
        got = f" ({via}: {details[:300]})" if details else ""
        if any(m in details for m in ("TSI_DATA_CORRUPTED", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED",
                                      "UNKNOWN_CA", "CERTIFICATE_EXPIRED")) and "VERIFY_FAILED" not in details:
            if not (self._certfile and self._keyfile):
                return errors.StoreTLSError(
                    f"{where}: etcd requires a client certificate and none was sent: set --etcd-certfile and "
                    f"--etcd-keyfile (FLANNELD_ETCD_CERTFILE/KEYFILE){got}")
            return errors.StoreTLSError(
                f"{where}: etcd rejected our client certificate {self._certfile}: it is not signed by a CA etcd "
                f"trusts (etcd --trusted-ca-file), has expired, or lacks the clientAuth usage{got}")
        if "CERTIFICATE_VERIFY_FAILED" in details:
            ca = f"--etcd-cafile {self._cafile}" if self._cafile else "the system CA bundle (no --etcd-cafile given)"
            why = "has expired" if "expired" in details else f"is not signed by a CA in {ca} (CA mismatch)"
            return errors.StoreTLSError(f"{where}: etcd's server certificate {why}{got}")
        if "Hostname Verification" in details or "not in peer certificate" in details:
            hosts = ", ".join(sorted({h for h, _, https in self._endpoints if https}))
            return errors.StoreTLSError(
                f"{where}: etcd's server certificate does not name the host we connect to ({hosts}): wrong server "
                f"name; use an endpoint whose host is in the certificate's subjectAltName{got}")
        if "WRONG_VERSION_NUMBER" in details or ("Handshake read failed" in details and "reset" in details):
            return errors.StoreUnavailable(
                f"{where}: the connection was reset during the handshake; if etcd serves plain http at this "
                f"address, use an http:// endpoint{got}")
        return None

    def _call(self, what: str, fn: Callable[[_KV], T]) -> T:
        """Run ``fn(kv)`` as gRPC over our HTTP/2 client (the default), through etcd's JSON gateway
        ($FLANNEL_ETCD_TRANSPORT=gateway) until an endpoint turns out not to serve it, or through
        grpcio ($FLANNEL_ETCD_TRANSPORT=grpc, or after that fallback), converting errors."""
        if self._mode != "grpc":
            try:
                return self._gateway_call(what, fn)
            except gateway.NotGateway as e:   # (the gateway transport only)
                self._fall_back(e)
        return self._grpc_call(what, lambda client: fn(_GrpcKV(client)))

    def _fall_back(self, e: BaseException) -> None:
        """The endpoint does not serve the JSON gateway: watches go through gRPC from now on, and so
        do unary calls if they went through the gateway (said once, at INFO). Unary calls over h2
        need no fallback: they are gRPC already."""
        with self._gw_lock:
            if self._watch_grpc:
                return
            self._watch_grpc = True
            unary_too = self._mode == "gateway"
            if unary_too:
                self._mode = "grpc"
        if unary_too:
            for unary in self._gw_unary:
                unary.close()
        log.info("etcd (%s) does not serve its JSON gateway (%s): using gRPC for its %s",
                 ",".join(self._urls), e, "calls and watches" if unary_too else "watches")

    def _kv(self, index: int, token: str, what: str) -> _KV:
        if self._mode == "h2":
            return _H2KV(self._h2_unary[index], token, what)
        return _GatewayKV(self._gw_unary[index], token, what)

    def _gateway_call(self, what: str, fn: Callable[[_KV], T]) -> T:
        """Run ``fn(kv)`` over h2 or the gateway, starting at the endpoint that last worked:
        re-authenticates once on a rejected token, and moves on to the next endpoint when one is
        down (refused, timed out, closed, an "unavailable" answer); the next call starts at the one
        that worked. A call that timed out is not sent again to the same endpoint.

        :raises gateway.NotGateway: the endpoint does not serve the gateway (use gRPC).
        """
        if self._closed:
            raise errors.StoreUnavailable(f"{self.describe()}: client closed")
        eps = self._gateway_endpoints()
        attempts = max(2, len(eps))
        index, stale, token = self._gw_next, "", ""
        for attempt in range(attempts):
            more_endpoints = attempt + 1 < len(eps)
            try:
                token = self._token(index, stale)
                result = fn(self._kv(index, token, what))
            except gateway.GatewayError as e:
                err = self._gateway_error(e, what)
                if isinstance(err, _Reauthenticate):
                    if attempt + 1 < attempts and token and not stale:
                        log.info("etcd rejected our auth token (%s); authenticating again", err)
                        stale = token
                        continue
                    err = errors.PermissionDenied(f"etcd {what}: authentication token rejected: {err}")
                elif isinstance(err, errors.StoreUnavailable) and more_endpoints:
                    index = (index + 1) % len(eps)
                    continue
                raise err from e
            except gateway.TLSFailure as e:
                tls = self._tls_problem(e.details, "ssl")
                if more_endpoints:
                    index = (index + 1) % len(eps)
                    continue
                raise (tls or e) from e
            except errors.StoreUnavailable as e:
                if isinstance(e, _Reauthenticate):
                    raise
                self._count_no_answer(e)
                if more_endpoints:
                    index = (index + 1) % len(eps)
                    continue
                raise
            self._no_answers = 0
            self._gw_next = index
            return result
        raise AssertionError("unreachable")

    def _count_no_answer(self, e: errors.StoreUnavailable) -> None:
        """NO_ANSWER_FALLBACK answers in a row of "closed without a byte" (calls and watches alike):
        the endpoint does not speak HTTP/1.1 (a gRPC-only server or proxy).

        :raises gateway.NotGateway: that many in a row.
        """
        if isinstance(e, gateway.NoAnswer):
            self._no_answers += 1
            if self._no_answers >= NO_ANSWER_FALLBACK:
                raise gateway.NotGateway(f"{self._no_answers} requests in a row were answered by closing "
                                         f"the connection") from e

    def _grpc_call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` with the gRPC client, converting errors. Re-authenticates once on a
        rejected token and moves on to the next endpoint when one is down (pyetcd fails over, but
        does not retry)."""
        library_errors = _library_errors()
        attempts = max(2, len(self._endpoints))
        for attempt in range(attempts):
            client = self._connect()
            try:
                result = fn(client)
            except library_errors as e:
                self._release()
                err = self._convert(e, what)
                if isinstance(err, errors.StoreUnavailable) and not isinstance(err, _Reauthenticate):
                    self._note_unavailable(client)
                if isinstance(err, _Reauthenticate):
                    if attempt + 1 < attempts:
                        log.info("etcd rejected our auth token (%s); authenticating again", err)
                        self._drop_client(client)
                        continue
                    err = errors.PermissionDenied(f"etcd {what}: authentication token rejected: {err}")
                elif (isinstance(err, errors.StoreUnavailable | errors.StoreTLSError)
                      and attempt + 1 < len(self._endpoints)):
                    continue  # another endpoint may work (pyetcd moves on to it)
                raise err from e
            except BaseException:
                self._release()
                raise
            self._release()
            self._failing_since = None
            return result
        raise AssertionError("unreachable")

    def _note_unavailable(self, client: Any) -> None:
        """Count an "unavailable" failure; after FRESH_CONNECTION_AFTER_SECONDS of nothing but
        those, drop the client so that the next call connects afresh.

        Why: a gRPC channel whose server went away (a GOAWAY on etcd's shutdown, then refused
        connections) is meant to reconnect by itself, but under load it was seen to keep failing
        every call with UNAVAILABLE for 30 s and more after etcd was back, while a new channel
        connects at once (tests/integration/test_agents.py etcd outage, about one run in three in
        CI). A fresh connection costs one TCP and HTTP/2 handshake; it is only made while nothing
        works anyway, so it can cost no working watch or call anything.
        """
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= FRESH_CONNECTION_AFTER_SECONDS:
            log.info("etcd (%s) unavailable for %.0fs: opening a fresh connection for the next call",
                     ",".join(self._urls), now - self._failing_since)
            self._failing_since = now
            self._drop_client(client)

    # -- keys and records: the trust boundary ----------------------------------------------------

    def lease_key(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> str:
        return self.subnets_prefix + wire.format_subnet_key(subnet, ipv6_subnet)

    def _expiration(self, kv: _KV, lease_id: int, ttl: bool) -> float | None:
        if lease_id == 0:
            return None  # a reservation: no etcd lease, never expires
        if not ttl:
            return TTL_NOT_LOOKED_UP
        return time.time() + max(kv.time_to_live(lease_id), 0)

    def _untrusted(self, key: Any, decode: Callable[[], T]) -> T | None:
        """Run ``decode`` on one untrusted record; on any failure skip the record (None).

        Anything at all that goes wrong while decoding one record (including RecursionError,
        MemoryError, UnicodeDecodeError, a wrong JSON type) is counted under its reason and logged
        at a bounded rate, naming the key; it never escapes, so no bad record can end a listing, a
        watch or a thread.
        """
        try:
            return decode()
        except errors.BadLeaseRecord as e:
            self.skipped.skip(_show_key(key), e.reason, str(e))
        except Exception as e:  # the boundary: whatever an untrusted record does, skip only it
            self.skipped.skip(_show_key(key), "internal", f"{type(e).__name__}: {str(e)[:200]}")
        return None

    def _record(self, key: Any, value: Any, expiration: float | None = None) -> tuple[Lease | None, Subnets | None]:
        """THE place where an etcd key/value becomes a Lease — or is skipped.

        Returns ``(lease, None)`` for a good record and ``(None, subnets)`` for a skipped one, where
        ``subnets`` is what its key names (None if the key is not a subnet key): such a key still
        occupies its subnet. The key is parsed once; the value is decoded against what it named.
        ``expiration`` becomes the lease's.

        The same containment as ``_untrusted``, written out: this runs for every lease of a
        listing and every watch event, and a closure per step cost more than the steps.
        """
        nets = self._key_subnets(key)
        if nets is None:
            return None, None
        try:
            attrs = wire.decode_attrs(bytes(value))
        except errors.BadLeaseRecord as e:
            self.skipped.skip(_show_key(key), e.reason, str(e))
            return None, nets
        except Exception as e:  # as above
            self.skipped.skip(_show_key(key), "internal", f"{type(e).__name__}: {str(e)[:200]}")
            return None, nets
        return Lease(subnet=nets[0], ipv6_subnet=nets[1], attrs=attrs, expiration=expiration), None

    def _too_large_record(self, key: Any) -> Subnets | None:
        """A record whose value alone is over MAX_RECEIVE_BYTES: skipped (counted, logged) like any
        oversized value; what its key names still occupies that subnet."""
        def refuse() -> Subnets:
            nets = self._parse_key(key)
            raise errors.BadLeaseRecord(f"lease value is larger than the {MAX_RECEIVE_BYTES} bytes we accept "
                                        f"from etcd (subnet {nets[0]})", "size")
        self._untrusted(key, refuse)
        return self._untrusted(key, lambda: self._parse_key(key))

    def _key_subnets(self, key: Any) -> Subnets | None:
        """What a key names; None (skipped: counted, logged) if it is not a subnet key. For a DELETE
        event (no value) and as the first half of ``_record``; contained as in ``_untrusted``."""
        try:
            return self._parse_key(key)
        except errors.BadLeaseRecord as e:
            self.skipped.skip(_show_key(key), e.reason, str(e))
        except Exception as e:  # the boundary, as in _untrusted
            self.skipped.skip(_show_key(key), "internal", f"{type(e).__name__}: {str(e)[:200]}")
        return None

    def _parse_key(self, key: Any) -> Subnets:
        """``<prefix>/subnets/<name>`` → the subnets it names.

        :raises errors.BadLeaseRecord: not UTF-8, not under the subnets prefix, not a subnet key."""
        if type(key) is bytes and key.startswith(self._subnets_prefix_bytes):   # the common key, quickly
            nets = wire.parse_subnet_key_bytes(key[len(self._subnets_prefix_bytes):])
            if nets is not None:
                return nets
        try:
            skey = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise errors.BadLeaseRecord("the key is not UTF-8", "key") from None
        if not skey.startswith(self.subnets_prefix):
            raise errors.BadLeaseRecord(f"not under {self.subnets_prefix}", "key")
        name = skey[len(self.subnets_prefix):]
        nets = wire.parse_subnet_key(name)
        if nets is None:
            raise errors.BadLeaseRecord(f"{name[:80]!r} is not a subnet key (expected like 10.5.34.0-24)", "key")
        return nets

    def _get_one(self, c: _KV, key: str) -> tuple[Any, int, bool]:
        """One key: ``(kv or None, header revision, whether its value was too large to receive)``.
        A value over MAX_RECEIVE_BYTES is read again without it (``kv.value`` is then empty)."""
        raw = key.encode("utf-8")
        try:
            resp = c.range(raw, b"")
        except Exception as e:   # only a too-large answer is handled here: anything else is re-raised
            if not _too_large(e):
                raise
            resp = c.range(raw, b"", keys_only=True)
            return (resp.kvs[0] if resp.kvs else None), resp.revision, bool(resp.kvs)
        return (resp.kvs[0] if resp.kvs else None), resp.revision, False

    # -- config ----------------------------------------------------------------------------------

    def get_config(self) -> str:
        kv, _rev, too_large = self._call(f"reading {self.config_key}", lambda c: self._get_one(c, self.config_key))
        if too_large:
            raise errors.ConfigError(f"invalid network config in etcd key {self.config_key}: larger than the "
                                     f"{MAX_RECEIVE_BYTES} bytes we accept from etcd")
        if kv is None:
            raise errors.ConfigNotFound(
                f"flannel config not found in etcd store (key {self.config_key} at {','.join(self._urls)}). "
                f"{CONFIG_NOT_FOUND_HINT}")
        return self._config_text(kv.value)

    def _config_text(self, value: Any) -> str:
        raw = bytes(value)
        if len(raw) > MAX_CONFIG_BYTES:
            raise errors.ConfigError(f"invalid network config in etcd key {self.config_key}: {len(raw)} bytes, "
                                     f"more than the {MAX_CONFIG_BYTES} allowed")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.ConfigError(f"invalid network config in etcd key {self.config_key}: not UTF-8: {e}") from None

    def put_config(self, text: str) -> None:
        self._call(f"writing {self.config_key}", lambda c: c.put(self._config_key_bytes, text.encode("utf-8")))

    # -- leases ----------------------------------------------------------------------------------

    def list_leases(self, *, ttl: bool = False) -> Listing:
        """Every lease, read in pages of at most LIST_PAGE_KEYS keys, all at the revision of the
        first page (a consistent snapshot however many pages it takes); a page too large to
        receive is read again with fewer keys."""
        def op(c: Any) -> Listing:
            for _ in range(LIST_ATTEMPTS):
                try:
                    return self._list_pages(c, ttl)
                except _Restart:
                    log.info("etcd compacted the revision of our listing of %s between two pages; listing again",
                             self.subnets_prefix)
            raise errors.StoreUnavailable(f"listing {self.subnets_prefix}: etcd compacted the listing's revision "
                                          f"{LIST_ATTEMPTS} times in a row")
        with memory.gc_paused():   # thousands of leases, kept: no full collection in the middle of them
            return self._call(f"listing {self.subnets_prefix}", op)

    def _list_pages(self, c: _KV, ttl: bool) -> Listing:
        """The pages of one listing. The next page is asked for (``_NextPage``) as soon as a page
        has arrived, before it is decoded: etcd's gateway takes ~28 ms to marshal a page of 1000
        leases as JSON, about what we take to decode one, and the two now overlap on two cores
        (at 10 000 leases: 0.50-0.59 s → see docs/benchmarks.md)."""
        start = self.subnets_prefix.encode("utf-8")
        end = _prefix_range_end(start)
        revision = 0
        limit = LIST_PAGE_KEYS
        out: list[Lease] = []
        occupied: list[Subnets] = []
        ahead: _NextPage | None = None
        try:
            while True:
                try:
                    resp = ahead.result() if ahead is not None else c.range(start, end, limit=limit,
                                                                             revision=revision)
                    ahead = None
                except Exception as e:   # compaction and a too-large page are handled: anything else is re-raised
                    ahead = None
                    if _compacted_range(e):
                        raise _Restart() from e
                    if not _too_large(e):
                        raise
                    if limit > 1:
                        limit = max(1, limit // 4)
                        continue
                    resp = c.range(start, end, limit=1, revision=revision, keys_only=True)
                    revision = revision or resp.revision
                    if not resp.kvs:
                        break
                    nets = self._too_large_record(resp.kvs[0].key)
                    if nets is not None:
                        occupied.append(nets)
                    start = bytes(resp.kvs[0].key) + b"\0"
                    if not resp.more:
                        break
                    continue
                revision = revision or resp.revision
                last = not resp.more or not resp.kvs
                if not last:
                    start = bytes(resp.kvs[-1].key) + b"\0"
                    limit = min(LIST_PAGE_KEYS, limit * 2)
                    ahead = _NextPage(c, start, end, limit, revision)
                self._decode_page(c, resp, ttl, out, occupied)
                if last:
                    break
        finally:
            if ahead is not None:
                ahead.abandon()
        return Listing(out, revision, tuple(occupied))

    def _decode_page(self, c: _KV, resp: gateway.RangeResult, ttl: bool, out: list[Lease],
                     occupied: list[Subnets]) -> None:
        record = self._record
        for kv in resp.kvs:
            lease_id = kv.lease
            # the expiration goes in at once when no RPC is needed for it (a listing of
            # thousands of leases); a looked-up TTL is asked for good records only
            lease, nets = record(kv.key, kv.value, None if lease_id == 0 else TTL_NOT_LOOKED_UP)
            if lease is not None:
                if ttl and lease_id != 0:
                    lease = dataclasses.replace(lease, expiration=self._expiration(c, lease_id, ttl))
                out.append(lease)
            elif nets is not None:
                occupied.append(nets)

    def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, *, ttl: bool = True) -> Stored:
        key = self.lease_key(subnet, ipv6_subnet)

        def op(c: _KV) -> Stored:
            kv, rev, too_large = self._get_one(c, key)
            if kv is None:
                return Stored(None, False, 0, rev)
            lease = None
            if too_large:
                self._too_large_record(kv.key)
            else:
                lease, _ = self._record(kv.key, kv.value)
            if lease is not None:
                lease = dataclasses.replace(lease, expiration=self._expiration(c, kv.lease, ttl))
            return Stored(lease, True, int(kv.mod_revision), rev)
        return self._call(f"reading {key}", op)

    def create_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int) -> Lease:
        key = self.lease_key(subnet, ipv6_subnet)
        value = wire.encode_attrs(attrs).encode("utf-8")
        raw = key.encode("utf-8")

        def op(c: _KV) -> Lease:
            grant, granted = c.grant(ttl)
            # An error here is ambiguous (a timeout: the key may now exist, attached to ``grant``):
            # revoking would delete it. The grant expires on its own; the caller re-lists and finds
            # the key by our public IP if the create did happen.
            if not c.put_if(raw, value, grant, version=0):
                c.revoke_quietly(grant)  # certain: nothing was written, nothing is attached to it
                raise errors.LeaseConflict(f"subnet {subnet} is already taken (key {key} exists)")
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + granted)
        return self._call(f"creating {key}", op)

    def update_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int | None) -> Lease:
        key = self.lease_key(subnet, ipv6_subnet)
        value = wire.encode_attrs(attrs).encode("utf-8")
        raw = key.encode("utf-8")

        def op(c: _KV) -> Lease:
            if ttl is None:
                c.put(raw, value)
                return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=None)
            grant, granted = c.grant(ttl)
            c.put(raw, value, lease=grant)  # a failure may be a put that happened: never revoke
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + granted)
        return self._call(f"writing {key}", op)

    def renew_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                    ttl: int, *, mod_revision: int) -> Lease:
        key = self.lease_key(subnet, ipv6_subnet)
        value = wire.encode_attrs(attrs).encode("utf-8")
        raw = key.encode("utf-8")

        def op(c: _KV) -> Lease:
            grant, granted = c.grant(ttl)
            if not c.put_if(raw, value, grant, mod_revision=mod_revision):
                c.revoke_quietly(grant)
                raise KeyChanged(f"{key} changed since revision {mod_revision} (deleted, expired or rewritten)")
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + granted)
        return self._call(f"renewing {key}", op)

    def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> None:
        key = self.lease_key(subnet, ipv6_subnet)
        self._call(f"deleting {key}", lambda c: c.delete(key.encode("utf-8")))

    # -- watches ---------------------------------------------------------------------------------

    def watch_leases(self, start_revision: int) -> WatchHandle:
        """One watch of everything under the prefix: every lease key and the config key."""
        root = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        return self._watch(root, prefix=True, start_revision=start_revision)

    def watch_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None,
                    start_revision: int) -> WatchHandle:
        return self._watch(self.lease_key(subnet, ipv6_subnet), prefix=False, start_revision=start_revision)

    def _watch(self, key: str, *, prefix: bool, start_revision: int) -> WatchHandle:
        raw = key.encode("utf-8")
        start = max(1, start_revision)
        range_end = _prefix_range_end(raw) if prefix else b""
        what = f"watching {key} from revision {start_revision}"
        if not self._watch_grpc:
            try:
                return self._gateway_watch(key, raw, range_end, start, what)
            except gateway.NotGateway as e:
                self._fall_back(e)
        from pyetcd import etcdrpc  # the gRPC path only
        create = etcdrpc.WatchCreateRequest(key=raw, start_revision=start, progress_notify=True)
        if prefix:
            create.range_end = range_end
        request = etcdrpc.WatchRequest(create_request=create)
        return self._grpc_call(what, lambda c: _Stream(self, c, key, request))
        # (errors of the watch itself, e.g. a compacted start revision, are raised by its ``next``)

    # -- watches through etcd's JSON gateway (gateway.py) ----------------------------------------

    def _gateway_endpoints(self) -> list[gateway.Endpoint]:
        if self._gw_endpoints is None:
            with self._gw_lock:
                if self._gw_endpoints is None:
                    self._gw_endpoints = self._make_gateway_endpoints()
        return self._gw_endpoints

    def _make_gateway_endpoints(self) -> list[gateway.Endpoint]:
        """(under _gw_lock) The endpoints and their unary clients (``_gw_unary``), built once."""
        tls: ssl.SSLContext | None = None
        h2tls: ssl.SSLContext | None = None
        if any(https for _, _, https in self._endpoints):
            client_cert = bool(self._certfile and self._keyfile)
            files = (self._cafile, self._certfile if client_cert else "", self._keyfile if client_cert else "")
            try:
                tls = gateway.tls_context(*files)
                h2tls = h2grpc.tls_context(*files) if self._mode == "h2" else None   # (ALPN h2, for HTTP/2)
            except (OSError, ssl.SSLError) as e:
                raise errors.ConfigError(f"--etcd-cafile/--etcd-certfile/--etcd-keyfile: cannot load the TLS "
                                         f"files: {e}") from None
        eps = [gateway.Endpoint(host.strip("[]"), port, tls if https else None)
               for host, port, https in self._endpoints]
        for url, (_, _, https) in zip(self._urls, self._endpoints):
            if not https:
                self._warn_insecure(url)
        ka = self._keepalive()
        if self._mode == "h2":
            self._h2_unary = [h2grpc.Unary(gateway.Endpoint(ep.host, ep.port, h2tls if ep.tls else None),
                                           timeout=self._timeout, keepalive=ka, max_bytes=MAX_RECEIVE_BYTES)
                              for ep in eps]
        else:
            self._gw_unary = [gateway.Unary(ep, timeout=self._timeout, keepalive=ka,
                                            max_bytes=_gateway_line_limit()) for ep in eps]
        return eps

    def _keepalive(self) -> gateway.Keepalive:
        return gateway.Keepalive(*keepalive_seconds())

    def _token(self, index: int, stale: str) -> str:
        """The auth token for h2 and gateway requests ("" without --etcd-username): the one we have,
        or a new one from endpoint ``index`` (over h2 when unary calls go that way, else through
        the gateway) when we have none or ``stale`` (the one etcd just rejected) is current."""
        if not self._username:
            return ""
        with self._gw_lock:
            if self._gw_token and self._gw_token != stale:
                return self._gw_token
            what = f"authenticating as {self._username}"
            try:
                if self._mode == "h2":
                    self._gw_token = self._h2_unary[index].authenticate(self._username, self._password)
                else:
                    assert self._gw_endpoints is not None   # (built before any call asks for a token)
                    self._gw_token = gateway.authenticate(self._gw_endpoints[index], self._username,
                                                          self._password, timeout=self._timeout,
                                                          keepalive=self._keepalive())
            except gateway.GatewayError as e:
                raise self._gateway_error(e, what) from None
            return self._gw_token

    def _gateway_error(self, e: gateway.GatewayError, what: str) -> Exception:
        return self._convert_status(e.code, e.message, f"etcd ({','.join(self._urls)}) {what}")

    def _gateway_watch(self, key: str, raw: bytes, range_end: bytes, start: int, what: str) -> _GatewayStream:
        """A watch through the gateway, on the first endpoint that takes it (starting from the one
        that last did); re-authenticates once when etcd rejects the token.

        :raises gateway.NotGateway: the endpoint does not serve the gateway (use gRPC).
        """
        request: dict[str, Any] = {"key": _b64(raw), "start_revision": str(start), "progress_notify": True}
        if range_end:
            request["range_end"] = _b64(range_end)
        eps = self._gateway_endpoints()
        index, stale, failed = self._gw_next, "", 0
        while True:
            ep = eps[index]
            try:
                token = self._token(index, stale)
                w = gateway.Watch(ep, request, token, timeout=self._timeout, keepalive=self._keepalive(),
                                  max_bytes=_gateway_line_limit(), silence=WATCH_SILENCE_SECONDS, what=what)
            except gateway.GatewayError as e:
                err = self._gateway_error(e, what)
                if isinstance(err, _Reauthenticate) and not stale and token:
                    stale = token
                    log.info("etcd rejected our auth token (%s); authenticating again", err)
                    continue
                raise err from e
            except errors.StoreUnavailable as e:
                self._count_no_answer(e)
                failed += 1
                if failed >= len(eps):
                    raise
                index = (index + 1) % len(eps)   # the next endpoint
                continue
            self._no_answers = 0
            reason = w.created.cancel_reason
            if w.created.canceled and token and not stale and ("Unauthenticated" in reason
                                                               or "auth store is old" in reason):
                w.cancel()
                stale = token
                log.info("etcd refused our watch with the auth token (%s); authenticating again", reason)
                continue
            self._gw_next = index
            return _GatewayStream(self, w, key, index)

    def _gateway_stream_failed(self, index: int) -> None:
        """A gateway watch through endpoint ``index`` broke (a hung etcd, a dead connection, a
        stream error): the next watch tries the next endpoint first. Without this, re-watching would
        start at the same member, and a hung one accepts the connection and lets the creation
        time out (RPC_TIMEOUT_SECONDS) before we move on; its liveness probe already failed."""
        eps = self._gw_endpoints or []
        if len(eps) > 1 and self._gw_next == index:
            self._gw_next = (index + 1) % len(eps)

    def _chunk(self, revision: int, events: Iterable[gateway.Event]) -> WatchChunk:
        """One watch response's events → a WatchChunk (gRPC and gateway alike). ``revision``: the
        header's, which a response without events (a progress notification) brings us to."""
        out: list[LeaseEvent] = []
        touched: list[tuple[Subnets, int]] = []
        config: ConfigUpdate | None = None
        subnets = self._subnets_prefix_bytes
        config_key = self._config_key_bytes
        record = self._record
        for deleted, key, value, mod_revision, lease_id in events:
            revision = int(mod_revision)  # events arrive in revision order
            if not key.startswith(subnets):
                if key == config_key:
                    config = self._config_update(deleted, value)
                continue  # something else under the prefix: not ours to read
            if deleted:
                nets = self._key_subnets(key)
                if nets is not None:
                    touched.append((nets, revision))
                    out.append(LeaseEvent(EventType.REMOVED, Lease(subnet=nets[0], ipv6_subnet=nets[1],
                                                                   attrs=_NO_ATTRS)))
                continue
            lease, skipped = record(key, value, None if lease_id == 0 else TTL_NOT_LOOKED_UP)
            if lease is not None:
                touched.append(((lease.subnet, lease.ipv6_subnet), revision))  # type: ignore[arg-type]
                out.append(LeaseEvent(EventType.ADDED, lease))
            elif skipped is not None:
                touched.append((skipped, revision))
        return WatchChunk(revision=revision, events=tuple(out), config=config, touched=tuple(touched))

    def _config_update(self, deleted: bool, value: Any) -> ConfigUpdate | None:
        if deleted:
            return ConfigUpdate(None)
        try:
            return ConfigUpdate(self._config_text(value))
        except errors.ConfigError as e:
            log.error("%s; keeping the running config", e)
            return None

    def _watch_ended(self, key: str, canceled: bool, reason: str, compact_revision: int) -> Exception | None:
        """What a compacted or cancelled watch response means (None for a normal one)."""
        if compact_revision:
            return Compacted(int(compact_revision))
        if canceled:
            reason = reason or "no reason given"
            if "permission denied" in reason:
                return errors.PermissionDenied(f"etcd watch on {key}: {reason} (user {self._username or '(none)'})")
            if "user name is empty" in reason:
                return errors.PermissionDenied(f"etcd watch on {key}: etcd requires authentication; set "
                                               f"--etcd-username and --etcd-password")
            return errors.StoreUnavailable(f"etcd cancelled the watch on {key}: {reason}")
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _gateway_line_limit() -> int:
    """The longest line of a gateway watch stream we read (one response as JSON): a response of
    MAX_RECEIVE_BYTES of keys and values is 4/3 of it in base64, plus the JSON around each event."""
    return MAX_RECEIVE_BYTES * 3 // 2


class _NextPage:
    """The next page of a listing, asked for on a thread of its own while the current one is
    decoded. ``result()`` is that call's answer or raises what it raised, exactly as calling
    ``c.range`` at that point would (the listing's error handling is the same either way)."""

    def __init__(self, c: _KV, start: bytes, end: bytes, limit: int, revision: int) -> None:
        self._answer: gateway.RangeResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(c, start, end, limit, revision),
                                        name="etcd-next-page", daemon=True)
        self._thread.start()

    def _run(self, c: _KV, start: bytes, end: bytes, limit: int, revision: int) -> None:
        try:
            self._answer = c.range(start, end, limit=limit, revision=revision)
        except BaseException as e:   # handed to the listing, which handles or raises it
            self._error = e

    def result(self) -> gateway.RangeResult:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    def abandon(self) -> None:
        """The listing ended early (an error): wait for the call (bounded by its timeout), drop its answer."""
        self._thread.join()


class _KV(Protocol):
    """The unary calls the registry's operations make, over either transport (``_GatewayKV``,
    ``_GrpcKV``): raising that transport's errors, which ``EtcdRegistry._call`` converts."""

    def range(self, key: bytes, range_end: bytes, *, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> gateway.RangeResult: ...

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def put_if(self, key: bytes, value: bytes, lease: int, *, version: int | None = None,
               mod_revision: int | None = None) -> bool: ...

    def grant(self, ttl: int) -> tuple[int, int]: ...

    def revoke_quietly(self, lease_id: int) -> None:
        """Revoke an etcd lease nothing is attached to; a failure is only logged (it expires on its own)."""

    def time_to_live(self, lease_id: int) -> int: ...


class _GatewayKV:
    """``_KV`` over etcd's JSON gateway: one endpoint's kept connection (gateway.Unary) and our token."""

    def __init__(self, unary: gateway.Unary, token: str, what: str) -> None:
        self._u, self._token, self._what = unary, token, what

    def range(self, key: bytes, range_end: bytes, *, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> gateway.RangeResult:
        return self._u.range(key, range_end, self._token, self._what, limit=limit, revision=revision,
                             keys_only=keys_only)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        self._u.put(key, value, lease, self._token, self._what)

    def delete(self, key: bytes) -> None:
        self._u.delete(key, self._token, self._what)

    def put_if(self, key: bytes, value: bytes, lease: int, *, version: int | None = None,
               mod_revision: int | None = None) -> bool:
        return self._u.put_if(key, value, lease, self._token, self._what, version=version, mod_revision=mod_revision)

    def grant(self, ttl: int) -> tuple[int, int]:
        return self._u.grant(ttl, self._token, self._what)

    def revoke_quietly(self, lease_id: int) -> None:
        try:
            self._u.revoke(lease_id, self._token, self._what)
        except (errors.StoreError, gateway.NotGateway) as e:  # it expires on its own; nothing is attached to it
            log.debug("could not revoke unused etcd lease %x: %s", lease_id, e)

    def time_to_live(self, lease_id: int) -> int:
        return self._u.time_to_live(lease_id, self._token, self._what)


class _H2KV:
    """``_KV`` as gRPC over our HTTP/2 client (h2grpc.Unary: one endpoint's kept connection) and our token."""

    def __init__(self, unary: h2grpc.Unary, token: str, what: str) -> None:
        self._u, self._token, self._what = unary, token, what

    def range(self, key: bytes, range_end: bytes, *, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> gateway.RangeResult:
        return self._u.range(key, range_end, self._token, self._what, limit=limit, revision=revision,
                             keys_only=keys_only)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        self._u.put(key, value, lease, self._token, self._what)

    def delete(self, key: bytes) -> None:
        self._u.delete(key, self._token, self._what)

    def put_if(self, key: bytes, value: bytes, lease: int, *, version: int | None = None,
               mod_revision: int | None = None) -> bool:
        return self._u.put_if(key, value, lease, self._token, self._what, version=version, mod_revision=mod_revision)

    def grant(self, ttl: int) -> tuple[int, int]:
        return self._u.grant(ttl, self._token, self._what)

    def revoke_quietly(self, lease_id: int) -> None:
        try:
            self._u.revoke(lease_id, self._token, self._what)
        except errors.StoreError as e:  # it expires on its own; nothing is attached to it
            log.debug("could not revoke unused etcd lease %x: %s", lease_id, e)

    def time_to_live(self, lease_id: int) -> int:
        return self._u.time_to_live(lease_id, self._token, self._what)


class _GrpcKV:
    """``_KV`` over pyetcd's gRPC client (FLANNEL_ETCD_TRANSPORT=grpc, or the gateway's fallback)."""

    def __init__(self, client: Any) -> None:
        self._c = client

    def range(self, key: bytes, range_end: bytes, *, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> gateway.RangeResult:
        if range_end:
            resp = self._c.get_range_response(key, range_end, limit=limit, revision=revision or None,
                                              keys_only=keys_only)
        else:
            resp = self._c.get_response(key, keys_only=keys_only)
        # the protobuf KeyValues have the attributes the registry reads (key, value, mod_revision, lease)
        return gateway.RangeResult(list(resp.kvs), bool(resp.more), int(resp.count), int(resp.header.revision))

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        self._c.put(key, value, lease=lease or None)

    def delete(self, key: bytes) -> None:
        self._c.delete(key)

    def put_if(self, key: bytes, value: bytes, lease: int, *, version: int | None = None,
               mod_revision: int | None = None) -> bool:
        t = self._c.transactions
        compare = t.version(key) == version if version is not None else t.mod(key) == mod_revision
        ok, _ = self._c.transaction(compare=[compare], success=[t.put(key, value, lease=lease or None)], failure=[])
        return bool(ok)

    def grant(self, ttl: int) -> tuple[int, int]:
        grant = self._c.lease(ttl)
        return int(grant.id), int(grant.ttl)

    def revoke_quietly(self, lease_id: int) -> None:
        try:
            self._c.revoke_lease(lease_id)
        except _library_errors() as e:  # it expires on its own; nothing is attached to it
            log.debug("could not revoke unused etcd lease %x: %s", lease_id, e)

    def time_to_live(self, lease_id: int) -> int:
        return int(self._c.get_lease_info(lease_id).TTL)


class _GatewayStream:
    """One etcd watch read through the JSON gateway (gateway.Watch), with the same contract as
    ``_Stream``: ``next()`` → WatchChunk, ``cancel()`` from any thread."""

    def __init__(self, reg: EtcdRegistry, watch: gateway.Watch, key: str, index: int) -> None:
        self._reg, self._watch, self._key, self._index = reg, watch, key, index
        created = watch.created
        #: a refusal that came with the creation answer (permission denied, ...): raised by ``next``
        self._refused = reg._watch_ended(key, created.canceled, created.cancel_reason, created.compact_revision)

    def next(self) -> WatchChunk:
        """The next response's events, decoded (blocks until there is one); raises as ``_Stream.next``."""
        if self._refused is not None:
            self.cancel()
            raise self._refused
        try:
            resp = self._watch.read()
        except gateway.GatewayError as e:
            self._reg._gateway_stream_failed(self._index)
            err = self._reg._gateway_error(e, f"watch on {self._key}")
            if not isinstance(err, errors.StoreUnavailable):
                err = errors.StoreUnavailable(str(err))
            raise err from e
        except errors.StoreUnavailable:
            if not self._watch.cancelled:
                self._reg._gateway_stream_failed(self._index)
            raise
        ended = self._reg._watch_ended(self._key, resp.canceled, resp.cancel_reason, resp.compact_revision)
        if ended is not None:
            self.cancel()
            raise ended
        return self._reg._chunk(resp.revision, resp.events)

    def cancel(self) -> None:
        """Stop the watch (idempotent, never raises; any thread)."""
        self._watch.cancel()


class _Stream:
    """One etcd watch through gRPC, read on the thread that asked for it (the fallback when the
    endpoint does not serve etcd's JSON gateway, or with $FLANNEL_ETCD_WATCH=grpc).

    It is a server stream (one create request, then responses; etcd keeps a watch whose client
    has half-closed its side), on a channel with gRPC's single-threaded unary-stream option: the
    caller's ``next()`` waits in gRPC's C core for the next response, with no Python thread of
    pyetcd's polling a queue, no channel thread and no hand-off per response. ``cancel()`` may be
    called from any thread (a stop hook): a ``next()`` waiting then raises StoreUnavailable.
    While it is open the client counts it as a user (the idle closer leaves the channel open).
    """

    def __init__(self, reg: EtcdRegistry, client: Any, key: str, request: Any) -> None:
        self._reg, self._client, self._key = reg, client, key
        self._cancelled = False
        from grpc._cython import cygrpc  # the gRPC path only
        from pyetcd import etcdrpc
        grpcwait.lengthen_signal_checks(cygrpc)   # a blocked next() sleeps instead of waking 5×/s (see grpcwait)
        method = client.channel.unary_stream(_WATCH_METHOD, request_serializer=etcdrpc.WatchRequest.SerializeToString,
                                             response_deserializer=etcdrpc.WatchResponse.FromString)
        self._call = method(request, metadata=client.metadata)
        self._responses = iter(self._call)
        self._created = False   # the first response answers the creation (``next`` reads it)
        self._release_lock = threading.Lock()
        self._holds_client = True
        with reg._lock:
            reg._users += 1

    def _let_go(self) -> None:
        """The stream no longer needs the client (once)."""
        with self._release_lock:
            holds, self._holds_client = self._holds_client, False
        if holds:
            self._reg._release()

    def _receive(self) -> Any:
        """The next response; a gRPC error or the end of the stream as flannel errors."""
        try:
            resp = next(self._responses)
        except StopIteration:
            self._let_go()
            raise errors.StoreUnavailable(f"etcd watch on {self._key} ended") from None
        except _library_errors() as e:
            self._let_go()
            if self._cancelled:
                raise errors.StoreUnavailable(f"etcd watch on {self._key} cancelled") from None
            if _too_large(e):
                raise ResponseTooLarge(f"etcd watch on {self._key}: a response was larger than the "
                                       f"{MAX_RECEIVE_BYTES} bytes we accept") from e
            err = self._reg._convert(e, f"watch on {self._key}")
            if isinstance(err, errors.StoreUnavailable):
                self._reg._endpoint_failed(self._client, e)
            if isinstance(err, _Reauthenticate):
                self._reg._drop_client(self._client)  # the next watch authenticates again
                err = errors.StoreUnavailable(f"etcd watch on {self._key}: auth token rejected ({err})")
            raise err from e
        ended = self._reg._watch_ended(self._key, resp.canceled, resp.cancel_reason, resp.compact_revision)
        if ended is not None:
            self.cancel()
            raise ended
        return resp

    def next(self) -> WatchChunk:
        """The next response's events, decoded (blocks until there is one).

        :raises Compacted: the start revision was compacted (relist).
        :raises ResponseTooLarge: a response was over MAX_RECEIVE_BYTES (relist).
        :raises errors.StoreUnavailable: the stream broke or was cancelled (re-watch).
        """
        resp = self._receive()
        if not self._created:  # the creation answer (a compacted start revision raised above)
            if not resp.created:
                raise errors.StoreUnavailable(f"etcd watch on {self._key}: no creation answer")
            self._created = True
            resp = self._receive()
        return self._reg._chunk(int(resp.header.revision),
                                ((ev.type == _DELETE, ev.kv.key, ev.kv.value, ev.kv.mod_revision, ev.kv.lease)
                                 for ev in resp.events))

    def cancel(self) -> None:
        """Stop the watch (idempotent, never raises; any thread)."""
        self._cancelled = True
        self._call.cancel()
        self._let_go()


def _show_key(key: Any) -> str:
    """A key for a log line, whatever its bytes."""
    if isinstance(key, bytes | bytearray):
        return bytes(key[:1024]).decode("utf-8", "replace") + ("..." if len(key) > 1024 else "")
    return repr(key)[:200]
