"""Raw rtnetlink on a socket: the message vocabulary (constants, structs, attributes), the socket
core every netlink client of the agent builds on (``Socket``: open, sequence numbers, one
send-and-collect loop for requests, batches and dumps), and a minimal client for links, addresses
and route lookups (``Client``). The routed backends' hot path (``flannel.backends.routed.rtnl``:
routes, neighbours, fdb in batches, and notifications) is built on the same ``Socket``.

Why not pyroute2: importing it costs ~22 MB of resident memory (half of an idle agent) and
~0.2 ms of Python per message. The agent needs a dozen fixed message shapes, which ``struct``
packs and parses directly. Everything runs in the calling thread's network namespace (the socket
is opened there).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33

NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_DUMP = 0x200, 0x400, 0x100, 0x300
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
IFF_UP = 0x1
RT_TABLE_MAIN = 254

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
NLA_F_NESTED = 0x8000

#: IFLA_VXLAN_* attribute numbers (linux/if_link.h) and how their payload reads
VXLAN_ATTRS: dict[int, tuple[str, str]] = {
    1: ("IFLA_VXLAN_ID", "u32"), 2: ("IFLA_VXLAN_GROUP", "ip"), 3: ("IFLA_VXLAN_LINK", "u32"),
    4: ("IFLA_VXLAN_LOCAL", "ip"), 5: ("IFLA_VXLAN_TTL", "u8"), 6: ("IFLA_VXLAN_TOS", "u8"),
    7: ("IFLA_VXLAN_LEARNING", "u8"), 13: ("IFLA_VXLAN_L2MISS", "u8"), 14: ("IFLA_VXLAN_L3MISS", "u8"),
    15: ("IFLA_VXLAN_PORT", "be16"), 16: ("IFLA_VXLAN_GROUP6", "ip"), 17: ("IFLA_VXLAN_LOCAL6", "ip"),
    23: ("IFLA_VXLAN_GBP", "flag"),
}
VXLAN_NUM = {name: num for num, (name, _) in VXLAN_ATTRS.items()}

HDR = struct.Struct("=IHHII")
IFINFO = struct.Struct("=BxHiII")
IFADDR = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BBHiHBB")
RTA = struct.Struct("=HH")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused a request (``errno`` set) or the socket failed."""


