"""The ``udp`` backend (reference §8): ``UDPBackend`` (options, lease attrs, TUN, sockets, workers) and
``UDPNetwork`` (the peer table, and the lifetime of TUN, sockets and workers)."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Mapping
from ipaddress import IPv4Network
from typing import Any

from flannel import errors, metrics
from flannel.backends.base import Backend, Network
from flannel.backends.udp import accel
from flannel.backends.udp.network import peer_of
from flannel.backends.udp.packet import Peer, PeerTable
from flannel.backends.udp.proxy import Proxy, open_socket
from flannel.backends.udp.tun import TunDevice
from flannel.config import NetworkConfig
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
OVERHEAD = 28  # outer IPv4 (20) + UDP (8)


def parse_port(backend: Mapping[str, Any]) -> int:
    """The ``Port`` option (keys case-insensitive as in Go's JSON decoding; last one wins)."""
    port: Any = DEFAULT_PORT
    for key, value in backend.items():
        if key.lower() == "port":
            port = value
    if isinstance(port, bool) or not isinstance(port, (int, float)) or port != int(port) \
            or not 1 <= int(port) <= 65535:
        raise errors.ConfigError(f"udp backend: Port must be an integer 1-65535, got {port!r}")
    return int(port)


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name, "").strip().lower()
    if v in ("0", "no", "false", "off"):
        return False
    if v in ("1", "yes", "true", "on"):
        return True
    return None


def default_queues() -> int:
    env = os.environ.get("FLANNEL_UDP_QUEUES")
    if env and env.isdigit() and int(env) > 0:
        return min(int(env), 16)
    return max(1, min(os.cpu_count() or 1, 8))


class UDPBackend(Backend):
    """TUN + user-space UDP encapsulation, on the wire identical to flannel's udp backend.

    ``queues`` / ``use_accel`` / ``offload`` are tuning knobs (env ``FLANNEL_UDP_QUEUES`` /
    ``FLANNEL_UDP_ACCEL`` / ``FLANNEL_UDP_OFFLOAD``); none of them changes the wire format.
    ``None`` means automatic: the C path and its offloads when the accelerator builds.

    ``spread_ports`` (env ``FLANNEL_UDP_SPREAD_PORTS=1``, off by default): TUN queues other than
    the first send from their own ephemeral source port instead of ``Port``, so the receiver's
    SO_REUSEPORT group spreads flows over its workers (one flow keeps one port, so no reordering).
    Peers (ours and Go flannel's) accept any source port, but the outer source port then differs
    from flannel's, which matters to firewalls that match on it; hence opt-in.
    """

    type_name = "udp"

    def __init__(self, ext_iface: Any, options: Any = None, *, queues: int | None = None,
                 use_accel: bool | None = None, offload: bool | None = None,
                 spread_ports: bool | None = None) -> None:
        super().__init__(ext_iface, options)
        self.queues = queues or default_queues()
        self.use_accel = use_accel
        self.offload = offload if offload is not None else _env_flag("FLANNEL_UDP_OFFLOAD")
        self.spread_ports = spread_ports if spread_ports is not None else bool(_env_flag("FLANNEL_UDP_SPREAD_PORTS"))

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        port = parse_port(config.backend or {})
        if not config.enable_ipv4 or config.network is None:
            raise errors.ConfigError("udp backend: IPv4 only; the config must have EnableIPv4 and Network")
        if config.enable_ipv6:
            log.warning("udp backend: IPv4 only; the IPv6 network is not carried")
        iface_addr = self.ext_iface.iface_addr
        if iface_addr is None or self.ext_iface.ext_addr is None:
            raise errors.ConfigError(f"udp backend: interface {self.ext_iface.name} has no IPv4 address")
        mtu = self.ext_iface.mtu - OVERHEAD
        if mtu < 68:
            raise errors.ConfigError(f"udp backend: MTU of {self.ext_iface.name} ({self.ext_iface.mtu}) is too small")

        lease = leases.acquire_lease(LeaseAttrs(public_ip=self.ext_iface.ext_addr))
        if lease.subnet is None:
            raise errors.BackendError("udp backend: the lease has no IPv4 subnet")
        tun_addr = lease.subnet.network_address

        have_c = self.use_accel is not False and accel.load() is not None
        offload = have_c and self.offload is not False
        if self.offload and not have_c:
            raise errors.BackendError(f"udp: offload needs the C accelerator: {accel.load_error() or 'disabled'}")
        tun = TunDevice.open("flannel%d", queues=self.queues, offload=offload)
        opened: list[socket.socket] = []  # everything to close on failure / at close()
        try:
            tun.configure(tun_addr, mtu, config.network)
            rx = [open_socket(iface_addr, port, reuseport=len(tun.fds) > 1, gro=offload) for _ in tun.fds]
            opened += rx
            tx = None
            if self.spread_ports and len(rx) > 1:
                tx = rx[:1] + [open_socket(iface_addr, 0, reuseport=False) for _ in rx[1:]]
                opened += tx[1:]
            proxy = Proxy(tun.fds, rx, tun_addr, port, mtu, use_accel=self.use_accel, offload=offload,
                          tx_socks=tx)
        except BaseException:
            for sock in opened:
                sock.close()
            tun.close()
            raise
        log.info("udp: %s %s/32 mtu %d, route %s, listening on %s:%d", tun.name, tun_addr, mtu,
                 config.network, iface_addr, port)
        return UDPNetwork(lease, mtu, port, tun, opened, proxy)


