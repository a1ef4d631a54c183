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

from flannel import errors, metrics
from flannel.backends.base import Backend, Network, each_batch
from flannel.backends.udp import accel
from flannel.backends.udp.network import parse_options, peer_of
from flannel.backends.udp.packet import Peer, TableBuilder
from flannel.backends.udp.proxy import Proxy, open_socket
from flannel.backends.udp.tun import TunDevice
from flannel.config import NetworkConfig
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)

OVERHEAD = 28  # outer IPv4 (20) + UDP (8)


def auto_queues() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def data_path_line(accelerated: bool, offload: bool, reason: str) -> str:
    """The one start-up line saying which data path runs (its format is a contract: the compose
    test and operators grep for ``udp: data path:``)."""
    if accelerated:
        return "udp: data path: accelerated (C fast path" + (", offload TSO/GSO/GRO)" if offload else ")")
    return f"udp: data path: pure Python ({reason})"


class UDPBackend(Backend):
    """TUN + user-space UDP encapsulation, on the wire identical to flannel's udp backend.

    Tuning comes from the typed options of the ``Backend`` config (``UDPOptions``, docs/udp.md).
    ``SpreadPorts`` (off by default): TUN queues other than the first send from their own
    ephemeral source port instead of ``Port``, so the receiver's SO_REUSEPORT group spreads flows
    over its workers (one flow keeps one port, so no reordering). Peers (ours and Go flannel's)
    accept any source port, but the outer source port then differs from flannel's, which matters
    to firewalls that match on it; hence opt-in.
    """

    type_name = "udp"

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        opts = parse_options(config.backend or {})
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
        have_c = False
        reason = 'DataPath is "python"'
        if opts.data_path != "python":
            have_c = accel.load() is not None
            reason = accel.load_error() or ""
            if not have_c and (opts.data_path == "c" or opts.offload):
                raise errors.BackendError(f"udp: the C fast path is required by the config (DataPath/Offload) "
                                          f"but not available: {reason}")
        offload = have_c and opts.offload is not False

        lease = leases.acquire_lease(config, LeaseAttrs(public_ip=self.ext_iface.ext_addr))
        if lease.subnet is None:
            raise errors.BackendError("udp backend: the lease has no IPv4 subnet")
        tun_addr = lease.subnet.network_address

        tun = TunDevice.open("flannel%d", queues=opts.queues or auto_queues(), offload=offload)
        opened: list[socket.socket] = []  # everything to close on failure / at close()
        try:
            tun.configure(tun_addr, mtu, config.network)
            rx = [open_socket(iface_addr, opts.port, reuseport=len(tun.fds) > 1, gro=offload) for _ in tun.fds]
            opened += rx
            tx = None
            if opts.spread_ports and len(rx) > 1:
                tx = rx[:1] + [open_socket(iface_addr, 0, reuseport=False) for _ in rx[1:]]
                opened += tx[1:]
            proxy = Proxy(tun.fds, rx, tun_addr, opts.port, mtu, use_accel=have_c, offload=offload, tx_socks=tx)
        except BaseException:
            for sock in opened:
                sock.close()
            tun.close()
            raise
        log.info("udp: %s %s/32 mtu %d, route %s, listening on %s:%d, %d queue(s); trusted sources: %s", tun.name,
                 tun_addr, mtu, config.network, iface_addr, opts.port, len(tun.fds),
                 ", ".join(map(str, opts.trusted_sources)) or "none (peers are known by their PublicIP only)")
        line = data_path_line(have_c, offload, reason)
        (log.info if have_c or opts.data_path == "python" else log.warning)("%s", line)
        table = TableBuilder(opts.port, network=config.network, trusted=opts.trusted_sources)
        return UDPNetwork(lease, mtu, opts.port, tun, opened, proxy, table)


class UDPNetwork(Network):
    """Keeps ``subnet → peer`` from lease events and publishes it to the workers as a whole."""

    def __init__(self, lease: Lease, mtu: int, port: int, tun: TunDevice,
                 socks: list[socket.socket], proxy: Proxy, table: TableBuilder | None = None) -> None:
        super().__init__(lease, mtu)
        self.port = port
        self.tun = tun
        self.socks = socks
        self.proxy = proxy
        self.table = table if table is not None else TableBuilder(port)
        proxy.set_table(self.table.publish())
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
        """Start the workers (``run`` does it too); idempotent, and a no-op after ``close``."""
        with self._lock:
            if not self._closed:
                self.proxy.start()

    @property
    def peers(self) -> Mapping[IPv4Network, Peer]:
        """The current peers (read-only view; control thread)."""
        return self.table.peers

    def apply(self, batch: Batch) -> None:
        """Fold one batch into the peer table and swap the new table in.

        Incremental: only the entries of the leases in the batch change (``TableBuilder``), so
        the cost does not grow with the number of peers beyond C-speed copies (issue 9).
        """
        changed = False
        for ev in batch.events:
            subnet = ev.lease.subnet
            if subnet is None or subnet == self._lease.subnet:
                continue
            if ev.type is EventType.ADDED:
                peer = peer_of(ev.lease)
                if peer is not None and self.table.set(peer):
                    changed = True
                    log.info("udp: peer %s via %s", subnet, peer.public_ip)
            elif self.table.remove(subnet):
                changed = True
                log.info("udp: peer %s removed", subnet)
        if changed:
            self.proxy.set_table(self.table.publish())
        metrics.lease_events_applied(batch.events)  # metrics

    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        """Apply lease batches; the packet workers run independently of this loop.

        Re-enterable: the daemon restarts a failed network thread by calling ``run`` again, so
        ``run`` neither stops the workers when it returns (``close`` does) nor assumes they are
        still running when it starts (``start`` restarts them if they were stopped). Forwarding to
        known peers therefore goes on while the control loop is being restarted.
        """
        self.start()
        for batch in each_batch(batches, stop):
            try:
                with metrics.timed_apply(full=False):  # metrics
                    self.apply(batch)
            except Exception:
                metrics.apply_failed()  # metrics
                log.exception("udp: could not apply a lease batch; continuing")

    def close(self) -> None:
        """Stop the workers, close sockets and the TUN (the kernel drops the device and route)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.proxy.close()
        log.info("udp: counters at shutdown: %s", self.counters())
        for s in self.socks:
            s.close()
        self.tun.close()