def header(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: the 16-byte header, then ``body``."""
    return HDR.pack(16 + len(body), kind, flags, seq, 0) + body


def error_code(data: bytes, off: int) -> int:
    """The (positive) errno an ``NLMSG_ERROR`` message at ``off`` carries; 0 = an ACK."""
    return -int(I32.unpack_from(data, off + 16)[0])


def attr(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return RTA.pack(n, kind) + data + b"\0" * (-n & 3)


def nested(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """TLV attributes from ``off`` to ``end`` (nested flag stripped)."""
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        n, kind = RTA.unpack_from(data, off)
        if n < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + n]
        off += (n + 3) & ~3
    return out


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, offset, end) of every netlink message in one datagram."""
    off = 0
    size = len(data)
    while off + 16 <= size:
        n, kind, flags, seq, _pid = HDR.unpack_from(data, off)
        if n < 16:
            break
        yield kind, flags, seq, off, off + n
        off += (n + 3) & ~3


def error_text(data: bytes, off: int, end: int, flags: int, capped: bool) -> str:
    """The kernel's extended-ack message (``NLMSGERR_ATTR_MSG``), if it sent one. The TLVs follow
    the echoed request: its header only with ``NETLINK_CAP_ACK``, the whole request without."""
    if not flags & NLM_F_ACK_TLVS or off + 36 > end:
        return ""
    inner = 16 if capped else (HDR.unpack_from(data, off + 20)[0] + 3) & ~3
    msg = attrs(data, off + 20 + inner, end).get(NLMSGERR_ATTR_MSG)
    return msg.rstrip(b"\0").decode(errors="replace") if msg else ""


def open_socket(groups: int = 0, rcvbuf: int = 1 << 20) -> tuple[socket.socket, bool]:
    """A bound NETLINK_ROUTE socket, and whether its acks are capped (``NETLINK_CAP_ACK``)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    capped = False
    for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
        try:
            s.setsockopt(SOL_NETLINK, opt, 1)
            capped = capped or opt == NETLINK_CAP_ACK
        except OSError:
            pass   # older kernels: no capped/extended acks or strict dump filters (callers filter anyway)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((0, groups))
    return s, capped


def ip_of(raw: bytes) -> IPv4Address | IPv6Address:
    return IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)


@dataclass(frozen=True)
class LinkMsg:
    index: int
    name: str
    flags: int
    mtu: int
    mac: str
    kind: str
    data: dict[str, Any]          # IFLA_VXLAN_* by name, for vxlan links


@dataclass(frozen=True)
class AddrMsg:
    index: int
    family: int
    prefixlen: int
    address: IPv4Address | IPv6Address
    flags: int


class Socket:
    """A NETLINK_ROUTE request socket: sequence numbers and one send-and-collect loop
    (``exchange``) under requests (``Client.request``), dumps (``dump``) and batches of many
    messages per send (``flannel.backends.routed.rtnl.Rtnl.send``).

    ``failure`` is the exception a failing socket or a refused dump raises; a subclass picks its
    own (the routed port distinguishes a failed socket from a refused entry)."""

    failure: type[NetlinkError] = NetlinkError

    def __init__(self) -> None:
        self.sock, self.capped = open_socket()
        self.sock.settimeout(30.0)
        self._seq = int.from_bytes(os.urandom(3), "big")

    def close(self) -> None:
        self.sock.close()

    @property
    def portid(self) -> int:
        return int(self.sock.getsockname()[0])

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def error_text(self, data: bytes, off: int, end: int, flags: int) -> str:
        """The kernel's message for the ``NLMSG_ERROR`` at ``off``, else the errno's text."""
        return error_text(data, off, end, flags, self.capped) or os.strerror(error_code(data, off))

    def exchange(self, payload: bytes, last: int,
                 bufsize: int = 1 << 16) -> Iterator[tuple[bytes, int, int, int, int, int]]:
        """Send ``payload`` (one or more messages); yield ``(data, type, flags, seq, offset, end)``
        of every message received until the one that ends sequence number ``last`` (its ACK or
        error, or ``NLMSG_DONE`` of a dump), which is yielded too. Replies to other sequence
        numbers are yielded as well: the caller picks what is its own.

        :raises NetlinkError: (``failure``) the socket failed.
        """
        try:
            self.sock.send(payload)
        except OSError as e:
            raise self.failure(e.errno or errno.EIO, f"netlink: {e}") from e
        while True:
            try:
                data = self.sock.recv(bufsize)
            except OSError as e:
                raise self.failure(e.errno or errno.EIO, f"netlink: {e}") from e
            for kind, flags, seq, off, end in messages(data):
                yield data, kind, flags, seq, off, end
                if seq == last and kind in (NLMSG_ERROR, NLMSG_DONE):
                    return

    def dump(self, kind: int, body: bytes) -> Iterator[tuple[bytes, int, int, int]]:
        """Every message of one dump: ``(data, type, offset, end)``.

        :raises NetlinkError: (``failure``) the socket failed or the kernel refused the dump.
        """
        seq = self.next_seq()
        for data, mkind, _flags, mseq, off, end in self.exchange(header(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body),
                                                                 seq, 1 << 20):
            if mseq != seq or mkind == NLMSG_DONE:
                continue
            if mkind == NLMSG_ERROR:
                code = error_code(data, off)
                raise self.failure(code, f"netlink dump: {os.strerror(code)}")
            yield data, mkind, off, end


class Client(Socket):
    """Simple requests (each acknowledged) and dumps: links, addresses, route lookups."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes) -> list[tuple[bytes, int, int, int]]:
        """Send one request; return its reply messages ``(data, type, off, end)`` (none for a
        plain change). :raises NetlinkError: with the kernel's errno and message."""
        seq = self.next_seq()
        out: list[tuple[bytes, int, int, int]] = []
        for data, mkind, mflags, mseq, off, end in self.exchange(
                header(kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, body), seq):
            if mseq != seq:
                continue
            if mkind == NLMSG_ERROR:
                code = error_code(data, off)
                if code:
                    raise NetlinkError(code, self.error_text(data, off, end, mflags))
            elif mkind != NLMSG_DONE:
                out.append((data, mkind, off, end))
        return out

    # ---- links ----------------------------------------------------------------------------------

    def links(self) -> list[LinkMsg]:
        return [parse_link(d, o, e) for d, k, o, e in self.dump(RTM_GETLINK, IFINFO.pack(0, 0, 0, 0, 0))
                if k == RTM_NEWLINK]

    def link(self, index: int) -> LinkMsg | None:
        try:
            replies = self.request(RTM_GETLINK, 0, IFINFO.pack(0, 0, index, 0, 0))
        except NetlinkError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return next((parse_link(d, o, e) for d, k, o, e in replies if k == RTM_NEWLINK), None)

    def set_link(self, index: int, *, up: bool | None = None, mtu: int | None = None,
                 linkinfo: bytes = b"") -> None:
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        body = IFINFO.pack(0, 0, index, flags, change)
        if mtu is not None:
            body += attr(IFLA_MTU, U32.pack(mtu))
        self.request(RTM_NEWLINK, 0, body + linkinfo)

    def add_link(self, name: str, kind: str, data: bytes, *, mtu: int | None = None, mac: str | None = None) -> None:
        body = IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu is not None:
            body += attr(IFLA_MTU, U32.pack(mtu))
        if mac is not None:
            body += attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        body += nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, kind.encode()), nested(IFLA_INFO_DATA, data))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, IFINFO.pack(0, 0, index, 0, 0))

    # ---- addresses ------------------------------------------------------------------------------

    def addrs(self, family: int = 0, index: int | None = None) -> list[AddrMsg]:
        out = []
        for d, k, o, e in self.dump(RTM_GETADDR, IFADDR.pack(family, 0, 0, 0, 0)):
            if k != RTM_NEWADDR:
                continue
            fam, plen, flags, _scope, idx = IFADDR.unpack_from(d, o + 16)
            if index is not None and idx != index:
                continue
            at = attrs(d, o + 24, e)
            raw = at.get(IFA_LOCAL) or at.get(IFA_ADDRESS)
            if not raw:
                continue
            fl = at.get(IFA_FLAGS)
            out.append(AddrMsg(idx, fam, plen, ip_of(raw), U32.unpack(fl)[0] if fl else flags))
        return out

    def _addr(self, kind: int, flags: int, index: int, addr: IPv4Address | IPv6Address, plen: int) -> None:
        fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        body = IFADDR.pack(fam, plen, 0, 0, index) + attr(IFA_LOCAL, addr.packed) + attr(IFA_ADDRESS, addr.packed)
        self.request(kind, flags, body)

    def add_addr(self, index: int, addr: IPv4Address | IPv6Address, plen: int) -> None:
        self._addr(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, addr, plen)

    def del_addr(self, index: int, addr: IPv4Address | IPv6Address, plen: int) -> None:
        self._addr(RTM_DELADDR, 0, index, addr, plen)

    # ---- routes (lookups only; the backends write routes through their own batches) ---------

    def default_route_oif(self, family: int) -> int | None:
        for d, k, o, e in self.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)):
            if k != RTM_NEWROUTE:
                continue
            _f, dst_len, _s, _t, table, _p, _sc, rtype, _fl = RTMSG.unpack_from(d, o + 16)
            at = attrs(d, o + 28, e)
            tid = at.get(RTA_TABLE)
            if (U32.unpack(tid)[0] if tid else table) == RT_TABLE_MAIN and dst_len == 0 and rtype == 1:
                oif = at.get(RTA_OIF)
                return U32.unpack(oif)[0] if oif else 0
        return None

    def route_get(self, dst: IPv4Address | IPv6Address) -> tuple[int, IPv4Address | IPv6Address | None]:
        """The kernel's route lookup for ``dst``: (output interface index, preferred source)."""
        fam = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
        body = RTMSG.pack(fam, dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, dst.packed)
        for d, k, o, e in self.request(RTM_GETROUTE, 0, body):
            if k == RTM_NEWROUTE:
                at = attrs(d, o + 28, e)
                oif, src = at.get(RTA_OIF), at.get(RTA_PREFSRC)
                return (U32.unpack(oif)[0] if oif else 0), (ip_of(src) if src else None)
        raise NetlinkError(errno.ENETUNREACH, f"no route to {dst}")


