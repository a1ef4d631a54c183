"""A small rtnetlink client for the hot path of the routed backends: route, neighbour and fdb
entries -- write, dump, and watch for changes.

Why not pyroute2 here: pyroute2 spends ~0.2 ms of Python encoding one message and ~0.1 ms
decoding one (reference dependency-facts §3), so a peer's three entries cost ~1 ms and a dump of
15 000 entries ~1.6 s. The few message types the backends write are fixed structs, so this
module packs them with ``struct`` (one ``pack`` per IPv4 message, header included), sends up to
``CHUNK`` bytes of them per ``send`` and asks for an ACK only on an ``NLMSG_NOOP`` that ends each
chunk: the kernel reports every *failing* message anyway (an ``NLMSG_ERROR`` carrying its
sequence number), so each failure is still attributed to its entry, while successes cost no
reply. A full reconcile reads dumps without parsing what it expects: ``route_key``/``neigh_key``
pull the raw fields a parse would read, and a message whose key is an expected entry's is that
entry. The socket core (sequence numbers,
the send-and-collect loop, dumps) and the message vocabulary are ``flannel.nl``'s, which also
serves links and addresses (rare, nested attributes); ``netlink.py`` is the only caller of this
module in the agent.

``Monitor`` is a second socket subscribed to route, neighbour and link notifications. A classic
BPF filter attached to it drops, in the kernel, the echoes of our own writes (new routes with our
protocol number, new neighbours/fdb entries), so a cold start that writes 15 000 entries does not
wake it 15 000 times; deletions and foreign routes pass (the reconcile loop's monitor thread
drops the echoes of our own neighbour/fdb deletions, which the kernel reports with port id 0).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any, NamedTuple

from flannel import nl, threadname
from flannel.backends.routed.model import (
    FLANNEL_PROTO,
    PROTO_BOOT,
    ZERO_MAC,
    Addr,
    Fdb,
    ForeignRoute,
    Neigh,
    Net,
    Route,
)
from flannel.nl import attr as _attr
from flannel.nl import attrs as _attrs

# the notification vocabulary the reconcile loop and bench/ read as ``rtnl.*`` (defined in flannel.nl)
messages = nl.messages
IFF_UP, RT_TABLE_MAIN = nl.IFF_UP, nl.RT_TABLE_MAIN
RTM_NEWLINK, RTM_DELLINK = nl.RTM_NEWLINK, nl.RTM_DELLINK
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = nl.RTM_NEWROUTE, nl.RTM_DELROUTE, nl.RTM_GETROUTE
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = nl.RTM_NEWNEIGH, nl.RTM_DELNEIGH, nl.RTM_GETNEIGH
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106   # linux/rtnetlink.h (Linux >= 5.3)

SO_ATTACH_FILTER = 26

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
RTNLGRP_NEXTHOP = 32          # beyond the 32-bit bind() mask: joined with NETLINK_ADD_MEMBERSHIP
NETLINK_ADD_MEMBERSHIP = 1

AF_BRIDGE = 7
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = nl.RTA_DST, nl.RTA_OIF, nl.RTA_GATEWAY, nl.RTA_TABLE
RTA_MULTIPATH = 9
RTA_NH_ID = 30
NHA_ID, NHA_GROUP, NHA_BLACKHOLE, NHA_OIF, NHA_GATEWAY = 1, 2, 4, 5, 6
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFLA_IFNAME = nl.IFLA_IFNAME

NLMSG_NOOP = 1
_SIOCGIFINDEX = 0x8933
_IFNAMSIZ = 16
_IFREQ = struct.Struct("=16si20x")    # struct ifreq: name, ifindex (the union is 24 bytes)
CHUNK = 32 * 1024
RTN_KINDS = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
             7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}

_RTMSG = nl.RTMSG
_NDMSG = nl.NDMSG
_IFINFO = nl.IFINFO
_U32 = nl.U32
_RTA = nl.RTA
_MAIN_TID = nl.U32.pack(nl.RT_TABLE_MAIN)
_BE32 = struct.Struct(">I")
_NHMSG = struct.Struct("=BBBBI")     # struct nhmsg: family, scope, protocol, resvd, flags
_SET = nl.NLM_F_REQUEST | nl.NLM_F_CREATE | nl.NLM_F_REPLACE
_NH = "nhid"   # marks the route_key of a route through a nexthop object


class NetlinkFailure(nl.NetlinkError):
    """The socket itself failed (not one entry): the caller reconciles against a fresh dump."""


def _family(a: Addr | Net) -> int:
    return socket.AF_INET6 if a.version == 6 else socket.AF_INET


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# ---- message bodies (header added by the sender) --------------------------------------------

def route_set(r: Route, oif: int) -> tuple[int, int, bytes]:
    body = _RTMSG.pack(_family(r.dst), r.dst.prefixlen, 0, 0, RT_TABLE_MAIN, FLANNEL_PROTO, RT_SCOPE_UNIVERSE,
                       RTN_UNICAST, RTNH_F_ONLINK if r.onlink else 0)
    body += (_attr(RTA_DST, r.dst.network_address.packed) + _attr(RTA_GATEWAY, r.gateway.packed)
             + _attr(RTA_OIF, _U32.pack(oif)))
    return RTM_NEWROUTE, _SET, body


def route_del(r: Route, oif: int) -> tuple[int, int, bytes]:
    """Delete exactly this route: the kernel matches destination, gateway, device *and protocol*,
    so a route someone else put in its place is never deleted by mistake."""
    body = _RTMSG.pack(_family(r.dst), r.dst.prefixlen, 0, 0, RT_TABLE_MAIN, r.proto, RT_SCOPE_NOWHERE, 0, 0)
    body += (_attr(RTA_DST, r.dst.network_address.packed) + _attr(RTA_GATEWAY, r.gateway.packed)
             + _attr(RTA_OIF, _U32.pack(oif)))
    return RTM_DELROUTE, nl.NLM_F_REQUEST, body


def route_set_nh(r: Route, nhid: int) -> tuple[int, int, bytes]:
    """``ip route replace <dst> nhid <id> proto 152``: the gateway and device are the nexthop's.
    Why nexthop objects: an IPv4 route with its own gateway makes the kernel walk every other
    route's fib_info on insert (their hash leaves the gateway out), O(N) per peer; a route
    through a nexthop object hashes by the object's id (docs/benchmarks.md)."""
    body = _RTMSG.pack(_family(r.dst), r.dst.prefixlen, 0, 0, RT_TABLE_MAIN, FLANNEL_PROTO, RT_SCOPE_UNIVERSE,
                       RTN_UNICAST, 0)
    body += _attr(RTA_DST, r.dst.network_address.packed) + _attr(RTA_NH_ID, _U32.pack(nhid))
    return RTM_NEWROUTE, _SET, body


