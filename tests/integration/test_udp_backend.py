"""udp backend end to end on two hosts (network namespaces on a bridge underlay), each running the
real ``UDPBackend.register_network`` + ``Network.run`` in a subprocess (the harness) with a fixed
lease source; peers are fed as lease Batches. Both data paths (C accelerator, pure Python)."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from flannel.backends.udp import accel
from flannel.lab.netns import cleanup_prefix, in_netns, run_prefix
from flannel.lab.topology import Host, Underlay, ping
from flannel.lab.udp_harness import HarnessProcess
from tests.support import wait_for

pytestmark = pytest.mark.root

NETWORK = "10.244.0.0/16"
S1, S2 = "10.244.1.0/24", "10.244.2.0/24"
PORT = 8285





@pytest.fixture(scope="module")
def underlay() -> Iterator[tuple[Underlay, Host, Host]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    prefix = run_prefix()
    u = Underlay(prefix)
    try:
        yield u, u.add_host("h1"), u.add_host("h2")
    finally:
        u.close()
        cleanup_prefix(prefix)


class Pair:
    def __init__(self, u: Underlay, h1: Host, h2: Host, mode: str, **kw: object) -> None:
        self.u, self.h1, self.h2, self.mode = u, h1, h2, mode
        acc, off = MODES[mode]
        self.n1 = HarnessProcess(h1.ns, S1, NETWORK, accel=acc, offload=off, **kw)  # type: ignore[arg-type]
        try:
            self.n2 = HarnessProcess(h2.ns, S2, NETWORK, accel=acc, offload=off, **kw)  # type: ignore[arg-type]
        except BaseException:
            self.n1.close()
            raise
        self.n1.add(S2, h2.ip)
        self.n2.add(S1, h1.ip)

    def close(self) -> None:
        self.n1.close()
        self.n2.close()


# data paths: C with TUN/UDP offloads (the default when the accelerator builds), plain C, Python
MODES = {"offload": ("c", "on"), "c": ("c", "off"), "python": ("python", "off")}


@pytest.fixture(params=list(MODES))
def pair(request: pytest.FixtureRequest, underlay: tuple[Underlay, Host, Host]) -> Iterator[Pair]:
    if request.param != "python":
        assert accel.load() is not None, f"C fast path not available: {accel.load_error()}"
    p = Pair(*underlay, request.param)
    yield p
    p.close()


def test_device_address_route_and_lease(pair: Pair) -> None:
    r = pair.n1.ready
    assert r["lease_value"] == '{"PublicIP":"198.18.0.1","PublicIPv6":null}'
    assert r["dev"] == "flannel0" and r["mtu"] == 1500 - 28
    assert r["accel"] == (pair.mode != "python")
    assert r["offload"] == (pair.mode == "offload")
    link = pair.h1.ns.ip("-d", "link", "show", "flannel0")
    assert "tun type tun pi off" in link and "mtu 1472" in link
    assert ("vnet_hdr on" in link) == (pair.mode == "offload")
    assert "inet 10.244.1.0/32 " in pair.h1.ns.ip("-4", "addr", "show", "flannel0")
    assert "10.244.0.0/16 dev flannel0" in pair.h1.ns.ip("route")
    ss = pair.h1.ns.exec("ss", "-uanH")
    assert f"198.18.0.1:{PORT}" in ss


TCP_SERVER = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""


def test_ping_and_tcp_transfer(pair: Pair) -> None:
    _ping_and_tcp_transfer(pair)


def test_spread_source_ports_opt_in(underlay: tuple[Underlay, Host, Host]) -> None:
    """Option SpreadPorts: queues > 0 send from their own port; traffic is still accepted
    (the receiver filters on the peer's address only) and arrives intact."""
    assert accel.load() is not None, f"C fast path not available: {accel.load_error()}"
    p = Pair(*underlay, "offload", queues=2, spread_ports=True)
    try:
        udp = [line.split()[3] for line in p.h1.ns.exec("ss", "-uanH").splitlines()]
        assert udp.count(f"198.18.0.1:{PORT}") == 2 and len(udp) == 3   # 2 queues + 1 sending port
        _ping_and_tcp_transfer(p)
    finally:
        p.close()


def _ping_and_tcp_transfer(pair: Pair) -> None:
    assert ping(pair.h1.ns, "10.244.2.0", count=3)
    assert ping(pair.h2.ns, "10.244.1.0", count=3)
    srv = pair.h2.ns.popen(sys.executable, "-c", TCP_SERVER, "10.244.2.0", stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "listening"
        payload = os.urandom(3 << 20)
        with in_netns(pair.h1.ns.name):
            c = socket.create_connection(("10.244.2.0", 5001), timeout=10)
        with c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := c.recv(1024):
                answer += chunk
        assert answer.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
    finally:
        srv.kill()
        srv.wait()
    c1, c2 = pair.n1.counters(), pair.n2.counters()
    # 3 MiB in <= 1472-byte datagrams: at least 2100 on the wire, whatever was batched/offloaded
    assert c1["tx_packets"] >= 2100 and c2["rx_packets"] >= 2100 and c2["tun_tx_packets"] >= 2100
    assert c1["tun_tx_packets"] > 0  # the ACKs came back
    assert c1["drop_unknown_peer"] == c1["drop_spoofed"] == c2["drop_unknown_peer"] == c2["drop_spoofed"] == 0


def _udp_probe_error(h: Host, dst: str) -> int | None:
    """Send one UDP datagram from ``h`` to ``dst``; the errno an ICMP error turned into, if any."""
    with in_netns(h.ns.name):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        # net-unreachable is a "soft" ICMP error: reported on a UDP socket only with IP_RECVERR
        s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
        s.settimeout(1.0)
        s.connect((dst, 9))
        s.send(b"probe")
        try:
            s.recv(100)
        except TimeoutError:
            return None
        except OSError as e:
            return e.errno
    return None


def test_peer_removed_gets_net_unreachable_others_continue(pair: Pair) -> None:
    pair.n1.add("10.244.3.0/24", pair.u.hub_ip)   # a second peer (the hub: datagrams to it die there)
    tx = pair.n1.counters()["tx_packets"]
    assert _udp_probe_error(pair.h1, "10.244.3.5") is None
    c1 = pair.n1.counters()
    assert c1["icmp_unreachable"] == 0 and c1["tx_packets"] == tx + 1
    pinger = pair.h1.ns.popen("ping", "-c", "30", "-i", "0.05", "-W", "1", "10.244.2.0",
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let the steady ping stream run across the table swap
        pair.n1.remove("10.244.3.0/24", pair.u.hub_ip)
        assert _udp_probe_error(pair.h1, "10.244.3.5") == errno.ENETUNREACH
        out, _ = pinger.communicate(timeout=20)
    finally:
        if pinger.poll() is None:
            pinger.kill()
    assert " 0% packet loss" in out, out
    c1 = pair.n1.counters()
    assert c1["icmp_unreachable"] == 1 and c1["drop_no_route"] >= 1


def _ipv4(src: str, dst: str, payload: bytes = b"spoof!spoof!") -> bytes:
    from tests.support import ip_packet
    return ip_packet(src, dst, payload=payload)


def test_garbage_and_spoofed_datagrams_dropped_and_counted(pair: Pair) -> None:
    h1_port = (str(pair.h1.ip), PORT)
    with in_netns(pair.u.hub.name):
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with in_netns(pair.h2.ns.name):
        known = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pinger = pair.h1.ns.popen("ping", "-c", "20", "-i", "0.05", "-W", "1", "10.244.2.0",
                              stdout=subprocess.PIPE, text=True)
    try:
        with stranger, known:
            for i in range(200):
                stranger.sendto(os.urandom(i % 80), h1_port)                        # not a peer
            stranger.sendto(_ipv4("10.244.2.9", "10.244.1.0"), h1_port)              # valid but not a peer
            for _ in range(10):
                known.sendto(_ipv4("10.244.9.9", "10.244.1.0"), h1_port)             # inner source spoofed
            known.sendto(b"\x45\x00\x00", h1_port)                                   # short
            known.sendto(b"\x60" + os.urandom(47), h1_port)                          # not IPv4
            known.sendto(b"", h1_port)                                               # empty
        out, _ = pinger.communicate(timeout=20)
    finally:
        if pinger.poll() is None:
            pinger.kill()
    assert " 0% packet loss" in out, out
    wait_for(lambda: pair.n1.counters()["drop_spoofed"] == 10, what="spoofed drops counted")
    c1 = pair.n1.counters()
    assert c1["drop_unknown_peer"] == 201
    assert c1["drop_short"] == 2 and c1["drop_version"] == 1
    assert pair.n1.p.poll() is None  # the worker survived
    assert ping(pair.h1.ns, "10.244.2.0")


def test_peer_may_forward_sources_outside_network_but_not_other_nodes(pair: Pair) -> None:
    """The anti-spoof rule as the daemon builds it (Network from the config): a peer identified by
    its PublicIP may send as an address outside Network (a node that does not masquerade forwards
    such traffic), never as another part of Network (issue 8 item 4)."""
    h1_port = (str(pair.h1.ip), PORT)
    before = pair.n1.counters()
    with in_netns(pair.h2.ns.name):
        known = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with known:
        for _ in range(5):
            known.sendto(_ipv4("192.0.2.7", "10.244.1.0"), h1_port)    # outside Network: accepted
        for _ in range(3):
            known.sendto(_ipv4("10.244.1.9", "10.244.1.0"), h1_port)   # our own subnet: spoofed
    wait_for(lambda: pair.n1.counters()["drop_spoofed"] - before["drop_spoofed"] == 3, what="spoofed drops")
    wait_for(lambda: pair.n1.counters()["tun_tx_packets"] - before["tun_tx_packets"] >= 5, what="forwarded")
    assert pair.n1.counters()["drop_unknown_peer"] == before["drop_unknown_peer"]


def test_close_removes_tun_and_route(pair: Pair) -> None:
    assert "flannel0" in pair.h1.ns.ip("link")
    pair.n1.close()
    assert pair.n1.p.returncode == 0
    assert "flannel0" not in pair.h1.ns.ip("link")
    assert "10.244.0.0/16" not in pair.h1.ns.ip("route")
    assert "8285" not in pair.h1.ns.exec("ss", "-uanH")
