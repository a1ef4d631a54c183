"""Prometheus metrics: every metric the agent exports is defined here, served at ``/metrics``.

Why one module: metric names are an interface (dashboards and alert rules depend on them), so
their names, help texts and labels are reviewed in one place; ``docs/metrics.md`` lists them
with what an operator does about each. Names follow Prometheus conventions: prefix ``flannel_``,
base units (seconds, bytes), counters end in ``_total``, timestamps in ``_timestamp_seconds``,
and labels only with small, bounded value sets (a reason, an operation, a backend type, a
device) — never a free-text error message. Per-peer WireGuard series are the one exception: one
series per peer, so that the peer whose handshake is stale can be named (see the docs).

**One registry per agent, not the process-global one.** ``Metrics`` owns its own
``CollectorRegistry``; the daemon creates one and the health server serves exactly that registry.
In-process tests run several daemons in one process, and a global registry would mix their
counts (or refuse the second registration of a name).

**Pull where state already exists.** Most numbers are already kept by live objects; copying them
into metric objects on every change would mean edits all over other modules and two truths that
can drift. ``StateCollector`` reads them at scrape time instead: the remote leases the daemon's
``LeaseWatcher`` tracks (by backend type), our own lease (its expiry), the workers' restarts
(``WorkerBoard``), the udp data path's ``counters()`` and the wireguard devices' ``peer_report()``.
It knows the network only by duck typing (the core must not import backends, DESIGN §2).

**Push where there is no state to read:** lease events received (the daemon's watch thread) and
applied (each backend's network loop), apply and full-reconcile durations, failed applies,
netlink errors by operation, store reconnects and relists, and records skipped by reason. Those
call sites live in code other engineers own, so each is one marked line calling a module-level
hook here (``metrics.netlink_error("set_route")``). A hook finds the agent's ``Metrics`` through
the calling thread: the daemon binds its ``Metrics`` to every worker thread it starts
(``bound``), so a hook needs no reference passed down through constructors, and two daemons in
one process count separately. On a thread that no daemon started (``flannelctl``, a unit test
calling a backend directly) hooks count into a process default (``default()``), which nothing
serves. A thread that a backend starts itself is not bound: a hook that must run there needs the
parent's ``m = current()`` captured and ``with bound(m):`` around the thread's target (no hook
runs on such a thread today). Relists are counted by the daemon itself (every snapshot after the
first one), so any subnet manager gets them; reconnects need the manager's own line.

**Metrics never break the agent.** A hook that fails logs at debug level and returns (it sits on
error paths: it must not replace the error being handled). A section of ``StateCollector`` that
raises during a scrape (a wireguard device that cannot be read, say) is logged — at most once
every ``LOG_EVERY_SECONDS`` per section — and counted in ``flannel_metrics_collect_errors_total``;
the other sections are still served. The standard ``process_*`` metrics (CPU, memory, fds) come
with every registry.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import flannel
from flannel.lease import EventType, Lease, LeaseEvent

log = logging.getLogger(__name__)

# ``<name>_created`` series double every counter's series count and nobody alerts on them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: seconds; from one netlink message (~1 ms) to a full reconcile of thousands of peers
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: a failing scrape section is logged at most this often
LOG_EVERY_SECONDS = 300.0
#: udp and alloc leases carry no BackendType (as flannel's); their label value
NO_BACKEND_TYPE = "none"

# udp data-path counter name (backends/udp/packet.COUNTER_NAMES) → (metric, reason label)
_UDP_COUNTERS: dict[str, tuple[str, str | None]] = {
    "tun_rx_packets": ("tun_read_packets", None),
    "tx_packets": ("sent_packets", None),
    "tx_bytes": ("sent_bytes", None),
    "rx_packets": ("received_packets", None),
    "tun_tx_packets": ("tun_written_packets", None),
    "tun_tx_bytes": ("tun_written_bytes", None),
    "icmp_unreachable": ("icmp_unreachable_sent", None),
    "send_errors": ("dropped_packets", "send_error"),
    "tun_write_errors": ("dropped_packets", "tun_write_error"),
}
_UDP_HELP = {
    "tun_read_packets": "Packets read from the TUN device (pods on this host sending to other hosts).",
    "sent_packets": "UDP datagrams sent to peers.",
    "sent_bytes": "Bytes of inner packets sent to peers (the UDP payload).",
    "received_packets": "UDP datagrams received on the udp backend's port, before filtering.",
    "tun_written_packets": "Packets from peers written into the TUN device (delivered to pods on this host).",
    "tun_written_bytes": "Bytes of packets from peers written into the TUN device.",
    "icmp_unreachable_sent": "ICMP net-unreachable replies written into the TUN for destinations no lease covers.",
    "dropped_packets": "Packets the udp data path dropped, by reason (drop_* counters of the data path, "
                       "send_error, tun_write_error).",
    "other": "Data-path counters of the udp backend that have no metric of their own yet.",
}


def _slug(text: str, limit: int = 48) -> str:
    """A label value from a short reason or operation: lower case, ``[a-z0-9_]``, bounded length."""
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")[:limit] or "unknown"


class Metrics:
    """One agent's metrics: its registry and the directly instrumented metrics in it."""

    def __init__(self, *, store: str | None = None) -> None:
        """``store``: the subnet manager (``etcd``/``kube``), so its counters exist (at 0) from the start."""
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)   # process_cpu_seconds_total, process_resident_memory_bytes, open fds
        self.build_info = Gauge("flannel_build_info", "Always 1; the agent's version in a label.", ["version"],
                                registry=r)
        self.build_info.labels(flannel.__version__).set(1)
        self.events_received = Counter(
            "flannel_lease_events_received", "Lease events the subnet manager delivered (watch events, before "
            "the agent filters its own lease and unchanged renewals; snapshots are not counted).", ["type"],
            registry=r)
        self.events_applied = Counter(
            "flannel_lease_events_applied", "Lease events the backend took into its desired state and "
            "programmed, including those a snapshot (start, relist) turned into (a failed kernel write is "
            "retried and counted in flannel_apply_failures_total).",
            ["type"], registry=r)
        self.apply_seconds = Histogram(
            "flannel_apply_duration_seconds", "Time to apply one batch of lease events incrementally "
            "(only the entries of the leases in the batch).", registry=r, buckets=DURATION_BUCKETS)
        self.full_reconcile_seconds = Histogram(
            "flannel_full_reconcile_duration_seconds", "Time of one full reconcile: the kernel (or device) "
            "state dumped and made to match every lease (at start, after a relist or a failure, and "
            "periodically).", registry=r, buckets=DURATION_BUCKETS)
        self.apply_failures = Counter(
            "flannel_apply_failures", "Applies or reconciles that failed and were scheduled for a retry "
            "with backoff.", registry=r)
        self.netlink_errors = Counter(
            "flannel_netlink_errors", "Netlink requests the kernel refused, by operation "
            "(e.g. set_route, delete_neigh, add_vxlan).", ["operation"], registry=r)
        self.store_reconnects = Counter(
            "flannel_store_reconnects", "Times the lease watch on the store broke and was re-established "
            "(without a full relist).", ["store"], registry=r)
        self.store_relists = Counter(
            "flannel_store_relists", "Full re-listings of all leases after the first (etcd compaction, "
            "kube 410 Gone, a restarted watch thread).", ["store"], registry=r)
        self.records_skipped = Counter(
            "flannel_store_records_skipped", "Store records that could not be read as a lease and were skipped "
            "(logged), by reason.", ["store", "reason"], registry=r)
        # series that exist from the start, so that rate() and increase() see the first event
        for etype in EventType:
            self.events_received.labels(etype.value)
            self.events_applied.labels(etype.value)
        if store:
            self.store_reconnects.labels(_slug(store))
            self.store_relists.labels(_slug(store))

    def attach(self, sources: Sources) -> StateCollector:
        """Register the scrape-time collector that reads ``sources`` (once per agent)."""
        collector = StateCollector(sources)
        self.registry.register(collector)
        return collector

    # -- direct instrumentation (hooks call these on the bound Metrics) --------------------------

    def lease_events_received(self, events: Iterable[LeaseEvent]) -> None:
        _count_events(self.events_received, events)

    def lease_events_applied(self, events: Iterable[LeaseEvent]) -> None:
        _count_events(self.events_applied, events)

    def netlink_error(self, operation: str) -> None:
        self.netlink_errors.labels(_slug(operation)).inc()

    def store_reconnected(self, store: str) -> None:
        self.store_reconnects.labels(_slug(store)).inc()

    def store_relisted(self, store: str) -> None:
        self.store_relists.labels(_slug(store)).inc()

    def record_skipped(self, store: str, reason: str) -> None:
        self.records_skipped.labels(_slug(store), _slug(reason)).inc()

    @contextlib.contextmanager
    def timed_apply(self, *, full: bool) -> Iterator[None]:
        """Observe the duration of the block (also when it raises) as an apply or a full reconcile."""
        hist = self.full_reconcile_seconds if full else self.apply_seconds
        started = time.perf_counter()
        try:
            yield
        finally:
            try:
                hist.observe(time.perf_counter() - started)
            except Exception as e:  # never replace the block's own outcome
                log.debug("metrics: observing a duration failed: %s", e)

    def sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The current value of one sample in this registry (tests and debugging)."""
        return self.registry.get_sample_value(name, dict(labels or {}))


def _count_events(counter: Counter, events: Iterable[LeaseEvent]) -> None:
    added = removed = 0
    for ev in events:
        if ev.type is EventType.ADDED:
            added += 1
        else:
            removed += 1
    if added:
        counter.labels(EventType.ADDED.value).inc(added)
    if removed:
        counter.labels(EventType.REMOVED.value).inc(removed)


# -------------------------------------------------------------------------------------------------
# Which Metrics a hook counts into: the one bound to the calling thread
# -------------------------------------------------------------------------------------------------

_local = threading.local()
_default: Metrics | None = None
_default_lock = threading.Lock()


def default() -> Metrics:
    """The process default (threads no daemon started); created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