def route_del_nh(r: Route, nhid: int) -> tuple[int, int, bytes]:
    """Delete the route at ``r.dst`` that goes through nexthop ``nhid`` and carries ``r.proto``: the
    kernel does not match a nexthop route by gateway/device (ESRCH), only by its nexthop id."""
    body = _RTMSG.pack(_family(r.dst), r.dst.prefixlen, 0, 0, RT_TABLE_MAIN, r.proto, RT_SCOPE_NOWHERE, 0, 0)
    body += _attr(RTA_DST, r.dst.network_address.packed) + _attr(RTA_NH_ID, _U32.pack(nhid))
    return RTM_DELROUTE, nl.NLM_F_REQUEST, body


def nexthop_set(r: Route, oif: int, nhid: int, *, new: bool) -> tuple[int, int, bytes]:
    """``ip nexthop {add|replace} id <id> via <gateway> dev <oif> [onlink] proto 152``. A ``new`` id
    is created with CREATE|EXCL, so that an id somebody else took meanwhile is refused (EEXIST)
    rather than overwritten; an id we own is replaced (a changed gateway is one replace)."""
    body = _NHMSG.pack(_family(r.gateway), 0, FLANNEL_PROTO, 0, RTNH_F_ONLINK if r.onlink else 0)
    body += _attr(NHA_ID, _U32.pack(nhid)) + _attr(NHA_GATEWAY, r.gateway.packed) + _attr(NHA_OIF, _U32.pack(oif))
    return RTM_NEWNEXTHOP, nl.NLM_F_REQUEST | nl.NLM_F_CREATE | (nl.NLM_F_EXCL if new else nl.NLM_F_REPLACE), body


def nexthop_del(nhid: int) -> tuple[int, int, bytes]:
    """``ip nexthop del id <id>`` (the kernel takes no protocol here: the caller checks it is ours)."""
    return RTM_DELNEXTHOP, nl.NLM_F_REQUEST, _NHMSG.pack(0, 0, 0, 0, 0) + _attr(NHA_ID, _U32.pack(nhid))


def neigh_set(n: Neigh, ifindex: int) -> tuple[int, int, bytes]:
    body = _NDMSG.pack(_family(n.ip), 0, 0, ifindex, NUD_PERMANENT, 0, 0)
    return RTM_NEWNEIGH, _SET, body + _attr(NDA_DST, n.ip.packed) + _attr(NDA_LLADDR, _mac(n.mac))


def neigh_del(n: Neigh, ifindex: int) -> tuple[int, int, bytes]:
    body = _NDMSG.pack(_family(n.ip), 0, 0, ifindex, 0, 0, 0)
    return RTM_DELNEIGH, nl.NLM_F_REQUEST, body + _attr(NDA_DST, n.ip.packed)


def fdb_set(f: Fdb, ifindex: int) -> tuple[int, int, bytes]:
    body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT, NTF_SELF, 0)
    return RTM_NEWNEIGH, _SET, body + _attr(NDA_LLADDR, _mac(f.mac)) + _attr(NDA_DST, f.dst.packed)


