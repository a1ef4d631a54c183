"""udp backend packet logic: TTL/checksum rewrite, LPM, ICMP (byte-exact, reference §8.5),
the anti-spoof rule (docs/udp.md), malformed input; the C fast path must agree with the Python
functions. The C fast path is built by the install (scripts/setup): missing, these tests fail."""

from __future__ import annotations

import ctypes
import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel import errors
from flannel.backends.udp import accel
from flannel.backends.udp.network import parse_port
from flannel.backends.udp.packet import (
    RX_OK,
    RX_SHORT,
    RX_SPOOFED,
    RX_UNKNOWN_PEER,
    RX_VERSION,
    Peer,
    PeerTable,
    classify_rx,
    decrement_ttl,
    icmp_net_unreachable,
)
from tests.support import csum, ip_packet


def table(*pairs: tuple[str, str], port: int = 8285, network: str | None = None,
          trusted: tuple[str, ...] = ()) -> PeerTable:
    return PeerTable.build([Peer(IPv4Network(n), IPv4Address(ip)) for n, ip in pairs], port,
                           network=IPv4Network(network) if network else None,
                           trusted=[IPv4Network(t) for t in trusted])


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """The installed C fast path (a failure, not a skip, when the install did not build it)."""
    loaded = accel.load()
    assert loaded is not None, f"C fast path not available: {accel.load_error()}"
    return loaded


# --- TTL / checksum -------------------------------------------------------------------------------

def test_decrement_ttl_golden_bytes() -> None:
    pkt = bytearray(ip_packet("10.244.1.2", "10.244.2.3", ttl=64))
    before = bytes(pkt)
    assert decrement_ttl(pkt)
    assert pkt[8] == 63
    # everything but TTL and checksum untouched; checksum equals a full recompute
    assert pkt[:8] == before[:8] and pkt[9:10] == before[9:10] and pkt[12:] == before[12:]
    zeroed = bytes(pkt[:10]) + b"\0\0" + bytes(pkt[12:20])
    assert int.from_bytes(pkt[10:12], "big") == csum(zeroed)


@pytest.mark.parametrize("seed", range(3))
def test_decrement_ttl_matches_full_recompute_random(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2000):
        src = IPv4Address(rng.getrandbits(32))
        dst = IPv4Address(rng.getrandbits(32))
        pkt = bytearray(ip_packet(str(src), str(dst), ttl=rng.randint(2, 255), proto=rng.randint(0, 255),
                                  ident=rng.getrandbits(16), tos=rng.getrandbits(8),
                                  payload=bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 30)))))
        assert decrement_ttl(pkt)
        zeroed = bytes(pkt[:10]) + b"\0\0" + bytes(pkt[12:20])
        assert int.from_bytes(pkt[10:12], "big") == csum(zeroed)
        assert csum(bytes(pkt[:20])) == 0  # header verifies


def test_decrement_ttl_expiry() -> None:
    for ttl in (0, 1):
        pkt = bytearray(ip_packet("10.0.0.1", "10.0.0.2", ttl=ttl))
        assert not decrement_ttl(pkt)
    pkt = bytearray(ip_packet("10.0.0.1", "10.0.0.2", ttl=2))
    assert decrement_ttl(pkt) and pkt[8] == 1


def test_c_decrement_ttl_agrees_with_python(lib: ctypes.CDLL) -> None:
    rng = random.Random(7)
    for _ in range(3000):
        raw = bytearray(rng.getrandbits(8) for _ in range(20))
        py, c = bytearray(raw), ctypes.create_string_buffer(bytes(raw), 20)
        assert bool(lib.fl_decrement_ttl(c)) == decrement_ttl(py)
        assert c.raw == bytes(py)


# --- longest-prefix match ------------------------------------------------------------------------

