"""Multi-host test topology: "hosts" are network namespaces on a shared L2 underlay.

    hub namespace (<prefix>hub): bridge ``br0`` with the hub address (.254); etcd and the kube
    stand-in API server listen here, so agents reach them over the underlay, never via the root
    namespace. The hub has no route out of the machine.
    host namespaces (<prefix>h1, ...): ``eth0`` (veth into br0) with 198.18.0.N/24, default route
    via the hub address (which leads nowhere: traffic to non-lab addresses dies in the hub).

Only addresses in 198.18.0.0/15 are used on the underlay.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from flannel.lab.netns import NetNS, run, veth_pair


def _local_mac(seed: str) -> str:
    """A locally administered unicast MAC derived from ``seed`` (stable for one lab)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))

DEFAULT_UNDERLAY = "198.18.0.0/24"


@dataclass
class Host:
    name: str
    ns: NetNS
    ip: ipaddress.IPv4Address
    ifname: str = "eth0"
    extra: dict[str, object] = field(default_factory=dict)


class Underlay:
    """The hub namespace and its bridge; ``add_host`` plugs a new host namespace into it."""

    def __init__(self, prefix: str, *, subnet: str = DEFAULT_UNDERLAY, mtu: int = 1500) -> None:
        self.prefix = prefix
        self.subnet = ipaddress.IPv4Network(subnet)
        self.mtu = mtu
        self.hub_ip = self.subnet.network_address + 254
        self.hub = NetNS(prefix + "hub")
        self.hub.ip("link", "add", "br0", "type", "bridge")
        # A MAC of its own, set explicitly: a bridge without one takes the lowest MAC of its ports and
        # changes it when a host joins with a lower one. Every host's ARP entry for the hub address
        # then names a MAC the hub's IP stack no longer accepts (a port's: the frames go up as
        # "other host" and are dropped), and a host that keeps hearing from the hub (retransmissions,
        # keepalives) keeps that entry REACHABLE: its packets to etcd vanished for 30 s and more
        # after another host joined (CI: test_agents_survive_an_etcd_outage). A real node's gateway
        # does not change its MAC under it.
        self.hub.ip("link", "set", "br0", "address", _local_mac(prefix))
        self.hub.ip("addr", "add", f"{self.hub_ip}/{self.subnet.prefixlen}", "dev", "br0")
        self.hub.ip("link", "set", "br0", "up")
        self.hosts: dict[str, Host] = {}
        self._next = 1

    def add_host(self, name: str, *, index: int | None = None) -> Host:
        idx = index if index is not None else self._next
        self._next = max(self._next, idx + 1)
        ns = NetNS(self.prefix + name)
        port = f"p{idx}"
        veth_pair(ns, "eth0", self.hub, port)
        self.hub.ip("link", "set", port, "master", "br0")
        ip = self.subnet.network_address + idx
        ns.ip("link", "set", "eth0", "mtu", str(self.mtu))
        self.hub.ip("link", "set", port, "mtu", str(self.mtu))
        ns.ip("addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        ns.ip("route", "add", "default", "via", str(self.hub_ip))
        # forwarding on, as on any node that routes pod traffic
        ns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        host = Host(name=name, ns=ns, ip=ip)
        self.hosts[name] = host
        return host

    def remove_host(self, name: str) -> None:
        host = self.hosts.pop(name)
        host.ns.delete()

    def close(self) -> None:
        for name in list(self.hosts):
            self.remove_host(name)
        self.hub.delete()

    def __enter__(self) -> Underlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(ns: NetNS, dst: str, *, count: int = 1, timeout: int = 2, src: str | None = None) -> bool:
    args = ["ping", "-c", str(count), "-W", str(timeout), "-i", "0.2", "-q"]
    if src:
        args += ["-I", src]
    out = run("ip", "netns", "exec", ns.name, *args, dst, check=False, timeout=count * timeout + 10)
    return " 0% packet loss" in out


# ---------------------------------------------------------------------------------------------
# Pods: a namespace behind the host's ``cni0`` bridge, addressed from the host's flannel subnet.
# This is what the CNI bridge plugin does for a real pod; doing it with iproute2 keeps the lab
# independent of the CNI plugin (kube mode uses the real plugin instead).

BRIDGE = "cni0"


@dataclass
class Pod:
    name: str
    ns: NetNS
    host: Host
    ip: ipaddress.IPv4Address
    ifname: str = "eth0"


def subnet_env_gateway(env: dict[str, str]) -> tuple[ipaddress.IPv4Interface, int]:
    """(bridge address, MTU) from a parsed subnet.env: FLANNEL_SUBNET is the first usable address
    of the host's lease with its prefix length, exactly what the CNI plugin gives the bridge."""
    try:
        gw = ipaddress.IPv4Interface(env["FLANNEL_SUBNET"])
        mtu = int(env["FLANNEL_MTU"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"subnet.env lacks a usable FLANNEL_SUBNET/FLANNEL_MTU ({env!r}): {e}") from e
    return gw, mtu


def ensure_bridge(host: Host, gateway: ipaddress.IPv4Interface, mtu: int) -> None:
    """Create ``cni0`` in the host with the gateway address (idempotent; a stale address from an
    earlier lease is replaced so pods never get a gateway outside the current subnet)."""
    links = host.ns.ip("-o", "link", "show", "dev", BRIDGE, check=False)
    if not links.strip():
        host.ns.ip("link", "add", BRIDGE, "type", "bridge")
    host.ns.ip("link", "set", BRIDGE, "mtu", str(mtu))
    addrs = host.ns.ip("-o", "-4", "addr", "show", "dev", BRIDGE)
    have = [line.split()[3] for line in addrs.splitlines() if len(line.split()) > 3]
    for a in have:
        if a != str(gateway):
            host.ns.ip("addr", "del", a, "dev", BRIDGE)
    if str(gateway) not in have:
        host.ns.ip("addr", "add", str(gateway), "dev", BRIDGE)
    host.ns.ip("link", "set", BRIDGE, "up")


def add_pod(host: Host, ns_name: str, *, index: int, gateway: ipaddress.IPv4Interface, mtu: int,
            name: str | None = None) -> Pod:
    """Pod ``index`` (1, 2, ...) of ``host``: namespace ``ns_name``, ``eth0`` = veth into cni0,
    address gateway + index, default route via the gateway (the bridge address)."""
    ip = gateway.ip + index
    if ip not in gateway.network or ip == gateway.network.broadcast_address:
        raise ValueError(f"pod index {index} does not fit in {gateway.network}")
    ensure_bridge(host, gateway, mtu)
    ns = NetNS(ns_name)
    host_if = f"veth{index}"
    try:
        veth_pair(ns, "eth0", host.ns, host_if)
        host.ns.ip("link", "set", host_if, "master", BRIDGE, "mtu", str(mtu))
        ns.ip("link", "set", "eth0", "mtu", str(mtu))
        ns.ip("addr", "add", f"{ip}/{gateway.network.prefixlen}", "dev", "eth0")
        ns.ip("route", "add", "default", "via", str(gateway.ip))
    except BaseException:
        ns.delete()
        raise
    return Pod(name=name or ns_name, ns=ns, host=host, ip=ip)
