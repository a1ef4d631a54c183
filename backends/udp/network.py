"""The running udp Network: peer table maintenance and the lifetime of TUN, sockets and workers."""

from __future__ import annotations

import logging
import queue
import socket
import threading
from ipaddress import IPv4Network

from flannel.backends.base import Network
from flannel.backends.udp.packet import Peer, PeerTable
from flannel.backends.udp.proxy import Proxy
from flannel.backends.udp.tun import TunDevice
from flannel.lease import Batch, EventType, Lease

log = logging.getLogger(__name__)


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
                peer = Peer(subnet=subnet, public_ip=ev.lease.attrs.public_ip)
                if self.peers.get(subnet) != peer:
                    self.peers[subnet] = peer
                    changed = True
                    log.info("udp: peer %s via %s", subnet, peer.public_ip)
            elif self.peers.pop(subnet, None) is not None:
                changed = True
                log.info("udp: peer %s removed", subnet)
        if changed:
            self.proxy.set_table(PeerTable.build(self.peers.values(), self.port))

    def run(self, batches: "queue.Queue[Batch | None]", stop: threading.Event) -> None:
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
                    self.apply(batch)
                except Exception:  # noqa: BLE001 - one bad event must not end the loop
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