class UDPNetwork(Network):
    """Keeps ``subnet → peer`` from lease events and publishes it to the workers as a whole."""

    def __init__(self, lease: Lease, mtu: int, port: int, tun: TunDevice,
                 socks: list[socket.socket], proxy: Proxy) -> None:
        super().__init__(lease, mtu)
        self.port = port
        self.tun = tun
        self.socks = socks
        self.proxy = proxy
        self.peers: dict[IPv4Network, Peer] = {}
        self._started = False
        self._closed = False
        self._lock = threading.Lock()  # control plane only (run vs close), never the packet path

    @property
    def device_name(self) -> str:
        return self.tun.name

    @property
    def accelerated(self) -> bool:
        return self.proxy.accelerated

    def counters(self) -> dict[str, int]:
        """Data-path counters summed over all workers (see ``packet.COUNTER_NAMES``)."""
        return self.proxy.counters()

    def start(self) -> None:
        """Start the workers (``run`` does it too); idempotent."""
        with self._lock:
            if not self._started and not self._closed:
                self.proxy.start()
                self._started = True

    def apply(self, batch: Batch) -> None:
        """Fold one batch into the peer table and swap the new table in."""
        changed = False
        for ev in batch.events:
            subnet = ev.lease.subnet
            if subnet is None or subnet == self._lease.subnet:
                continue
            if ev.type is EventType.ADDED:
                peer = peer_of(ev.lease)
                if peer is not None and self.peers.get(subnet) != peer:
                    self.peers[subnet] = peer
                    changed = True
                    log.info("udp: peer %s via %s", subnet, peer.public_ip)
            elif self.peers.pop(subnet, None) is not None:
                changed = True
                log.info("udp: peer %s removed", subnet)
        if changed:
            self.proxy.set_table(PeerTable.build(self.peers.values(), self.port))
        metrics.lease_events_applied(batch.events)  # metrics

    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.is_set():
                try:
                    batch = batches.get(timeout=0.2)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                try:
                    with metrics.timed_apply(full=False):  # metrics
                        self.apply(batch)
                except Exception:
                    metrics.apply_failed()  # metrics
                    log.exception("udp: could not apply a lease batch; continuing")
        finally:
            self.proxy.stop()

    def close(self) -> None:
        """Stop the workers, close sockets and the TUN (the kernel drops the device and route)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.proxy.stop()
        log.info("udp: counters at shutdown: %s", self.counters())
        for s in self.socks:
            s.close()
        self.tun.close()
