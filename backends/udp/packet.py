"""Pure packet logic of the udp backend: IPv4 header checks, TTL rewrite, ICMP, the peer table.

No I/O here, so every forwarding decision is unit-testable byte for byte. The wire format is
flannel's (reference §8.2): one raw IPv4 packet per UDP datagram, TTL decremented by one with the
header checksum patched as flannel's C proxy does (RFC 1624). The C accelerator (``_accel``)
implements the same functions; tests compare the two.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

IPV4_HEADER_LEN = 20
ICMP_TTL = 8
PROTO_ICMP = 1

# Counter names, shared by the Python and C workers (the C struct has the same order).
COUNTER_NAMES: tuple[str, ...] = (
    "tun_rx_packets",       # packets read from the TUN
    "tx_packets",           # datagrams sent to peers
    "tx_bytes",
    "rx_packets",           # datagrams received on the UDP port
    "tun_tx_packets",       # packets written into the TUN (from peers)
    "tun_tx_bytes",
    "drop_short",           # shorter than an IPv4 header (either direction)
    "drop_version",         # not IPv4 (either direction)
    "drop_ttl",             # TTL reached zero (either direction)
    "drop_no_route",        # no peer subnet matched the destination
    "icmp_unreachable",     # ICMP net-unreachable written into the TUN
    "drop_unknown_peer",    # datagram from an address that is not a known peer's PublicIP
    "drop_spoofed",         # inner source not in the sending peer's subnet(s)
    "send_errors",          # sendto/sendmmsg failed
    "tun_write_errors",     # write into the TUN failed
    "drop_malformed",       # offload path: TSO metadata that cannot be segmented, unknown GSO type
)

# Verdicts of the receive-side filter.
RX_OK = 0
RX_SHORT = 1
RX_VERSION = 2
RX_UNKNOWN_PEER = 3
RX_SPOOFED = 4
RX_TTL = 5


def ipv4_checksum(header: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) over ``header`` (even length)."""
    n = len(header)
    if n % 2:
        header = bytes(header) + b"\0"
        n += 1
    total: int = sum(struct.unpack(f"!{n // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def decrement_ttl(pkt: bytearray) -> bool:
    """Decrement the TTL in place and patch the checksum; False when the TTL reaches zero.

    Same arithmetic as flannel's proxy.c ``decrement_ttl`` (RFC 1624: the 16-bit word holding the
    TTL drops by 0x0100, so the one's-complement checksum rises by 0x0100 with end-around carry).
    A packet whose TTL is already 0 is treated as expiring (flannel would wrap to 255).
    """
    ttl = pkt[8]
    if ttl <= 1:
        return False
    pkt[8] = ttl - 1
    check = (pkt[10] << 8) | pkt[11]
    if check >= 0xFFFF - 0x100:
        check = (check + 0x101) & 0xFFFF
    else:
        check += 0x100
    pkt[10] = check >> 8
    pkt[11] = check & 0xFF
    return True


def icmp_net_unreachable(pkt: bytes | bytearray | memoryview, tun_addr: int) -> bytes | None:
    """The ICMP "network unreachable" flannel writes into the TUN for an unroutable packet (§8.5).

    ``None`` when flannel would not send one: the offender is ICMP, a non-first fragment, or has
    an IHL with IHL*4 >= 60 (flannel's own limit), or is too short to quote.
    """
    if len(pkt) < IPV4_HEADER_LEN:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    if pkt[9] == PROTO_ICMP:
        return None
    if ((pkt[6] << 8) | pkt[7]) & 0x1FFF:
        return None
    if ihl >= IPV4_HEADER_LEN + 40 or ihl < IPV4_HEADER_LEN or len(pkt) < ihl + 8:
        return None
    quoted = bytes(pkt[: ihl + 8])
    total = IPV4_HEADER_LEN + 8 + ihl + 8
    icmp = bytearray(struct.pack("!BBHI", 3, 0, 0, 0) + quoted)
    csum = ipv4_checksum(icmp)
    icmp[2] = csum >> 8
    icmp[3] = csum & 0xFF
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, ICMP_TTL, PROTO_ICMP, 0,
                               tun_addr.to_bytes(4, "big"), bytes(pkt[12:16])))
    csum = ipv4_checksum(ip)
    ip[10] = csum >> 8
    ip[11] = csum & 0xFF
    return bytes(ip + icmp)


@dataclass(frozen=True)
class Peer:
    """A remote node as the data path sees it: its subnet and where to send the datagrams."""

    subnet: IPv4Network
    public_ip: IPv4Address


@dataclass(frozen=True)
class PeerTable:
    """An immutable snapshot of the peers, built once per lease change and swapped in whole.

    Workers read ``network.table`` once per packet (an atomic attribute read), so no lock is
    needed in the hot path (copy-on-write). Lookup is longest-prefix match (flannel: first match).
    """

    peers: tuple[Peer, ...] = ()
    # [(mask, {network_int: (ip_str, port)})] sorted by prefix length, longest first
    routes: tuple[tuple[int, dict[int, tuple[str, int]]], ...] = field(default=(), repr=False)
    # public ip (int) -> ((net_int, mask), ...) the subnets that peer may send from
    sources: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict, repr=False)
    port: int = 8285

    @classmethod
    def build(cls, peers: Iterable[Peer], port: int) -> PeerTable:
        uniq: dict[IPv4Network, Peer] = {}
        for p in peers:
            uniq[p.subnet] = p
        by_len: dict[int, dict[int, tuple[str, int]]] = {}
        sources: dict[int, list[tuple[int, int]]] = {}
        for p in uniq.values():
            mask = int(p.subnet.netmask)
            by_len.setdefault(p.subnet.prefixlen, {})[int(p.subnet.network_address)] = (str(p.public_ip), port)
            sources.setdefault(int(p.public_ip), []).append((int(p.subnet.network_address), mask))
        routes = tuple((int(IPv4Network(f"0.0.0.0/{plen}").netmask) if plen else 0, by_len[plen])
                       for plen in sorted(by_len, reverse=True))
        return cls(peers=tuple(sorted(uniq.values(), key=lambda p: int(p.subnet.network_address))),
                   routes=routes, sources={k: tuple(v) for k, v in sources.items()}, port=port)

    def lookup(self, dst: int) -> tuple[str, int] | None:
        """Longest-prefix match of a destination address (int) → (peer ip, port), or None."""
        for mask, nets in self.routes:
            hit = nets.get(dst & mask)
            if hit is not None:
                return hit
        return None

    def source_allowed(self, outer_src: int, inner_src: int) -> int:
        """RX_OK, RX_UNKNOWN_PEER (outer source is no peer) or RX_SPOOFED (inner source outside
        every subnet that peer leases)."""
        nets = self.sources.get(outer_src)
        if nets is None:
            return RX_UNKNOWN_PEER
        for net, mask in nets:
            if inner_src & mask == net:
                return RX_OK
        return RX_SPOOFED


def classify_rx(pkt: bytes | bytearray | memoryview, outer_src: int, table: PeerTable) -> int:
    """The receive-side verdict for one datagram (before the TTL rewrite). Strangers are
    rejected first, whatever they send."""
    if outer_src not in table.sources:
        return RX_UNKNOWN_PEER
    if len(pkt) < IPV4_HEADER_LEN:
        return RX_SHORT
    if pkt[0] >> 4 != 4:
        return RX_VERSION
    return table.source_allowed(outer_src, int.from_bytes(pkt[12:16], "big"))
