"""vxlan pure logic: options, BackendData, lease → kernel entries (as a table), the reconcile plan."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from ipaddress import IPv6Address as A6
from ipaddress import IPv6Network as N6

import pytest

from flannel import errors
from flannel.backends.routed import model as rm
from flannel.backends.vxlan import network as vx
from flannel.lease import Lease, LeaseAttrs

CTX = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0", local_nets=(N("198.18.0.0/24"),))
CTX_DR = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0", local_nets=(N("198.18.0.0/24"),),
                    direct_routing=True)
MAC2 = "02:00:00:00:00:02"


def lease(subnet: str, ip: str, typ: str = "vxlan",
          data: str | None = '{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}') -> Lease:
    return Lease(N(subnet), LeaseAttrs(public_ip=A(ip), backend_type=typ, backend_data=data))


# ---- options -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, expected", [
    ({"Type": "vxlan"}, vx.VXLANOptions()),
    ({"type": "vxlan", "vni": 7, "port": 4789, "gbp": True, "learning": True, "mtu": 1400, "directrouting": True},
     vx.VXLANOptions(vni=7, port=4789, gbp=True, learning=True, mtu=1400, direct_routing=True)),
    ({"Type": "vxlan", "VNI": 0}, vx.VXLANOptions(vni=0)),
    ({"Type": "vxlan", "DirectRouting": False, "Unknown": 1}, vx.VXLANOptions()),
])
def test_parse_options(backend, expected):
    assert vx.parse_options(backend) == expected


@pytest.mark.parametrize("backend, name", [
    ({"VNI": -1}, "VNI"), ({"VNI": 1 << 24}, "VNI"), ({"VNI": "1"}, "VNI"), ({"VNI": True}, "VNI"),
    ({"Port": 70000}, "Port"), ({"GBP": "yes"}, "GBP"), ({"Learning": 1}, "Learning"),
    ({"MTU": 1.5}, "MTU"), ({"DirectRouting": "true"}, "DirectRouting"),
])
def test_bad_option_names_the_option(backend, name):
    with pytest.raises(errors.ConfigError, match=rf"option {name}\b"):
        vx.parse_options({"Type": "vxlan", **backend})


@pytest.mark.parametrize("opt_mtu, ext, v6, expected", [(0, 1500, False, 1450), (1400, 1500, False, 1350),
                                                         (0, 1500, True, 1430), (0, 9000, False, 8950)])
def test_device_mtu(opt_mtu, ext, v6, expected):
    assert vx.device_mtu(vx.VXLANOptions(mtu=opt_mtu), ext, ipv6_underlay=v6) == expected


def test_device_mtu_too_small_is_config_error():
    with pytest.raises(errors.ConfigError, match="MTU"):
        vx.device_mtu(vx.VXLANOptions(mtu=100), 1500)


# ---- MACs and BackendData ------------------------------------------------------------------

@pytest.mark.parametrize("text, mac", [("02:AA:bb:00:00:01", "02:aa:bb:00:00:01"),
                                       ("02-aa-bb-00-00-01", "02:aa:bb:00:00:01"),
                                       ("02aa.bb00.0001", "02:aa:bb:00:00:01")])
def test_normalize_mac(text, mac):
    assert vx.normalize_mac(text) == mac


@pytest.mark.parametrize("text", ["", "02:aa:bb:00:00", "02:aa:bb:00:00:0g", "02aa.bb00", "0:1:2:3:4:5"])
def test_normalize_mac_rejects(text):
    with pytest.raises(ValueError):
        vx.normalize_mac(text)


def test_random_mac_is_unicast_and_local():
    assert vx.random_mac(b"\xff\x01\x02\x03\x04\x05") == "fe:01:02:03:04:05"
    assert vx.random_mac(b"\x00" * 6) == "02:00:00:00:00:00"


def test_backend_data_round_trip_is_flannels_text():
    text = vx.encode_backend_data(1, "02:aa:00:00:00:01")
    assert text == '{"VNI":1,"VtepMAC":"02:aa:00:00:00:01"}'
    assert vx.parse_backend_data(text) == vx.VtepData(1, "02:aa:00:00:00:01")


@pytest.mark.parametrize("data", [None, "not json", "[]", '{"VNI":1}', '{"VtepMAC":5}', '{"VtepMAC":"zz"}',
                                  '{"VtepMAC":"00:00:00:00:00:00"}', '{"VtepMAC":"03:00:00:00:00:01"}'])
def test_bad_backend_data(data):
    with pytest.raises(errors.BadLeaseRecord):
        vx.parse_backend_data(data)


# ---- lease → entries -----------------------------------------------------------------------

ROUTE = rm.Route(N("10.5.2.0/24"), A("10.5.2.0"), "flannel.1", onlink=True)
NEIGH = rm.Neigh(A("10.5.2.0"), MAC2, "flannel.1")
FDB = rm.Fdb(MAC2, A("198.18.0.2"), "flannel.1")


@pytest.mark.parametrize("name, the_lease, ctx, expected", [
    ("vxlan", lease("10.5.2.0/24", "198.18.0.2"), CTX,
     rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB}))),
    ("vxlan, MAC in other notation", lease("10.5.2.0/24", "198.18.0.2", data='{"VtepMAC":"02-00-00-00-00-02"}'), CTX,
     rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB}))),
    ("DirectRouting, peer on link", lease("10.5.2.0/24", "198.18.0.2"), CTX_DR,
     rm.KernelState(routes=frozenset({rm.Route(N("10.5.2.0/24"), A("198.18.0.2"), "eth0")}))),
    ("DirectRouting, peer elsewhere", lease("10.5.2.0/24", "198.19.7.2"), CTX_DR,
     rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({rm.Fdb(MAC2, A("198.19.7.2"), "flannel.1")}))),
])
def test_vxlan_entries(name, the_lease, ctx, expected):
    assert vx.vxlan_entries(the_lease, ctx) == expected


@pytest.mark.parametrize("the_lease, exc, match", [
    (lease("10.5.2.0/24", "198.18.0.2", typ="host-gw", data=None), rm.Skip, "ignoring non-vxlan"),
    (lease("10.5.2.0/24", "198.18.0.2", typ="", data=None), rm.Skip, "ignoring non-vxlan"),
    (lease("10.5.2.0/24", "198.18.0.2", data='{"VNI":1}'), errors.BadLeaseRecord, "VtepMAC"),
    (lease("10.5.2.0/24", "198.18.0.2", data=None), errors.BadLeaseRecord, "no BackendData"),
])
def test_vxlan_entries_refused(the_lease, exc, match):
    with pytest.raises(exc, match=match):
        vx.vxlan_entries(the_lease, CTX)


def test_desired_state_skips_bad_leases_without_affecting_others():
    good = lease("10.5.2.0/24", "198.18.0.2")
    bad = lease("10.5.3.0/24", "198.18.0.3", data="{")
    other = lease("10.5.4.0/24", "198.18.0.4", typ="udp", data=None)
    d = rm.desired_state([good, bad, other], CTX, vx.vxlan_entries)
    assert d.state == vx.vxlan_entries(good, CTX)
    assert [lz for lz, _ in d.skipped] == [bad, other]


# ---- plan ----------------------------------------------------------------------------------

def test_plan_keeps_correct_entries_and_deletes_stale():
    stale = rm.KernelState(frozenset({rm.Route(N("10.5.9.0/24"), A("10.5.9.0"), "flannel.1", True)}),
                           frozenset({rm.Neigh(A("10.5.9.0"), "02:00:00:00:00:09", "flannel.1")}),
                           frozenset({rm.Fdb("02:00:00:00:00:09", A("198.18.0.9"), "flannel.1")}))
    desired = rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB}))
    p = rm.plan(desired, desired.union(stale))
    assert p.set_routes == p.set_neighs == p.set_fdbs == ()
    assert (set(p.del_routes), set(p.del_neighs), set(p.del_fdbs)) == (stale.routes, stale.neighs, stale.fdbs)
    assert rm.plan(desired, desired).empty


def test_plan_changed_mac_is_a_replace_not_a_delete():
    old = rm.KernelState(frozenset({ROUTE}), frozenset({rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:99", "flannel.1")}),
                         frozenset({rm.Fdb("02:00:00:00:00:99", A("198.18.0.2"), "flannel.1")}))
    desired = rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB}))
    p = rm.plan(desired, old)
    assert p.del_routes == () and p.del_neighs == ()          # neighbour G is replaced in place
    assert p.set_neighs == (NEIGH,) and p.set_fdbs == (FDB,)
    assert p.del_fdbs == (rm.Fdb("02:00:00:00:00:99", A("198.18.0.2"), "flannel.1"),)


def test_plan_direct_route_switch_replaces_route():
    direct = rm.Route(N("10.5.2.0/24"), A("198.18.0.2"), "eth0")
    p = rm.plan(rm.KernelState(routes=frozenset({direct})),
                rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB})))
    assert p.set_routes == (direct,) and p.del_routes == ()
    assert p.del_neighs == (NEIGH,) and p.del_fdbs == (FDB,)


# ---- dual stack ----------------------------------------------------------------------------

CTX_DS = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0", dev6="flannel-v6.1",
                    local_nets=(N("198.18.0.0/24"),), local_nets6=(N6("2001:2::/64"),))
CTX_V6 = rm.Context(backend_type="vxlan", dev=None, ext_dev="eth0", dev6="flannel-v6.1")
MAC6 = "02:00:00:00:06:02"
ROUTE6 = rm.Route(N6("fd00:10:5:2::/64"), A6("fd00:10:5:2::"), "flannel-v6.1", onlink=True)
NEIGH6 = rm.Neigh(A6("fd00:10:5:2::"), MAC6, "flannel-v6.1")
FDB6 = rm.Fdb(MAC6, A6("2001:2::2"), "flannel-v6.1")


def ds(v6data: str | None = '{"VNI":1,"VtepMAC":"02:00:00:00:06:02"}', v4: bool = True) -> Lease:
    return Lease(N("10.5.2.0/24") if v4 else None,
                 LeaseAttrs(public_ip=A("198.18.0.2"), public_ipv6=A6("2001:2::2"), backend_type="vxlan",
                            backend_data='{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}' if v4 else None,
                            backend_v6_data=v6data),
                 ipv6_subnet=N6("fd00:10:5:2::/64"))


@pytest.mark.parametrize("name, the_lease, ctx, expected", [
    ("dual-stack lease, dual-stack node", ds(), CTX_DS,
     rm.KernelState(frozenset({ROUTE, ROUTE6}), frozenset({NEIGH, NEIGH6}), frozenset({FDB, FDB6}))),
    ("dual-stack lease, IPv4-only node (flannel crashed, §14.13)", ds(), CTX,
     rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB}))),
    ("IPv4-only lease, dual-stack node", lease("10.5.2.0/24", "198.18.0.2"), CTX_DS,
     rm.KernelState(frozenset({ROUTE}), frozenset({NEIGH}), frozenset({FDB}))),
    ("IPv6-only node", ds(v4=False), CTX_V6,
     rm.KernelState(frozenset({ROUTE6}), frozenset({NEIGH6}), frozenset({FDB6}))),
    ("DirectRouting over IPv6", ds(v4=False), rm.Context(backend_type="vxlan", dev=None, ext_dev="eth0",
                                                        dev6="flannel-v6.1", local_nets6=(N6("2001:2::/64"),),
                                                        direct_routing=True),
     rm.KernelState(routes=frozenset({rm.Route(N6("fd00:10:5:2::/64"), A6("2001:2::2"), "eth0")}))),
])
def test_vxlan_entries_dual_stack(name, the_lease, ctx, expected):
    assert vx.vxlan_entries(the_lease, ctx) == expected


def test_bad_v6_backend_data_skips_the_lease():
    with pytest.raises(errors.BadLeaseRecord):
        vx.vxlan_entries(ds(v6data='{"VNI":1}'), CTX_DS)


def test_ipv4_lease_at_ipv6_only_node_is_skipped():
    with pytest.raises(rm.Skip, match="no subnet of an address family"):
        vx.vxlan_entries(lease("10.5.2.0/24", "198.18.0.2"), CTX_V6)


def test_plan_handles_mixed_families():
    """IPv4 and IPv6 entries in one plan (they do not compare with each other: no sorting)."""
    desired = rm.KernelState(frozenset({ROUTE, ROUTE6}), frozenset({NEIGH, NEIGH6}), frozenset({FDB, FDB6}))
    p = rm.plan(desired, rm.EMPTY)
    assert set(p.set_routes) == {ROUTE, ROUTE6} and set(p.set_fdbs) == {FDB, FDB6}
    assert set(p.set_neighs) == {NEIGH, NEIGH6} and len(p) == 6


def test_backend_data_nested_too_deep_or_huge_is_a_bad_record_not_a_crash():
    for text in ("[" * 5000 + "]" * 5000, '{"VtepMAC":' * 3000 + "1" + "}" * 3000,
                 '{"VNI":1,"VtepMAC":"02:aa:00:00:00:01","x":"' + "y" * 1_000_000 + '"}'):
        try:
            vx.parse_backend_data(text)
        except errors.BadLeaseRecord:
            continue
        # the 1 MB one is valid JSON with a good MAC: accepted, and that is fine
        assert text.startswith('{"VNI":1,')


@pytest.mark.parametrize("mac", ["02:aa:00:00:00:01", "0a:ff:10:20:30:40", "01:00:00:00:00:00", "00:00:00:00:00:00"])
@pytest.mark.parametrize("vni", [0, 1, 4096])
def test_backend_data_fast_path_agrees_with_the_json_path(mac, vni):
    text = vx.encode_backend_data(vni, mac)
    spaced = text.replace(",", ", ")              # not canonical: takes the JSON path
    results = []
    for t in (text, spaced):
        try:
            results.append(vx.parse_backend_data(t))
        except errors.BadLeaseRecord as e:
            results.append(type(e))
    assert results[0] == results[1]


@pytest.mark.parametrize("data", [None, "not json", "[]", '{"VNI":1}', '{"VtepMAC":5}', '{"VtepMAC":"zz"}',
                                  '{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}', '{"VNI":1,"VtepMAC":"03:00:00:00:00:01"}',
                                  '{"VNI":1,"VtepMAC":"02:aa:00:00:00:01"}', '{"VNI":7,"VtepMAC":"0a:ff:10:20:30:40"}',
                                  '{"VNI":1,"VtepMAC":"0A:FF:10:20:30:40"}', '{"vtepmac":"02-aa-00-00-00-01"}'])
def test_the_translations_mac_is_parse_backend_datas(data):
    """``vtep_mac`` (what a lease's translation reads, no ``VtepData`` built) says what
    ``parse_backend_data`` says: the same MAC, or the same kind of refusal."""
    try:
        want: object = vx.parse_backend_data(data).mac
    except errors.BadLeaseRecord as e:
        want = (type(e), str(e))
    try:
        got: object = vx.vtep_mac(data)
    except errors.BadLeaseRecord as e:
        got = (type(e), str(e))
    assert got == want


# ---- the index's flat twin of the translation ----------------------------------------------------

def _random_lease(draw):  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    i = draw(st.integers(1, 6))
    v4 = draw(st.booleans())
    v6 = draw(st.booleans())
    mac = draw(st.sampled_from(["02:00:00:00:00:0a", "02:00:00:00:00:0b", "0A:FF:10:20:30:40"]))
    data = draw(st.sampled_from([None, "{", '{"VNI":1}', '{"VtepMAC":"01:00:00:00:00:01"}',
                                 f'{{"VNI":1,"VtepMAC":"{mac}"}}', f'{{"VNI":4096,"VtepMAC":"{mac}"}}',
                                 f'{{"vtepmac":"{mac}"}}', f'{{"VNI":1,"VtepMAC":"{mac}"}}']))
    data6 = draw(st.sampled_from([None, f'{{"VNI":1,"VtepMAC":"{mac}"}}', '{"VNI":1}']))
    near = draw(st.booleans())   # the peer on our L2 network (DirectRouting applies)
    return Lease(N(f"10.5.{i}.0/24") if v4 else None,
                 LeaseAttrs(public_ip=A(f"198.18.{0 if near else 7}.{i + 1}"),
                            public_ipv6=A6(f"fd00:{0 if near else 7}::{i + 1}") if draw(st.booleans()) else None,
                            backend_type=draw(st.sampled_from(["vxlan", "vxlan", "host-gw", ""])),
                            backend_data=data, backend_v6_data=data6),
                 ipv6_subnet=N6(f"fd00:5:{i:x}::/64") if v6 else None)


def _outcome(f, lease, ctx):  # type: ignore[no-untyped-def]
    try:
        return f(lease, ctx)
    except (rm.Skip, errors.BadLeaseRecord) as e:
        return (type(e), str(e))


def test_the_flat_twin_says_what_the_translation_says():
    """``vxlan_flat`` (what the index translates with) against ``vxlan_entries`` for random
    leases -- IPv4, IPv6, dual stack, DirectRouting on and off, bad BackendData, other backend
    types, nodes running either family or both: the same entries, each once, routes first, or the
    same refusal; and the index keeps exactly what the general flattening gives."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ctxs = [rm.Context(backend_type="vxlan", dev=d4, ext_dev="eth0", local_nets=(N("198.18.0.0/24"),),
                       direct_routing=dr, dev6=d6, local_nets6=(N6("fd00::/64"),))
            for d4 in ("flannel.1", None) for d6 in ("flannel-v6.1", None) for dr in (False, True) if d4 or d6]
    general = rm.flat_translation(lambda lz, c: vx.vxlan_entries(lz, c))   # not registered: the general path
    assert rm.flat_translation(vx.vxlan_entries) is vx.vxlan_flat

    @settings(max_examples=400, deadline=None)
    @given(lease=st.composite(_random_lease)(), ctx=st.sampled_from(ctxs))
    def check(lease: Lease, ctx: rm.Context) -> None:
        st_ = _outcome(vx.vxlan_entries, lease, ctx)
        flat = _outcome(vx.vxlan_flat, lease, ctx)
        if not isinstance(st_, rm.KernelState):
            assert flat == st_ == _outcome(general, lease, ctx)
            return
        routes, entries = flat
        assert set(routes) == st_.routes and len(routes) == len(st_.routes)
        assert entries[:len(routes)] == routes and len(set(entries)) == len(entries) == len(st_)
        assert set(entries) == st_.routes | st_.neighs | st_.fdbs
        g_routes, g_entries = general(lease, ctx)
        assert set(g_routes) == set(routes) and set(g_entries) == set(entries)

    check()


