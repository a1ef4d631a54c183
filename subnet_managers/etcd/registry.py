"""etcd storage for flannel's keys (reference §4.1–4.5, §4.8): the only module that imports pyetcd.

What lives here: connecting (endpoints, TLS, username/password), flannel's key layout and values
(through ``flannel.wire``), create-if-absent as a transaction on ``version(key) == 0``, updates,
reservations (puts without an etcd lease), deletes, and watches from a revision. Every pyetcd or
gRPC error is converted at this boundary into ``flannel.errors`` (``StoreUnavailable``,
``PermissionDenied``, ``LeaseConflict``, ...) with ``raise ... from``; nothing above this module
ever sees a library exception.

Every record is untrusted: ``_record`` (through ``_untrusted``) is the one place where a key/value
becomes a ``Lease``; any failure there skips that record only, counted per reason in ``skipped``
and logged at a bounded rate (``flannel.records``), so a garbage value can never reach the lease
pipeline or stop a thread. Writes are never undone after an ambiguous failure (a timeout may hide
a write that happened): only a certain refusal revokes the etcd lease we granted for it.

Two pyetcd facts shape the code (dependency-facts §2): an endpoint is marked dead for
``Endpoint.time_retry`` seconds after one failure (default 300 s, so we set it to about a second),
and the client authenticates in its constructor, so the client is created lazily (the subnet
manager's constructor does no I/O) and re-created when etcd rejects the auth token.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from grpc._cython import cygrpc
from pyetcd import etcdrpc
from pyetcd import exceptions as etcd_exc
from pyetcd.etcdrpc import kv_pb2

from flannel import errors, wire
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.records import SkippedRecords
from flannel.subnet_managers.etcd import grpcwait
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
#: a smaller TIME gets the connection closed with "too_many_pings".
KEEPALIVE_TIME_SECONDS = 30.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0
KEEPALIVE_TIME_ENV = "FLANNEL_ETCD_KEEPALIVE_TIME"
KEEPALIVE_TIMEOUT_ENV = "FLANNEL_ETCD_KEEPALIVE_TIMEOUT"

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
_DELETE = kv_pb2.Event.DELETE
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


def grpc_options() -> list[tuple[str, int]]:
    """The gRPC channel options of every etcd connection (keepalive read from the environment)."""
    time_s = _env_seconds(KEEPALIVE_TIME_ENV, KEEPALIVE_TIME_SECONDS, 1.0)
    timeout_s = _env_seconds(KEEPALIVE_TIMEOUT_ENV, KEEPALIVE_TIMEOUT_SECONDS, 0.5)
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


_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                      grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                      grpc.StatusCode.UNKNOWN}
_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (etcd_exc.Etcd3Exception, grpc.RpcError, ValueError)


def _too_large(e: BaseException) -> bool:
    """gRPC refused a response over MAX_RECEIVE_BYTES (etcd's own RESOURCE_EXHAUSTED answers, a full
    database or too many requests, say something else)."""
    return (isinstance(e, grpc.RpcError) and hasattr(e, "code") and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "larger than max" in (e.details() or ""))


def _compacted_range(e: BaseException) -> bool:
    """A range at a revision etcd has compacted away (etcd's ErrGRPCCompacted)."""
    return (isinstance(e, grpc.RpcError) and hasattr(e, "code") and e.code() == grpc.StatusCode.OUT_OF_RANGE
            and "compacted" in (e.details() or ""))


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
    """Lease and config storage under one prefix. Thread-safe: one gRPC client shared by all callers.

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
        self._lock = threading.Lock()
        self._client: Any = None
        self._closed = False
        #: monotonic time of the first "unavailable" failure since the last successful call
        self._failing_since: float | None = None
        self._warned_insecure = not warn_insecure
        #: records skipped at the trust boundary, per reason (exported as a metric)
        self.skipped = SkippedRecords("etcd key", log, metric_store="etcd")

    # -- connection ------------------------------------------------------------------------------

    def describe(self) -> str:
        who = f" as user {self._username}" if self._username else ""
        return f"etcd at {','.join(self._urls)}{who} (prefix {self.prefix})"

    def _credentials(self, secure: bool, url: str) -> grpc.ChannelCredentials | None:
        """As etcd's Go client: the URL scheme decides (http → plaintext, https → TLS); the client
        certificate is used only when both --etcd-certfile and --etcd-keyfile are set."""
        client_cert = bool(self._certfile and self._keyfile)
        if not secure:
            if not self._warned_insecure:
                if client_cert:
                    log.warning("etcd endpoint %s is http://: the client certificate is not used. This is "
                                "insecure (use https:// endpoints)", url)
                else:
                    log.warning("no certificate provided: connecting to etcd with http. This is insecure")
                self._warned_insecure = True
            return None
        if bool(self._certfile) != bool(self._keyfile):
            log.warning("only one of --etcd-certfile/--etcd-keyfile is set: connecting without a client certificate")
        ca = _read(self._cafile, "--etcd-cafile") if self._cafile else None
        key = _read(self._keyfile, "--etcd-keyfile") if client_cert else None
        cert = _read(self._certfile, "--etcd-certfile") if client_cert else None
        return grpc.ssl_channel_credentials(ca, key, cert)

    def _connect(self) -> Any:
        with self._lock:
            if self._closed:
                raise errors.StoreUnavailable(f"{self.describe()}: client closed")
            if self._client is not None:
                return self._client
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
            except _LIBRARY_ERRORS as e:
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
        except _LIBRARY_ERRORS:
            pass

    def _endpoint_failed(self, client: Any, e: BaseException) -> None:
        """What pyetcd does after a unary call fails this way: the endpoint is marked failed, so the
        next call goes to another one (or, with one endpoint, waits ENDPOINT_RETRY_SECONDS)."""
        if isinstance(e, grpc.RpcError) and hasattr(e, "code") and e.code() in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
            with self._lock:
                try:
                    client.endpoint_in_use.fail()
                    client._clear_old_stubs()
                except _LIBRARY_ERRORS as err:  # pyetcd's bookkeeping only
                    log.debug("marking the etcd endpoint failed: %s", err)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except _LIBRARY_ERRORS:
                pass

    def _convert(self, e: BaseException, what: str) -> Exception:
        """A pyetcd / gRPC exception → the flannel error callers handle."""
        where = f"etcd ({','.join(self._urls)}) {what}"
        if isinstance(e, etcd_exc.RevisionCompactedError):
            return Compacted(e.compacted_revision)
        cause = e.__context__ if isinstance(e, etcd_exc.Etcd3Exception) else e  # pyetcd hides the gRPC error
        if isinstance(cause, grpc.RpcError) and hasattr(cause, "details"):
            tls = self._tls_problem(cause.details() or "")
            if tls is not None:
                return tls
        if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
            code, details = e.code(), (e.details() or "")
            if code == grpc.StatusCode.UNAUTHENTICATED or "auth store is old" in details:
                return _Reauthenticate(details)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                return errors.PermissionDenied(f"{where}: permission denied for user "
                                               f"{self._username or '(none)'}: {details}")
            if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in details:
                return errors.PermissionDenied(f"{where}: authentication failed for user "
                                               f"{self._username!r}: invalid user name or password")
            if code == grpc.StatusCode.INVALID_ARGUMENT and "user name is empty" in details:
                return errors.PermissionDenied(f"{where}: etcd requires authentication; set --etcd-username and "
                                               f"--etcd-password")
            if code == grpc.StatusCode.FAILED_PRECONDITION and "authentication is not enabled" in details:
                return errors.ConfigError(f"{where}: --etcd-username given but etcd has authentication "
                                          f"disabled")
            if code in _UNAVAILABLE_CODES:
                return errors.StoreUnavailable(f"{where}: {code.name.lower()}: {details}")
            return errors.StoreError(f"{where}: {code.name}: {details}")
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

    def _tls_problem(self, details: str) -> Exception | None:
        """gRPC's connection error text → what is most likely wrong with TLS, and which flag fixes it.

        gRPC reports a refused client certificate as ``Unwrap failed (TSI_DATA_CORRUPTED)`` (the
        server's alert arrives after the handshake), an unknown CA as ``CERTIFICATE_VERIFY_FAILED``
        and a name mismatch as ``Hostname Verification Check failed``; retrying fixes none of them.
        """
        where = f"TLS handshake with etcd ({','.join(self._urls)}) failed"
        got = f" (gRPC: {details[:300]})" if details else ""
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

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)``, converting errors. Re-authenticates once on a rejected token and
        moves on to the next endpoint when one is down (pyetcd fails over, but does not retry)."""
        attempts = max(2, len(self._endpoints))
        for attempt in range(attempts):
            client = self._connect()
            try:
                result = fn(client)
            except _LIBRARY_ERRORS as e:
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

    def _expiration(self, client: Any, lease_id: int, ttl: bool) -> float | None:
        if lease_id == 0:
            return None  # a reservation: no etcd lease, never expires
        if not ttl:
            return TTL_NOT_LOOKED_UP
        remaining = int(client.get_lease_info(lease_id).TTL)
        return time.time() + max(remaining, 0)

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

    def _get_one(self, c: Any, key: str) -> tuple[Any, int, bool]:
        """One key: ``(kv or None, header revision, whether its value was too large to receive)``.
        A value over MAX_RECEIVE_BYTES is read again without it (``kv.value`` is then empty)."""
        try:
            resp = c.get_response(key)
        except grpc.RpcError as e:
            if not _too_large(e):
                raise
            resp = c.get_response(key, keys_only=True)
            return (resp.kvs[0] if resp.count else None), int(resp.header.revision), bool(resp.count)
        return (resp.kvs[0] if resp.count else None), int(resp.header.revision), False

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
        self._call(f"writing {self.config_key}", lambda c: c.put(self.config_key, text.encode("utf-8")))

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
        return self._call(f"listing {self.subnets_prefix}", op)

    def _list_pages(self, c: Any, ttl: bool) -> Listing:
        start = self.subnets_prefix.encode("utf-8")
        end = pyetcd.utils.prefix_range_end(start)
        revision = 0
        limit = LIST_PAGE_KEYS
        out: list[Lease] = []
        occupied: list[Subnets] = []
        while True:
            try:
                resp = c.get_range_response(start, end, limit=limit, revision=revision or None)
            except grpc.RpcError as e:
                if _compacted_range(e):
                    raise _Restart() from e
                if not _too_large(e):
                    raise
                if limit > 1:
                    limit = max(1, limit // 4)
                    continue
                resp = c.get_range_response(start, end, limit=1, revision=revision or None, keys_only=True)
                revision = revision or int(resp.header.revision)
                if not resp.kvs:
                    break
                nets = self._too_large_record(resp.kvs[0].key)
                if nets is not None:
                    occupied.append(nets)
                start = bytes(resp.kvs[0].key) + b"\0"
                if not resp.more:
                    break
                continue
            revision = revision or int(resp.header.revision)
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
            if not resp.more or not resp.kvs:
                break
            start = bytes(resp.kvs[-1].key) + b"\0"
            limit = min(LIST_PAGE_KEYS, limit * 2)
        return Listing(out, revision, tuple(occupied))

    def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, *, ttl: bool = True) -> Stored:
        key = self.lease_key(subnet, ipv6_subnet)

        def op(c: Any) -> Stored:
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

        def op(c: Any) -> Lease:
            grant = c.lease(ttl)
            # An error here is ambiguous (a timeout: the key may now exist, attached to ``grant``):
            # revoking would delete it. The grant expires on its own; the caller re-lists and finds
            # the key by our public IP if the create did happen.
            ok, _ = c.transaction(compare=[c.transactions.version(key) == 0],
                                  success=[c.transactions.put(key, value, lease=grant.id)], failure=[])
            if not ok:
                self._revoke(c, grant.id)  # certain: nothing was written, nothing is attached to it
                raise errors.LeaseConflict(f"subnet {subnet} is already taken (key {key} exists)")
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + grant.ttl)
        return self._call(f"creating {key}", op)

    def update_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int | None) -> Lease:
        key = self.lease_key(subnet, ipv6_subnet)
        value = wire.encode_attrs(attrs).encode("utf-8")

        def op(c: Any) -> Lease:
            if ttl is None:
                c.put(key, value)
                return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=None)
            grant = c.lease(ttl)
            c.put(key, value, lease=grant.id)  # a failure may be a put that happened: never revoke
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + grant.ttl)
        return self._call(f"writing {key}", op)

    def renew_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                    ttl: int, *, mod_revision: int) -> Lease:
        key = self.lease_key(subnet, ipv6_subnet)
        value = wire.encode_attrs(attrs).encode("utf-8")

        def op(c: Any) -> Lease:
            grant = c.lease(ttl)
            ok, _ = c.transaction(compare=[c.transactions.mod(key) == mod_revision],
                                  success=[c.transactions.put(key, value, lease=grant.id)], failure=[])
            if not ok:
                self._revoke(c, grant.id)
                raise KeyChanged(f"{key} changed since revision {mod_revision} (deleted, expired or rewritten)")
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + grant.ttl)
        return self._call(f"renewing {key}", op)

    def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> None:
        key = self.lease_key(subnet, ipv6_subnet)
        self._call(f"deleting {key}", lambda c: c.delete(key))

    @staticmethod
    def _revoke(c: Any, lease_id: int) -> None:
        try:
            c.revoke_lease(lease_id)
        except _LIBRARY_ERRORS as e:  # it expires on its own; nothing is attached to it
            log.debug("could not revoke unused etcd lease %x: %s", lease_id, e)

    # -- watches ---------------------------------------------------------------------------------

    def watch_leases(self, start_revision: int) -> _Stream:
        """One watch of everything under the prefix: every lease key and the config key."""
        root = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        return self._watch(root, prefix=True, start_revision=start_revision)

    def watch_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, start_revision: int) -> _Stream:
        return self._watch(self.lease_key(subnet, ipv6_subnet), prefix=False, start_revision=start_revision)

    def _watch(self, key: str, *, prefix: bool, start_revision: int) -> _Stream:
        raw = key.encode("utf-8")
        create = etcdrpc.WatchCreateRequest(key=raw, start_revision=max(1, start_revision), progress_notify=True)
        if prefix:
            create.range_end = pyetcd.utils.prefix_range_end(raw)
        request = etcdrpc.WatchRequest(create_request=create)
        return self._call(f"watching {key} from revision {start_revision}", lambda c: _Stream(self, c, key, request))
        # (errors of the watch itself, e.g. a compacted start revision, are raised by its ``next``)