def fdb_del(f: Fdb, ifindex: int) -> tuple[int, int, bytes]:
    body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT, NTF_SELF, 0)
    return RTM_DELNEIGH, nl.NLM_F_REQUEST, body + _attr(NDA_LLADDR, _mac(f.mac)) + _attr(NDA_DST, f.dst.packed)


# ---- whole messages (header included), as ``Rtnl.send`` sends them ---------------------------------

#: ``(entry, ifindex, seq)`` -> one complete netlink message
Encoder = Callable[[Any, int, int], bytes]

# IPv4 entries -- all of them in an IPv4 cluster -- are packed with one struct each (header,
# body and attributes at once, addresses in network order through ``htonl``): a third of the
# Python cost of a cold start's 15 000 messages at 5000 peers. Anything else takes the generic
# encoders above; a unit test checks both give the same bytes.
_ROUTE4 = struct.Struct("=IHHII BBBBBBBBI HHI HHI HHI")
_NEIGH4 = struct.Struct("=IHHII BBHiHBB HHI HH6s2x")
_FDB4 = struct.Struct("=IHHII BBHiHBB HH6s2x HHI")
_htonl = socket.htonl


def _message(parts: tuple[int, int, bytes], seq: int) -> bytes:
    kind, flags, body = parts
    return nl.header(kind, flags, seq, body)


def route_set_msg(r: Route, oif: int, seq: int) -> bytes:
    dst, gw = r.dst, r.gateway
    if dst.version == 4 and gw.version == 4:
        return _ROUTE4.pack(_ROUTE4.size, RTM_NEWROUTE, _SET, seq, 0,
                            socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, FLANNEL_PROTO, RT_SCOPE_UNIVERSE,
                            RTN_UNICAST, RTNH_F_ONLINK if r.onlink else 0,
                            8, RTA_DST, _htonl(int(dst.network_address)), 8, RTA_GATEWAY, _htonl(int(gw)),
                            8, RTA_OIF, oif)
    return _message(route_set(r, oif), seq)


def neigh_set_msg(n: Neigh, ifindex: int, seq: int) -> bytes:
    mac = _mac(n.mac)
    if n.ip.version == 4 and len(mac) == 6:
        return _NEIGH4.pack(_NEIGH4.size, RTM_NEWNEIGH, _SET, seq, 0,
                            socket.AF_INET, 0, 0, ifindex, NUD_PERMANENT, 0, 0,
                            8, NDA_DST, _htonl(int(n.ip)), 10, NDA_LLADDR, mac)
    return _message(neigh_set(n, ifindex), seq)


def fdb_set_msg(f: Fdb, ifindex: int, seq: int) -> bytes:
    mac = _mac(f.mac)
    if f.dst.version == 4 and len(mac) == 6:
        return _FDB4.pack(_FDB4.size, RTM_NEWNEIGH, _SET, seq, 0,
                          AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT, NTF_SELF, 0,
                          10, NDA_LLADDR, mac, 8, NDA_DST, _htonl(int(f.dst)))
    return _message(fdb_set(f, ifindex), seq)


_NEXTHOP4 = struct.Struct("=IHHII BBBBI HHI HHI HHI")
_ROUTE4_NH = struct.Struct("=IHHII BBBBBBBBI HHI HHI")
_NH_NEW = nl.NLM_F_REQUEST | nl.NLM_F_CREATE | nl.NLM_F_EXCL
_NH_REPLACE = nl.NLM_F_REQUEST | nl.NLM_F_CREATE | nl.NLM_F_REPLACE


def nexthop_new_msg(item: tuple[Route, int], oif: int, seq: int) -> bytes:
    """``nexthop_set(route, oif, nhid, new=True)`` as a whole message, ``item`` = (route, nhid):
    an encoder (no body built beforehand), one struct for an IPv4 gateway."""
    return _nexthop_msg(item[0], oif, item[1], seq, _NH_NEW)


def nexthop_replace_msg(item: tuple[Route, int], oif: int, seq: int) -> bytes:
    """``nexthop_set(route, oif, nhid, new=False)`` as a whole message (see ``nexthop_new_msg``)."""
    return _nexthop_msg(item[0], oif, item[1], seq, _NH_REPLACE)


def _nexthop_msg(r: Route, oif: int, nhid: int, seq: int, flags: int) -> bytes:
    gw = r.gateway
    if gw.version == 4:
        return _NEXTHOP4.pack(_NEXTHOP4.size, RTM_NEWNEXTHOP, flags, seq, 0,
                              socket.AF_INET, 0, FLANNEL_PROTO, 0, RTNH_F_ONLINK if r.onlink else 0,
                              8, NHA_ID, nhid, 8, NHA_GATEWAY, _htonl(int(gw)), 8, NHA_OIF, oif)
    return _message(nexthop_set(r, oif, nhid, new=flags == _NH_NEW), seq)