def current() -> Metrics:
    """The ``Metrics`` bound to this thread, else the process default."""
    bound_metrics: Metrics | None = getattr(_local, "metrics", None)
    return bound_metrics if bound_metrics is not None else default()


@contextlib.contextmanager
def bound(m: Metrics) -> Iterator[Metrics]:
    """Hooks called on this thread inside the block count into ``m`` (the daemon wraps its workers)."""
    previous = getattr(_local, "metrics", None)
    _local.metrics = m
    try:
        yield m
    finally:
        _local.metrics = previous


def _hook(fn: Callable[[Metrics], None], what: str) -> None:
    try:
        fn(current())
    except Exception as e:  # a metric must never break the code path that counts it
        log.debug("metrics: %s failed: %s", what, e)


# -- the hooks: one line at each call site -------------------------------------------------------

def lease_events_applied(events: Iterable[LeaseEvent]) -> None:
    """A backend took ``events`` into its desired state (call once per batch)."""
    _hook(lambda m: m.lease_events_applied(events), "lease_events_applied")


def apply_failed() -> None:
    """An apply/reconcile failed and will be retried (call where the backoff is scheduled)."""
    _hook(lambda m: m.apply_failures.inc(), "apply_failed")


def netlink_error(operation: str) -> None:
    """The kernel refused a netlink request; ``operation`` is a short fixed name (``set_route``)."""
    _hook(lambda m: m.netlink_error(operation), "netlink_error")