def test_lpm_longest_prefix_wins_and_miss() -> None:
    t = table(("10.244.0.0/16", "198.18.0.1"), ("10.244.5.0/24", "198.18.0.5"), ("10.244.5.128/25", "198.18.0.6"))
    ip = lambda s: int(IPv4Address(s))  # noqa: E731
    assert t.lookup(ip("10.244.5.200")) == ("198.18.0.6", 8285)
    assert t.lookup(ip("10.244.5.7")) == ("198.18.0.5", 8285)
    assert t.lookup(ip("10.244.9.9")) == ("198.18.0.1", 8285)
    assert t.lookup(ip("10.245.0.1")) is None
    assert PeerTable.build((), 8285).lookup(ip("10.244.5.7")) is None


def test_lpm_same_subnet_last_one_wins_and_port() -> None:
    t = table(("10.244.5.0/24", "198.18.0.5"), ("10.244.5.0/24", "198.18.0.9"), port=9999)
    assert t.lookup(int(IPv4Address("10.244.5.1"))) == ("198.18.0.9", 9999)
    assert t.size == 1


@pytest.mark.parametrize("network", [None, "10.0.0.0/8", "0.0.0.0/1"])
def test_c_lookup_and_source_filter_agree_with_python(lib: ctypes.CDLL, network: str | None) -> None:
    rng = random.Random(3)
    pairs = []
    for _ in range(300):
        plen = rng.choice((16, 20, 24, 24, 26))
        net = IPv4Network((rng.getrandbits(32) & 0x0FFFFFFF | 0x0A000000, plen), strict=False)  # mostly 10/8
        pairs.append((str(net), str(IPv4Address(0xC6120000 + rng.randint(1, 60)))))
    t = table(*pairs, network=network, trusted=("198.18.1.0/24", "198.19.0.7/32"))
    buf = ctypes.create_string_buffer(t.c_layout, len(t.c_layout))
    addr = ctypes.addressof(buf)
    nets = [IPv4Network(n) for n, _ in pairs]
    outers = [0xC6120000 + rng.randint(0, 64) for _ in range(20)] + [0xC6120100 + rng.randint(0, 255) for _ in range(5)]
    outers += [int(IPv4Address("198.19.0.7")), int(IPv4Address("198.19.0.8"))]
    for _ in range(6000):
        if rng.random() < 0.5:
            n = rng.choice(nets)
            dst = int(n.network_address) + rng.randint(0, n.num_addresses - 1)
        else:
            dst = rng.getrandbits(32)
        hit = t.lookup(dst)
        assert lib.fl_lookup(addr, dst) == (int(IPv4Address(hit[0])) if hit else 0)
        outer = rng.choice(outers)
        assert lib.fl_known_sender(addr, outer) == t.known_sender(outer)
        assert lib.fl_source_allowed(addr, outer, dst) == t.source_allowed(outer, dst), (outer, dst)


# --- source filtering ----------------------------------------------------------------------------

def test_classify_rx_decisions_without_network() -> None:
    """No Network known (the strictest reading): every inner source must be the peer's own."""
    t = table(("10.244.2.0/24", "198.18.0.2"), ("10.244.3.0/24", "198.18.0.3"), ("10.244.4.0/24", "198.18.0.3"))
    peer2, peer3 = int(IPv4Address("198.18.0.2")), int(IPv4Address("198.18.0.3"))
    stranger = int(IPv4Address("198.18.0.77"))
    good = ip_packet("10.244.2.9", "10.244.1.5")
    assert classify_rx(good, peer2, t) == RX_OK
    assert classify_rx(good, stranger, t) == RX_UNKNOWN_PEER
    assert classify_rx(good, peer3, t) == RX_SPOOFED            # peer 3 may not send as 10.244.2.x
    assert classify_rx(ip_packet("10.244.4.1", "10.244.1.5"), peer3, t) == RX_OK  # its second subnet
    assert classify_rx(ip_packet("10.9.9.9", "10.244.1.5"), peer2, t) == RX_SPOOFED
    assert classify_rx(good[:19], peer2, t) == RX_SHORT
    assert classify_rx(b"\x60" + good[1:], peer2, t) == RX_VERSION