def test_entries_hash_by_their_addresses_integers_and_stay_consistent_with_equality():
    """Route/Neigh/Fdb hash from the addresses' integers (not ``ipaddress``'s hashes): entries built
    separately from equal values are equal, hash alike and find each other in sets -- a route's
    protocol takes no part in either -- while an IPv4 and an IPv6 entry with the same integers
    stay different."""
    import random

    rnd = random.Random(5)
    for _ in range(300):
        v6 = rnd.random() < 0.5
        bits, net_t, addr_t = (128, N6, A6) if v6 else (32, N, A)
        plen = rnd.randint(0, bits)
        raw = rnd.getrandbits(bits) >> (bits - plen) << (bits - plen) if plen else 0
        gw = rnd.getrandbits(bits)
        mac = ":".join(f"{rnd.getrandbits(8):02x}" for _ in range(6))
        onlink = rnd.random() < 0.5
        r1 = rm.Route(net_t((raw, plen)), addr_t(gw), "flannel.1", onlink)
        r2 = rm.Route(net_t(f"{net_t((raw, plen))}"), addr_t(str(addr_t(gw))), "flannel.1", onlink,
                      proto=rm.PROTO_BOOT)
        assert r1 == r2 and hash(r1) == hash(r2) and r2 in {r1} and r2.proto == rm.PROTO_BOOT
        assert rm.Route(r1.dst, r1.gateway, "flannel.1", not onlink) != r1
        n1, n2 = rm.Neigh(addr_t(gw), mac, "flannel.1"), rm.Neigh(addr_t(str(addr_t(gw))), mac, "flannel.1")
        f1, f2 = rm.Fdb(mac, addr_t(gw), "flannel.1"), rm.Fdb(mac, addr_t(str(addr_t(gw))), "flannel.1")
        assert n1 == n2 and hash(n1) == hash(n2) and f1 == f2 and hash(f1) == hash(f2)
        assert frozenset({n1, f1}) == frozenset({n2, f2})
    assert rm.Neigh(A(1), "02:00:00:00:00:01", "d") != rm.Neigh(A6(1), "02:00:00:00:00:01", "d")
    assert rm.Route(N("0.0.0.1/32"), A(1), "d") != rm.Route(N6("::1/128"), A6(1), "d")