def store_reconnected(store: str) -> None:
    """The lease watch on ``store`` (``etcd``/``kube``) broke and is being re-established."""
    _hook(lambda m: m.store_reconnected(store), "store_reconnected")


def store_relisted(store: str) -> None:
    """All leases were listed again (not the first listing)."""
    _hook(lambda m: m.store_relisted(store), "store_relisted")


def record_skipped(store: str, reason: str) -> None:
    """A record from ``store`` was skipped; ``reason`` is a short fixed slug (``bad_value``), not the
    error text (a label with free text would create a series per message)."""
    _hook(lambda m: m.record_skipped(store, reason), "record_skipped")


@contextlib.contextmanager
def timed_apply(*, full: bool) -> Iterator[None]:
    """``with metrics.timed_apply(full=...): <apply>`` observes the duration (the block's own
    exceptions pass through unchanged)."""
    with current().timed_apply(full=full):
        yield


# -------------------------------------------------------------------------------------------------
# Scrape-time collection from live objects
# -------------------------------------------------------------------------------------------------

@runtime_checkable
class HasCounters(Protocol):
    """The udp Network (``backends/udp``): data-path counters summed over its workers."""

    def counters(self) -> Mapping[str, int]: ...


class PeerLike(Protocol):
    """One WireGuard peer as ``WireGuardNetwork.peer_report()`` reports it."""

    @property
    def device(self) -> str: ...

    @property
    def public_key(self) -> str: ...

    @property
    def allowed_ips(self) -> tuple[str, ...]: ...

    @property
    def last_handshake_age(self) -> float | None: ...


