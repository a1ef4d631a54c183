"""The etcd subnet manager: flannel's allocation and reuse policy (reference §4.6–4.8), minus its bugs.

Storage is behind ``store.Registry`` (registry.py talks to etcd; the unit tests use an in-memory
fake), so this module holds only decisions. The config is the one the daemon validated and passes in;
it is never re-read for an acquisition.

* **acquire**: reuse the lease held for our public IP (if it still fits the config, else delete it,
  as flannel does), else the previous subnet from subnet.env, else a random subnet among the first
  100 free ones. A new lease is created with a create-if-absent transaction; losing that race is
  retried with a fresh listing (``retry.lease_race``), not fatal as in flannel (§14.1).
* **our lease among several**: when more than one lease carries our public IP (a leftover, an
  operator's mistake), we keep the one we hold — the subnet.env subnet (or, when re-acquiring, the
  subnet we just held) — then a reservation, then the one renewed last; the others are logged as
  strays and left alone (never deleted, never adopted over ours). See ``choose_own``.
* **no crash loops**: a subnet whose create fails (its key exists: an undecodable record, a race)
  is not tried again in that acquisition, and a failed subnet.env hint is dropped for good; keys we
  cannot decode still occupy their subnets (``Listing.occupied``), so allocation picks another.
* **reservations** (keys without an etcd lease) stay reservations when their owner takes them
  (§14.5): they are re-put without a lease and never renewed.
* **prefetch**: the daemon calls ``prefetch_leases`` once it has the config; the listing the
  acquisition needs starts then, on a thread, while the backend sets itself up (its devices: ~0.1 s),
  and the first acquisition attempt takes it (``_Prefetch``). A listing a little older than the
  attempt is as good as a fresh one: the create-if-absent transaction settles every race, and the
  watch continues from the listing's revision. A failed prefetch only means the attempt lists itself.
* **complete_lease**: the ``LeaseKeeper`` (keeper.py): conditional renewals, re-acquisition.
* **watch_leases**: snapshot, then events from the snapshot's revision + 1; a broken watch resumes
  from the last delivered event's revision + 1. A compaction (or a catch-up too large to receive)
  means relist → a new snapshot, which the LeaseWatcher diffs. The first snapshot is the listing
  the acquisition just read (not a second listing of every lease: at 5000 leases that listing is
  most of the startup time that grows with the cluster), when it is still fresh
  (``FIRST_SNAPSHOT_MAX_AGE``) and describes what the watch continues from (an acquisition that
  deleted our incompatible lease after listing discards it). The same watch follows the config
  key: an incompatible change raises ``errors.ConfigChanged`` (the agent exits 1 and its supervisor
  restarts it; flannel ignores it), and our own key, for the lease keeper (``KeyFeed``): one etcd
  watch per agent. Undecodable records never get this far (the registry counts, logs and drops
  them), so one garbage value cannot look like an empty snapshot and tear down every peer (§14.2).

Nothing polls: the watch is read on the calling thread and a stop hook (``flannel.stophooks``)
cancels it when ``stop`` is set, so SIGTERM is honoured at once and an idle agent's threads sleep.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from flannel import errors, metrics, retry, stophooks, subnet_file, threadname
from flannel.config import NetworkConfig, deferred_changes, parse_network_config, restart_changes
from flannel.lease import Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from flannel.records import SkippedRecords
from flannel.subnet_managers.base import SubnetManager
from flannel.subnet_managers.etcd.keeper import KeyFeed, LeaseKeeper
from flannel.subnet_managers.etcd.store import (
    TTL_NOT_LOOKED_UP,
    Compacted,
    Hints,
    Listing,
    Registry,
    ResponseTooLarge,
    Subnets,
    WatchHandle,
)

log = logging.getLogger(__name__)

#: flannel collects at most this many free candidates and picks one at random.
MAX_FREE_CANDIDATES = 100
#: Seconds for which the acquisition's listing may serve as the lease watch's first snapshot.
#: The watch starts right after the acquisition (well under a second); an older listing (the
#: watch thread restarted, a startup stalled) would make the watch replay a long backlog of
#: events from an old revision, or hit a compaction, so it lists again instead.
FIRST_SNAPSHOT_MAX_AGE = 10.0


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
        #: what the lease watch sees of our key, for the lease keeper
        self._feed = KeyFeed()
        #: the listing our acquisition read and when (monotonic): the lease watch's first snapshot (taken once)
        self._listing: tuple[Listing, float] | None = None
        #: the listing started by ``prefetch_leases``, for the first acquisition attempt (taken once)
        self._prefetch: _Prefetch | None = None
        self._prefetch_started = False

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
        """The previous-subnet hints from subnet.env (read once, on first use; dropped after a failed create)."""
        if self._hints is None:
            v4, v6 = subnet_file.previous_subnets(self._opts.subnet_file)
            self._hints = (v4, v6)
        return self._hints

    @property
    def name(self) -> str:
        hint = self._previous()[0]
        return f"Etcd Local Manager with Previous Subnet: {hint or 'None'} ({self._reg().describe()})"

    @property
    def skipped(self) -> SkippedRecords:
        """Records the store boundary skipped, counted per reason (for the metrics endpoint)."""
        return self._reg().skipped

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            reg = self._registry
        if reg is not None:
            reg.close()

    @property
    def ttl(self) -> int:
        return int(self._opts.subnet_lease_ttl)

    @property
    def _config_source(self) -> str:
        return f"etcd key {self._opts.etcd_prefix.rstrip('/')}/config"

    # -- config ----------------------------------------------------------------------------------

    def get_network_config(self) -> NetworkConfig:
        return self._parse_config(self._reg().get_config())

    def _parse_config(self, text: str) -> NetworkConfig:
        config = parse_network_config(text, source=self._config_source)
        if not config.enable_ipv4:
            raise errors.ConfigError("invalid network config: EnableIPv4: must be true with the etcd subnet "
                                     "manager (etcd subnet keys always carry an IPv4 subnet)")
        return config

    def _check_config(self, running: NetworkConfig, text: str | None) -> None:
        """Compare the config now in etcd with the one we run: raise ConfigChanged for a change we
        cannot apply while running; log anything else (a deleted or invalid config keeps us going:
        the data path is still right, and a restart would report it)."""
        if text is None:
            log.warning("the network config %s was deleted; keeping the running config (a restart would wait "
                        "for it)", self._config_source)
            return
        try:
            stored = self._parse_config(text)
        except errors.ConfigError as e:
            log.error("the network config in etcd is now invalid (%s); keeping the running config", e)
            return
        changed = restart_changes(running, stored)
        if changed:
            raise errors.ConfigChanged(
                f"the network config in {self._config_source} changed while running ({'; '.join(changed)}); "
                "exiting so that the supervisor restarts flannel with the new config (flannel would keep "
                "the old one until a restart)")
        later = deferred_changes(running, stored)
        if later:
            log.warning("the network config in %s changed (%s); this takes effect when flannel restarts",
                        self._config_source, "; ".join(later))

    def _recheck_config(self, running: NetworkConfig, stop: threading.Event) -> None:
        """Read the config key again (each time the watch is set up: a change made while the watch
        was down has no event for us) and compare it with the running config."""
        try:
            text: str | None = _with_store_retry(stop, "reading the network config", self._reg().get_config)
        except errors.ConfigNotFound:
            text = None
        except errors.ConfigChanged:
            raise
        except errors.ConfigError as e:  # not UTF-8, too large
            log.error("%s; keeping the running config", e)
            return
        self._check_config(running, text)

    # -- acquire ---------------------------------------------------------------------------------

    def prefetch_leases(self) -> None:
        """Once per manager (a startup): a later re-acquisition lists afresh."""
        with self._lock:
            if self._prefetch_started:
                return
            self._prefetch_started = True
        prefetch = _Prefetch(self._reg)
        with self._lock:
            self._prefetch = prefetch

    def _take_prefetched(self) -> tuple[Listing, float] | None:
        """The prefetched listing and when it was read, once (waiting for it if still running);
        None if there is none, it failed, or it is older than FIRST_SNAPSHOT_MAX_AGE (a stalled
        startup): the caller lists."""
        with self._lock:
            prefetch, self._prefetch = self._prefetch, None
        out = prefetch.result() if prefetch is not None else None
        if out is not None and time.monotonic() - out[1] > FIRST_SNAPSHOT_MAX_AGE:
            log.info("the lease listing read ahead is %.0fs old; listing again", time.monotonic() - out[1])
            return None
        return out

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        seen: list[tuple[Listing, float] | None] = []
        lease = self._acquire(config, attrs, prefer=None, stop=self._closed, seen=seen)
        with self._lock:
            self._listing = seen[-1] if seen else None
        return lease

    def _acquire(self, config: NetworkConfig, attrs: LeaseAttrs, *, prefer: Hints | None,
                 stop: threading.Event, seen: list[tuple[Listing, float] | None] | None = None) -> Lease:
        """``prefer``: the subnet to try first (None: the subnet.env hint). Subnets whose create
        failed are remembered across attempts, so no attempt repeats them. ``seen`` collects the
        listings read, with when (None for one the attempt made stale by deleting a lease)."""
        tried: set[IPv4Network] = set()
        for attempt in retry.store(stop, what="acquiring a subnet lease from etcd"):
            with attempt:
                for race in retry.lease_race():
                    with race:
                        return self._try_acquire(config, attrs, prefer, tried, seen)
        raise AssertionError("unreachable")

    def _try_acquire(self, config: NetworkConfig, attrs: LeaseAttrs, prefer: Hints | None,
                     tried: set[IPv4Network], seen: list[tuple[Listing, float] | None] | None = None) -> Lease:
        """One round of flannel's tryAcquireLease. Raises LeaseConflict when a create fails."""
        reg = self._reg()
        prefetched = self._take_prefetched()
        listing, read_at = prefetched if prefetched is not None else (reg.list_leases(), time.monotonic())
        if seen is not None:
            seen.append((listing, read_at))
        hint = prefer if prefer is not None else self._previous()
        leases = listing.leases
        mine = self._find_own(leases, attrs, hint[0])
        if (mine is not None and prefer is not None and prefer[0] is not None and mine.subnet != prefer[0]
                and prefer[0] not in tried and usable_hint(config, leases, listing.occupied, prefer) is not None):
            log.warning("not adopting %s, which also carries our public IP: taking back the subnet we held, %s",
                        mine.describe(), prefer[0])
            mine = None
        if mine is not None:
            if config.is_compatible(mine.subnet, mine.ipv6_subnet):
                return self._reuse(mine, attrs)
            if self._drop_incompatible(mine, attrs):
                leases = [lease for lease in leases if lease is not mine]
                if seen is not None:
                    seen[-1] = None   # the listing still shows the lease we deleted: not a snapshot to watch from

        chosen = None if hint[0] in tried else usable_hint(config, leases, listing.occupied, hint)
        if chosen is None:
            chosen = self._allocate(config, leases, listing, tried)
        sn, sn6 = chosen
        assert sn is not None
        try:
            lease = reg.create_lease(sn, sn6, attrs, self.ttl)
        except errors.LeaseConflict:
            tried.add(sn)
            if sn == hint[0]:
                log.warning("previous subnet %s could not be taken (its key exists); not trying it again", sn)
                if prefer is None:
                    self._hints = (None, None)  # subnet.env's hint: dropped for good (no crash loop on it)
            raise
        log.info("Allocated lease (ip: %s ipv6: %s) to current node (%s)", sn, sn6, attrs.public_ip)
        return lease

    def _reuse(self, mine: Lease, attrs: LeaseAttrs) -> Lease:
        """Publish ``attrs`` on our existing lease (a reservation stays one)."""
        log.info("Found lease (ip: %s ipv6: %s) for current IP (%s), reusing%s", mine.subnet,
                 mine.ipv6_subnet, attrs.public_ip, " (a reservation)" if mine.expiration is None else "")
        assert mine.subnet is not None
        return self._reg().update_lease(mine.subnet, mine.ipv6_subnet, attrs,
                                        None if mine.expiration is None else self.ttl)

    def _drop_incompatible(self, mine: Lease, attrs: LeaseAttrs) -> bool:
        """Our lease no longer fits the config: delete it as flannel does (True), except a
        reservation, which is the operator's to remove (False)."""
        if mine.expiration is None:
            log.error("reservation %s for this node (%s) does not fit the network config; not using it "
                      "(remove it with: flannelctl reservations remove %s)", mine.describe(), attrs.public_ip,
                      mine.subnet)
            return False
        log.warning("Found lease (ip: %s ipv6: %s) for current IP (%s) but not compatible with current "
                    "config, deleting", mine.subnet, mine.ipv6_subnet, attrs.public_ip)
        assert mine.subnet is not None
        self._reg().delete_lease(mine.subnet, mine.ipv6_subnet)
        return True

    def _find_own(self, leases: list[Lease], attrs: LeaseAttrs, hint: IPv4Network | None) -> Lease | None:
        """The lease we hold among those published for our public IP; the others are logged as strays."""
        mine = [lease for lease in leases if carries_our_ip(lease, attrs)]
        if len(mine) <= 1:
            return mine[0] if mine else None
        if hint is None or not any(lease.subnet == hint for lease in mine):
            mine = [self._with_expiration(lease) for lease in mine]
        chosen, strays = choose_own(mine, hint)
        log.warning("%d leases carry our public IP %s: using %s (%s); leaving the others alone, they are not ours: "
                    "%s (remove leftovers with: etcdctl del <key>)", len(mine), attrs.public_ip or attrs.public_ipv6,
                    chosen.subnet, _why_chosen(chosen, hint),
                    ", ".join(f"{s.subnet} ({'reservation' if s.expiration is None else 'lease'})" for s in strays))
        return chosen

    def _with_expiration(self, lease: Lease) -> Lease:
        """``lease`` with its remaining TTL looked up (listings skip that RPC)."""
        if lease.expiration != TTL_NOT_LOOKED_UP or lease.subnet is None:
            return lease
        stored = self._reg().get_lease(lease.subnet, lease.ipv6_subnet, ttl=True)
        return stored.lease if stored.lease is not None else lease

    def _allocate(self, config: NetworkConfig, leases: list[Lease], listing: Listing,
                  tried: set[IPv4Network]) -> Hints:
        assert config.network is not None
        log.info("Picking subnet in range %s ... %s", config.subnet_min, config.subnet_max)
        taken4 = [lease.subnet for lease in leases if lease.subnet is not None]
        taken4 += [nets[0] for nets in listing.occupied] + sorted(tried)
        free4 = _free_candidates(config.subnet_candidates(), config.subnet_len, 4, taken4)
        if not free4:
            raise errors.NetworkFull(
                f"network {config.network} is full: all {config.subnet_count} /{config.subnet_len} subnets "
                f"({config.subnet_min} ... {config.subnet_max}) are leased or reserved")
        sn = IPv4Network((self._rng.choice(free4), config.subnet_len))
        sn6: IPv6Network | None = None
        if config.enable_ipv6:
            taken6 = [lease.ipv6_subnet for lease in leases if lease.ipv6_subnet is not None]
            taken6 += [nets[1] for nets in listing.occupied if nets[1] is not None]
            free6 = _free_candidates(config.ipv6_subnet_candidates(), config.ipv6_subnet_len, 6, taken6)
            if not free6:
                count6 = len(config.ipv6_subnet_candidates())
                raise errors.NetworkFull(
                    f"IPv6 network {config.ipv6_network} is full: all {count6} /{config.ipv6_subnet_len} "
                    f"subnets are leased or reserved")
            sn6 = IPv6Network((self._rng.choice(free6), config.ipv6_subnet_len))
        return sn, sn6

    # -- keep our lease --------------------------------------------------------------------------

    def complete_lease(self, config: NetworkConfig, lease: Lease, stop: threading.Event,
                       on_lease: Callable[[Lease], None] | None = None) -> None:
        def reacquire(prefer: Hints) -> Lease:
            return self._acquire(config, lease.attrs, prefer=prefer, stop=stop)
        LeaseKeeper(self._reg(), lease, stop=stop, ttl=self.ttl, margin=self._opts.subnet_lease_renew_margin * 60.0,
                    reacquire=reacquire, on_lease=on_lease, feed=self._feed).run()

    # -- watch everyone --------------------------------------------------------------------------

    def watch_leases(self, config: NetworkConfig, stop: threading.Event) -> Iterator[WatchResult]:
        reg = self._reg()
        with self._lock:
            acquired, self._listing = self._listing, None
        listing = None
        if acquired is not None:
            age = time.monotonic() - acquired[1]
            if age <= FIRST_SNAPSHOT_MAX_AGE:
                listing = acquired[0]
            else:
                log.info("the acquisition's lease listing is %.0fs old; listing the leases again", age)
        current: list[WatchHandle] = []   # the open watch, for the stop hook to cancel

        def cancel() -> None:
            for h in list(current):
                h.cancel()
        unhook = stophooks.on_stop(stop, cancel)
        self._feed.opened()
        try:
            yield from self._watch_loop(reg, config, stop, listing, current)
        finally:
            unhook()
            self._feed.closed()

    def _watch_loop(self, reg: Registry, config: NetworkConfig, stop: threading.Event, listing: Listing | None,
                    current: list[WatchHandle]) -> Iterator[WatchResult]:
        rev: int | None = None
        backoff = retry.watch(stop, what="the lease watch")
        while not stop.is_set():
            handle: WatchHandle | None = None
            try:
                if rev is None:
                    source = "the acquisition's listing"
                    if listing is None:
                        listing = _with_store_retry(stop, "listing leases", reg.list_leases)
                        source = "listed"
                    rev = listing.revision
                    log.info("lease snapshot: %d leases at revision %d (%s)%s", len(listing.leases), rev, source,
                             f" ({len(listing.occupied)} unreadable keys skipped)" if listing.occupied else "")
                    self._feed.snapshot(rev)
                    leases, listing = listing.leases, None
                    yield WatchResult.of_snapshot(leases)
                self._recheck_config(config, stop)
                start = rev + 1
                handle = _with_store_retry(stop, f"watching leases from revision {start}",
                                           functools.partial(reg.watch_leases, start))
                current.append(handle)
                while not stop.is_set():
                    chunk = handle.next()
                    backoff.reset()
                    if chunk.config is not None:
                        self._check_config(config, chunk.config.text)
                    if chunk.touched:
                        self._feed.touched(chunk.touched)
                    rev = max(rev, chunk.revision)
                    if chunk.events:
                        yield WatchResult.of_events(chunk.events)
            except (Compacted, ResponseTooLarge) as e:
                log.warning("lease watch cannot go on from revision %s (%s); listing all leases again", rev, e)
                rev = None
            except errors.ConfigChanged:
                raise
            except errors.StoreUnavailable as e:
                if stop.is_set():
                    break
                metrics.store_reconnected("etcd")  # metrics
                backoff.failed(e, resume=f"resuming from revision {None if rev is None else rev + 1};")
            except errors.FlannelError as e:  # e.g. PermissionDenied, a TLS failure: log loudly, keep trying
                backoff.failed(e, level=logging.ERROR)
            finally:
                if handle is not None:
                    current.remove(handle)
                    handle.cancel()


