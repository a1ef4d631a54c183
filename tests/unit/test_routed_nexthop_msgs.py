"""The nexthop-object messages of ``flannel.backends.routed.rtnl``: encoders checked field by field
against the kernel's layouts (linux/nexthop.h, linux/rtnetlink.h), parsers against messages built
here byte by byte, and the classifier reading a route through its nexthop."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

from flannel import nl
from flannel.backends.routed import model as rm
from flannel.backends.routed import rtnl


def tlvs(buf: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off + 4 <= len(buf):
        n, kind = struct.unpack_from("=HH", buf, off)
        out[kind] = buf[off + 4:off + n]
        off += (n + 3) & ~3
    return out


def wrap(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


R = rm.Route(N("10.5.2.0/24"), A("10.5.2.0"), "flannel.1", True)


def test_nexthop_set_new_is_exclusive_and_carries_our_protocol_and_onlink():
    kind, flags, body = rtnl.nexthop_set(R, 7, 0x0A050200, new=True)
    assert kind == 104
    assert flags & nl.NLM_F_CREATE and flags & nl.NLM_F_EXCL and not flags & nl.NLM_F_REPLACE
    family, scope, proto, resvd, nhflags = struct.unpack_from("=BBBBI", body)
    assert (family, scope, proto, resvd, nhflags) == (socket.AF_INET, 0, 152, 0, 0x4)
    at = tlvs(body[8:])
    assert at == {1: struct.pack("=I", 0x0A050200), 6: bytes([10, 5, 2, 0]), 5: struct.pack("=I", 7)}


def test_nexthop_set_owned_replaces_and_plain_gateway_has_no_onlink():
    r = rm.Route(N("10.6.2.0/24"), A("198.18.0.2"), "eth0")
    _kind, flags, body = rtnl.nexthop_set(r, 3, 99, new=False)
    assert flags & nl.NLM_F_CREATE and flags & nl.NLM_F_REPLACE and not flags & nl.NLM_F_EXCL
    assert struct.unpack_from("=BBBBI", body)[4] == 0
    assert tlvs(body[8:])[6] == A("198.18.0.2").packed


def test_route_through_a_nexthop_has_no_gateway_nor_device():
    kind, flags, body = rtnl.route_set_nh(R, 1234)
    assert kind == nl.RTM_NEWROUTE and flags & nl.NLM_F_REPLACE
    family, dlen, _s, _t, table, proto, scope, rtype, rflags = struct.unpack_from("=BBBBBBBBI", body)
    assert (family, dlen, table, proto, scope, rtype, rflags) == (socket.AF_INET, 24, 254, 152, 0, 1, 0)
    assert tlvs(body[12:]) == {rtnl.RTA_DST: bytes([10, 5, 2, 0]), rtnl.RTA_NH_ID: struct.pack("=I", 1234)}


def test_route_delete_by_nexthop_id_keeps_the_protocol_and_nexthop_delete_has_only_the_id():
    kind, _flags, body = rtnl.route_del_nh(rm.Route(R.dst, R.gateway, R.dev, True, proto=152), 55)
    assert kind == nl.RTM_DELROUTE and struct.unpack_from("=BBBBBBBBI", body)[5] == 152
    assert tlvs(body[12:]) == {rtnl.RTA_DST: bytes([10, 5, 2, 0]), rtnl.RTA_NH_ID: struct.pack("=I", 55)}
    kind, flags, body = rtnl.nexthop_del(55)
    assert kind == 105 and flags == nl.NLM_F_REQUEST
    assert body[:8] == bytes(8) and tlvs(body[8:]) == {1: struct.pack("=I", 55)}


def test_parse_nexthop_single_group_and_garbage():
    body = (struct.pack("=BBBBI", socket.AF_INET, 253, 152, 0, 0x4) + nl.attr(1, struct.pack("=I", 9))
            + nl.attr(5, struct.pack("=I", 4)) + nl.attr(6, bytes([10, 5, 9, 0])))
    m = rtnl.parse_nexthop(wrap(104, body), 0, 16 + len(body))
    assert m == rtnl.NexthopMsg(9, socket.AF_INET, 152, 4, A("10.5.9.0"), True, True)
    group = struct.pack("=BBBBI", 0, 0, 4, 0, 0) + nl.attr(1, struct.pack("=I", 10)) + nl.attr(2, bytes(8))
    g = rtnl.parse_nexthop(wrap(104, group), 0, 16 + len(group))
    assert g is not None and g.id == 10 and not g.single and g.gateway is None
    noid = struct.pack("=BBBBI", 2, 0, 152, 0, 0) + nl.attr(5, struct.pack("=I", 4))
    assert rtnl.parse_nexthop(wrap(104, noid), 0, 16 + len(noid)) is None
    assert rtnl.parse_nexthop(wrap(104, b"\0\0"), 0, 18) is None


def test_our_nexthop_message_parses_back_to_what_the_port_records():
    _k, _f, body = rtnl.nexthop_set(R, 7, 77, new=True)
    m = rtnl.parse_nexthop(wrap(104, body), 0, 16 + len(body))
    assert m == rtnl.NexthopMsg(77, socket.AF_INET, 152, 7, A("10.5.2.0"), True)


def test_parse_route_reports_the_nexthop_id_and_the_classifier_reads_the_route_through_it():
    _k, _f, body = rtnl.route_set_nh(R, 77)
    data = wrap(nl.RTM_NEWROUTE, body)
    msg = rtnl.parse_route(data, 0, len(data), lambda v, d, p: True)
    assert msg is not None and msg.nhid == 77 and msg.gateway is None and msg.oif is None
    table = {77: rtnl.NexthopMsg(77, socket.AF_INET, 152, 7, A("10.5.2.0"), True)}
    cl = rtnl.Classifier(network=N("10.5.0.0/16"), network6=None, exclude=(), names={7: "flannel.1"},
                         overlay={7: "flannel.1"}, nexthops=table)
    assert cl.classify(msg, lambda i: None) == R
    # an unknown id (or a group) gives no gateway: a foreign route, never ours to delete
    table.clear()
    assert isinstance(cl.classify(msg, lambda i: None), rm.ForeignRoute)
    table[77] = rtnl.NexthopMsg(77, 0, 152, None, None, False, single=False)
    assert isinstance(cl.classify(msg, lambda i: None), rm.ForeignRoute)


def test_switch_values(monkeypatch, caplog):
    from flannel.backends.routed.netlink import nexthops_wanted
    for raw, want in (("", True), ("1", True), ("true", True), ("0", False), ("off", False), ("No", False)):
        monkeypatch.setenv("FLANNEL_ROUTE_NEXTHOPS", raw)
        assert nexthops_wanted() is want, raw
    monkeypatch.setenv("FLANNEL_ROUTE_NEXTHOPS", "maybe")
    assert nexthops_wanted() is True and "FLANNEL_ROUTE_NEXTHOPS='maybe'" in caplog.text


def _random_routes(seed: int, n: int) -> list[rm.Route]:
    """IPv4 and IPv6 routes with random prefixes, gateways (of either family: an IPv6 gateway
    takes the generic encoder), devices and onlink flags."""
    import random
    from ipaddress import IPv6Address, ip_network

    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        if rnd.random() < 0.5:
            plen = rnd.randint(0, 32)
            dst = ip_network((rnd.getrandbits(32) >> (32 - plen) << (32 - plen) if plen else 0, plen))
            gw = A(rnd.getrandbits(32)) if rnd.random() < 0.8 else IPv6Address(rnd.getrandbits(128))
        else:
            plen = rnd.randint(0, 128)
            dst = ip_network((rnd.getrandbits(128) >> (128 - plen) << (128 - plen) if plen else 0, plen))
            gw = IPv6Address(rnd.getrandbits(128))
        out.append(rm.Route(dst, gw, rnd.choice(("flannel.1", "eth0", "flannel-v6.1")), rnd.random() < 0.5))
    return out


def test_whole_nexthop_messages_equal_header_plus_generic_body():
    """The encoders a reconcile sends (one struct for IPv4) say byte for byte what the generic
    bodies say, for random routes of both families, ids and devices."""
    import random

    rnd = random.Random(9)
    for r in _random_routes(1, 400):
        nhid, oif, seq = rnd.randint(1, 0xFFFF_FFFF), rnd.randint(1, 0x7FFF_FFFF), rnd.randint(1, 0xFFFF_FFFF)
        k, f, b = rtnl.nexthop_set(r, oif, nhid, new=True)
        assert rtnl.nexthop_new_msg((r, nhid), oif, seq) == nl.header(k, f, seq, b), r
        k, f, b = rtnl.nexthop_set(r, oif, nhid, new=False)
        assert rtnl.nexthop_replace_msg((r, nhid), oif, seq) == nl.header(k, f, seq, b), r
        k, f, b = rtnl.route_set_nh(r, nhid)
        assert rtnl.route_nh_msg((r, nhid), 0, seq) == nl.header(k, f, seq, b), r
