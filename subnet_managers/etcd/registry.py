"""etcd storage for flannel's keys (reference §4.1–4.5, §4.8): the only module that imports pyetcd.

What lives here: connecting (endpoints, TLS, username/password), flannel's key layout and values
(through ``flannel.wire``), create-if-absent as a transaction on ``version(key) == 0``, updates,
reservations (puts without an etcd lease), deletes, and watches from a revision. Every pyetcd or
gRPC error is converted at this boundary into ``flannel.errors`` (``StoreUnavailable``,
``PermissionDenied``, ``LeaseConflict``, ...) with ``raise ... from``; nothing above this module
ever sees a library exception. Records that cannot be decoded are logged (which key, why) and
skipped here, so a garbage value can never reach the lease pipeline.

Two pyetcd facts shape the code (dependency-facts §2): an endpoint is marked dead for
``Endpoint.time_retry`` seconds after one failure (default 300 s, so we set it to about a second),
and the client authenticates in its constructor, so the client is created lazily (the subnet
manager's constructor does no I/O) and re-created when etcd rejects the auth token.
"""

from __future__ import annotations

import logging
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

from flannel import errors, metrics, wire
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.subnet_managers.etcd.store import TTL_NOT_LOOKED_UP, Compacted, WatchChunk

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds an endpoint stays "failed" after an error (pyetcd's default of 300 s would keep the
#: client down for five minutes after etcd comes back).
ENDPOINT_RETRY_SECONDS = 1.0
#: timeout of every unary RPC (and of watch creation).
RPC_TIMEOUT_SECONDS = 5.0
CONFIG_NOT_FOUND_HINT = "Did you create your config using etcdv3 API?"

_GRPC_OPTIONS = [
    # reconnect quickly after etcd restarts (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # notice a silently dead connection under a long-running watch
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
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
        self._warned_insecure = not warn_insecure

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
            for url, (host, port, https) in zip(self._urls, self._endpoints):
                creds = self._credentials(https, url)
                eps.append(pyetcd.Endpoint(host, port, secure=creds is not None, creds=creds,
                                           time_retry=ENDPOINT_RETRY_SECONDS, opts=_GRPC_OPTIONS))
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

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)``, converting errors. Re-authenticates once on a rejected token and
        moves on to the next endpoint when one is down (pyetcd fails over, but does not retry)."""
        attempts = max(2, len(self._endpoints))
        for attempt in range(attempts):
            client = self._connect()
            try:
                return fn(client)
            except _LIBRARY_ERRORS as e:
                err = self._convert(e, what)
                if isinstance(err, _Reauthenticate):
                    if attempt + 1 < attempts:
                        log.info("etcd rejected our auth token (%s); authenticating again", err)
                        self._drop_client(client)
                        continue
                    err = errors.PermissionDenied(f"etcd {what}: authentication token rejected: {err}")
                elif isinstance(err, errors.StoreUnavailable) and attempt + 1 < len(self._endpoints):
                    continue
                raise err from e
        raise AssertionError("unreachable")

    # -- keys ------------------------------------------------------------------------------------

    def lease_key(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> str:
        return self.subnets_prefix + wire.format_subnet_key(subnet, ipv6_subnet)

    def _expiration(self, client: Any, lease_id: int, ttl: bool) -> float | None:
        if lease_id == 0:
            return None  # a reservation: no etcd lease, never expires
        if not ttl:
            return TTL_NOT_LOOKED_UP
        remaining = int(client.get_lease_info(lease_id).TTL)
        return time.time() + max(remaining, 0)

    def _decode_kv(self, client: Any, key: bytes, value: bytes, lease_id: int, ttl: bool) -> Lease | None:
        """A subnets/ kv → Lease, or None (logged) if it is not one of ours."""
        name = self._name(key)
        if name is None:
            return None
        try:
            text = value.decode("utf-8")
            return wire.decode_lease(name, text, expiration=self._expiration(client, lease_id, ttl))
        except (errors.BadLeaseRecord, UnicodeDecodeError) as e:
            metrics.record_skipped("etcd", "not_utf8" if isinstance(e, UnicodeDecodeError) else "bad_value")  # metrics
            log.warning("skipping etcd key %s: %s", key.decode("utf-8", "replace"), e)
            return None

    def _name(self, key: bytes) -> str | None:
        """The subnet-key part of ``<prefix>/subnets/<name>``; stray keys are logged, → None."""
        skey = key.decode("utf-8", "replace")
        if not skey.startswith(self.subnets_prefix):
            metrics.record_skipped("etcd", "outside_prefix")  # metrics
            log.warning("skipping etcd key %s: not under %s", skey, self.subnets_prefix)
            return None
        name = skey[len(self.subnets_prefix):]
        if wire.parse_subnet_key(name) is None:
            metrics.record_skipped("etcd", "bad_key")  # metrics
            log.warning("skipping etcd key %s: %r is not a subnet key (expected like 10.5.34.0-24)", skey, name)
            return None
        return name

    # -- config ----------------------------------------------------------------------------------

    def get_config(self) -> str:
        resp = self._call(f"reading {self.config_key}", lambda c: c.get_response(self.config_key))
        if resp.count < 1:
            raise errors.ConfigNotFound(
                f"flannel config not found in etcd store (key {self.config_key} at {','.join(self._urls)}). "
                f"{CONFIG_NOT_FOUND_HINT}")
        try:
            return bytes(resp.kvs[0].value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.ConfigError(f"invalid network config in etcd key {self.config_key}: not UTF-8: {e}") from None

    def put_config(self, text: str) -> None:
        self._call(f"writing {self.config_key}", lambda c: c.put(self.config_key, text.encode("utf-8")))

    # -- leases ----------------------------------------------------------------------------------

    def list_leases(self, *, ttl: bool = False) -> tuple[list[Lease], int]:
        def op(c: Any) -> tuple[list[Lease], int]:
            resp = c.get_prefix_response(self.subnets_prefix)
            out = []
            for kv in resp.kvs:
                lease = self._decode_kv(c, kv.key, kv.value, kv.lease, ttl)
                if lease is not None:
                    out.append(lease)
            return out, int(resp.header.revision)
        return self._call(f"listing {self.subnets_prefix}", op)

    def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, *,
                  ttl: bool = True) -> tuple[Lease | None, int]:
        key = self.lease_key(subnet, ipv6_subnet)

        def op(c: Any) -> tuple[Lease | None, int]:
            resp = c.get_response(key)
            rev = int(resp.header.revision)
            if resp.count < 1:
                return None, rev
            kv = resp.kvs[0]
            return self._decode_kv(c, kv.key, kv.value, kv.lease, ttl), rev
        return self._call(f"reading {key}", op)

    def create_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int) -> Lease:
        key = self.lease_key(subnet, ipv6_subnet)
        value = wire.encode_attrs(attrs).encode("utf-8")

        def op(c: Any) -> Lease:
            grant = c.lease(ttl)
            try:
                ok, _ = c.transaction(compare=[c.transactions.version(key) == 0],
                                      success=[c.transactions.put(key, value, lease=grant.id)], failure=[])
            except _LIBRARY_ERRORS:
                self._revoke(c, grant.id)
                raise
            if not ok:
                self._revoke(c, grant.id)
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
            try:
                c.put(key, value, lease=grant.id)
            except _LIBRARY_ERRORS:
                self._revoke(c, grant.id)
                raise
            return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=time.time() + grant.ttl)
        return self._call(f"writing {key}", op)

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
        return _Watch(self, self.subnets_prefix, prefix=True, start_revision=start_revision, ttl=False)

    def watch_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, start_revision: int) -> _Watch:
        return _Watch(self, self.lease_key(subnet, ipv6_subnet), prefix=False, start_revision=start_revision,
                      ttl=True)


class _Watch:
    """One etcd watch whose responses land in a queue, so the consumer can wait with a timeout
    (and so honour its stop event) instead of blocking in pyetcd's iterator."""

    def __init__(self, reg: EtcdRegistry, key: str, *, prefix: bool, start_revision: int, ttl: bool) -> None:
        self._reg, self._key, self._ttl = reg, key, ttl
        self._queue: queue.Queue[Any] = queue.Queue()
        self._client: Any = None
        self._id: int | None = None
        kwargs: dict[str, Any] = {"start_revision": max(1, start_revision)}
        if prefix:
            kwargs["range_end"] = pyetcd.utils.prefix_range_end(key.encode("utf-8"))

        def start(c: Any) -> int:
            self._client = c
            return int(c.add_watch_callback(key, self._queue.put, **kwargs))
        self._id = reg._call(f"watching {key} from revision {start_revision}", start)

    def get(self, timeout: float) -> WatchChunk | None:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._id = None
            err = self._reg._convert(item, f"watch on {self._key}")
            if isinstance(err, _Reauthenticate):
                self._reg._drop_client(self._client)  # the next watch authenticates again
                err = errors.StoreUnavailable(f"etcd watch on {self._key}: auth token rejected ({err})")
            raise err from item
        if item is None:  # the stream ended without an error (client reset)
            self._id = None
            raise errors.StoreUnavailable(f"etcd watch on {self._key} ended")
        out: list[LeaseEvent] = []

        def decode(c: Any) -> None:
            out.clear()  # _call may run us twice (re-authentication)
            for ev in item.events:
                if isinstance(ev, etcd_events.DeleteEvent):
                    name = self._reg._name(ev.key)
                    nets = wire.parse_subnet_key(name) if name is not None else None
                    if nets is not None:
                        out.append(LeaseEvent(EventType.REMOVED, Lease(subnet=nets[0], ipv6_subnet=nets[1],
                                                                       attrs=LeaseAttrs())))
                else:
                    lease = self._reg._decode_kv(c, ev.key, ev.value, ev.lease, self._ttl)
                    if lease is not None:
                        out.append(LeaseEvent(EventType.ADDED, lease))
        if self._ttl:
            self._reg._call("reading a lease TTL", decode)
        else:
            decode(None)
        return WatchChunk(revision=int(item.header.revision), events=tuple(out))

    def cancel(self) -> None:
        wid, self._id = self._id, None
        if wid is None or self._client is None:
            return
        try:
            self._client.cancel_watch(wid)
        except _LIBRARY_ERRORS as e:
            log.debug("cancelling etcd watch on %s: %s", self._key, e)
