"""Pure packet logic of the udp backend: IPv4 header checks, TTL rewrite, ICMP, the peer table.

No I/O here, so every forwarding decision is unit-testable byte for byte. The wire format is
flannel's (reference §8.2): one raw IPv4 packet per UDP datagram, TTL decremented by one with the
header checksum patched as flannel's C proxy does (RFC 1624). The C accelerator (``_accel``)
implements the same functions; tests compare the two.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any

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
    "drop_unknown_peer",    # outer source neither a peer's PublicIP nor in TrustedSources (docs/udp.md)
    "drop_spoofed",         # inner source the sender may not use (docs/udp.md, "Anti-spoofing")
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


Net = tuple[int, int]  # (network address, mask) as host-order integers


def _net(n: IPv4Network) -> Net:
    return int(n.network_address), int(n.netmask)


#: Network unknown (``PeerTable.build`` without one): every inner source counts as inside it,
#: the strictest reading of the anti-spoof rule.
EVERYTHING: Net = (0, 0)


#: Each dict of the Python table is split into this many shards, so a lease event copies one
#: shard (peers / SHARDS entries), not the whole dict (copy-on-write at shard granularity).
SHARDS = 64
_SHARD = SHARDS - 1

# (mask, shift, shards): one prefix length of the routes; shard of a key = (key >> shift) & _SHARD
RouteGroup = tuple[int, int, tuple[Mapping[int, tuple[str, int]], ...]]


@dataclass(frozen=True)
class PeerTable:
    """An immutable snapshot of the peers, swapped in whole (copy-on-write).

    Workers read ``network.table`` once per packet (an atomic attribute read), so no lock is
    needed in the hot path. Lookup is longest-prefix match (flannel: first match). Built by a
    ``TableBuilder``, which shares every shard a change does not touch with the previous
    snapshot, so one lease event copies two small dicts, not the table.

    ``network``: the overlay (``Network``) as (net, mask); inner sources outside it are not
    attributed to any node. ``trusted``: outer sources that may send without being a peer's
    PublicIP (docs/udp.md, "Anti-spoofing").
    """

    # per prefix length, longest first: (mask, shift, shards of {network_int: (ip_str, port)})
    routes: tuple[RouteGroup, ...] = field(default=(), repr=False)
    # shards (by ``ip & _SHARD``) of {public ip (int): ((net_int, mask), ...) the subnets it may send from}
    sources: tuple[Mapping[int, tuple[Net, ...]], ...] = field(default=(), repr=False)
    port: int = 8285
    network: Net = EVERYTHING
    trusted: tuple[Net, ...] = ()
    #: the same table in ``struct fl_table`` layout, for the C workers
    c_layout: bytes = field(default=b"", repr=False)
    size: int = 0  # number of peers

    @classmethod
    def build(cls, peers: Iterable[Peer], port: int, *, network: IPv4Network | None = None,
              trusted: Iterable[IPv4Network] = ()) -> PeerTable:
        """A table from scratch (the last peer of a subnet wins)."""
        b = TableBuilder(port, network=network, trusted=trusted)
        for p in peers:
            b.set(p)
        return b.publish()

    def lookup(self, dst: int) -> tuple[str, int] | None:
        """Longest-prefix match of a destination address (int) → (peer ip, port), or None."""
        for mask, shift, shards in self.routes:
            key = dst & mask
            hit = shards[(key >> shift) & _SHARD].get(key)
            if hit is not None:
                return hit
        return None

    def _nets_of(self, outer_src: int) -> tuple[Net, ...] | None:
        return self.sources[outer_src & _SHARD].get(outer_src) if self.sources else None

    def known_sender(self, outer_src: int) -> bool:
        """Whether a datagram from ``outer_src`` is looked at at all: a peer's PublicIP, or trusted."""
        if self._nets_of(outer_src) is not None:
            return True
        return any(outer_src & mask == net for net, mask in self.trusted)

    def source_allowed(self, outer_src: int, inner_src: int) -> int:
        """The anti-spoof verdict (docs/udp.md): RX_OK, RX_UNKNOWN_PEER or RX_SPOOFED.

        * outer source = a peer's PublicIP: that peer, and it may send as its own subnet(s) or as
          an address outside ``Network`` (forwarded traffic when it does not masquerade);
        * outer source in ``trusted`` (a node whose datagrams do not come from its PublicIP, e.g.
          started with ``--public-ip`` behind an inbound-only NAT): as any peer's subnet, or
          outside ``Network``;
        * never as our own subnet or an address of ``Network`` that no peer leases.
        """
        nets = self._nets_of(outer_src)
        if nets is None and not any(outer_src & mask == net for net, mask in self.trusted):
            return RX_UNKNOWN_PEER
        net, mask = self.network
        if inner_src & mask != net:
            return RX_OK
        if nets is not None:
            return RX_OK if any(inner_src & m == n for n, m in nets) else RX_SPOOFED
        return RX_OK if self.lookup(inner_src) is not None else RX_SPOOFED


