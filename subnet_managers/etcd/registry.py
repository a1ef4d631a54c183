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
import queue
import threading
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exc

from flannel import errors, wire
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.records import SkippedRecords
from flannel.subnet_managers.etcd.store import (
    TTL_NOT_LOOKED_UP,
    Compacted,
    ConfigUpdate,
    KeyChanged,
    Listing,
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
    ]


_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                      grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                      grpc.StatusCode.UNKNOWN}
_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (etcd_exc.Etcd3Exception, grpc.RpcError, ValueError)


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

    def _record(self, key: Any, value: Any) -> tuple[Lease | None, Subnets | None]:
        """THE place where an etcd key/value becomes a Lease — or is skipped.

        Returns ``(lease, None)`` for a good record and ``(None, subnets)`` for a skipped one, where
        ``subnets`` is what its key names (None if the key is not a subnet key): such a key still
        occupies its subnet.
        """
        parsed = self._untrusted(key, lambda: self._parse_key(key))
        if parsed is None:
            return None, None
        name, nets = parsed
        lease = self._untrusted(key, lambda: wire.decode_lease(name, bytes(value)))
        return (lease, None) if lease is not None else (None, nets)

    def _deleted(self, key: Any) -> Subnets | None:
        """What a deleted key named (a DELETE event has no value); None (skipped) if not a subnet key."""
        parsed = self._untrusted(key, lambda: self._parse_key(key))
        return None if parsed is None else parsed[1]

    def _parse_key(self, key: Any) -> tuple[str, Subnets]:
        """``<prefix>/subnets/<name>`` → (name, subnets).

        :raises errors.BadLeaseRecord: not UTF-8, not under the subnets prefix, not a subnet key."""
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
        return name, nets

    # -- config ----------------------------------------------------------------------------------

    def get_config(self) -> str:
        resp = self._call(f"reading {self.config_key}", lambda c: c.get_response(self.config_key))
        if resp.count < 1:
            raise errors.ConfigNotFound(
                f"flannel config not found in etcd store (key {self.config_key} at {','.join(self._urls)}). "
                f"{CONFIG_NOT_FOUND_HINT}")
        return self._config_text(resp.kvs[0].value)

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
        def op(c: Any) -> Listing:
            resp = c.get_prefix_response(self.subnets_prefix)
            out: list[Lease] = []
            occupied: list[Subnets] = []
            for kv in resp.kvs:
                lease, nets = self._record(kv.key, kv.value)
                if lease is not None:
                    out.append(dataclasses.replace(lease, expiration=self._expiration(c, kv.lease, ttl)))
                elif nets is not None:
                    occupied.append(nets)
            return Listing(out, int(resp.header.revision), tuple(occupied))
        return self._call(f"listing {self.subnets_prefix}", op)

    def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, *, ttl: bool = True) -> Stored:
        key = self.lease_key(subnet, ipv6_subnet)

        def op(c: Any) -> Stored:
            resp = c.get_response(key)
            rev = int(resp.header.revision)
            if resp.count < 1:
                return Stored(None, False, 0, rev)
            kv = resp.kvs[0]
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

    def watch_leases(self, start_revision: int) -> _Watch:
        return _Watch(self, self.subnets_prefix, prefix=True, start_revision=start_revision,
                      config_key=self.config_key)

    def watch_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, start_revision: int) -> _Watch:
        return _Watch(self, self.lease_key(subnet, ipv6_subnet), prefix=False, start_revision=start_revision)


class _Watch:
    """One etcd watch (plus, for the lease watch, one on the config key) whose responses land in a
    queue, so the consumer can wait with a timeout (and so honour its stop event) instead of
    blocking in pyetcd's iterator."""

    def __init__(self, reg: EtcdRegistry, key: str, *, prefix: bool, start_revision: int,
                 config_key: str | None = None) -> None:
        self._reg, self._key = reg, key
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._client: Any = None
        self._ids: list[int] = []
        start = max(1, start_revision)
        range_end = pyetcd.utils.prefix_range_end(key.encode("utf-8")) if prefix else None

        def add(c: Any, tag: str, watched: str, end: Any) -> None:
            kwargs: dict[str, Any] = {"start_revision": start}
            if end is not None:
                kwargs["range_end"] = end
            self._ids.append(int(c.add_watch_callback(watched, lambda item: self._queue.put((tag, item)), **kwargs)))

        def begin(c: Any) -> None:
            self._client = c
            add(c, "leases", key, range_end)
            if config_key is not None:
                add(c, "config", config_key, None)
        try:
            reg._call(f"watching {key} from revision {start_revision}", begin)
        except BaseException:
            self.cancel()
            raise

    def get(self, timeout: float) -> WatchChunk | None:
        try:
            tag, item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            err = self._reg._convert(item, f"watch on {self._key}")
            if isinstance(err, _Reauthenticate):
                self._reg._drop_client(self._client)  # the next watch authenticates again
                err = errors.StoreUnavailable(f"etcd watch on {self._key}: auth token rejected ({err})")
            self.cancel()
            raise err from item
        if item is None:  # the stream ended without an error (client reset)
            self.cancel()
            raise errors.StoreUnavailable(f"etcd watch on {self._key} ended")
        if tag == "config":
            return self._config_chunk(item)
        out: list[LeaseEvent] = []
        revision = int(item.header.revision)  # a progress notification: everything up to it was sent
        for ev in item.events:
            revision = int(ev.mod_revision)  # events arrive in revision order
            if isinstance(ev, etcd_events.DeleteEvent):
                nets = self._reg._deleted(ev.key)
                if nets is not None:
                    out.append(LeaseEvent(EventType.REMOVED, Lease(subnet=nets[0], ipv6_subnet=nets[1],
                                                                   attrs=LeaseAttrs())))
            else:
                lease, _ = self._reg._record(ev.key, ev.value)
                if lease is not None:
                    expiration = self._reg._expiration(None, int(ev.lease), ttl=False)
                    out.append(LeaseEvent(EventType.ADDED, dataclasses.replace(lease, expiration=expiration)))
        return WatchChunk(revision=revision, events=tuple(out))

    def _config_chunk(self, item: Any) -> WatchChunk | None:
        if not item.events:
            return None
        ev = item.events[-1]  # only the latest value of the config matters
        if isinstance(ev, etcd_events.DeleteEvent):
            return WatchChunk(revision=0, events=(), config=ConfigUpdate(None))
        try:
            text = self._reg._config_text(ev.value)
        except errors.ConfigError as e:
            log.error("%s; keeping the running config", e)
            return None
        return WatchChunk(revision=0, events=(), config=ConfigUpdate(text))

    def cancel(self) -> None:
        ids, self._ids = self._ids, []
        if self._client is None:
            return
        for wid in ids:
            try:
                self._client.cancel_watch(wid)
            except _LIBRARY_ERRORS as e:
                log.debug("cancelling etcd watch on %s: %s", self._key, e)


def _show_key(key: Any) -> str:
    """A key for a log line, whatever its bytes."""
    if isinstance(key, bytes | bytearray):
        return bytes(key[:1024]).decode("utf-8", "replace") + ("..." if len(key) > 1024 else "")
    return repr(key)[:200]