A = lambda s: int(IPv4Address(s))  # noqa: E731


def test_anti_spoof_rule_with_network_and_trusted_sources() -> None:
    """docs/udp.md "Anti-spoofing", row by row. Network 10.244.0.0/16, we are 10.244.1.0/24."""
    t = table(("10.244.2.0/24", "198.18.0.2"), ("10.244.3.0/24", "198.19.0.3"),
              network="10.244.0.0/16", trusted=("198.18.0.0/24",))
    peer2, nat3, iface3 = A("198.18.0.2"), A("198.19.0.3"), A("198.18.0.3")   # 3: --public-ip 198.19.0.3
    stranger = A("203.0.113.9")
    to_us = "10.244.1.5"
    ok = lambda outer, src: classify_rx(ip_packet(src, to_us), outer, t)  # noqa: E731
    # identified by its PublicIP: its own subnet, or an address outside Network (not masqueraded)
    assert ok(peer2, "10.244.2.7") == RX_OK
    assert ok(peer2, "192.168.7.7") == RX_OK
    assert ok(nat3, "10.244.3.7") == RX_OK             # 1:1 NAT: datagrams arrive from the PublicIP
    # an identified peer never speaks for another node, for us, or for unleased addresses
    assert ok(peer2, "10.244.3.7") == RX_SPOOFED
    assert ok(peer2, "10.244.1.9") == RX_SPOOFED
    assert ok(peer2, "10.244.200.1") == RX_SPOOFED
    # a trusted sender that is no PublicIP (a node with --public-ip, no SNAT): any remote lease's
    # subnet or outside Network, never ours or unleased ones
    assert ok(iface3, "10.244.3.7") == RX_OK
    assert ok(iface3, "10.244.2.7") == RX_OK
    assert ok(iface3, "8.8.8.8") == RX_OK
    assert ok(iface3, "10.244.1.9") == RX_SPOOFED
    assert ok(iface3, "10.244.99.1") == RX_SPOOFED
    # anyone else is not looked at, whatever it sends
    assert ok(stranger, "10.244.2.7") == RX_UNKNOWN_PEER
    assert classify_rx(b"junk", stranger, t) == RX_UNKNOWN_PEER
    assert classify_rx(b"junk", iface3, t) == RX_SHORT
    # without TrustedSources the --public-ip node's interface address is a stranger
    strict = table(("10.244.3.0/24", "198.19.0.3"), network="10.244.0.0/16")
    assert classify_rx(ip_packet("10.244.3.7", to_us), iface3, strict) == RX_UNKNOWN_PEER


# --- ICMP net unreachable (§8.5) -----------------------------------------------------------------

def expected_icmp(offender: bytes, tun_addr: str) -> bytes:
    ihl = (offender[0] & 0xF) * 4
    quoted = offender[: ihl + 8]
    icmp = bytearray(b"\x03\x00\x00\x00\x00\x00\x00\x00" + quoted)
    icmp[2:4] = csum(bytes(icmp)).to_bytes(2, "big")
    total = 20 + 8 + ihl + 8
    ip = bytearray(b"\x45\x00" + total.to_bytes(2, "big") + b"\x00\x00" + b"\x00\x00" + b"\x08\x01\x00\x00"
                   + IPv4Address(tun_addr).packed + offender[12:16])
    ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
    return bytes(ip) + bytes(icmp)


@pytest.mark.parametrize("ihl", [5, 6, 14])
def test_icmp_net_unreachable_byte_exact(ihl: int) -> None:
    off = ip_packet("10.244.1.7", "10.244.99.3", proto=6, ihl=ihl, payload=bytes(range(40)))
    got = icmp_net_unreachable(off, int(IPv4Address("10.244.1.0")))
    assert got == expected_icmp(off, "10.244.1.0")
    assert len(got) == 20 + 8 + ihl * 4 + 8
    assert got[8] == 8 and got[9] == 1 and got[20] == 3 and got[21] == 0  # TTL 8, ICMP, type 3 code 0
    assert csum(got[:20]) == 0 and csum(got[20:]) == 0


