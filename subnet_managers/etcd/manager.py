"""The etcd subnet manager: flannel's allocation and reuse policy (reference §4.6–4.8), minus its bugs.

Storage is behind ``store.Registry`` (registry.py talks to etcd; the unit tests use an in-memory
fake), so this module holds only decisions:

* **acquire**: reuse the lease held for our public IP (if it still fits the config, else delete it,
  as flannel does), else the previous subnet from subnet.env, else a random subnet among the first
  100 free ones. A new lease is created with a create-if-absent transaction; losing that race is
  retried with a fresh listing (``retry.lease_race``), not fatal as in flannel (§14.1).
* **reservations** (keys without an etcd lease) stay reservations when their owner takes them
  (§14.5): they are re-put without a lease and never renewed.
* **complete_lease**: renew ``--subnet-lease-renew-margin`` minutes before expiry (half the remaining
  time if the margin is longer, so short test TTLs work); watch our own key and, if it is deleted or
  expires, re-acquire (same subnet if still free) and report the new lease instead of exiting (§14.8).
* **watch_leases**: snapshot, then events from the snapshot's revision + 1. A compaction means
  relist → a new snapshot, which the LeaseWatcher diffs (changed attributes included). An etcd outage
  means back off (``retry.store``) and resume from the last revision seen, so nothing is lost.
  Undecodable records never get this far (the registry logs and drops them), so one garbage value
  cannot look like an empty snapshot and tear down every peer (§14.2).

Loops poll their ``stop`` event at least every ``POLL_SECONDS`` so SIGTERM is honoured promptly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from flannel import errors, metrics, retry, subnet_file
from flannel.config import NetworkConfig, parse_network_config
from flannel.lease import EventType, Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from flannel.subnet_managers.base import SubnetManager
from flannel.subnet_managers.etcd.store import Compacted, Registry, WatchHandle

log = logging.getLogger(__name__)

#: flannel collects at most this many free candidates and picks one at random.
MAX_FREE_CANDIDATES = 100
POLL_SECONDS = 0.5
#: renewal retry delay after a failure (flannel: 1 min), capped by a quarter of the time left.
RENEW_RETRY_SECONDS = 60.0
#: wait between attempts when re-acquiring a lost lease fails for a non-transient reason.
REACQUIRE_RETRY_SECONDS = 10.0
#: a watch that breaks repeatedly right after being set up backs off up to this.
WATCH_BACKOFF_MAX = 5.0

Hints = tuple[IPv4Network | None, IPv6Network | None]


class EtcdSubnetManager(SubnetManager):
    """flannel's "local manager" on etcd v3.

    :param opts: the agent options (endpoints, prefix, TLS, auth, TTL, renew margin, subnet file).
    :param registry: storage to use instead of etcd (unit tests).
    :param rng: random source for the allocation (tests pass a seeded one).
    """

    kind = "etcd"

    def __init__(self, opts: AgentOptions, *, registry: Registry | None = None,
                 rng: random.Random | None = None) -> None:
        self._opts = opts
        self._registry = registry
        self._rng = rng or random.SystemRandom()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._hints: Hints | None = None

    # -- plumbing --------------------------------------------------------------------------------

    def _reg(self) -> Registry:
        with self._lock:
            if self._registry is None:
                from flannel.subnet_managers.etcd.registry import EtcdRegistry
                o = self._opts
                self._registry = EtcdRegistry(endpoints=o.etcd_endpoints, prefix=o.etcd_prefix, cafile=o.etcd_cafile,
                                              certfile=o.etcd_certfile, keyfile=o.etcd_keyfile,
                                              username=o.etcd_username, password=o.etcd_password)
            return self._registry

    def _previous(self) -> Hints:
        """The previous-subnet hints from subnet.env (read once, on first use)."""
        if self._hints is None:
            v4, v6 = subnet_file.previous_subnets(self._opts.subnet_file)
            self._hints = (v4, v6)
        return self._hints

    @property
    def name(self) -> str:
        hint = self._previous()[0]
        return f"Etcd Local Manager with Previous Subnet: {hint or 'None'} ({self._reg().describe()})"

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            reg = self._registry
        if reg is not None:
            reg.close()

    @property
    def ttl(self) -> int:
        return int(self._opts.subnet_lease_ttl)

    # -- config ----------------------------------------------------------------------------------

    def get_network_config(self) -> NetworkConfig:
        reg = self._reg()
        text = reg.get_config()
        config = parse_network_config(text, source=f"etcd key {self._opts.etcd_prefix.rstrip('/')}/config")
        if not config.enable_ipv4:
            raise errors.ConfigError("invalid network config: EnableIPv4: must be true with the etcd subnet "
                                     "manager (etcd subnet keys always carry an IPv4 subnet)")
        return config

    # -- acquire ---------------------------------------------------------------------------------

    def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        return self._acquire(attrs, prefer=None, stop=self._closed)

    def _acquire(self, attrs: LeaseAttrs, *, prefer: Hints | None, stop: threading.Event) -> Lease:
        for attempt in retry.store(stop, what="acquiring a subnet lease from etcd"):
            with attempt:
                config = self.get_network_config()
                for race in retry.lease_race():
                    with race:
                        return self._try_acquire(config, attrs, prefer)
        raise AssertionError("unreachable")

    def _try_acquire(self, config: NetworkConfig, attrs: LeaseAttrs, prefer: Hints | None) -> Lease:
        """One round of flannel's tryAcquireLease. Raises LeaseConflict when a create race is lost."""
        reg = self._reg()
        leases, _ = reg.list_leases()
        mine = self._find_own(leases, attrs)
        if mine is not None:
            if config.is_compatible(mine.subnet, mine.ipv6_subnet):
                log.info("Found lease (ip: %s ipv6: %s) for current IP (%s), reusing%s", mine.subnet,
                         mine.ipv6_subnet, attrs.public_ip, " (a reservation)" if mine.expiration is None else "")
                ttl = None if mine.expiration is None else self.ttl
                assert mine.subnet is not None
                return reg.update_lease(mine.subnet, mine.ipv6_subnet, attrs, ttl)
            if mine.expiration is None:
                log.error("reservation %s for this node (%s) does not fit the network config; not using it "
                          "(remove it with: flannelctl reservations remove %s)", mine.describe(), attrs.public_ip,
                          mine.subnet)
            else:
                log.warning("Found lease (ip: %s ipv6: %s) for current IP (%s) but not compatible with current "
                            "config, deleting", mine.subnet, mine.ipv6_subnet, attrs.public_ip)
                assert mine.subnet is not None
                reg.delete_lease(mine.subnet, mine.ipv6_subnet)
                leases = [lease for lease in leases if lease is not mine]

        chosen = self._usable_hint(config, leases, prefer if prefer is not None else self._previous())
        if chosen is None:
            chosen = self._allocate(config, leases)
        sn, sn6 = chosen
        assert sn is not None
        lease = reg.create_lease(sn, sn6, attrs, self.ttl)
        log.info("Allocated lease (ip: %s ipv6: %s) to current node (%s)", sn, sn6, attrs.public_ip)
        return lease

    @staticmethod
    def _find_own(leases: list[Lease], attrs: LeaseAttrs) -> Lease | None:
        """The lease published for our public IP (IPv4; IPv6 for IPv6-only nodes, fixing §14.6 where
        every IPv6-only node matched ``0.0.0.0``)."""
        if int(attrs.public_ip) != 0:
            return next((lease for lease in leases if lease.attrs.public_ip == attrs.public_ip), None)
        if attrs.public_ipv6 is not None:
            return next((lease for lease in leases if lease.attrs.public_ipv6 == attrs.public_ipv6), None)
        return None

    @staticmethod
    def _usable_hint(config: NetworkConfig, leases: list[Lease], hint: Hints) -> Hints | None:
        sn, sn6 = hint
        if sn is None:
            return None
        sn6 = sn6 if config.enable_ipv6 else None
        if any(lease.subnet is not None and lease.subnet.overlaps(sn) for lease in leases):
            log.info("previous subnet %s is held by another node; allocating a new one", sn)
            return None
        if not config.is_compatible(sn, sn6):
            log.error("previous subnet %s (ipv6 %s) does not fit the network config; ignoring it", sn, sn6)
            return None
        if sn6 is not None and any(lease.ipv6_subnet is not None and lease.ipv6_subnet.overlaps(sn6)
                                   for lease in leases):
            log.info("previous IPv6 subnet %s is held by another node; allocating a new one", sn6)
            return None
        log.info("Found previously leased subnet (%s), reusing", sn)
        return sn, sn6

    def _allocate(self, config: NetworkConfig, leases: list[Lease]) -> Hints:
        assert config.network is not None
        log.info("Picking subnet in range %s ... %s", config.subnet_min, config.subnet_max)
        free4 = _free_candidates(config.subnet_candidates(), config.subnet_len, 4,
                                 [lease.subnet for lease in leases if lease.subnet is not None])
        if not free4:
            raise errors.NetworkFull(
                f"network {config.network} is full: all {config.subnet_count} /{config.subnet_len} subnets "
                f"({config.subnet_min} ... {config.subnet_max}) are leased or reserved")
        sn = IPv4Network((self._rng.choice(free4), config.subnet_len))
        sn6: IPv6Network | None = None
        if config.enable_ipv6:
            free6 = _free_candidates(config.ipv6_subnet_candidates(), config.ipv6_subnet_len, 6,
                                     [lease.ipv6_subnet for lease in leases if lease.ipv6_subnet is not None])
            if not free6:
                count6 = len(config.ipv6_subnet_candidates())
                raise errors.NetworkFull(
                    f"IPv6 network {config.ipv6_network} is full: all {count6} /{config.ipv6_subnet_len} "
                    f"subnets are leased or reserved")
            sn6 = IPv6Network((self._rng.choice(free6), config.ipv6_subnet_len))
        return sn, sn6

    # -- keep our lease --------------------------------------------------------------------------

    def _renew_at(self, lease: Lease) -> float | None:
        """When to renew: ``margin`` before expiry, or half-way if the margin is longer than that."""
        if lease.expiration is None:
            return None  # a reservation never expires
        now = time.time()
        remaining = lease.expiration - now
        margin = self._opts.subnet_lease_renew_margin * 60.0
        wait = remaining / 2 if margin >= remaining else remaining - margin
        return now + max(0.0, wait)

    def complete_lease(self, lease: Lease, stop: threading.Event,
                       on_lease: Callable[[Lease], None] | None = None) -> None:
        reg = self._reg()
        current = lease
        next_renew = self._renew_at(current)
        handle: WatchHandle | None = None
        backoff = 0.0

        def lost(why: str, *, same: bool) -> Lease | None:
            return self._lost(current, why, same=same, stop=stop, on_lease=on_lease)

        try:
            while not stop.is_set():
                if handle is None:
                    subnet = current.subnet
                    assert subnet is not None
                    try:
                        stored, rev = reg.get_lease(subnet, current.ipv6_subnet)
                        if stored is None or stored.attrs.public_ip != current.attrs.public_ip:
                            new = lost("is gone from etcd" if stored is None else
                                       f"is now held by {stored.attrs.public_ip}", same=stored is None)
                            if new is None:
                                return
                            current, next_renew = new, self._renew_at(new)
                            continue
                        current = dataclasses.replace(current, expiration=stored.expiration)
                        next_renew = self._renew_at(current)
                        handle = reg.watch_lease(subnet, current.ipv6_subnet, rev + 1)
                        backoff = 0.0
                    except errors.FlannelError as e:  # never die: etcd may come back, creds may be fixed
                        backoff = min(WATCH_BACKOFF_MAX, max(0.1, backoff * 2))
                        log.warning("watching our lease %s: %s; retrying in %.1fs", current.describe(), e, backoff)
                        stop.wait(backoff)
                        continue
                timeout = POLL_SECONDS if next_renew is None else min(POLL_SECONDS, max(0.0, next_renew - time.time()))
                try:
                    chunk = handle.get(timeout)
                except errors.FlannelError as e:  # Compacted, StoreUnavailable, ...
                    log.info("watch on our lease %s interrupted (%s); re-reading it", current.describe(), e)
                    handle.cancel()
                    handle = None
                    continue
                for ev in chunk.events if chunk is not None else ():
                    if ev.type == EventType.REMOVED or ev.lease.attrs.public_ip != current.attrs.public_ip:
                        handle.cancel()
                        handle = None
                        removed = ev.type == EventType.REMOVED
                        new = lost("was removed (deleted or expired)" if removed else
                                   f"was overwritten by {ev.lease.attrs.public_ip}", same=removed)
                        if new is None:
                            return
                        current, next_renew = new, self._renew_at(new)
                        break
                    current = dataclasses.replace(current, expiration=ev.lease.expiration)
                    next_renew = self._renew_at(current)
                    if next_renew is not None:
                        log.debug("Waiting for %.0fs to renew lease", next_renew - time.time())
                if handle is None or next_renew is None or time.time() < next_renew:
                    continue
                assert current.subnet is not None
                try:
                    current = reg.update_lease(current.subnet, current.ipv6_subnet, current.attrs, self.ttl)
                except errors.FlannelError as e:
                    left = (current.expiration or 0) - time.time()
                    delay = min(RENEW_RETRY_SECONDS, max(0.5, left / 4))
                    log.warning("Error renewing lease %s (trying again in %.1fs): %s", current.describe(), delay, e)
                    next_renew = time.time() + delay
                    continue
                log.info("Lease renewed, new expiration: %s", time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(current.expiration or 0)))
                next_renew = self._renew_at(current)
                _publish(on_lease, current)
        finally:
            if handle is not None:
                handle.cancel()

    def _lost(self, current: Lease, why: str, *, same: bool, stop: threading.Event,
              on_lease: Callable[[Lease], None] | None) -> Lease | None:
        """We no longer hold ``current`` (``why``): acquire a lease again (the same subnet if
        ``same`` and it is still free) and publish it; None only when ``stop`` is set first."""
        log.warning("Our lease %s %s; acquiring a lease again%s", current.describe(), why,
                    " (same subnet if still free)" if same else "")
        new = self._reacquire(current, stop, same=same)
        if new is not None:
            log.info("Re-acquired lease %s", new.describe())
            _publish(on_lease, new)
        return new

    def _reacquire(self, old: Lease, stop: threading.Event, *, same: bool) -> Lease | None:
        """Acquire again after losing ``old``; None only when ``stop`` is set first."""
        prefer: Hints | None = (old.subnet, old.ipv6_subnet) if same else (None, None)
        while not stop.is_set():
            try:
                return self._acquire(old.attrs, prefer=prefer, stop=stop)
            except errors.StoreUnavailable:
                return None  # only raised once stop is set (retry.store retries it until then)
            except errors.FlannelError as e:
                log.error("cannot re-acquire a lease: %s (trying again in %.0fs)", e, REACQUIRE_RETRY_SECONDS)
                stop.wait(REACQUIRE_RETRY_SECONDS)
        return None

    # -- watch everyone --------------------------------------------------------------------------

    def watch_leases(self, stop: threading.Event) -> Iterator[WatchResult]:
        reg = self._reg()
        rev: int | None = None
        backoff = 0.0
        while not stop.is_set():
            handle: WatchHandle | None = None
            try:
                if rev is None:
                    leases, rev = _with_store_retry(stop, "listing leases", reg.list_leases)
                    log.info("lease snapshot: %d leases at revision %d", len(leases), rev)
                    yield WatchResult.of_snapshot(leases)
                start = rev + 1
                handle = _with_store_retry(stop, f"watching leases from revision {start}",
                                           functools.partial(reg.watch_leases, start))
                while not stop.is_set():
                    chunk = handle.get(POLL_SECONDS)
                    if chunk is None:
                        continue
                    backoff = 0.0
                    rev = max(rev, chunk.revision)
                    if chunk.events:
                        yield WatchResult.of_events(chunk.events)
            except Compacted as e:
                log.warning("lease watch fell behind etcd compaction (%s); listing all leases again", e)
                rev = None
            except errors.StoreUnavailable as e:
                if stop.is_set():
                    break
                metrics.store_reconnected("etcd")  # metrics
                backoff = min(WATCH_BACKOFF_MAX, max(0.1, backoff * 2))
                log.warning("lease watch interrupted: %s; resuming from revision %s in %.1fs",
                            e, None if rev is None else rev + 1, backoff)
                stop.wait(backoff)
            except errors.FlannelError as e:  # e.g. PermissionDenied: log loudly, keep trying
                log.error("lease watch failed: %s; retrying in %.0fs", e, WATCH_BACKOFF_MAX)
                stop.wait(WATCH_BACKOFF_MAX)
            finally:
                if handle is not None:
                    handle.cancel()