def route_nh_msg(item: tuple[Route, int], _ifindex: int, seq: int) -> bytes:
    """``route_set_nh(route, nhid)`` as a whole message, ``item`` = (route, nhid)."""
    r, nhid = item
    dst = r.dst
    if dst.version == 4:
        return _ROUTE4_NH.pack(_ROUTE4_NH.size, RTM_NEWROUTE, _SET, seq, 0,
                               socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, FLANNEL_PROTO, RT_SCOPE_UNIVERSE,
                               RTN_UNICAST, 0, 8, RTA_DST, _htonl(int(dst.network_address)), 8, RTA_NH_ID, nhid)
    return _message(route_set_nh(r, nhid), seq)


def prebuilt(parts: tuple[int, int, bytes], _ifindex: int, seq: int) -> bytes:
    """An ``Encoder`` for a message body built beforehand (nexthop objects and the routes through
    them: a few per lease event, not worth a packed struct of their own)."""
    return _message(parts, seq)


def route_del_msg(r: Route, oif: int, seq: int) -> bytes:
    return _message(route_del(r, oif), seq)


def neigh_del_msg(n: Neigh, ifindex: int, seq: int) -> bytes:
    return _message(neigh_del(n, ifindex), seq)


def fdb_del_msg(f: Fdb, ifindex: int, seq: int) -> bytes:
    return _message(fdb_del(f, ifindex), seq)


# ---- parsing --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RouteMsg:
    """One main-table route inside the network, as the kernel reports it."""

    dst: Net
    oif: int | None
    gateway: Addr | None
    proto: int
    kind: int
    onlink: bool
    nhid: int | None = None       # RTA_NH_ID: the route goes through a nexthop object


def parse_route(data: bytes, off: int, end: int, within: Callable[[int, int, int], bool]) -> RouteMsg | None:
    """A route message → ``RouteMsg`` if it is a main-table route accepted by ``within(version,
    dst_int, dst_len)``; ``None`` for everything else (other tables, outside the network)."""
    family, dst_len, _src_len, _tos, table, proto, _scope, kind, flags = _RTMSG.unpack_from(data, off + 16)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    at = _attrs(data, off + 28, end)
    tid = at.get(RTA_TABLE)
    if (_U32.unpack(tid)[0] if tid is not None else table) != RT_TABLE_MAIN:
        return None
    version = 4 if family == socket.AF_INET else 6
    raw = at.get(RTA_DST)
    dst_int = int.from_bytes(raw, "big") if raw else 0
    if not within(version, dst_int, dst_len):
        return None
    dst: Net = IPv4Network((dst_int, dst_len)) if version == 4 else IPv6Network((dst_int, dst_len))
    oif = at.get(RTA_OIF)
    gw = at.get(RTA_GATEWAY)
    multipath = RTA_MULTIPATH in at
    nh = at.get(RTA_NH_ID)
    return RouteMsg(dst, None if oif is None or multipath else _U32.unpack(oif)[0],
                    None if gw is None else nl.ip_of(gw), proto, kind, bool(flags & RTNH_F_ONLINK),
                    None if nh is None else _U32.unpack(nh)[0])


class NexthopMsg(NamedTuple):
    """One nexthop object as the kernel reports it. ``single``: a gateway/device nexthop (not a
    group, not a blackhole), the only kind a route of ours can be read through.

    A named tuple, not a frozen dataclass: a cold start records one per peer route (5000 at
    5000 peers), and a tuple is built in a fifth of the time."""

    id: int
    family: int
    protocol: int
    oif: int | None
    gateway: Addr | None
    onlink: bool
    single: bool = True


def parse_nexthop(data: bytes, off: int, end: int) -> NexthopMsg | None:
    """An RTM_NEWNEXTHOP/RTM_DELNEXTHOP message → ``NexthopMsg`` (``None``: no id, malformed)."""
    if end - off < 24:
        return None
    family, _scope, proto, _resvd, flags = _NHMSG.unpack_from(data, off + 16)
    at = _attrs(data, off + 24, end)
    raw = at.get(NHA_ID)
    if raw is None or len(raw) < 4:
        return None
    oif, gw = at.get(NHA_OIF), at.get(NHA_GATEWAY)
    return NexthopMsg(_U32.unpack_from(raw)[0], family, proto, None if oif is None else _U32.unpack_from(oif)[0],
                      None if gw is None or len(gw) not in (4, 16) else nl.ip_of(gw), bool(flags & RTNH_F_ONLINK),
                      NHA_GROUP not in at and NHA_BLACKHOLE not in at)


