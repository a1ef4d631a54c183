"""``udp`` backend registration (reference §8.1): options, lease attrs, TUN, sockets, workers."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Mapping

from flannel import errors
from flannel.backends.base import Backend, Network
from flannel.backends.udp import accel
from flannel.backends.udp.network import UDPNetwork
from flannel.backends.udp.proxy import Proxy, open_socket
from flannel.backends.udp.tun import TunDevice
from flannel.config import NetworkConfig
from flannel.lease import LeaseAttrs, LeaseSource

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