def _publish(on_lease: Callable[[Lease], None] | None, lease: Lease) -> None:
    """Hand a new or renewed lease to the daemon's callback (which must not stop the renewals)."""
    if on_lease is not None:
        try:
            on_lease(lease)
        except Exception:  # a callback bug must not stop the renewals
            log.exception("on_lease callback failed for %s", lease.describe())


def _with_store_retry(stop: threading.Event, what: str, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` under the ``store`` policy (back off while etcd is unreachable, until ``stop``)."""
    for attempt in retry.store(stop, what=what):
        with attempt:
            return fn()
    raise AssertionError("unreachable")


def _free_candidates(candidates: range, prefixlen: int, version: int, taken: list[Any]) -> list[int]:
    """The first ``MAX_FREE_CANDIDATES`` candidate subnets (as integers) that overlap no taken subnet.

    Overlap as flannel defines it: equal under the shorter of the two masks. Same-length subnets are
    checked through a set, so this stays cheap with thousands of leases; leases tolerate any family
    mix (an IPv4-only lease simply has no IPv6 subnet to compare, fixing §14.4).
    """
    same = {int(t.network_address) for t in taken if t.version == version and t.prefixlen == prefixlen}
    other = [t for t in taken if t.version == version and t.prefixlen != prefixlen]
    free: list[int] = []
    for c in candidates:
        if c in same:
            continue
        if other:
            net = (IPv4Network if version == 4 else IPv6Network)((c, prefixlen))
            if any(net.overlaps(t) for t in other):
                continue
        free.append(c)
        if len(free) >= MAX_FREE_CANDIDATES:
            break
    return free