class TableBuilder:
    """The control thread's mutable view of the peer table; ``publish`` snapshots it.

    Copy-on-write per shard: the first change after a ``publish`` to a shard of the routes (or of
    the sources) copies that shard, later changes in the same batch reuse the copy. The C layout
    is kept alongside as sorted flat ``array('I')`` runs (insert/delete is a ``memmove``), so
    packing a snapshot for the C workers is a few ``tobytes`` calls. No Python loop over the
    peers anywhere: one lease event at 5000 peers costs tens of microseconds
    (bench/udp_peer_table.py, docs/benchmarks.md).
    """

    def __init__(self, port: int, *, network: IPv4Network | None = None,
                 trusted: Iterable[IPv4Network] = ()) -> None:
        self.port = port
        self.network = _net(network) if network is not None else EVERYTHING
        self.trusted = tuple(_net(t) for t in trusted)
        self._peers: dict[IPv4Network, Peer] = {}
        self._routes: dict[int, list[dict[int, tuple[str, int]]]] = {}   # prefix length → shards
        self._sources: list[dict[int, tuple[Net, ...]]] = [{} for _ in range(SHARDS)]
        self._owned: set[int] = set()   # id() of the shards not yet shared with a published table
        # C layout: per prefix length, sorted nets and the flat (net, peer) pairs; sources as
        # sorted (peer, net) keys and flat (peer, net, mask) triples.
        self._c_nets: dict[int, list[int]] = {}
        self._c_routes: dict[int, array[int]] = {}
        self._c_src_keys: list[tuple[int, int]] = []
        self._c_src: array[int] = array("I")

    def __len__(self) -> int:
        return len(self._peers)

    @property
    def peers(self) -> Mapping[IPv4Network, Peer]:
        """Read-only view of the current peers (control thread only)."""
        return MappingProxyType(self._peers)

    def _own(self, shards: list[dict[Any, Any]], i: int) -> dict[Any, Any]:
        d = shards[i]
        if id(d) not in self._owned:
            d = shards[i] = dict(d)
            self._owned.add(id(d))
        return d

    def set(self, peer: Peer) -> bool:
        """Add or replace the peer of ``peer.subnet``; False if it was already exactly that."""
        old = self._peers.get(peer.subnet)
        if old == peer:
            return False
        if old is not None:
            self.remove(old.subnet)
        self._peers[peer.subnet] = peer
        net, mask = _net(peer.subnet)
        plen, ip = peer.subnet.prefixlen, int(peer.public_ip)
        shards = self._routes.get(plen)
        if shards is None:
            shards = self._routes[plen] = [{} for _ in range(SHARDS)]
        self._own(shards, (net >> (32 - plen)) & _SHARD)[net] = (str(peer.public_ip), self.port)
        src = self._own(self._sources, ip & _SHARD)
        src[ip] = tuple(sorted((*src.get(ip, ()), (net, mask))))  # canonical order
        nets = self._c_nets.setdefault(plen, [])
        i = bisect_left(nets, net)
        nets.insert(i, net)
        self._c_routes.setdefault(plen, array("I"))[2 * i:2 * i] = array("I", (net, ip))
        j = bisect_left(self._c_src_keys, (ip, net))
        self._c_src_keys.insert(j, (ip, net))
        self._c_src[3 * j:3 * j] = array("I", (ip, net, mask))
        return True

    def remove(self, subnet: IPv4Network) -> bool:
        """Drop the peer of ``subnet``; False if there was none."""
        old = self._peers.pop(subnet, None)
        if old is None:
            return False
        net, mask = _net(subnet)
        plen, ip = subnet.prefixlen, int(old.public_ip)
        del self._own(self._routes[plen], (net >> (32 - plen)) & _SHARD)[net]
        src = self._own(self._sources, ip & _SHARD)
        left = tuple(s for s in src[ip] if s != (net, mask))
        if left:
            src[ip] = left
        else:
            del src[ip]
        nets = self._c_nets[plen]
        i = bisect_left(nets, net)
        del nets[i]
        del self._c_routes[plen][2 * i:2 * i + 2]
        if not nets:
            del self._routes[plen], self._c_nets[plen], self._c_routes[plen]
        j = bisect_left(self._c_src_keys, (ip, net))
        del self._c_src_keys[j]
        del self._c_src[3 * j:3 * j + 3]
        return True

    def publish(self) -> PeerTable:
        """The current state as an immutable table; the shards it holds are never mutated again."""
        self._owned.clear()
        routes = tuple((_mask(plen), 32 - plen, tuple(self._routes[plen]))
                       for plen in sorted(self._routes, reverse=True))
        return PeerTable(routes=routes, sources=tuple(self._sources), port=self.port, network=self.network,
                         trusted=self.trusted, c_layout=self.c_layout(), size=len(self._peers))

    def c_layout(self) -> bytes:
        """The current state in ``struct fl_table`` layout (fastpath.c): header, groups (longest
        prefix first), routes sorted by net within a group, sources sorted by (peer, net), trusted."""
        plens = sorted(self._c_routes, reverse=True)
        groups = array("I")
        start = 0
        for plen in plens:
            n = len(self._c_nets[plen])
            groups.extend((_mask(plen), start, n))
            start += n
        trusted = array("I", [x for t in self.trusted for x in t])
        head = array("I", (len(plens), start, len(self._c_src_keys), len(self.trusted), *self.network,
                           TABLE_ABI, 0))
        return b"".join([head.tobytes(), groups.tobytes(), *(self._c_routes[p].tobytes() for p in plens),
                         self._c_src.tobytes(), trusted.tobytes()])


#: layout version of ``struct fl_table`` / ``struct fl_state``, checked against ``fl_abi()``
TABLE_ABI = 3


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


def classify_rx(pkt: bytes | bytearray | memoryview, outer_src: int, table: PeerTable) -> int:
    """The receive-side verdict for one datagram (before the TTL rewrite). Strangers are
    rejected first, whatever they send."""
    if not table.known_sender(outer_src):
        return RX_UNKNOWN_PEER
    if len(pkt) < IPV4_HEADER_LEN:
        return RX_SHORT
    if pkt[0] >> 4 != 4:
        return RX_VERSION
    return table.source_allowed(outer_src, int.from_bytes(pkt[12:16], "big"))