def route_key(data: bytes, off: int, end: int) -> tuple[object, ...]:
    """Every field of a route message that ``parse_route`` and ``Classifier.classify`` read, raw
    (no address objects): two messages with the same key classify the same way. A full reconcile
    looks this key up among the entries it expects (``expected_route_key``) and parses only the
    messages it does not find there (cheap: ~2 µs against ~15 µs for a parse at 5000 peers)."""
    family, dst_len, _src_len, _tos, table, proto, _scope, kind, flags = _RTMSG.unpack_from(data, off + 16)
    dst = gw = oif = tid = nhid = None
    multipath = False
    p = off + 28
    unpack = _RTA.unpack_from
    while p + 4 <= end:
        n, t = unpack(data, p)
        if n < 4:
            break
        t &= 0x3FFF
        if t == RTA_DST:
            dst = data[p + 4:p + n]
        elif t == RTA_GATEWAY:
            gw = data[p + 4:p + n]
        elif t == RTA_OIF:
            oif = data[p + 4:p + n]
        elif t == RTA_TABLE:
            tid = data[p + 4:p + n]
        elif t == RTA_MULTIPATH:
            multipath = True
        elif t == RTA_NH_ID:
            nhid = data[p + 4:p + n]
        p += (n + 3) & ~3
    if nhid is not None:
        # through a nexthop object: its gateway, device and onlink flag are the object's (the
        # message repeats them only with nexthop_compat_mode=1), so the id stands for them
        return (family, dst_len, table, tid, proto, kind, _NH, dst, nhid)
    return (family, dst_len, table, tid, proto, kind, flags & RTNH_F_ONLINK, dst, gw, oif, multipath)


def route_key_nhid(key: tuple[object, ...]) -> int | None:
    """The nexthop id in a ``route_key`` (None: a plain route)."""
    raw = key[8] if len(key) == 9 else None
    return _U32.unpack(raw)[0] if isinstance(raw, bytes) and len(raw) == 4 else None


def expected_route_key(r: Route, oif: int) -> tuple[object, ...]:
    """``route_key`` of the message the kernel dumps for a route we wrote (``route_set``)."""
    return (_family(r.dst), r.dst.prefixlen, RT_TABLE_MAIN, _MAIN_TID, FLANNEL_PROTO, RTN_UNICAST,
            RTNH_F_ONLINK if r.onlink else 0, _packed(r.dst.network_address), _packed(r.gateway), _U32.pack(oif), False)


def expected_route_key_nh(r: Route, nhid: int) -> tuple[object, ...]:
    """``route_key`` of the message the kernel dumps for a route we wrote through nexthop ``nhid``
    (``route_set_nh``). The caller checks that the nexthop holds the route's gateway and device."""
    return (_family(r.dst), r.dst.prefixlen, RT_TABLE_MAIN, _MAIN_TID, FLANNEL_PROTO, RTN_UNICAST, _NH,
            _packed(r.dst.network_address), _U32.pack(nhid))


def _packed(a: Addr) -> bytes:
    """``a.packed`` (a Python property: ~1 µs; this: a quarter of it for IPv4)."""
    return _BE32.pack(int(a)) if type(a) is IPv4Address else a.packed


def neigh_key(data: bytes, off: int, end: int) -> tuple[object, ...]:
    """Every field of a neighbour / fdb message that ``parse_neigh`` and ``neigh_entry`` read,
    raw (see ``route_key``): family, device, permanent or not, destination and link-layer address."""
    family, _p1, _p2, ifindex, state, _flags, _kind = _NDMSG.unpack_from(data, off + 16)
    dst = ll = None
    p = off + 28
    unpack = _RTA.unpack_from
    while p + 4 <= end:
        n, t = unpack(data, p)
        if n < 4:
            break
        t &= 0x3FFF
        if t == NDA_DST:
            dst = data[p + 4:p + n]
        elif t == NDA_LLADDR:
            ll = data[p + 4:p + n]
        p += (n + 3) & ~3
    # the MAC as parse_neigh spells it: an entry whose MAC is written differently never matches
    return (family, ifindex, bool(state & NUD_PERMANENT), dst, None if ll is None or len(ll) != 6 else ll.hex(":"))


def expected_neigh_key(e: Neigh | Fdb, ifindex: int) -> tuple[object, ...] | None:
    """``neigh_key`` of the message the kernel dumps for a neighbour / fdb entry we wrote; ``None``
    for the all-zero fdb MAC (never ours: always parsed, so it compares as before)."""
    if isinstance(e, Fdb):
        return None if e.mac == ZERO_MAC else (AF_BRIDGE, ifindex, True, _packed(e.dst), e.mac)
    return (_family(e.ip), ifindex, True, _packed(e.ip), e.mac)


@dataclass(frozen=True, slots=True)
class NeighMsg:
    family: int
    ifindex: int
    state: int
    flags: int
    ip: Addr | None
    mac: str | None


def parse_neigh(data: bytes, off: int, end: int) -> NeighMsg:
    family, _p1, _p2, ifindex, state, flags, _kind = _NDMSG.unpack_from(data, off + 16)
    at = _attrs(data, off + 28, end)
    dst = at.get(NDA_DST)
    ll = at.get(NDA_LLADDR)
    return NeighMsg(family, ifindex, state, flags, None if not dst else nl.ip_of(dst),
                    None if ll is None or len(ll) != 6 else ll.hex(":"))


# ---- sockets --------------------------------------------------------------------------------

