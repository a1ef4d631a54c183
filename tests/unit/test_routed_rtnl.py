"""The hand-packed netlink messages of the routed backends (``flannel.backends.routed.rtnl``):
the one-struct IPv4 encoders say exactly what the generic ones say, and the raw keys a full
reconcile matches dumped messages with are those of the messages we write."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from ipaddress import IPv6Address as A6
from ipaddress import IPv6Network as N6

import pytest

from flannel import nl
from flannel.backends.routed import model as rm
from flannel.backends.routed import rtnl

ROUTES = [rm.Route(N("10.5.2.0/24"), A("10.5.2.0"), "flannel.1", True),
          rm.Route(N("10.200.0.0/16"), A("198.18.0.7"), "eth0"),
          rm.Route(N("10.5.3.7/32"), A("198.19.255.254"), "eth0", True),
          rm.Route(N6("fd00:5:2::/64"), A6("fd00:5:2::"), "flannel-v6.1", True)]
NEIGHS = [rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:02", "flannel.1"),
          rm.Neigh(A("10.255.255.0"), "fe:dc:ba:98:76:54", "flannel.1"),
          rm.Neigh(A6("fd00:5:2::"), "02:00:00:00:00:02", "flannel-v6.1")]
FDBS = [rm.Fdb("02:00:00:00:00:02", A("198.18.0.2"), "flannel.1"),
        rm.Fdb("FE:DC:BA:98:76:54", A("198.19.1.2"), "flannel.1"),
        rm.Fdb("02:00:00:00:00:02", A6("fd00::2"), "flannel-v6.1")]


@pytest.mark.parametrize(("entries", "fast", "generic"), [
    (ROUTES, rtnl.route_set_msg, rtnl.route_set), (NEIGHS, rtnl.neigh_set_msg, rtnl.neigh_set),
    (FDBS, rtnl.fdb_set_msg, rtnl.fdb_set)])
def test_whole_message_encoders_equal_header_plus_generic_body(entries, fast, generic):
    for e in entries:
        for ifindex, seq in ((2, 1), (0x7FFF_FFF0, 0x7FFF_FFFF)):
            kind, flags, body = generic(e, ifindex)
            assert fast(e, ifindex, seq) == nl.header(kind, flags, seq, body), e


def test_the_raw_key_of_a_message_we_write_is_the_key_we_expect_for_its_entry():
    """What ``Netlink.dump`` looks up for a dumped message is what ``_expected`` computes for the
    entry; the message the kernel dumps carries more attributes (table, cache info) and the
    table in the header -- added here the way the kernel adds them."""
    for r in ROUTES:
        msg = bytearray(rtnl.route_set_msg(r, 9, 1))
        msg += nl.attr(rtnl.RTA_TABLE, nl.U32.pack(rtnl.RT_TABLE_MAIN)) + nl.attr(12, b"\0" * 16)   # + RTA_CACHEINFO
        msg[0:4] = nl.U32.pack(len(msg))
        assert rtnl.route_key(bytes(msg), 0, len(msg)) == rtnl.expected_route_key(r, 9), r
        kind, _flags, body = rtnl.route_del(r, 9)   # another protocol / type: not the same key
        assert rtnl.route_key(nl.header(kind, 0, 1, body), 0, 16 + len(body)) != rtnl.expected_route_key(r, 9)
    for e in (*NEIGHS, *FDBS):
        encode = rtnl.fdb_set_msg if isinstance(e, rm.Fdb) else rtnl.neigh_set_msg
        msg = bytearray(encode(e, 9, 1)) + nl.attr(3, b"\0" * 16)   # + NDA_CACHEINFO
        msg[0:4] = nl.U32.pack(len(msg))
        want = rtnl.expected_neigh_key(e, 9)
        if e.mac != e.mac.lower():
            assert rtnl.neigh_key(bytes(msg), 0, len(msg)) != want   # read back in lower case: parsed
        else:
            assert rtnl.neigh_key(bytes(msg), 0, len(msg)) == want, e


def test_ifindex_by_ioctl_on_the_socket_is_if_nametoindex():
    """``apply`` looks devices up through an ioctl on its open socket instead of glibc's
    ``if_nametoindex`` (which opens a socket per call): same answers, None for a missing name,
    for a name too long to be a device (glibc's rule) and for an empty one."""
    import socket

    rt = rtnl.Rtnl()
    try:
        names = [name for _, name in socket.if_nameindex()]
        assert names
        for name in names:
            assert rt.ifindex(name) == socket.if_nametoindex(name)
        assert rt.ifindex("nosuchdev0") is None
        assert rt.ifindex("x" * 16) is None and rt.ifindex("") is None and rt.ifindex("lo\0x") is None
    finally:
        rt.close()