def parse_link(data: bytes, off: int, end: int) -> LinkMsg:
    _family, _type, index, flags, _change = IFINFO.unpack_from(data, off + 16)
    at = attrs(data, off + 32, end)
    name = at.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace")
    mtu = U32.unpack(at[IFLA_MTU])[0] if IFLA_MTU in at else 0
    mac = at.get(IFLA_ADDRESS, b"").hex(":")
    kind, data_attrs = "", {}
    info = at.get(IFLA_LINKINFO)
    if info is not None:
        li = attrs(info, 0, len(info))
        kind = li.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode(errors="replace")
        raw = li.get(IFLA_INFO_DATA)
        if kind == "vxlan" and raw is not None:
            data_attrs = _vxlan_data(attrs(raw, 0, len(raw)))
    return LinkMsg(index, name, flags, mtu, mac, kind, data_attrs)


def _vxlan_data(at: dict[int, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for num, raw in at.items():
        spec = VXLAN_ATTRS.get(num)
        if spec is None:
            continue
        name, how = spec
        if how == "u32" and len(raw) >= 4:
            out[name] = U32.unpack_from(raw)[0]
        elif how == "u8" and raw:
            out[name] = raw[0]
        elif how == "be16" and len(raw) >= 2:
            out[name] = int.from_bytes(raw[:2], "big")
        elif how == "ip" and len(raw) in (4, 16):
            out[name] = str(ip_address(raw))
        elif how == "flag":
            out[name] = True
    return out


def vxlan_data(*, vni: int, local: IPv4Address | IPv6Address, link: int, learning: bool, port: int = 0,
               gbp: bool = False) -> bytes:
    """IFLA_INFO_DATA of a vxlan link as flannel creates it (ttl 0, tos 0; port 0 = not sent)."""
    parts = [attr(1, U32.pack(vni)), attr(17 if local.version == 6 else 4, local.packed), attr(3, U32.pack(link)),
             attr(7, bytes([int(learning)])), attr(5, b"\0"), attr(6, b"\0")]
    if port:
        parts.append(attr(15, port.to_bytes(2, "big")))
    if gbp:
        parts.append(attr(23, b""))
    return b"".join(parts)
