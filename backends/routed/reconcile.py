"""The reconcile loop shared by vxlan and host-gw (and any backend whose data plane is kernel routes).

``RoutedNetwork.run`` keeps the desired set of peers and makes the kernel match it (DESIGN §3):

* batches before the first ``synced`` one only update the peer table: the first snapshot is
  reconciled as a whole against one dump of the kernel, so a restart leaves correct entries
  untouched (no flap) and removes only what no lease justifies;
* after that, each batch is applied as the diff between the previous and the new desired state
  (no dump), and a ``synced`` batch, a periodic resync (``resync_interval``: 60 s for vxlan, 10 s
  for host-gw like flannel's route check), a re-created device or an earlier failure trigger a
  full reconcile against a fresh dump, which also repairs entries someone else deleted;
* a failing entry is logged and retried with backoff (1 s doubling to 30 s); it never ends the loop
  and never removes other peers;
* ``check_device`` is a hook for backends that own a device (vxlan re-creates a deleted one; a
  ``True`` result makes the next step a full reconcile).

Kernel state is left in place on ``close`` so that a restart does not interrupt traffic (§12.4).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any

from flannel import errors, metrics
from flannel.backends.base import ExternalInterface, Network
from flannel.backends.routed import model
from flannel.backends.routed.netlink import BATCH_UNVERIFIED, Netlink, Scope
from flannel.config import NetworkConfig
from flannel.lease import Batch, EventType, Lease

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 10.0          # host-gw: flannel's route check period
DEVICE_CHECK_INTERVAL = 1.0
MAX_BACKOFF = 30.0


class RoutedNetwork(Network):
    """A Network whose data plane is a set of kernel routes (and, for vxlan, neighbours + fdb)."""

    def __init__(self, *, lease: Lease, mtu: int, nl: Netlink, ctx: model.Context, config: NetworkConfig,
                 translate: model.Translate, ext_iface: ExternalInterface,
                 resync_interval: float = RESYNC_INTERVAL) -> None:
        super().__init__(lease, mtu)
        self.nl = nl
        self.ctx = ctx
        self.config = config
        self.translate = translate
        self.ext_iface = ext_iface
        self.resync_interval = resync_interval
        self.peers: dict[object, Lease] = {}
        self._cache: model.KernelState | None = None   # what the kernel holds, as far as we know
        self._synced = False
        self._dirty = False
        self._backoff = 1.0
        self._retry_at = 0.0
        self._next_resync = 0.0
        self._skip_logged: dict[object, str] = {}
        self._lock = threading.Lock()

    # ---- Network API ------------------------------------------------------------------------

    def close(self) -> None:
        """Leave routes/neighbours/fdb (and the device) in place for the next start."""
        self.nl.close()

    def scope(self) -> Scope:
        v4 = self.config.enable_ipv4
        v6 = self.config.enable_ipv6
        return Scope(network=self.config.network if v4 else None, devs=self.route_devs(),
                     overlay_dev=self.overlay_dev() if v4 else None, exclude=self._lease.subnet,
                     network6=self.config.ipv6_network if v6 else None,
                     overlay_dev6=self.overlay_dev6() if v6 else None, exclude6=self._lease.ipv6_subnet)

    def route_devs(self) -> tuple[str, ...]:
        return (self.ext_iface.name,)

    def overlay_dev(self) -> str | None:
        return None

    def overlay_dev6(self) -> str | None:
        return None

    def check_device(self) -> bool:
        """Hook: make sure our device exists. Returns True if it had to be re-created."""
        return False

    def refresh_context(self) -> None:
        """Re-read which subnets are on-link on the external interface (for host-gw/DirectRouting)."""
        idx = self.nl.link_index(self.ext_iface.name)
        nets = self.nl.connected_nets(idx, 4) if idx is not None else ()
        nets6 = self.nl.connected_nets(idx, 6) if idx is not None and self.ctx.dev6 is not None else ()
        if nets != self.ctx.local_nets or nets6 != self.ctx.local_nets6:
            self.ctx = replace(self.ctx, local_nets=nets, local_nets6=nets6)

    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        log.info("%s: watching for new subnet leases", self.ctx.backend_type)
        while not stop.is_set():
            try:
                batch = batches.get(timeout=self._tick())
            except queue.Empty:
                batch = None
                got = False
            else:
                got = True
                if batch is None:
                    return
            try:
                self.step(batch if got else None)
            except Exception:
                log.exception("%s: unexpected error in reconcile step; retrying", self.ctx.backend_type)
                self._fail()

    # ---- the loop body (public for tests) ---------------------------------------------------

    def step(self, batch: Batch | None) -> None:
        """Apply one batch (or just the periodic checks when ``batch`` is None)."""
        full = False
        if batch is not None:
            for ev in batch.events:
                if ev.type is EventType.ADDED:
                    self.peers[ev.lease.ident] = ev.lease
                else:
                    self.peers.pop(ev.lease.ident, None)
                    self._skip_logged.pop(ev.lease.ident, None)
            metrics.lease_events_applied(batch.events)  # metrics
            if batch.synced:
                if not self._synced:
                    log.info("%s: first snapshot complete (%d leases); reconciling",
                             self.ctx.backend_type, len(self.peers))
                self._synced = True
                full = True
        if not self._synced:
            return
        now = time.monotonic()
        try:
            if self.check_device():
                full = True
        except errors.BackendError as e:
            log.warning("%s: device check failed: %s", self.ctx.backend_type, e)
            self._fail()
            return
        if now >= self._next_resync:
            full = True
        if self._dirty:
            # ticks respect the backoff; a new batch is applied at once (one failing peer must
            # not delay the others), against a fresh dump because the cache is unknown
            if batch is None and now < self._retry_at:
                return
            full = True
        if batch is not None or full:
            with metrics.timed_apply(full=full or self._cache is None):  # metrics: apply/full-reconcile time
                self.sync(full=full)

    def sync(self, *, full: bool) -> None:
        """Make the kernel match the desired state: against a fresh dump if ``full``."""
        try:
            if full or self._cache is None:
                self.refresh_context()
            desired = model.desired_state(self.peers.values(), self.ctx, self.translate)
            self._log_skipped(desired)
            if full or self._cache is None:
                actual = self.nl.dump(self.scope())
                self._next_resync = time.monotonic() + self.resync_interval
            else:
                actual = self._cache
            p = model.plan(desired.state, actual)
            if p.empty:
                self._ok(desired.state)
                return
            log.info("%s: applying %d changes (%d route, %d neigh, %d fdb deletions; %d fdb, %d neigh, %d route sets)",
                     self.ctx.backend_type, len(p), len(p.del_routes), len(p.del_neighs), len(p.del_fdbs),
                     len(p.set_fdbs), len(p.set_neighs), len(p.set_routes))
            for r in p.del_routes:
                log.debug("delete %s", r)
            failed = self.nl.apply(p)
            if failed and failed[0][0] is BATCH_UNVERIFIED:
                # batch mode does not attribute errors to entries: re-dump, redo the rest one by one
                log.info("%s: %s; verifying", self.ctx.backend_type, failed[0][1])
                rest = model.plan(desired.state, self.nl.dump(self.scope()))
                failed = self.nl.apply_each(rest) if not rest.empty else []
        except errors.BackendError as e:
            log.warning("%s: reconcile failed: %s", self.ctx.backend_type, e)
            self._fail()
            return
        if failed:
            for _entry, msg in failed:
                log.warning("%s: %s", self.ctx.backend_type, msg)
            self._fail()
        else:
            self._ok(desired.state)

    # ---- helpers ----------------------------------------------------------------------------

    def _tick(self) -> float:
        return DEVICE_CHECK_INTERVAL

    def _ok(self, state: model.KernelState) -> None:
        self._cache = state
        self._dirty = False
        self._backoff = 1.0

    def _fail(self) -> None:
        metrics.apply_failed()  # metrics
        self._cache = None
        self._dirty = True
        self._retry_at = time.monotonic() + self._backoff
        log.info("%s: will retry in %.0f s", self.ctx.backend_type, self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _log_skipped(self, desired: model.Desired) -> None:
        for lease, reason in desired.skipped:
            if self._skip_logged.get(lease.ident) != reason:
                self._skip_logged[lease.ident] = reason
                level = logging.INFO if reason.startswith("ignoring non-") else logging.WARNING
                log.log(level, "%s", reason)


def families(config: NetworkConfig, ext: ExternalInterface, what: str) -> dict[int, Any]:
    """The tunnel source per enabled family; clear errors for what is missing.

    The source must be a local address: with --public-ip behind NAT we use the interface's own
    address (flannel used the public one, which the kernel cannot use, reference §14.24).
    """
    out: dict[int, Any] = {}
    if config.enable_ipv4:
        if config.network is None:
            raise errors.ConfigError(f"the {what} backend needs a Network when EnableIPv4 is set")
        if ext.ext_addr is None:
            raise errors.ConfigError(f"the {what} backend needs an IPv4 public address on {ext.name}")
        out[4] = ext.iface_addr or ext.ext_addr
    if config.enable_ipv6:
        if config.ipv6_network is None:
            raise errors.ConfigError(f"the {what} backend needs an IPv6Network when EnableIPv6 is set")
        if ext.ext_v6_addr is None:
            raise errors.ConfigError(f"the {what} backend needs an IPv6 public address on {ext.name} (EnableIPv6)")
        out[6] = ext.iface_v6_addr or ext.ext_v6_addr
    if not out:
        raise errors.ConfigError(f"the {what} backend needs EnableIPv4 or EnableIPv6")
    return out