class Rtnl(nl.Socket):
    """The request socket of the per-peer entries: batched writes with per-entry errors, and dumps
    (``nl.Socket``'s, raising ``NetlinkFailure``)."""

    failure = NetlinkFailure

    def ifindex(self, name: str) -> int | None:
        """``if_nametoindex`` in this socket's namespace (where its writes go), by an ioctl on
        the socket: glibc opens and closes a socket per call, ~10 µs, ~50 µs in a thread that
        just woke for one lease event -- a tenth of that event's cost."""
        raw = name.encode()
        if not raw or len(raw) >= _IFNAMSIZ or b"\0" in raw:
            return None
        try:
            out = fcntl.ioctl(self.sock.fileno(), _SIOCGIFINDEX, _IFREQ.pack(raw, 0))
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            try:   # an ioctl this socket does not take (not seen): the library call
                return socket.if_nametoindex(name)
            except OSError:
                return None
        index: int = _IFREQ.unpack(out)[1]
        return index

    def send(self, items: Iterable[tuple[object, Encoder, Any, int]]) -> list[tuple[object, int, str]]:
        """Send ``encode(entry, ifindex, seq)`` of every ``(tag, encode, entry, ifindex)``; returns
        ``(tag, errno, text)`` for each message the kernel refused.

        Messages go out in chunks of about ``CHUNK`` bytes, none of them asking for an ACK: the
        kernel answers every *failing* message regardless (an ``NLMSG_ERROR`` with its sequence
        number) and carries on with the next one, so one bad entry never hides the others. Each
        chunk ends with an ``NLMSG_NOOP`` that asks for an ACK: the kernel handles a chunk's
        messages in order, so that ACK says every error of the chunk has been received.

        A send of more than one chunk (a cold start: ~40 chunks at 5000 peers) hands its chunks to
        a ``_ChunkSender`` thread and encodes the next one meanwhile: the kernel does its work
        inside ``send()``, without the GIL, so its share (about a third of a cold reconcile) runs
        beside our encoding instead of after it. Chunks still reach the kernel one at a time and
        in order; a single event's send (one chunk) starts no thread.

        :raises NetlinkFailure: the socket failed (nothing can be said about the entries).
        """
        failed: list[tuple[object, int, str]] = []
        pending: dict[int, object] = {}
        parts: list[bytes] = []
        size = 0
        next_seq = self.next_seq
        sender: _ChunkSender | None = None
        try:
            for tag, encode, entry, ifindex in items:
                seq = next_seq()
                msg = encode(entry, ifindex, seq)
                parts.append(msg)
                pending[seq] = tag
                size += len(msg)
                if size >= CHUNK:
                    if sender is None:
                        sender = _ChunkSender(self)
                    sender.put(self._chunk(parts), pending)
                    parts, pending, size = [], {}, 0
            if parts:
                if sender is None:
                    self._exchange_chunk(self._chunk(parts), pending, failed)
                else:
                    sender.put(self._chunk(parts), pending)
        finally:
            if sender is not None:
                failed.extend(sender.finish())   # raises what the sender met (after it has stopped)
        return failed

    def _chunk(self, parts: list[bytes]) -> tuple[bytes, int]:
        """One chunk's bytes, ending with the ``NLMSG_NOOP`` that asks for an ACK, and its sequence number."""
        last = self.next_seq()
        parts.append(nl.header(NLMSG_NOOP, nl.NLM_F_REQUEST | nl.NLM_F_ACK, last, b""))
        return b"".join(parts), last

    def _exchange_chunk(self, chunk: tuple[bytes, int], pending: dict[int, object],
                        failed: list[tuple[object, int, str]]) -> None:
        payload, last = chunk
        for data, kind, flags, seq, off, end in self.exchange(payload, last):
            code = nl.error_code(data, off) if kind == nl.NLMSG_ERROR and seq in pending else 0
            if code:   # a refused entry
                failed.append((pending[seq], code, self.error_text(data, off, end, flags)))

    def dump_raw(self, kind: int, body: bytes, want: int) -> Iterator[tuple[bytes, int, int]]:
        """``(data, offset, end)`` of every message of type ``want`` in one dump: ``nl.Socket.dump``
        in one loop (a full reconcile reads 15 000 messages at 5000 peers; three nested generators
        cost ~1 µs each per message).

        :raises NetlinkFailure: the socket failed or the kernel refused the dump.
        """
        seq = self.next_seq()
        try:
            self.sock.send(nl.header(kind, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, seq, body))
        except OSError as e:
            raise self.failure(e.errno or errno.EIO, f"netlink: {e}") from e
        unpack = nl.HDR.unpack_from
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError as e:
                raise self.failure(e.errno or errno.EIO, f"netlink: {e}") from e
            off, size = 0, len(data)
            while off + 16 <= size:
                n, mkind, _flags, mseq, _pid = unpack(data, off)
                if n < 16:
                    break
                if mseq == seq:
                    if mkind == nl.NLMSG_DONE:
                        return
                    if mkind == nl.NLMSG_ERROR:
                        code = nl.error_code(data, off)
                        raise self.failure(code, f"netlink dump: {os.strerror(code)}")
                    if mkind == want:
                        yield data, off, off + n
                off += (n + 3) & ~3

    def dump_routes(self, family: int) -> Iterator[tuple[bytes, int, int]]:
        body = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)
        return self.dump_raw(RTM_GETROUTE, body, RTM_NEWROUTE)

    def dump_nexthops(self) -> Iterator[NexthopMsg]:
        """Every nexthop object. :raises NetlinkFailure: also when the kernel has none (< 5.3:
        EOPNOTSUPP)."""
        for data, kind, off, end in self.dump(RTM_GETNEXTHOP, _NHMSG.pack(0, 0, 0, 0, 0)):
            if kind == RTM_NEWNEXTHOP:
                m = parse_nexthop(data, off, end)
                if m is not None:
                    yield m

    def dump_neighs(self, family: int, ifindex: int) -> Iterator[NeighMsg]:
        """Neighbours (``family`` AF_INET/AF_INET6) or fdb entries (AF_BRIDGE) of one device."""
        for data, off, end in self.dump_neighs_raw(family, ifindex):
            yield parse_neigh(data, off, end)

    def dump_neighs_raw(self, family: int, ifindex: int) -> Iterator[tuple[bytes, int, int]]:
        """``dump_neighs`` unparsed: ``(data, offset, end)`` of each message of that device."""
        if family == AF_BRIDGE:
            body = _NDMSG.pack(family, 0, 0, ifindex, 0, 0, 0)
        else:
            body = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0) + _attr(NDA_IFINDEX, _U32.pack(ifindex))
        unpack = _NDMSG.unpack_from
        for data, off, end in self.dump_raw(RTM_GETNEIGH, body, RTM_NEWNEIGH):
            # the kernel filters by device (strict checking); older kernels may not: checked here too
            if unpack(data, off + 16)[3] == ifindex:
                yield data, off, end


