"""The wireguard backend (reference §9.4): ``WireGuardBackend`` (the plugin) and ``WireGuardNetwork``.

Startup: load (or generate) the private key, create ``flannel-wg`` (and ``flannel-wg-v6`` in
``separate`` mode with IPv6) afresh — kernel WireGuard or wireguard-go, see ``device.py`` — with
our key, listen port and no peers; publish ``{"PublicKey":…,"Port":…}``; after the lease, give
each device its ``/32`` (``/128``) address and the route ``Network dev flannel-wg scope link``.

Running: ``WireGuardNetwork.run`` keeps one WireGuard peer per remote lease (``network.PeerTable``):

* the first snapshot (and every relist, device re-creation, failure and the periodic resync,
  60 s) is a full resync: the device's peers are read (UAPI ``get=1`` / ``wg show dump``) and one
  transaction removes what no lease justifies and adds/updates what differs; correct peers are
  not touched;
* every other batch of k events is one transaction with only those k peers, computed against
  what we applied last (no device read);
* a bad lease (bad BackendData, no public IP) is logged once and skipped; it never removes other
  peers; a failing transaction is retried with backoff (1 s doubling to 30 s).

Shutdown deletes the devices (and so stops wireguard-go), like flannel.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from flannel import errors, metrics, stophooks
from flannel.backends.base import Backend, ExternalInterface, Network
from flannel.backends.routed.netlink import Netlink
from flannel.backends.routed.reconcile import MAX_BACKOFF, families
from flannel.backends.wireguard import device, keys
from flannel.backends.wireguard import network as wgnet
from flannel.backends.wireguard.links import LinkWatch
from flannel.backends.wireguard.model import PeerConfig, SetRequest
from flannel.backends.wireguard.network import DEV, DEV_V6, TYPE, Context, Mode, PeerTable
from flannel.config import NetworkConfig
from flannel.lease import UNSPECIFIED_V4, Batch, EventType, Lease, LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)

RESYNC_INTERVAL = 60.0
#: how often the devices are looked up when link notifications are not available (with them, a
#: deletion wakes the loop at once and the devices are looked up at each resync as well)
DEVICE_CHECK_INTERVAL = 1.0
#: shortest wait of the run loop (a due time in the past must not make it spin)
MIN_WAIT = 0.01
#: queued by the link watch: "look at the devices now" (not a lease batch)
_CHECK_DEVICES = Batch()


@dataclass(frozen=True)
class PeerReport:
    """One peer on one of our devices, as the device reports it (for metrics and ``doctor``)."""

    device: str
    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    last_handshake_age: float | None   # seconds; None = never
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    listen_port: int
    family: int          # the family whose address/route it carries (single mode: 4 and 6 → see versions)
    versions: tuple[int, ...]


class WireGuardNetwork(Network):
    """Keeps our WireGuard devices' peers in step with the remote leases."""

    def __init__(self, *, lease: Lease, mtu: int, nl: Netlink, devices: dict[str, device.WGDevice],
                 specs: dict[str, DeviceSpec], ctx: Context, config: NetworkConfig, private_key: str,
                 impl: str = device.AUTO, uapi_dir: str = device.DEFAULT_UAPI_DIR,
                 resync_interval: float = RESYNC_INTERVAL) -> None:
        super().__init__(lease, mtu)
        self.nl = nl
        self.devices = dict(devices)
        self.specs = dict(specs)
        self.ctx = ctx
        self.config = config
        self.impl = impl
        self.uapi_dir = uapi_dir
        self.resync_interval = resync_interval
        self.table = PeerTable(ctx)
        self.applied: dict[str, dict[str, PeerConfig]] = {name: {} for name in devices}
        self.transactions = 0          # device set transactions sent (tests check incrementality)
        self._private_key = private_key
        self._synced = False
        self._dirty = False
        self._backoff = 1.0
        self._retry_at = 0.0
        self._next_resync = 0.0
        self._next_check = 0.0
        self._logged_skips: dict[object, str] = {}
        self._logged_shared: dict[tuple[str, str], tuple[object, ...]] = {}
        self._lock = threading.RLock()   # devices: run loop vs close / peer_report
        self._watch: LinkWatch | None = None
        self._closed = False

    # ---- Network API ------------------------------------------------------------------------

    @property
    def public_key(self) -> str:
        return keys.public_key(self._private_key)

    @property
    def implementation(self) -> str:
        return next(iter(self.devices.values())).implementation if self.devices else ""

    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        """Apply batches; between them sleep until the next due time (resync, retry, device check).

        Why no fixed tick: an idle agent should not wake up. A deleted device (or a wireguard-go that
        exited) is reported by the kernel and wakes the loop through ``LinkWatch``; without that
        watch the devices are looked up every DEVICE_CHECK_INTERVAL as before."""
        log.info("wireguard: watching for new subnet leases")
        unregister = stophooks.on_stop(stop, lambda: batches.put(None))
        try:
            self._watch = LinkWatch(lambda: tuple(self.devices), lambda: batches.put(_CHECK_DEVICES))
        except errors.BackendError as e:
            log.warning("wireguard: %s; looking up the devices every %.0f s instead", e, DEVICE_CHECK_INTERVAL)
        try:
            while not stop.is_set():
                try:
                    batch = batches.get(timeout=self._wait())
                except queue.Empty:
                    batch = None
                else:
                    if batch is None:
                        return
                    if batch is _CHECK_DEVICES:
                        self._next_check = 0.0
                        batch = None
                try:
                    self.step(batch)
                except Exception:
                    log.exception("wireguard: unexpected error applying peers; retrying")
                    self._fail()
        finally:
            unregister()
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    def _wait(self) -> float | None:
        """Seconds until ``step`` has something to do without a batch (None: nothing until one comes)."""
        if not self._synced:
            return None
        due = self._retry_at if self._dirty else min(self._next_resync, self._next_check)
        return max(MIN_WAIT, due - time.monotonic())

    def on_lease_renewed(self, lease: Lease) -> None:
        """A re-acquired lease with another subnet moves the devices' addresses."""
        old = self._lease
        self._lease = lease
        if lease.ident != old.ident:
            with self._lock:
                for spec in self.specs.values():
                    try:
                        self._configure_addresses(spec)
                    except errors.BackendError as e:
                        log.warning("wireguard: moving %s to lease %s failed: %s", spec.name, lease.describe(), e)

    def close(self) -> None:
        """Delete our devices (wireguard-go exits with its device), as flannel does on shutdown."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name, dev in self.devices.items():
                try:
                    dev.close()
                    log.info("wireguard: removed device %s", name)
                except errors.BackendError as e:
                    log.warning("wireguard: removing device %s failed: %s", name, e)
            self.nl.close()

    def peer_report(self) -> list[PeerReport]:
        """Every peer on our devices with its last-handshake age, read from the devices now
        (UAPI ``get=1`` for wireguard-go, ``wg show dump`` for the kernel).

        :raises errors.BackendError: a device cannot be read.
        """
        now = time.time()
        out = []
        with self._lock:
            devs = list(self.devices.items())
        for name, dev in devs:
            for p in dev.status().peers:
                out.append(PeerReport(
                    device=name, public_key=p.public_key, endpoint=str(p.endpoint) if p.endpoint else None,
                    allowed_ips=tuple(sorted(str(n) for n in p.allowed_ips)),
                    last_handshake_age=p.handshake_age(now), rx_bytes=p.rx_bytes, tx_bytes=p.tx_bytes))
        return out

    # ---- the loop body (public for tests) ---------------------------------------------------

    def step(self, batch: Batch | None) -> None:
        """Apply one batch (or only the periodic checks when ``batch`` is None)."""
        full = False
        touched: set[tuple[str, str]] = set()
        if batch is not None:
            self._log_events(batch)
            touched = self.table.update(batch.events)
            metrics.lease_events_applied(batch.events)  # metrics
            self._log_skips()
            if batch.synced:
                if not self._synced:
                    log.info("wireguard: first snapshot complete (%d leases); syncing peers", len(self.table.leases))
                self._synced = True
                full = True
        if not self._synced:
            return
        now = time.monotonic()
        if self._dirty and batch is None and now < self._retry_at:
            return   # backing off after a failure (a new batch is tried at once)
        try:
            if now >= self._next_check:
                self._next_check = now + (DEVICE_CHECK_INTERVAL if self._watch is None else self.resync_interval)
                if self.check_devices():
                    full = True
        except errors.BackendError as e:
            log.warning("wireguard: device check failed: %s", e)
            self._fail()
            return
        if now >= self._next_resync:
            full = True
        if self._dirty:
            full = True
        try:
            if full:
                with metrics.timed_apply(full=True):  # metrics
                    self.full_sync()
            elif touched:
                with metrics.timed_apply(full=False):  # metrics
                    self.incremental(touched)
        except errors.BackendError as e:
            log.warning("wireguard: applying peers failed: %s", e)
            self._fail()
            return
        self._dirty = False
        self._backoff = 1.0

    def incremental(self, touched: set[tuple[str, str]]) -> None:
        """One transaction per device with only the touched peers (no device read)."""
        by_dev: dict[str, set[str]] = {}
        for dev_name, key in touched:
            by_dev.setdefault(dev_name, set()).add(key)
        with self._lock:
            for name, keys_ in sorted(by_dev.items()):
                dev = self.devices.get(name)
                if dev is None:
                    continue
                applied = self.applied.setdefault(name, {})
                req = wgnet.plan_keys(self.table, name, keys_, applied)
                if req.empty:
                    continue
                self._apply(dev, req)
                for key in req.remove:
                    applied.pop(key, None)
                for p in req.upsert:
                    applied[p.public_key] = p

    def full_sync(self) -> None:
        """Read every device and make it match the table; re-assert addresses and routes."""
        desired = self.table.all_desired()
        with self._lock:
            for name, dev in sorted(self.devices.items()):
                spec = self.specs[name]
                self._configure_addresses(spec)
                status = dev.status()
                want = desired.get(name, {})
                req = wgnet.plan(want, status.peers)
                if status.listen_port != spec.listen_port or status.public_key != self.public_key:
                    log.warning("wireguard: %s has listen port %s / public key %s; restoring %d / %s", name,
                                status.listen_port, status.public_key, spec.listen_port, self.public_key)
                    req = SetRequest(private_key=self._private_key, listen_port=spec.listen_port,
                                     remove=req.remove, upsert=req.upsert)
                if not req.empty:
                    log.info("wireguard: %s: full sync: removing %d peers, adding/updating %d (%d correct)",
                             name, len(req.remove), len(req.upsert), len(want) - len(req.upsert))
                    self._apply(dev, req)
                self.applied[name] = dict(want)
        self._next_resync = time.monotonic() + self.resync_interval

    def check_devices(self) -> bool:
        """Re-create a device someone deleted (or whose wireguard-go died). True if one was."""
        recreated = False
        with self._lock:
            for name, dev in list(self.devices.items()):
                if self._closed or dev.alive():
                    continue
                log.warning("wireguard: device %s is gone%s; re-creating it", name,
                            " (wireguard-go exited)" if dev.implementation == device.USERSPACE else "")
                try:
                    dev.close()
                except errors.BackendError:
                    pass
                spec = self.specs[name]
                new = device.create(name, self.nl, mtu=self.mtu, impl=self.impl, uapi_dir=self.uapi_dir)
                self.devices[name] = new
                new.set(SetRequest(private_key=self._private_key, listen_port=spec.listen_port, replace_peers=True))
                self._configure_addresses(spec)
                self.applied[name] = {}
                log.info("wireguard: %s re-created (%s); re-programming %d peers", name, new.implementation,
                         len(self.table.all_desired().get(name, {})))
                recreated = True
        return recreated

    # ---- helpers ----------------------------------------------------------------------------

    def _apply(self, dev: device.WGDevice, req: SetRequest) -> None:
        for key in req.remove:
            log.info("wireguard: %s: removing peer %s", dev.name, key)
        for p in req.upsert:
            log.info("wireguard: %s: %s", dev.name, p.describe())
        dev.set(req)
        self.transactions += 1

    def _configure_addresses(self, spec: DeviceSpec) -> None:
        idx = self.nl.link_index(spec.name)
        if idx is None:
            raise errors.BackendError(f"wireguard device {spec.name} does not exist")
        configure_device(self.nl, idx, spec, self._lease, self.config)

    def _fail(self) -> None:
        metrics.apply_failed()  # metrics
        self._dirty = True
        self._retry_at = time.monotonic() + self._backoff
        log.info("wireguard: will retry in %.0f s", self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _log_events(self, batch: Batch) -> None:
        for ev in batch.events:
            if ev.type is EventType.ADDED:
                log.info("wireguard: subnet added: %s", ev.lease.describe())
            else:
                log.info("wireguard: subnet removed: %s", ev.lease.describe())

    def _log_skips(self) -> None:
        for ident in list(self._logged_skips):
            if ident not in self.table.skipped:
                del self._logged_skips[ident]
        for ident, reason in self.table.skipped.items():
            if self._logged_skips.get(ident) != reason:
                self._logged_skips[ident] = reason
                log.warning("wireguard: skipping lease: %s", reason)
        shared = self.table.shared_keys()
        now_shared: dict[tuple[str, str], tuple[object, ...]] = {
            pk: tuple(le.ident for le in leases) for pk, leases in shared.items()}
        for pk, leases in shared.items():
            if self._logged_shared.get(pk) != now_shared[pk]:
                log.warning("wireguard: %s: %d leases share public key %s (%s); one peer with all their subnets",
                            pk[0], len(leases), pk[1], ", ".join(le.describe() for le in leases))
        self._logged_shared = now_shared


def configure_device(nl: Netlink, index: int, spec: DeviceSpec, lease: Lease, config: NetworkConfig) -> None:
    """Address ``<subnet>/32`` (``/128``) per family the device carries, link up, and the route
    ``Network dev <dev> scope link`` (replace) per family (reference §9.4)."""
    for version in spec.versions:
        subnet = lease.subnet if version == 4 else lease.ipv6_subnet
        net = config.network if version == 4 else config.ipv6_network
        if subnet is None or net is None:
            raise errors.BackendError(f"the wireguard backend needs an IPv{version} subnet in our lease "
                                      f"({lease.describe()}) and an IPv{version} network in the config")
        nl.ensure_address(index, subnet.network_address, net)
    nl.set_up(index)
    for version in spec.versions:
        net = config.network if version == 4 else config.ipv6_network
        assert net is not None
        nl.replace_link_route(net, index)


class WireGuardBackend(Backend):
    """Entry point ``wireguard``: encrypted pod traffic over WireGuard (kernel or wireguard-go)."""

    type_name = TYPE

    def __init__(self, ext_iface: ExternalInterface, options: Any = None, *, key_file: str | None = None,
                 impl: str | None = None, uapi_dir: str | None = None) -> None:
        """``key_file`` / ``impl`` / ``uapi_dir`` default to ``$WIREGUARD_KEY_FILE`` (else
        /run/flannel/wgkey), ``$FLANNEL_WIREGUARD_IMPL`` (else auto) and
        ``$FLANNEL_WIREGUARD_UAPI_DIR`` (else /var/run/wireguard); tests pass them per instance."""
        super().__init__(ext_iface, options)
        self.key_file = key_file or keys.key_file_path()
        self.impl = (impl or os.environ.get(device.IMPL_ENV, "")).strip().lower() or device.AUTO
        self.uapi_dir = uapi_dir or os.environ.get(device.UAPI_DIR_ENV) or device.DEFAULT_UAPI_DIR

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        opts = wgnet.parse_options(config.backend or {})
        ext = self.ext_iface
        fams = families(config, ext, TYPE)
        mtu = wgnet.device_mtu(opts, ext.mtu)
        impl, uapi_dir, key_file = self.impl, self.uapi_dir, self.key_file
        private_key = keys.load_or_create(key_file)
        public_key = keys.public_key(private_key)
        specs = device_specs(opts.mode, fams, opts)
        nl = Netlink()
        devices: dict[str, device.WGDevice] = {}
        try:
            for spec in specs.values():
                dev = device.create(spec.name, nl, mtu=mtu, impl=impl, uapi_dir=uapi_dir)
                devices[spec.name] = dev
                dev.set(SetRequest(private_key=private_key, listen_port=spec.listen_port, replace_peers=True))
                log.info("wireguard: %s is %s (listen port %d, mtu %d, mode %s, public key %s, key file %s)",
                         spec.name, "kernel WireGuard" if dev.implementation == device.KERNEL else "wireguard-go",
                         spec.listen_port, mtu, opts.mode.value, public_key, key_file)
            lease = leases.acquire_lease(config, lease_attrs(ext, fams, opts, public_key))
            for spec in specs.values():
                idx = nl.link_index(spec.name)
                if idx is None:
                    raise errors.BackendError(f"wireguard device {spec.name} vanished")
                configure_device(nl, idx, spec, lease, config)
        except BaseException:
            for dev in devices.values():
                try:
                    dev.close()
                except errors.BackendError as e:
                    log.warning("wireguard: cleaning up %s: %s", dev.name, e)
            nl.close()
            raise
        ctx = make_context(opts, fams, ext)
        if opts.psk:
            log.info("wireguard: using a preshared key (PSK) for every peer")
        return WireGuardNetwork(lease=lease, mtu=mtu, nl=nl, devices=devices, specs=specs, ctx=ctx, config=config,
                                private_key=private_key, impl=impl, uapi_dir=uapi_dir)


def device_specs(mode: Mode, fams: dict[int, object], opts: wgnet.WGOptions) -> dict[str, DeviceSpec]:
    """``separate``: ``flannel-wg`` (IPv4, ListenPort) and ``flannel-wg-v6`` (IPv6, ListenPortV6);
    other modes: one ``flannel-wg`` on ListenPort carrying every enabled family."""
    if mode is Mode.SEPARATE:
        out = {}
        if 4 in fams:
            out[DEV] = DeviceSpec(DEV, opts.listen_port, 4, (4,))
        if 6 in fams:
            out[DEV_V6] = DeviceSpec(DEV_V6, opts.listen_port_v6, 6, (6,))
        return out
    versions = tuple(v for v in (4, 6) if v in fams)
    return {DEV: DeviceSpec(DEV, opts.listen_port, versions[0], versions)}


def lease_attrs(ext: ExternalInterface, fams: dict[int, object], opts: wgnet.WGOptions, public_key: str) -> LeaseAttrs:
    """``BackendType "wireguard"``, the public addresses, and ``{"PublicKey":…,"Port":…}`` per
    enabled family. In single-device modes the v6 ``Port`` is ``ListenPort`` — the port the one
    device listens on (flannel publishes ``ListenPortV6`` there, which nothing listens on)."""
    port6 = opts.listen_port_v6 if opts.mode is Mode.SEPARATE else opts.listen_port
    return LeaseAttrs(
        public_ip=ext.ext_addr if ext.ext_addr is not None else UNSPECIFIED_V4,
        public_ipv6=ext.ext_v6_addr,
        backend_type=TYPE,
        backend_data=wgnet.encode_backend_data(public_key, opts.listen_port) if 4 in fams else None,
        backend_v6_data=wgnet.encode_backend_data(public_key, port6) if 6 in fams else None)


def make_context(opts: wgnet.WGOptions, fams: dict[int, object], ext: ExternalInterface) -> Context:
    separate = opts.mode is Mode.SEPARATE
    return Context(mode=opts.mode, dev4=DEV if 4 in fams else None,
                   dev6=(DEV_V6 if separate else DEV) if 6 in fams else None,
                   port4=opts.listen_port, port6=opts.listen_port_v6 if separate else opts.listen_port,
                   psk=opts.psk, keepalive=opts.keepalive, ext_addr=ext.ext_addr, ext_v6_addr=ext.ext_v6_addr)


__all__ = ["PeerReport", "WireGuardBackend", "WireGuardNetwork"]
