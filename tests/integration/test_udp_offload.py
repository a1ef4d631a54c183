"""The C offload path (TUN virtio-net header + TSO, UDP GSO/GRO), no root needed: the "TUN" is a
SOCK_SEQPACKET socketpair carrying virtio-net headers. What leaves on the wire must still be
flannel's format: one complete, correctly checksummed IPv4 packet per datagram."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backends.udp import accel
from flannel.backends.udp.packet import Peer, PeerTable
from tests.support import UDP_LOCAL as LOCAL
from tests.support import UDP_PEER, Rig, csum, wait_for

LIB = accel.load()
SOL_UDP, UDP_GRO = 17, 104


@pytest.fixture(autouse=True)
def _c_fast_path() -> None:
    """Built by the install (scripts/setup): a missing fast path fails these tests, it does not skip them."""
    assert LIB is not None, f"C fast path not available: {accel.load_error()}"

MSS = 1420
ACK, PSH, FIN = 0x10, 0x08, 0x01


def tcp_packet(src: str, dst: str, seq: int, payload: bytes, *, flags: int = ACK, ttl: int = 64,
               ident: int = 100, full_csum: bool = True) -> bytes:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 12345, 678)  # NOP NOP timestamps
    th = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 99, (32 // 4) << 4, flags, 502, 0, 0) + opts)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(th) + len(payload), ident, 0x4000, ttl, 6, 0,
                               IPv4Address(src).packed, IPv4Address(dst).packed))
    ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(th) + len(payload))
    if full_csum:
        th[16:18] = csum(bytes(pseudo) + bytes(th) + payload).to_bytes(2, "big")
    else:  # CHECKSUM_PARTIAL as the kernel hands it over: the pseudo-header sum, not inverted
        th[16:18] = (0xFFFF - csum(bytes(pseudo))).to_bytes(2, "big")
    return bytes(ip) + bytes(th) + payload


def check_segment(seg: bytes) -> tuple[int, int, bytes]:
    """Assert a wire segment is a valid TCP/IPv4 packet; return (seq, flags, payload)."""
    assert seg[0] == 0x45 and csum(seg[:20]) == 0
    assert int.from_bytes(seg[2:4], "big") == len(seg)
    thl = (seg[32] >> 4) * 4
    pseudo = seg[12:20] + struct.pack("!BBH", 0, 6, len(seg) - 20)
    assert csum(pseudo + seg[20:]) == 0, "TCP checksum"
    return int.from_bytes(seg[24:28], "big"), seg[33], seg[20 + thl:]


def test_tso_segment_makes_complete_packets() -> None:
    payload = os.urandom(10000)
    sup = tcp_packet("10.244.1.5", "10.244.2.9", 1000, payload, flags=ACK | PSH, full_csum=False)
    out = ctypes.create_string_buffer(20000)
    seg_len = ctypes.c_int()
    n = LIB.fl_tso_segment(sup, len(sup), MSS, out, ctypes.byref(seg_len))
    assert n == 8 and seg_len.value == 52 + MSS
    raw, got, off = out.raw, b"", 0
    for i in range(n):
        size = seg_len.value if i < n - 1 else len(sup) + (n - 1) * 52 - off
        seg = raw[off:off + size]
        off += size
        seq, flags, data = check_segment(seg)
        assert seq == 1000 + i * MSS
        assert seg[8] == 63                                          # TTL - 1
        assert int.from_bytes(seg[4:6], "big") == 100 + i           # IP id per segment
        assert flags == (ACK | PSH if i == n - 1 else ACK)          # PSH only on the last
        assert seg[20:24] == sup[20:24] and seg[40:52] == sup[40:52]  # ports, options kept
        got += data
    assert got == payload


def test_tso_segment_ttl_expiry_and_garbage() -> None:
    out = ctypes.create_string_buffer(70000)
    seg_len = ctypes.c_int()
    assert LIB.fl_tso_segment(tcp_packet("10.0.0.1", "10.0.0.2", 1, b"x" * 3000, ttl=1), 3052, MSS, out,
                              ctypes.byref(seg_len)) == 0
    rnd = os.urandom(200)
    for cut in range(0, 200, 7):
        LIB.fl_tso_segment(rnd[:cut], cut, MSS, out, ctypes.byref(seg_len))  # must not crash


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(use_accel=True, offload=True, start=False)
    yield r
    r.close()


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, start: int = 0, off: int = 0) -> bytes:
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, start, off)


def test_tso_from_tun_leaves_as_plain_flannel_datagrams(rig: Rig) -> None:
    rig.proxy.start()
    payload = os.urandom(30000)
    sup = tcp_packet("10.244.1.5", "10.244.2.9", 7, payload, flags=ACK | PSH, full_csum=False)
    rig.tun_test.send(vnet(1, 1, 52, MSS, 20, 16) + sup)
    got, seqs = b"", []
    while len(got) < len(payload):
        data, src = rig.peer.recvfrom(65536)
        assert src == (LOCAL, rig.port) and len(data) <= 1472
        seq, _, chunk = check_segment(data)
        seqs.append(seq)
        got += chunk
    assert got == payload and seqs == [7 + i * MSS for i in range(len(seqs))]
    # a CHECKSUM_PARTIAL non-GSO packet is completed before it leaves
    small = tcp_packet("10.244.1.5", "10.244.2.9", 5, b"hello", full_csum=False)
    rig.tun_test.send(vnet(1, 0, 0, 0, 20, 16) + small)
    data = rig.peer.recv(65536)
    check_segment(data)
    wait_for(lambda: rig.proxy.counters()["tx_packets"] == len(seqs) + 1)


def test_gro_receive_merges_a_tcp_burst_into_one_gso_write(rig: Rig) -> None:
    payloads = [os.urandom(MSS) for _ in range(5)] + [os.urandom(300)]
    seq = 5000
    for i, p in enumerate(payloads):   # queued before the workers start: one recvmmsg sees them all
        flags = ACK | PSH if i == len(payloads) - 1 else ACK
        rig.peer.sendto(tcp_packet("10.244.2.9", "10.244.1.5", seq, p, flags=flags, ident=i), (LOCAL, rig.port))
        seq += len(p)
    rig.peer.sendto(b"\x45" + os.urandom(60), ("127.0.0.1", rig.port))  # garbage from the peer
    rig.proxy.start()
    msg = rig.tun_test.recv(70000)
    flags, gso_type, hdr_len, gso_size, start, off = struct.unpack("=BBHHHH", msg[:10])
    pkt = msg[10:]
    assert (flags, gso_type, hdr_len, gso_size, start, off) == (1, 1, 52, MSS, 20, 16)
    assert pkt[8] == 63 and csum(pkt[:20]) == 0 and int.from_bytes(pkt[2:4], "big") == len(pkt)
    assert pkt[52:] == b"".join(payloads)
    assert pkt[33] == ACK | PSH
    # the TCP checksum field holds the pseudo-header sum (virtio NEEDS_CSUM), which completes to valid
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(pkt) - 20)
    assert int.from_bytes(pkt[36:38], "big") == 0xFFFF - csum(pseudo)
    wait_for(lambda: rig.proxy.counters()["tun_tx_packets"] == 6)
    c = rig.proxy.counters()
    assert c["tun_tx_packets"] == 6 and c["rx_packets"] == 7 and c["drop_short"] + c["drop_version"] + \
        c["drop_spoofed"] + c["drop_ttl"] == 1


def test_gro_receive_keeps_other_packets_separate_and_in_order(rig: Rig) -> None:
    a = tcp_packet("10.244.2.9", "10.244.1.5", 1, b"a" * 100)          # short segment: ends its run
    b = tcp_packet("10.244.2.9", "10.244.1.5", 101, b"b" * 100)
    udp = bytes.fromhex("4500001c000000004011") + b"\0\0" + IPv4Address("10.244.2.9").packed + \
        IPv4Address("10.244.1.5").packed + b"\x00\x35\x00\x35\x00\x08\x00\x00"
    for p in (a, udp, b):
        rig.peer.sendto(p, (LOCAL, rig.port))
    rig.proxy.start()
    seen = []
    for _ in range(3):
        msg = rig.tun_test.recv(70000)
        assert msg[:10] == vnet()                                        # no offload metadata
        seen.append(msg[10:])
    assert [s[20:] if s[9] == 17 else s[52:] for s in seen] == [a[52:], udp[20:], b[52:]]


def test_offload_fuzz_never_kills_the_workers(rig: Rig) -> None:
    """Random virtio headers / TSO metadata on the TUN side, random TCP-ish datagrams from the peer."""
    import random

    rng = random.Random(5)
    rig.proxy.start()
    for i in range(300):
        pkt = bytearray(tcp_packet("10.244.1.5", "10.244.2.9", i, os.urandom(rng.randint(0, 3000))))
        for _ in range(rng.randint(0, 6)):
            pkt[rng.randrange(len(pkt))] = rng.getrandbits(8)
        hdr = vnet(rng.choice((0, 1, 3)), rng.choice((0, 1, 3, 0x81)), rng.getrandbits(16),
                   rng.choice((0, 1, 7, MSS, 65535, rng.getrandbits(16))), rng.getrandbits(16) % 80,
                   rng.getrandbits(16) % 40)
        rig.tun_test.send((hdr + bytes(pkt))[: rng.choice((len(hdr) + len(pkt), rng.randint(0, 80)))])
        dg = bytearray(tcp_packet("10.244.2.9", "10.244.1.5", i * 100, os.urandom(rng.randint(0, 1400))))
        for _ in range(rng.randint(0, 4)):
            dg[rng.randrange(12, len(dg))] = rng.getrandbits(8)
        rig.peer.sendto(bytes(dg[: rng.randint(0, len(dg))] if i % 3 == 0 else dg), (LOCAL, rig.port))
    wait_for(lambda: rig.proxy.counters()["rx_packets"] >= 300 and rig.proxy.counters()["tun_rx_packets"] >= 300)
    for sock in (rig.tun_test, rig.peer):
        sock.settimeout(0.2)
        try:
            while True:
                sock.recv(70000)
        except TimeoutError:
            pass
        sock.settimeout(3)
    good = tcp_packet("10.244.2.9", "10.244.1.5", 1, b"after")
    rig.peer.sendto(good, (LOCAL, rig.port))
    msg = rig.tun_test.recv(70000)
    assert msg[:10] == vnet() and msg[10 + 52:] == b"after"
    sup = tcp_packet("10.244.1.5", "10.244.2.9", 9, os.urandom(5000), full_csum=False)
    rig.tun_test.send(vnet(1, 1, 52, MSS, 20, 16) + sup)
    assert check_segment(rig.peer.recv(65536))[0] == 9
    assert all(t.is_alive() for t in rig.proxy._threads)


def gro_batches(sock: socket.socket, total: int) -> list[list[bytes]]:
    """Receive ``total`` datagrams on a UDP_GRO socket, grouped by the send they came in (on
    loopback a UDP_SEGMENT send reaches a GRO socket as one unit: one recvmsg per sendmsg)."""
    batches: list[list[bytes]] = []
    while sum(map(len, batches)) < total:
        data, anc, _, _ = sock.recvmsg(70000, socket.CMSG_SPACE(4))
        size = len(data)
        for level, kind, val in anc:
            if (level, kind) == (SOL_UDP, UDP_GRO):
                size = struct.unpack("i", val[:4])[0]
        batches.append([data[i:i + size] for i in range(0, len(data), size)])
    return batches


def test_tso_remainder_leaves_with_the_next_packet(rig: Rig) -> None:
    """A 45-segment TSO packet does not fit one UDP send (44 × 1472 bytes do): its last segment
    waits for the next packet read from the TUN instead of costing a send of its own; whatever
    is left goes out when the TUN has nothing more. Order and format are unchanged."""
    rig.peer.setsockopt(SOL_UDP, UDP_GRO, 1)
    rig.tun_test.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)   # room for two 64 KB packets
    payload = os.urandom(90 * MSS)
    for k in range(2):   # queued before the workers start: the second read finds the next one
        sup = tcp_packet("10.244.1.5", "10.244.2.9", 1 + k * 45 * MSS, payload[k * 45 * MSS:(k + 1) * 45 * MSS],
                         full_csum=False)
        rig.tun_test.send(vnet(1, 1, 52, MSS, 20, 16) + sup)
    rig.proxy.start()
    batches = gro_batches(rig.peer, 90)
    assert [len(b) for b in batches] == [44, 44, 2]
    got = [check_segment(seg) for b in batches for seg in b]
    assert [seq for seq, _, _ in got] == [1 + i * MSS for i in range(90)]
    assert b"".join(chunk for _, _, chunk in got) == payload
    wait_for(lambda: rig.proxy.counters()["tx_packets"] == 90)


def test_small_packets_of_one_size_leave_in_one_send(rig: Rig) -> None:
    """Pure ACKs (or any packets of one size to one peer) read back to back share a UDP_SEGMENT
    send; a packet of another size starts a new one; nothing is reordered."""
    rig.peer.setsockopt(SOL_UDP, UDP_GRO, 1)
    acks = [tcp_packet("10.244.1.5", "10.244.2.9", 1, b"", ident=i) for i in range(5)]
    data = tcp_packet("10.244.1.5", "10.244.2.9", 1, b"x" * 700, ident=9)
    for p in (*acks, data):
        rig.tun_test.send(vnet() + p)
    rig.proxy.start()
    batches = gro_batches(rig.peer, 6)
    assert [len(b) for b in batches] == [5, 1]
    sent = [seg for b in batches for seg in b]
    assert [check_segment(s)[2] for s in sent] == [b""] * 5 + [b"x" * 700]
    assert [int.from_bytes(s[4:6], "big") for s in sent] == [0, 1, 2, 3, 4, 9]
    assert all(s[8] == 63 for s in sent)


def test_gro_merge_spans_receive_batches(rig: Rig) -> None:
    """A flow's segments that arrive in two recvmmsg() batches (more datagrams than one batch
    takes) still become one GSO write: the sender's sends do not line up with TCP packets."""
    payloads = [os.urandom(MSS) for _ in range(12)]   # > RX_BATCH (8) datagrams
    for i, p in enumerate(payloads):
        rig.peer.sendto(tcp_packet("10.244.2.9", "10.244.1.5", 1 + i * MSS, p, ident=i), (LOCAL, rig.port))
    rig.proxy.start()
    msg = rig.tun_test.recv(70000)
    assert struct.unpack("=BBHHHH", msg[:10])[:4] == (1, 1, 52, MSS)
    assert msg[10 + 52:] == b"".join(payloads)
    wait_for(lambda: rig.proxy.counters()["tun_tx_packets"] == 12)


