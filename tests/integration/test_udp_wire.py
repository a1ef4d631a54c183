"""The udp workers (pure Python and C) on real loopback sockets (no root, no namespaces): the
"TUN" is one end of a SOCK_SEQPACKET socketpair (one packet per read, like a TUN fd) and the peer is a plain UDP socket
on another loopback address. Checks flannel's wire format at the byte level in both directions,
ICMP into the TUN, filtering counters, and a peer-table swap while traffic flows."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backends.udp import accel
from flannel.backends.udp.packet import Peer, PeerTable, icmp_net_unreachable
from tests.support import UDP_LOCAL as LOCAL
from tests.support import UDP_PEER as PEER
from tests.support import UDP_TUN_ADDR as TUN_ADDR
from tests.support import Rig, csum, ip_packet, wait_for

STRANGER = "127.0.0.3"







@pytest.fixture(params=["python", "c"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    if request.param == "c":
        assert accel.load() is not None, f"C fast path not available: {accel.load_error()}"
    r = Rig(use_accel=request.param == "c")
    assert r.proxy.accelerated == (request.param == "c")
    yield r
    r.close()


def expect_ttl_minus_one(orig: bytes, got: bytes) -> None:
    exp = bytearray(orig)
    exp[8] -= 1
    exp[10:12] = b"\0\0"
    exp[10:12] = csum(bytes(exp[:20])).to_bytes(2, "big")
    assert got == bytes(exp)


def test_tun_to_udp_is_flannel_wire_format(rig: Rig) -> None:
    pkt = ip_packet("10.244.1.5", "10.244.2.9", proto=6, payload=os.urandom(1000))
    rig.tun_test.send(pkt)
    data, src = rig.peer.recvfrom(65536)
    assert src == (LOCAL, rig.port)           # from <iface addr>:<Port>, to <peer>:<Port>
    expect_ttl_minus_one(pkt, data)            # one raw IPv4 packet, TTL-1, valid checksum
    wait_for(lambda: rig.proxy.counters()["tx_packets"] == 1)


def test_udp_to_tun_and_filtering(rig: Rig) -> None:
    good = ip_packet("10.244.2.9", "10.244.1.5", payload=b"x" * 100)
    rig.peer.sendto(good, (LOCAL, rig.port))
    expect_ttl_minus_one(good, rig.tun_test.recv(65536))

    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind((STRANGER, 0))
    stranger.sendto(good, (LOCAL, rig.port))                                   # not a peer
    rig.peer.sendto(ip_packet("10.244.7.1", "10.244.1.5"), (LOCAL, rig.port))  # spoofed inner source
    rig.peer.sendto(b"\x45" * 10, (LOCAL, rig.port))                           # short
    rig.peer.sendto(b"\x60" + good[1:], (LOCAL, rig.port))                     # not IPv4
    rig.peer.sendto(ip_packet("10.244.2.9", "10.244.1.5", ttl=1), (LOCAL, rig.port))  # TTL expires
    for _ in range(50):
        stranger.sendto(os.urandom(40), (LOCAL, rig.port))
    stranger.close()
    rig.peer.sendto(good, (LOCAL, rig.port))                                   # still flowing
    expect_ttl_minus_one(good, rig.tun_test.recv(65536))
    wait_for(lambda: rig.proxy.counters()["rx_packets"] == 57 and rig.proxy.counters()["tun_tx_packets"] == 2)
    c = rig.proxy.counters()
    drops = (c["drop_unknown_peer"], c["drop_spoofed"], c["drop_short"], c["drop_version"], c["drop_ttl"])
    assert drops == (51, 1, 1, 1, 1)
    assert c["tun_tx_packets"] == 2


def test_no_route_gets_icmp_and_bad_packets_counted(rig: Rig) -> None:
    off = ip_packet("10.244.1.5", "10.244.9.9", proto=17, payload=b"q" * 30)
    rig.tun_test.send(off)
    assert rig.tun_test.recv(65536) == icmp_net_unreachable(off, int(TUN_ADDR))
    rig.tun_test.send(b"\x45\x00")                                 # short
    rig.tun_test.send(b"\x60" + bytes(39))                         # IPv6
    rig.tun_test.send(ip_packet("10.244.1.5", "10.244.2.9", ttl=1))  # expires
    wait_for(lambda: rig.proxy.counters()["tun_rx_packets"] == 4 and rig.proxy.counters()["drop_ttl"] == 1)
    c = rig.proxy.counters()
    drops = (c["drop_no_route"], c["icmp_unreachable"], c["drop_short"], c["drop_version"], c["drop_ttl"])
    assert drops == (1, 1, 1, 1, 1)
    assert c["tx_packets"] == 0


def test_table_swap_while_traffic_flows(rig: Rig) -> None:
    """Adding/removing an unrelated peer many times never loses a packet to the steady peer."""
    n = 300
    other = Peer(IPv4Network("10.244.3.0/24"), IPv4Address(STRANGER))
    steady = Peer(IPv4Network("10.244.2.0/24"), IPv4Address(PEER))
    got: list[int] = []
    for i in range(n):
        rig.proxy.set_table(PeerTable.build([steady] + ([other] if i % 2 else []), rig.port))
        rig.tun_test.send(ip_packet("10.244.1.5", "10.244.2.9", payload=struct.pack("!I", i)))
        if i % 20 == 19:  # drain in chunks so the peer's socket buffer never overflows
            got += [struct.unpack("!I", rig.peer.recv(65536)[20:24])[0] for _ in range(20)]
    assert sorted(got) == list(range(n))
    # and a removed peer is unreachable right after the swap
    rig.proxy.set_table(PeerTable.build([], rig.port))
    off = ip_packet("10.244.1.5", "10.244.2.9", payload=b"z" * 8)
    rig.tun_test.send(off)
    assert rig.tun_test.recv(65536) == icmp_net_unreachable(off, int(TUN_ADDR))


def test_fuzzed_datagrams_and_tun_packets_never_kill_the_workers(rig: Rig) -> None:
    """Random bytes that pass the peer check (IPv4 nibble, source in the peer's subnet) and random
    'TUN' packets; afterwards real traffic still flows both ways."""
    import random

    rng = random.Random(99)
    for i in range(400):
        body = bytearray(rng.getrandbits(8) for _ in range(rng.randint(0, 120)))
        if len(body) >= 16 and i % 2:
            body[0] = 0x40 | (body[0] & 0x0F)
            body[12:16] = bytes([10, 244, 2, body[15]])
        rig.peer.sendto(bytes(body), (LOCAL, rig.port))
        tun = bytearray(rng.getrandbits(8) for _ in range(rng.randint(1, 120)))
        if len(tun) >= 20 and i % 2:
            tun[0] = 0x40 | (tun[0] & 0x0F)
            tun[16:20] = bytes([10, 244, 2, tun[19]])
        rig.tun_test.send(bytes(tun))
    wait_for(lambda: rig.proxy.counters()["rx_packets"] >= 400 and rig.proxy.counters()["tun_rx_packets"] >= 400)
    rig.tun_test.settimeout(0.2)
    try:
        while True:
            rig.tun_test.recv(65536)  # drain whatever was injected (ICMP, accepted fuzz)
    except TimeoutError:
        pass
    rig.peer.settimeout(0.2)
    try:
        while True:
            rig.peer.recv(65536)
    except TimeoutError:
        pass
    rig.peer.settimeout(3)
    rig.tun_test.settimeout(3)
    good = ip_packet("10.244.2.9", "10.244.1.5", payload=b"after-fuzz")
    rig.peer.sendto(good, (LOCAL, rig.port))
    expect_ttl_minus_one(good, rig.tun_test.recv(65536))
    out = ip_packet("10.244.1.5", "10.244.2.9", payload=b"after-fuzz-out")
    rig.tun_test.send(out)
    expect_ttl_minus_one(out, rig.peer.recv(65536))
    assert all(t.is_alive() for t in rig.proxy._threads)