# ---- classifying what the kernel holds ---------------------------------------------------------

def _v4_within(net: IPv4Network | None) -> tuple[int, int] | None:
    return None if net is None else (int(net.network_address), net.prefixlen)


class Classifier:
    """Which routes are ours, which are someone else's (see ``netlink.Scope`` for the rule)."""

    def __init__(self, *, network: IPv4Network | None, network6: IPv6Network | None,
                 exclude: tuple[Net, ...], names: dict[int, str], overlay: dict[int, str],
                 nexthops: dict[int, NexthopMsg] | None = None) -> None:
        self.network, self.network6 = network, network6
        self.nexthops = nexthops    # id -> nexthop (shared with the port, which keeps it current)
        self.exclude = exclude
        self.names = names          # ifindex -> name of our devices (overlay + external)
        self.overlay = overlay      # ifindex -> name of the vxlan devices
        self._nets = {4: _v4_within(network), 6: None if network6 is None
                      else (int(network6.network_address), network6.prefixlen)}

    def within(self, version: int, dst: int, plen: int) -> bool:
        n = self._nets.get(version)
        if n is None:
            return False
        base, nlen = n
        bits = 32 if version == 4 else 128
        return plen >= nlen and (dst >> (bits - nlen) if nlen else 0) == (base >> (bits - nlen) if nlen else 0)

    def classify(self, m: RouteMsg, name_of: Callable[[int], str | None]) -> Route | ForeignRoute | None:
        """Ours (``Route``, with the protocol it carries), foreign, or none of our business."""
        if m.dst in self.exclude:
            return None
        if m.nhid is not None and self.nexthops is not None:
            # a route through a nexthop object: its gateway, device and onlink flag are the object's
            # (the route message carries them too only with net.ipv4.nexthop_compat_mode=1)
            nh = self.nexthops.get(m.nhid)
            if nh is not None and nh.single:
                m = RouteMsg(m.dst, nh.oif, nh.gateway, m.proto, m.kind, nh.onlink, m.nhid)
        dev = None if m.oif is None else (self.names.get(m.oif) or name_of(m.oif))
        if m.kind == RTN_UNICAST and m.gateway is not None and dev is not None:
            if m.proto == FLANNEL_PROTO:
                return Route(m.dst, m.gateway, dev, m.onlink, proto=FLANNEL_PROTO)
            if (m.proto == PROTO_BOOT and m.oif in self.overlay and m.onlink
                    and m.gateway == m.dst.network_address):
                return Route(m.dst, m.gateway, dev, True, proto=PROTO_BOOT)   # Go flannel's vxlan route
        return ForeignRoute(m.dst, dev, m.gateway, m.proto, RTN_KINDS.get(m.kind, str(m.kind)))


def ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def neigh_entry(m: NeighMsg, dev: str, *, deleted: bool = False) -> Neigh | Fdb | None:
    """A permanent neighbour / fdb entry of our device as a model value (others: None). A deletion
    notification reports the entry's state after removal (``NUD_FAILED``), so it is not checked."""
    if (not deleted and not m.state & NUD_PERMANENT) or m.ip is None or m.mac is None:
        return None
    if m.family == AF_BRIDGE:
        return None if m.mac == ZERO_MAC else Fdb(m.mac, m.ip, dev)
    return Neigh(m.ip, m.mac, dev)


class _ChunkSender:
    """The thread that sends ``Rtnl.send``'s chunks while the caller encodes the next ones.

    At most two chunks are outstanding (the one in the kernel and the next, encoded): memory stays
    bounded at 10 000 peers and the caller blocks -- releasing the GIL -- when it is ahead. The
    thread is the socket's only user until ``finish`` returns; sequence numbers are drawn by the
    caller alone. A failure of the socket stops the sending (the chunks after it are dropped, as a
    plain send would not have sent them) and is raised to the caller at its next ``put`` or at
    ``finish``.
    """

    def __init__(self, rt: Rtnl) -> None:
        self._rt = rt
        self._slots = threading.Semaphore(2)
        self._todo: queue.SimpleQueue[tuple[tuple[bytes, int], dict[int, object]] | None] = queue.SimpleQueue()
        self._failed: list[tuple[object, int, str]] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="netlink-send", daemon=True)
        self._thread.start()

    def put(self, chunk: tuple[bytes, int], pending: dict[int, object]) -> None:
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            raise self._error
        self._todo.put((chunk, pending))

    def _run(self) -> None:
        threadname.name_this_thread()
        while True:
            item = self._todo.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._rt._exchange_chunk(item[0], item[1], self._failed)
                except BaseException as e:   # handed to the caller, which raises it
                    self._error = e
            self._slots.release()

    def finish(self) -> list[tuple[object, int, str]]:
        """Wait until every chunk put has been answered; the refusals. :raises: what the thread met."""
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._failed


# ---- change notifications ------------------------------------------------------------------------

def _bpf_drop_own_echoes(own_portid: int = 0) -> bytes:
    """Classic BPF: drop the notifications our own writes cause -- every message carrying our
    request socket's port id (routes, neighbours, nexthop objects), RTM_NEWNEIGH (vxlan reports its fdb changes
    with port id 0) and RTM_NEWROUTE carrying our protocol -- and accept the rest."""
    type_lo = 4 if sys.byteorder == "little" else 5    # low byte of nlmsg_type (values < 256)
    pid_be = int.from_bytes(own_portid.to_bytes(4, sys.byteorder), "big")   # BPF loads words big-endian
    ld_w, ld_b, jeq, ret = 0x20, 0x30, 0x15, 0x06
    prog = [
        (ld_w, 0, 0, 12),                   # 0: A = nlmsg_pid
        (jeq, 6, 0, pid_be if own_portid else 0xFFFFFFFF),   # 1: ours -> 8 drop
        (ld_b, 0, 0, type_lo),              # 2: A = low byte of nlmsg_type
        (jeq, 4, 0, RTM_NEWNEIGH),          # 3: -> 8 drop
        (jeq, 0, 2, RTM_NEWROUTE),          # 4: -> 5, else -> 7 accept
        (ld_b, 0, 0, 16 + 5),               # 5: A = rtm_protocol
        (jeq, 1, 0, FLANNEL_PROTO),         # 6: -> 8 drop, else -> 7
        (ret, 0, 0, 0xFFFFFFFF),            # 7: accept
        (ret, 0, 0, 0),                     # 8: drop
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


class Monitor:
    """Route, neighbour, nexthop-object and link notifications; ``read`` returns raw datagrams (parsed by the
    reconcile loop, which owns the state they are compared with). ``None`` = notifications were
    lost (``ENOBUFS``): the caller must reconcile against a dump."""

    def __init__(self, own_portid: int = 0) -> None:
        """``own_portid``: the port id of the socket our writes go through (their echoes are dropped)."""
        groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
        self.sock, _ = nl.open_socket(groups, rcvbuf=4 << 20)
        try:
            self.sock.setsockopt(nl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_NEXTHOP)
        except OSError:
            pass   # no nexthop objects in this kernel (< 5.3): we program none either
        self.filtered = False
        prog = _bpf_drop_own_echoes(own_portid)
        code = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(code))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self.filtered = True
        except OSError:
            pass   # no socket filters: the loop skips our echoes itself (slower, same result)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        """Block until a datagram arrives. ``None``: lost notifications. Raises OSError once closed."""
        try:
            return self.sock.recv(1 << 16)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                return None
            raise

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()



def link_event(data: bytes, off: int, end: int) -> tuple[int, int, str | None]:
    """(ifindex, flags, name) of an RTM_NEWLINK/RTM_DELLINK message."""
    _family, _kind, index, flags, _change = _IFINFO.unpack_from(data, off + 16)
    name = _attrs(data, off + 32, end).get(IFLA_IFNAME)
    return index, flags, None if name is None else name.rstrip(b"\0").decode(errors="replace")