def test_batches_to_two_peers_interleaved_keep_every_packet_intact(rig: Rig) -> None:
    """Switching peer (or size) ends a batch; packets queued for the next one are never
    overwritten by the ones read after them."""
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.3", rig.port))
    other.settimeout(3)
    try:
        rig.proxy.set_table(PeerTable.build([Peer(IPv4Network("10.244.2.0/24"), IPv4Address(UDP_PEER)),
                                             Peer(IPv4Network("10.244.3.0/24"), IPv4Address("127.0.0.3"))],
                                            rig.port))
        plan = [("10.244.2.9", 100), ("10.244.3.9", 600), ("10.244.3.9", 600), ("10.244.2.9", 100),
                ("10.244.3.9", 1400), ("10.244.2.9", 100), ("10.244.2.9", 100), ("10.244.3.9", 1400)]
        sent: dict[str, list[bytes]] = {"10.244.2.9": [], "10.244.3.9": []}
        for i, (dst, size) in enumerate(plan):
            pkt = tcp_packet("10.244.1.5", dst, 1 + i, os.urandom(size), ident=i)
            sent[dst].append(pkt[20:])
            rig.tun_test.send(vnet() + pkt)
        rig.proxy.start()
        for sock, dst in ((rig.peer, "10.244.2.9"), (other, "10.244.3.9")):
            got = [sock.recv(2000) for _ in sent[dst]]
            for g in got:
                check_segment(g)
            assert [g[20:] for g in got] == sent[dst]
    finally:
        other.close()
