"""The vxlan backend (reference §7) and the reconcile loop it shares with host-gw.

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
* vxlan only: the device is checked every ``device_check_interval`` s; if someone deleted it, it is
  re-created with the same MAC and address and every peer is programmed again (flannel 0.27 did not
  replay peers, reference §14.15).

Kernel state is left in place on ``close`` so that a restart does not interrupt traffic (§12.4).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from flannel import errors
from flannel.backends.base import Backend, ExternalInterface, Network
from flannel.backends.vxlan import network as vx
from flannel.backends.vxlan.device import BATCH_UNVERIFIED, Netlink, Scope, VXLANSpec
from flannel.config import NetworkConfig
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 10.0          # host-gw: flannel's route check period
VXLAN_RESYNC_INTERVAL = 60.0    # vxlan: a full dump costs ~0.25 ms/entry in Python; flannel had none
DEVICE_CHECK_INTERVAL = 1.0
MAX_BACKOFF = 30.0

Translate = Callable[[Lease, vx.Context], vx.KernelState]


class RoutedNetwork(Network):
    """A Network whose data plane is a set of kernel routes (and, for vxlan, neighbours + fdb)."""

    def __init__(self, *, lease: Lease, mtu: int, nl: Netlink, ctx: vx.Context, config: NetworkConfig,
                 translate: Translate, ext_iface: ExternalInterface,
                 resync_interval: float = RESYNC_INTERVAL) -> None:
        super().__init__(lease, mtu)
        self.nl = nl
        self.ctx = ctx
        self.config = config
        self.translate = translate
        self.ext_iface = ext_iface
        self.resync_interval = resync_interval
        self.peers: dict[object, Lease] = {}
        self._cache: vx.KernelState | None = None   # what the kernel holds, as far as we know
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

    def run(self, batches: "queue.Queue[Batch | None]", stop: threading.Event) -> None:
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
            except Exception:  # noqa: BLE001 - a bug here must not kill the data plane thread
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
            if batch.synced:
                if not self._synced:
                    log.info("%s: first snapshot complete (%d leases); reconciling", self.ctx.backend_type, len(self.peers))
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
            self.sync(full=full)

    def sync(self, *, full: bool) -> None:
        """Make the kernel match the desired state: against a fresh dump if ``full``."""
        try:
            if full or self._cache is None:
                self.refresh_context()
            desired = vx.desired_state(self.peers.values(), self.ctx, self.translate)
            self._log_skipped(desired)
            if full or self._cache is None:
                actual = self.nl.dump(self.scope())
                self._next_resync = time.monotonic() + self.resync_interval
            else:
                actual = self._cache
            p = vx.plan(desired.state, actual)
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
                rest = vx.plan(desired.state, self.nl.dump(self.scope()))
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

    def _ok(self, state: vx.KernelState) -> None:
        self._cache = state
        self._dirty = False
        self._backoff = 1.0

    def _fail(self) -> None:
        self._cache = None
        self._dirty = True
        self._retry_at = time.monotonic() + self._backoff
        log.info("%s: will retry in %.0f s", self.ctx.backend_type, self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _log_skipped(self, desired: vx.Desired) -> None:
        for lease, reason in desired.skipped:
            if self._skip_logged.get(lease.ident) != reason:
                self._skip_logged[lease.ident] = reason
                level = logging.INFO if reason.startswith("ignoring non-") else logging.WARNING
                log.log(level, "%s", reason)


class VXLANNetwork(RoutedNetwork):
    """vxlan: one device per enabled family (``flannel.<VNI>``, ``flannel-v6.<VNI>``)."""

    def __init__(self, *, specs: dict[int, VXLANSpec], macs: dict[int, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.specs = dict(specs)     # by IP version
        self.macs = dict(macs)
        self._next_check = 0.0
        self._dev_backoff = 1.0

    @property
    def spec(self) -> VXLANSpec:
        """The IPv4 device's spec (or the IPv6 one on an IPv6-only node)."""
        return self.specs.get(4) or self.specs[6]

    @property
    def mac(self) -> str:
        return self.macs.get(4) or self.macs[6]

    def on_lease_renewed(self, lease: Lease) -> None:
        """A re-acquired lease with another subnet moves the devices' /32 (/128) addresses."""
        old = self._lease
        self._lease = lease
        if lease.ident != old.ident:
            for version, spec in self.specs.items():
                try:
                    info = self.nl.link(spec.name)
                    if info is not None:
                        configure_device(self.nl, info, lease, self.config, version)
                except errors.BackendError as e:
                    log.warning("moving %s to lease %s failed: %s", spec.name, lease.describe(), e)

    def route_devs(self) -> tuple[str, ...]:
        # direct routes (DirectRouting) go via the ext iface; include it even when the option is
        # off so that switching it off removes them
        return (*(s.name for s in self.specs.values()), self.ext_iface.name)

    def overlay_dev(self) -> str | None:
        return self.specs[4].name if 4 in self.specs else None

    def overlay_dev6(self) -> str | None:
        return self.specs[6].name if 6 in self.specs else None

    def check_device(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + DEVICE_CHECK_INTERVAL
        recreated = False
        for version, spec in list(self.specs.items()):
            if self.nl.link_index(spec.name) is not None:
                continue
            log.warning("Interface %s deleted; re-creating it", spec.name)
            try:
                ext_idx = self.nl.link_index(self.ext_iface.name)
                if ext_idx is None:
                    raise errors.BackendError(f"external interface {self.ext_iface.name} is gone")
                spec = replace(spec, link_index=ext_idx)
                info = setup_device(self.nl, spec, self.macs[version], self._lease, self.config, version)
            except errors.BackendError as e:
                self._next_check = now + self._dev_backoff
                log.warning("re-creating %s failed: %s; next try in %.0f s", spec.name, e, self._dev_backoff)
                self._dev_backoff = min(self._dev_backoff * 2, MAX_BACKOFF)
                raise
            self.specs[version] = spec
            self._dev_backoff = 1.0
            self._cache = None
            recreated = True
            log.info("%s re-created (mac %s); re-programming %d peers", info.name, info.mac, len(self.peers))
        return recreated


def setup_device(nl: Netlink, spec: VXLANSpec, mac: str | None, lease: Lease | None,
                 config: NetworkConfig, version: int = 4) -> Any:
    """Create/reuse the device and, once the lease is known, give it its address and bring it up."""
    info, created = nl.ensure_vxlan(spec, mac)
    log.info("%s vxlan device %s (vni %d, mac %s, mtu %d)", "created" if created else "reusing", info.name,
             spec.vni, info.mac, info.mtu)
    if lease is not None:
        configure_device(nl, info, lease, config, version)
    return info


def configure_device(nl: Netlink, info: Any, lease: Lease, config: NetworkConfig, version: int = 4) -> None:
    """Address ``<subnet>.0/32`` (IPv6: ``<subnet>::/128``), link up, and the MAC check of §7.4."""
    subnet = lease.subnet if version == 4 else lease.ipv6_subnet
    if subnet is None:
        raise errors.BackendError(f"the vxlan backend needs an IPv{version} subnet in our lease ({lease.describe()})")
    nl.ensure_address(info.index, subnet.network_address, config.network if version == 4 else config.ipv6_network)
    nl.set_up(info.index)
    now = nl.link(info.name)
    if now is None or now.mac != info.mac:
        raise errors.BackendError(f"{info.name}'s mac address wanted: {info.mac}, but got: {now.mac if now else None}")


class VXLANBackend(Backend):
    """Entry point ``vxlan``: kernel vxlan device(s) and per-peer route + neighbour + fdb entries."""

    type_name = "vxlan"

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        opts = vx.parse_options(config.backend)
        ext = self.ext_iface
        families = _families(config, ext, self.type_name)
        stored = _stored_macs(leases)
        nl = Netlink()
        specs: dict[int, VXLANSpec] = {}
        infos: dict[int, Any] = {}
        try:
            ext_idx = nl.link_index(ext.name) or ext.index
            for version, local in families.items():
                # over an IPv6 underlay the outer headers take 70 bytes, not 50 (reference §14.14)
                mtu = vx.device_mtu(opts, ext.mtu, ipv6_underlay=version == 6)
                specs[version] = VXLANSpec(name=vx.device_name(opts.vni, v6=version == 6), vni=opts.vni,
                                           port=opts.port, gbp=opts.gbp, learning=opts.learning, local=local,
                                           link_index=ext_idx, mtu=mtu)
                infos[version] = setup_device(nl, specs[version], stored.get(version), None, config, version)
            attrs = LeaseAttrs(
                public_ip=ext.ext_addr if 4 in families and ext.ext_addr else LeaseAttrs().public_ip,
                public_ipv6=ext.ext_v6_addr if 6 in families else None,
                backend_type=self.type_name,
                backend_data=vx.encode_backend_data(opts.vni, infos[4].mac) if 4 in infos else None,
                backend_v6_data=vx.encode_backend_data(opts.vni, infos[6].mac) if 6 in infos else None)
            lease = leases.acquire_lease(attrs)
            for version, info in infos.items():
                configure_device(nl, info, lease, config, version)
        except BaseException:
            nl.close()
            raise
        ctx = vx.Context(backend_type=self.type_name, dev=specs[4].name if 4 in specs else None, ext_dev=ext.name,
                         direct_routing=opts.direct_routing, dev6=specs[6].name if 6 in specs else None)
        return VXLANNetwork(specs=specs, macs={v: i.mac for v, i in infos.items()}, lease=lease,
                            mtu=min(i.mtu for i in infos.values()), nl=nl, ctx=ctx, config=config,
                            translate=vx.vxlan_entries, ext_iface=ext, resync_interval=VXLAN_RESYNC_INTERVAL)


def _families(config: NetworkConfig, ext: ExternalInterface, what: str) -> dict[int, Any]:
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


def _stored_macs(leases: LeaseSource) -> dict[int, str]:
    """The VtepMACs we published last time (kube keeps them in annotations; etcd does not)."""
    try:
        v4, v6 = leases.stored_backend_data()
    except (AttributeError, NotImplementedError):
        return {}
    out: dict[int, str] = {}
    for version, text in ((4, v4), (6, v6)):
        if not text:
            continue
        try:
            out[version] = vx.parse_backend_data(text).mac
        except errors.BadLeaseRecord as e:
            log.warning("ignoring stored BackendData %r: %s", text, e)
    return out


__all__ = ["VXLANBackend", "VXLANNetwork", "RoutedNetwork"]