def test_icmp_not_sent_for_icmp_fragments_and_long_ihl() -> None:
    tun = int(IPv4Address("10.244.1.0"))
    assert icmp_net_unreachable(ip_packet("10.244.1.7", "10.9.0.1", proto=1), tun) is None
    assert icmp_net_unreachable(ip_packet("10.244.1.7", "10.9.0.1", frag=0x0010), tun) is None  # offset 16*8
    assert icmp_net_unreachable(ip_packet("10.244.1.7", "10.9.0.1", ihl=15, payload=b"x" * 20), tun) is None
    assert icmp_net_unreachable(ip_packet("10.244.1.7", "10.9.0.1", payload=b"abc"), tun) is None  # < 8 to quote
    # "don't fragment" and "more fragments" with offset 0 still get an answer
    assert icmp_net_unreachable(ip_packet("10.244.1.7", "10.9.0.1", frag=0x4000, payload=b"x" * 8), tun) is not None
    assert icmp_net_unreachable(ip_packet("10.244.1.7", "10.9.0.1", frag=0x2000, payload=b"x" * 8), tun) is not None


def test_c_icmp_agrees_with_python(lib: ctypes.CDLL) -> None:
    rng = random.Random(11)
    tun = int(IPv4Address("10.244.1.0"))
    for i in range(3000):
        if i % 2:
            pkt = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        else:
            pkt = ip_packet("10.244.1.7", str(IPv4Address(rng.getrandbits(32))), proto=rng.choice((1, 6, 17)),
                            ihl=rng.randint(5, 15), frag=rng.choice((0, 0x4000, 0x0001)),
                            payload=bytes(rng.randint(0, 20)))
        out = ctypes.create_string_buffer(128)
        n = lib.fl_icmp_unreach(pkt, len(pkt), tun, out)
        py = icmp_net_unreachable(pkt, tun)
        assert (out.raw[:n] if n else None) == py


# --- malformed input -----------------------------------------------------------------------------

def test_fuzz_random_bytes_never_raise() -> None:
    rng = random.Random(1234)
    t = table(("10.244.2.0/24", "198.18.0.2"), ("0.0.0.0/1", "198.18.0.3"))
    for _ in range(5000):
        n = rng.choice((0, 1, 19, 20, 21, rng.randint(0, 200)))
        data = bytes(rng.getrandbits(8) for _ in range(n))
        outer = rng.choice((int(IPv4Address("198.18.0.2")), int(IPv4Address("198.18.0.3")), rng.getrandbits(32)))
        verdict = classify_rx(data, outer, t)
        assert verdict in (RX_OK, RX_SHORT, RX_VERSION, RX_UNKNOWN_PEER, RX_SPOOFED)
        reply = icmp_net_unreachable(data, 0x0AF40100)
        assert reply is None or (len(reply) >= 56 and csum(reply[:20]) == 0)
        if n >= 20:
            buf = bytearray(data)
            decrement_ttl(buf)
            assert len(buf) == n
            t.lookup(int.from_bytes(data[16:20], "big"))


# --- options ---------------------------------------------------------------------------------------

def test_port_option() -> None:
    assert parse_port({}) == 8285
    assert parse_port({"Type": "udp", "port": 9000}) == 9000
    assert parse_port({"PORT": 1, "Port": 65535}) == 65535
    for bad in ("8285", 0, 70000, True, 1.5, [8285]):
        with pytest.raises(errors.ConfigError, match="Port"):
            parse_port({"Port": bad})