class _Stream:
    """One etcd watch, read on the thread that asked for it.

    It is a server stream (one create request, then responses; etcd keeps a watch whose client
    has half-closed its side), on a channel with gRPC's single-threaded unary-stream option: the
    caller's ``next()`` waits in gRPC's C core for the next response, with no Python thread of
    pyetcd's polling a queue, no channel thread and no hand-off per response. ``cancel()`` may be
    called from any thread (a stop hook): a ``next()`` waiting then raises StoreUnavailable.
    """

    def __init__(self, reg: EtcdRegistry, client: Any, key: str, request: Any) -> None:
        self._reg, self._client, self._key = reg, client, key
        self._cancelled = False
        grpcwait.lengthen_signal_checks(cygrpc)   # a blocked next() sleeps instead of waking 5×/s (see grpcwait)
        method = client.channel.unary_stream(_WATCH_METHOD, request_serializer=etcdrpc.WatchRequest.SerializeToString,
                                             response_deserializer=etcdrpc.WatchResponse.FromString)
        self._call = method(request, metadata=client.metadata)
        self._responses = iter(self._call)
        self._created = False   # the first response answers the creation (``next`` reads it)

    def _receive(self) -> Any:
        """The next response; a gRPC error or the end of the stream as flannel errors."""
        try:
            resp = next(self._responses)
        except StopIteration:
            raise errors.StoreUnavailable(f"etcd watch on {self._key} ended") from None
        except grpc.RpcError as e:
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
        if resp.compact_revision:
            self.cancel()
            raise Compacted(int(resp.compact_revision))
        if resp.canceled:
            self.cancel()
            reason = resp.cancel_reason or "no reason given"
            if "permission denied" in reason:
                raise errors.PermissionDenied(f"etcd watch on {self._key}: {reason} (user "
                                              f"{self._reg._username or '(none)'})")
            raise errors.StoreUnavailable(f"etcd cancelled the watch on {self._key}: {reason}")
        return resp

    def next(self) -> WatchChunk:
        """The next response's events, decoded (blocks until there is one).

        :raises Compacted: the start revision was compacted (relist).
        :raises ResponseTooLarge: a response was over MAX_RECEIVE_BYTES (relist).
        :raises errors.StoreUnavailable: the stream broke or was cancelled (re-watch).
        """
        reg = self._reg
        resp = self._receive()
        if not self._created:  # the creation answer (a compacted start revision raised above)
            if not resp.created:
                raise errors.StoreUnavailable(f"etcd watch on {self._key}: no creation answer")
            self._created = True
            resp = self._receive()
        out: list[LeaseEvent] = []
        touched: list[tuple[Subnets, int]] = []
        config: ConfigUpdate | None = None
        revision = int(resp.header.revision)  # a progress notification: everything up to it was sent
        subnets = reg._subnets_prefix_bytes
        config_key = reg._config_key_bytes
        for ev in resp.events:
            kv = ev.kv
            revision = int(kv.mod_revision)  # events arrive in revision order
            key = kv.key
            if not key.startswith(subnets):
                if key == config_key:
                    config = self._config_update(ev)
                continue  # something else under the prefix: not ours to read
            if ev.type == _DELETE:
                nets = reg._key_subnets(key)
                if nets is not None:
                    touched.append((nets, revision))
                    out.append(LeaseEvent(EventType.REMOVED, Lease(subnet=nets[0], ipv6_subnet=nets[1],
                                                                   attrs=_NO_ATTRS)))
                continue
            lease, skipped = reg._record(key, kv.value, None if kv.lease == 0 else TTL_NOT_LOOKED_UP)
            if lease is not None:
                touched.append(((lease.subnet, lease.ipv6_subnet), revision))  # type: ignore[arg-type]
                out.append(LeaseEvent(EventType.ADDED, lease))
            elif skipped is not None:
                touched.append((skipped, revision))
        return WatchChunk(revision=revision, events=tuple(out), config=config, touched=tuple(touched))

    def _config_update(self, ev: Any) -> ConfigUpdate | None:
        if ev.type == _DELETE:
            return ConfigUpdate(None)
        try:
            return ConfigUpdate(self._reg._config_text(ev.kv.value))
        except errors.ConfigError as e:
            log.error("%s; keeping the running config", e)
            return None

    def cancel(self) -> None:
        """Stop the watch (idempotent, never raises; any thread)."""
        self._cancelled = True
        self._call.cancel()


def _show_key(key: Any) -> str:
    """A key for a log line, whatever its bytes."""
    if isinstance(key, bytes | bytearray):
        return bytes(key[:1024]).decode("utf-8", "replace") + ("..." if len(key) > 1024 else "")
    return repr(key)[:200]