class _Prefetch:
    """A lease listing read on a thread of its own (``prefetch_leases``), for the first acquisition
    attempt. Any failure is only logged: the attempt then lists itself and reports what fails."""

    def __init__(self, reg: Callable[[], Registry]) -> None:
        self._reg = reg
        self._out: tuple[Listing, float] | None = None
        self._thread = threading.Thread(target=self._run, name="lease-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        threadname.name_this_thread()
        try:
            listing = self._reg().list_leases()
        except Exception as e:  # an optimisation only: whatever failed, the acquisition lists again
            log.debug("listing the leases ahead of the acquisition failed (%s); the acquisition lists them", e)
            return
        self._out = (listing, time.monotonic())

    def result(self) -> tuple[Listing, float] | None:
        self._thread.join()
        return self._out


def carries_our_ip(lease: Lease, attrs: LeaseAttrs) -> bool:
    """Whether ``lease`` was published for our public IP (IPv4; IPv6 for IPv6-only nodes, fixing
    §14.6 where every IPv6-only node matched ``0.0.0.0``)."""
    if int(attrs.public_ip) != 0:
        return lease.attrs.public_ip == attrs.public_ip
    return attrs.public_ipv6 is not None and lease.attrs.public_ipv6 == attrs.public_ipv6


def choose_own(mine: list[Lease], hint: IPv4Network | None) -> tuple[Lease, list[Lease]]:
    """Which of several leases carrying our public IP is ours, and the strays.

    In order: the one on the subnet we held (subnet.env, or the subnet we just lost), a reservation
    (an operator put it there for us), the one with the latest expiration (renewed last: a live
    agent renews, a leftover does not); ties by subnet. ``mine`` must not be empty.
    """
    def rank(lease: Lease) -> tuple[bool, bool, float, int]:
        not_held = not (hint is not None and lease.subnet == hint)
        not_reserved = lease.expiration is not None
        latest_first = -(lease.expiration or 0.0)
        return not_held, not_reserved, latest_first, int(lease.subnet.network_address) if lease.subnet else 0

    ordered = sorted(mine, key=rank)
    return ordered[0], ordered[1:]


def _why_chosen(lease: Lease, hint: IPv4Network | None) -> str:
    if hint is not None and lease.subnet == hint:
        return "the subnet we held"
    if lease.expiration is None:
        return "a reservation"
    return "renewed last"


def usable_hint(config: NetworkConfig, leases: list[Lease], occupied: tuple[Subnets, ...],
                hint: Hints) -> Hints | None:
    """The previous subnet(s), if still free (by decodable leases *and* unreadable keys) and compatible."""
    sn, sn6 = hint
    if sn is None:
        return None
    sn6 = sn6 if config.enable_ipv6 else None
    held = [lease.subnet for lease in leases] + [nets[0] for nets in occupied]
    if any(other is not None and other.overlaps(sn) for other in held):
        log.info("previous subnet %s is held by another node (or by a key we cannot read); allocating a new one", sn)
        return None
    if not config.is_compatible(sn, sn6):
        log.error("previous subnet %s (ipv6 %s) does not fit the network config; ignoring it", sn, sn6)
        return None
    held6 = [lease.ipv6_subnet for lease in leases] + [nets[1] for nets in occupied]
    if sn6 is not None and any(other is not None and other.overlaps(sn6) for other in held6):
        log.info("previous IPv6 subnet %s is held by another node; allocating a new one", sn6)
        return None
    log.info("Found previously leased subnet (%s), reusing", sn)
    return sn, sn6


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