class _NoLease:
    """A LeaseSource that must not be reached: option errors come before any side effect."""

    calls = 0

    def acquire_lease(self, config: object, attrs: object) -> object:
        _NoLease.calls += 1
        raise AssertionError("acquire_lease called")

    def stored_backend_data(self) -> tuple[None, None]:
        return (None, None)


def test_register_network_rejects_bad_options_before_leasing() -> None:
    import json

    from flannel.backends.base import ExternalInterface
    from flannel.backends.udp import UDPBackend
    from flannel.config import parse_network_config

    ext = ExternalInterface(name="eth0", index=2, mtu=1500, iface_addr=IPv4Address("198.18.0.1"),
                            ext_addr=IPv4Address("198.18.0.1"))
    for backend, name in (({"port": "x"}, "Port"), ({"Queues": -1}, "Queues"), ({"DataPath": "go"}, "DataPath"),
                          ({"TrustedSources": ["10.0.0.1/8"]}, "TrustedSources")):
        bad = parse_network_config(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", **backend}}))
        with pytest.raises(errors.ConfigError, match=name):
            UDPBackend(ext).register_network(config=bad, leases=_NoLease())  # type: ignore[arg-type]
    no_addr = ExternalInterface(name="eth0", index=2, mtu=1500, iface_addr=None, ext_addr=None)
    ok = parse_network_config(json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}))
    with pytest.raises(errors.ConfigError, match="eth0"):
        UDPBackend(no_addr).register_network(config=ok, leases=_NoLease())  # type: ignore[arg-type]
    assert _NoLease.calls == 0


def test_typed_options_defaults_and_values() -> None:
    from flannel.backends.udp.network import UDPOptions, parse_options

    assert parse_options({"Type": "udp"}) == UDPOptions()
    assert UDPOptions() == UDPOptions(port=8285, queues=0, data_path="auto", offload=None, spread_ports=False,
                                      trusted_sources=())
    got = parse_options({"Type": "udp", "Port": 9000, "queues": 4, "DataPath": "c", "Offload": False,
                         "SpreadPorts": True, "TrustedSources": ["192.168.0.0/24", "10.1.2.3/32"]})
    assert got == UDPOptions(port=9000, queues=4, data_path="c", offload=False, spread_ports=True,
                             trusted_sources=(IPv4Network("192.168.0.0/24"), IPv4Network("10.1.2.3/32")))
    assert parse_options({"DataPath": "python"}).data_path == "python"


@pytest.mark.parametrize(("backend", "name"), [
    ({"Queues": 17}, "Queues"), ({"Queues": "2"}, "Queues"), ({"Queues": True}, "Queues"),
    ({"DataPath": "C"}, "DataPath"), ({"DataPath": 1}, "DataPath"),
    ({"Offload": "yes"}, "Offload"), ({"SpreadPorts": 1}, "SpreadPorts"),
    ({"TrustedSources": "10.0.0.0/8"}, "TrustedSources"), ({"TrustedSources": ["10.0.0.0/33"]}, "TrustedSources"),
    ({"TrustedSources": ["fd00::/64"]}, "TrustedSources"), ({"TrustedSources": [7]}, "TrustedSources"),
    ({"DataPath": "python", "Offload": True}, "Offload"),
])
def test_typed_options_errors_name_the_option(backend: dict[str, object], name: str) -> None:
    from flannel.backends.udp.network import parse_options

    with pytest.raises(errors.ConfigError, match=name) as e:
        parse_options({"Type": "udp", **backend})
    assert "udp backend option" in str(e.value)


def test_data_path_log_line_contract() -> None:
    """The compose test and operators grep for these exact prefixes."""
    from flannel.backends.udp.backend import data_path_line

    assert data_path_line(True, True, "") == "udp: data path: accelerated (C fast path, offload TSO/GSO/GRO)"
    assert data_path_line(True, False, "") == "udp: data path: accelerated (C fast path)"
    assert data_path_line(False, False, "not built").startswith("udp: data path: pure Python (not built)")