@runtime_checkable
class HasPeerReport(Protocol):
    """The wireguard Network (``backends/wireguard``): its devices' peers, read now."""

    def peer_report(self) -> Sequence[PeerLike]: ...


def _nothing() -> None:
    return None


def _no_leases() -> list[Lease]:
    return []


def _no_workers() -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class Sources:
    """What ``StateCollector`` reads, as callables the daemon provides (fakes in tests).

    ``remote_leases``: the leases of other nodes the agent tracks; ``own_lease``: ours (None before
    it is acquired); ``network``: the backend's running Network (None before); ``worker_restarts``:
    restarts per worker thread; ``ready``: subnet.env written (None: not exported).
    """

    remote_leases: Callable[[], Iterable[Lease]] = _no_leases
    own_lease: Callable[[], Lease | None] = _nothing
    network: Callable[[], object | None] = _nothing
    worker_restarts: Callable[[], Mapping[str, int]] = _no_workers
    ready: Callable[[], bool] | None = None


class StateCollector:
    """Reads ``sources`` on every scrape (see the module doc). Sections fail independently; the
    failures are counted in ``flannel_metrics_collect_errors_total`` (in the same scrape).
    ``clock`` (tests) paces the log lines about them.
    """

    def __init__(self, sources: Sources, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = sources
        self.clock = clock
        self._logged: dict[str, float] = {}
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()   # scrapes run on concurrent request threads

    def collect(self) -> Iterator[prometheus_client.Metric]:
        sections: tuple[tuple[str, Callable[[], list[prometheus_client.Metric]]], ...] = (
            ("leases", self._leases), ("agent", self._agent), ("udp", self._udp), ("wireguard", self._wireguard))
        for name, section in sections:
            try:
                families = section()   # built completely first: a failure yields nothing half-done
            except Exception as e:   # any failure of a live object: log it, serve the rest
                self._failed(name, e)
                continue
            yield from families
        errors = CounterMetricFamily("flannel_metrics_collect_errors", "Scrape-time sections (leases, agent, "
                                     "udp, wireguard) that failed (logged); the rest of the scrape is still "
                                     "served.", labels=["section"])
        with self._lock:
            for name, n in sorted(self._errors.items()):
                errors.add_metric([name], n)
        yield errors

    def _failed(self, section: str, e: Exception) -> None:
        now = self.clock()
        with self._lock:
            self._errors[section] = self._errors.get(section, 0) + 1
            last = self._logged.get(section)
            due = last is None or now - last >= LOG_EVERY_SECONDS
            if due:
                self._logged[section] = now
        if due:
            log.warning("metrics: could not collect %s: %s: %s (logged at most every %.0fs)",
                        section, type(e).__name__, e, LOG_EVERY_SECONDS)
            log.debug("metrics: %s failed here:", section, exc_info=e)

    def _leases(self) -> list[prometheus_client.Metric]:
        by_type: dict[str, int] = {}
        for lease in self.sources.remote_leases():
            key = lease.attrs.backend_type or NO_BACKEND_TYPE
            by_type[key] = by_type.get(key, 0) + 1
        remote = GaugeMetricFamily("flannel_remote_leases", "Leases of other nodes this agent tracks, by the "
                                   "BackendType in the lease (udp and alloc leases have none).",
                                   labels=["backend_type"])
        for btype, n in sorted(by_type.items()):
            remote.add_metric([btype], n)
        out: list[prometheus_client.Metric] = [remote]
        own = self.sources.own_lease()
        if own is not None:
            info = GaugeMetricFamily("flannel_own_lease_info", "Always 1 while the agent holds a lease; "
                                     "our subnet(s) and public IP in labels.",
                                     labels=["subnet", "ipv6_subnet", "public_ip", "backend_type"])
            info.add_metric([str(own.subnet or ""), str(own.ipv6_subnet or ""), str(own.attrs.public_ip),
                             own.attrs.backend_type or NO_BACKEND_TYPE], 1)
            out.append(info)
            if own.expiration:   # None: never expires (kube, reservations); 0.0: TTL unknown
                out.append(GaugeMetricFamily(
                    "flannel_own_lease_expiry_timestamp_seconds", "When our lease expires unless renewed "
                    "(Unix time). Absent for leases that do not expire (kube mode, reservations).",
                    value=own.expiration))
        return out

    def _agent(self) -> list[prometheus_client.Metric]:
        out: list[prometheus_client.Metric] = []
        restarts = CounterMetricFamily("flannel_worker_restarts", "Restarts of the agent's worker threads "
                                       "(watch, network, lease, traffic, health) after a failure.",
                                       labels=["worker"])
        for worker, n in sorted(self.sources.worker_restarts().items()):
            restarts.add_metric([worker], n)
        out.append(restarts)
        if self.sources.ready is not None:
            out.append(GaugeMetricFamily("flannel_ready", "1 once subnet.env is written (what /readyz says).",
                                         value=1 if self.sources.ready() else 0))
        return out

    def _udp(self) -> list[prometheus_client.Metric]:
        net = self.sources.network()
        if not isinstance(net, HasCounters):
            return []
        families: dict[str, CounterMetricFamily] = {}

        def family(metric: str, labels: list[str]) -> CounterMetricFamily:
            if metric not in families:
                families[metric] = CounterMetricFamily(f"flannel_udp_{metric}", _UDP_HELP[metric], labels=labels)
            return families[metric]

        for name, value in sorted(net.counters().items()):
            metric, reason = _UDP_COUNTERS.get(name, (None, None))
            if metric is None and name.startswith("drop_"):
                metric, reason = "dropped_packets", name[len("drop_"):]
            if metric is None:
                family("other", ["counter"]).add_metric([_slug(name)], value)
            elif metric == "dropped_packets":
                family(metric, ["reason"]).add_metric([_slug(reason or name)], value)
            else:
                family(metric, []).add_metric([], value)
        return list(families.values())

    def _wireguard(self) -> list[prometheus_client.Metric]:
        net = self.sources.network()
        if not isinstance(net, HasPeerReport):
            return []
        peers = GaugeMetricFamily("flannel_wireguard_peers", "Peers configured on each of our WireGuard "
                                  "devices (read from the device).", labels=["device"])
        never = GaugeMetricFamily("flannel_wireguard_peers_without_handshake", "Peers on the device that "
                                  "have never completed a handshake.", labels=["device"])
        age = GaugeMetricFamily("flannel_wireguard_peer_last_handshake_age_seconds", "Seconds since the last "
                                "completed handshake with each peer (absent for peers without one). WireGuard "
                                "re-handshakes every 2 minutes while traffic flows.",
                                labels=["device", "public_key", "allowed_ips"])
        count: dict[str, int] = {}
        without: dict[str, int] = {}
        for p in net.peer_report():
            count[p.device] = count.get(p.device, 0) + 1
            without.setdefault(p.device, 0)
            if p.last_handshake_age is None:
                without[p.device] += 1
            else:
                age.add_metric([p.device, p.public_key, ",".join(p.allowed_ips)], p.last_handshake_age)
        devices = getattr(net, "devices", None)   # devices without peers still report 0
        if isinstance(devices, Mapping):
            for dev in devices:
                count.setdefault(str(dev), 0)
                without.setdefault(str(dev), 0)
        for dev in sorted(count):
            peers.add_metric([dev], count[dev])
            never.add_metric([dev], without[dev])
        return [peers, never, age]
