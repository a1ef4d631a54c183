"""IPv4 peer routes through nexthop objects (issue 9: the kernel's route insert is O(N) when N
routes have N gateways on one device; through nexthop objects it is O(1)). Real kernel objects in
a fresh namespace per test, checked with ``ip -j route`` / ``ip -j nexthop``.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from typing import Any

import pytest

from flannel.backends.hostgw import HostGWBackend
from flannel.backends.vxlan import VXLANBackend
from flannel.lab.netns import NetNS
from flannel.lease import Lease, LeaseAttrs
from tests.support import UNDERLAY_LOCAL as LOCAL
from tests.support import Agent, FakeLeases, added, ext_of, in_ns, make_ns, removed, routes, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

CFG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
CFG_HG = '{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}'


def vx(i: int) -> Lease:
    data = json.dumps({"VNI": 1, "VtepMAC": f"02:00:00:00:00:{i:02x}"}, separators=(",", ":"))
    return Lease(N(f"10.5.{i}.0/24"), LeaseAttrs(public_ip=A(f"198.18.0.{i}"), backend_type="vxlan",
                                                 backend_data=data))


def hg(i: int, ip: str | None = None) -> Lease:
    return Lease(N(f"10.6.{i}.0/24"), LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), backend_type="host-gw"))


def vx_routes(*ls: Lease) -> set[str]:
    return {f"{lz.subnet} via {lz.subnet.network_address} dev flannel.1 onlink" for lz in ls}  # type: ignore[union-attr]


def route_json(ns: NetNS) -> dict[str, dict[str, Any]]:
    """Main-table routes by destination, as ``ip -j route`` reports them."""
    return {r["dst"]: r for r in json.loads(ns.ip("-j", "route", "show", "table", "main") or "[]")}


def nexthops(ns: NetNS) -> dict[int, dict[str, Any]]:
    """Nexthop objects by id, as ``ip -j nexthop`` reports them."""
    return {int(n["id"]): n for n in json.loads(ns.ip("-j", "nexthop", "show") or "[]")}


def nh_view(ns: NetNS) -> dict[str, tuple[int, str, str, bool, str]]:
    """For every route through a nexthop: dst -> (id, gateway, dev, onlink, protocol) of its nexthop."""
    nhs = nexthops(ns)
    out = {}
    for dst, r in route_json(ns).items():
        if "nhid" in r:
            n = nhs.get(int(r["nhid"]), {})   # read between a write and the next: the callers wait
            out[dst] = (int(r["nhid"]), n.get("gateway", ""), n.get("dev", ""), "onlink" in n.get("flags", []),
                        str(n.get("protocol")))
    return out


@pytest.fixture
def ns(ns_prefix):
    n = make_ns(ns_prefix)
    yield n
    n.delete()


@pytest.fixture
def plain_env(monkeypatch):
    monkeypatch.setenv("FLANNEL_ROUTE_NEXTHOPS", "0")


def test_vxlan_peer_routes_go_through_their_own_nexthop_and_leave_with_it(ns):
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2, p3 = vx(2), vx(3)
        agent.send(*added(p2, p3), synced=True)
        wait_for(lambda: routes(ns) == vx_routes(p2, p3), what="peers programmed")
        view = nh_view(ns)
        assert set(view) == {"10.5.2.0/24", "10.5.3.0/24"}
        for dst, (_nhid, gw, dev, onlink, proto) in view.items():
            assert (gw, dev, onlink, proto) == (dst.split("/")[0], "flannel.1", True, "152"), view
            assert route_json(ns)[dst]["protocol"] == "152"
        assert view["10.5.2.0/24"][0] != view["10.5.3.0/24"][0]      # one nexthop per route
        assert set(nexthops(ns)) == {v[0] for v in view.values()}
        agent.send(*removed(p3))
        wait_for(lambda: routes(ns) == vx_routes(p2), what="peer 3's route removed")
        wait_for(lambda: set(nexthops(ns)) == {view["10.5.2.0/24"][0]}, what="peer 3's nexthop removed")
    finally:
        agent.stop()


def test_hostgw_gateway_change_replaces_the_nexthop_in_place(ns):
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG_HG, FakeLeases("10.6.1.0/24")).start()
    try:
        agent.send(*added(hg(2)), synced=True)
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0"}, what="host-gw route")
        nhid, gw, dev, onlink, proto = nh_view(ns)["10.6.2.0/24"]
        assert (gw, dev, onlink, proto) == ("198.18.0.2", "eth0", False, "152")
        agent.send(*added(hg(2, ip="198.18.0.22")))
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.22 dev eth0"}, what="new gateway")
        assert nh_view(ns)["10.6.2.0/24"] == (nhid, "198.18.0.22", "eth0", False, "152")
        assert set(nexthops(ns)) == {nhid}
    finally:
        agent.stop()


def test_nexthop_or_route_deleted_by_someone_else_comes_back(ns):
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2, p3 = vx(2), vx(3)
        agent.send(*added(p2, p3), synced=True)
        wait_for(lambda: routes(ns) == vx_routes(p2, p3), what="peers programmed")
        nhid = nh_view(ns)["10.5.2.0/24"][0]
        repairs = agent.net.stats["repairs"]
        ns.ip("nexthop", "del", "id", str(nhid))     # takes its route with it, without a route notification
        wait_for(lambda: agent.net.stats["repairs"] > repairs and routes(ns) == vx_routes(p2, p3)
                 and set(nh_view(ns)) == {"10.5.2.0/24", "10.5.3.0/24"}, what="route and nexthop restored")
        ns.ip("route", "del", "10.5.3.0/24")          # the route only: its nexthop stays
        wait_for(lambda: routes(ns) == vx_routes(p2, p3), what="route restored")
        view = nh_view(ns)
        assert len(nexthops(ns)) == 2 and {v[0] for v in view.values()} == set(nexthops(ns))   # no leftovers
    finally:
        agent.stop()


def test_a_foreign_nexthop_is_never_replaced_nor_deleted(ns):
    """A foreign nexthop holding the id we would pick for 10.5.2.0/24 (its address as a number):
    we take another id; an unused foreign nexthop survives a full reconcile, an unused one of
    ours (a crash between the two messages) does not."""
    want_id = int(A("10.5.2.0"))
    ns.ip("nexthop", "add", "id", str(want_id), "via", "198.18.0.99", "dev", "eth0")
    ns.ip("nexthop", "add", "id", "7", "via", "198.18.0.98", "dev", "eth0", "proto", "static")
    ns.ip("nexthop", "add", "id", "8", "via", "198.18.0.97", "dev", "eth0", "proto", "152")   # ours, unused
    before = {i: nexthops(ns)[i] for i in (want_id, 7)}
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        agent.send(*added(vx(2)), synced=True)
        wait_for(lambda: routes(ns) == vx_routes(vx(2)), what="peer programmed")
        nhid = nh_view(ns)["10.5.2.0/24"][0]
        assert nhid not in (want_id, 7, 8)
        wait_for(lambda: 8 not in nexthops(ns), what="our unused nexthop pruned")
        agent.net._full_wanted = True
        agent.send()
        wait_for(lambda: agent.net.stats["full_reconciles"] >= 2, what="second full reconcile")
        assert {i: nexthops(ns)[i] for i in (want_id, 7)} == before
        # a foreign nexthop that appears while we run: its id is not picked either
        ns.ip("nexthop", "add", "id", str(int(A("10.5.3.0"))), "via", "198.18.0.96", "dev", "eth0")
        wait_for(lambda: int(A("10.5.3.0")) in nexthops(ns), what="foreign nexthop")
        agent.send(*added(vx(3)))
        wait_for(lambda: routes(ns) == vx_routes(vx(2), vx(3)), what="peer 3 programmed")
        assert nexthops(ns)[int(A("10.5.3.0"))]["gateway"] == "198.18.0.96"
        assert nh_view(ns)["10.5.3.0/24"][0] != int(A("10.5.3.0"))
    finally:
        agent.stop()



def test_an_id_taken_after_the_dump_is_refused_not_overwritten_and_the_retry_uses_another(ns):
    from flannel.backends.routed import model as rm
    from flannel.backends.routed.netlink import Netlink, Scope

    scope = Scope(network=N("10.6.0.0/16"), devs=("eth0",))
    r = rm.Route(N("10.6.2.0/24"), A("198.18.0.2"), "eth0")

    def run() -> tuple[Any, ...]:
        nl = Netlink()
        try:
            nl.dump(scope)
            ns.ip("nexthop", "add", "id", str(int(A("10.6.2.0"))), "via", "198.18.0.99", "dev", "eth0")
            first = nl.apply(rm.Plan(set_routes=(r,)))
            second = nl.apply(rm.Plan(set_routes=(r,)))
            dumped = nl.dump(scope)
            gone = nl.apply(rm.Plan(del_routes=tuple(dumped.routes)))
            return first, second, dumped, gone
        finally:
            nl.close()
    first, second, dumped, gone = in_ns(ns, run)
    assert [e for e, _ in first] == [r] and "exists" in first[0][1].lower()
    assert second == [] and dumped.routes == {r} and gone == []
    assert routes(ns) == set()
    assert set(nexthops(ns)) == {int(A("10.6.2.0"))}           # only the foreign one is left
    assert nexthops(ns)[int(A("10.6.2.0"))]["gateway"] == "198.18.0.99"


def test_dump_reads_nexthop_routes_without_compat_mode(ns):
    """With ``net.ipv4.nexthop_compat_mode=0`` the route dump carries only the nexthop id: the
    gateway, device and onlink flag come from the nexthop table (doctor reads through this dump)."""
    from flannel.backends.routed import model as rm
    from flannel.backends.routed.netlink import Netlink, Scope

    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", LOCAL, "dev", "eth0", "nolearning")
    ns.ip("link", "set", "flannel.1", "up")
    ns.exec("sysctl", "-qw", "net.ipv4.nexthop_compat_mode=0")
    ns.ip("nexthop", "add", "id", "40", "via", "10.5.2.0", "dev", "flannel.1", "onlink", "proto", "152")
    ns.ip("route", "add", "10.5.2.0/24", "nhid", "40", "proto", "152")
    ns.ip("nexthop", "add", "id", "41", "via", "198.18.0.7", "dev", "eth0")
    ns.ip("route", "add", "10.5.7.0/24", "nhid", "41")                        # foreign
    assert "via" not in ns.ip("route", "show", "10.5.2.0/24")
    scope = Scope(network=N("10.5.0.0/16"), devs=("flannel.1", "eth0"), overlay_dev="flannel.1")

    def run() -> Any:
        nl = Netlink()
        try:
            return nl.dump(scope)
        finally:
            nl.close()
    got = in_ns(ns, run)
    assert got.routes == {rm.Route(N("10.5.2.0/24"), A("10.5.2.0"), "flannel.1", True)}
    assert got.foreign == {rm.ForeignRoute(N("10.5.7.0/24"), "eth0", A("198.18.0.7"), 3)}


def test_upgrade_keeps_plain_routes_of_ours_without_churn_and_can_delete_them(ns):
    """What an older version left (plain proto-152 routes) is accepted as is: no write at start;
    a departed peer's plain route is deleted; a changed one becomes a nexthop route."""
    for i in (2, 3, 4):
        ns.ip("route", "add", f"10.6.{i}.0/24", "via", f"198.18.0.{i}", "dev", "eth0", "proto", "152")
    plans: list[Any] = []

    def record(net: Any) -> None:
        orig = net.nl.apply
        net.nl.apply = lambda p: (plans.append(p), orig(p))[1]
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG_HG, FakeLeases("10.6.1.0/24"), tweak=record).start()
    try:
        agent.send(*added(hg(2), hg(3), hg(4)), synced=True)
        wait_for(lambda: agent.net.stats["full_reconciles"] >= 1, what="first reconcile")
        assert plans == [] and nexthops(ns) == {} and all("nhid" not in r for r in route_json(ns).values())
        agent.send(*removed(hg(3)))
        wait_for(lambda: "10.6.3.0/24" not in route_json(ns), what="plain route of a departed peer deleted")
        agent.send(*added(hg(4, ip="198.18.0.44")))
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0", "10.6.4.0/24 via 198.18.0.44 dev eth0"},
                 what="changed peer")
        assert set(nh_view(ns)) == {"10.6.4.0/24"} and "nhid" not in route_json(ns)["10.6.2.0/24"]
    finally:
        agent.stop()


def test_switch_off_keeps_plain_routes(ns, plain_env):
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2, p3 = vx(2), vx(3)
        agent.send(*added(p2, p3), synced=True)
        wait_for(lambda: routes(ns) == vx_routes(p2, p3), what="peers programmed")
        assert nexthops(ns) == {}
        ours = [r for d, r in route_json(ns).items() if d.startswith("10.5.")]
        assert len(ours) == 2 and all("nhid" not in r and r["protocol"] == "152" for r in ours)
        agent.send(*removed(p3))
        wait_for(lambda: routes(ns) == vx_routes(p2), what="peer 3 removed")
    finally:
        agent.stop()


def test_switch_off_after_nexthops_turns_them_into_plain_routes_on_change_and_prunes(ns, monkeypatch):
    """Nexthop routes of a previous run with the switch now off: read and kept as they are (no
    churn), deleted by id when their peer leaves, and their nexthops do not outlive them."""
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        agent.send(*added(vx(2), vx(3)), synced=True)
        wait_for(lambda: set(nh_view(ns)) == {"10.5.2.0/24", "10.5.3.0/24"}, what="nexthop routes")
    finally:
        agent.stop()
    monkeypatch.setenv("FLANNEL_ROUTE_NEXTHOPS", "0")
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        agent.send(*added(vx(2), vx(3)), synced=True)
        wait_for(lambda: agent.net.stats["full_reconciles"] >= 1, what="first reconcile")
        assert set(nh_view(ns)) == {"10.5.2.0/24", "10.5.3.0/24"}
        agent.send(*removed(vx(3)))
        wait_for(lambda: routes(ns) == vx_routes(vx(2)) and len(nexthops(ns)) == 1, what="route and nexthop gone")
    finally:
        agent.stop()


def test_a_device_without_carrier_gets_a_plain_route_as_before(ns):
    """The kernel creates a nexthop object only on a device with carrier, a plain route on any
    device that is up: with eth0's carrier gone the host-gw route is still written (plain)."""
    ns.ip("link", "set", "eth1", "down")
    wait_for(lambda: "NO-CARRIER" in ns.ip("link", "show", "eth0"), what="eth0 without carrier")
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG_HG, FakeLeases("10.6.1.0/24")).start()
    try:
        agent.send(*added(hg(2)), synced=True)
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0"}, what="plain host-gw route")
        assert nexthops(ns) == {} and "nhid" not in route_json(ns)["10.6.2.0/24"]
        assert agent.net.stats["full_reconciles"] == 1 and not agent.net._retry.routes
    finally:
        agent.stop()


@pytest.mark.parametrize("compat", ["1", "0"])
def test_dump_given_an_expectation_reads_nexthop_routes_exactly_as_without_one(ns, compat):
    """A full reconcile's dump matches messages against what it expects instead of parsing them
    (rperf). A route through a nexthop is matched by its nexthop id, and only while that nexthop
    holds the expected gateway and device: a nexthop of ours rewritten by someone else to another
    gateway, a foreign nexthop and a route of ours through a foreign nexthop read exactly as
    without the expectation, with or without ``nexthop_compat_mode``."""
    from flannel.backends.routed import model as rm
    from flannel.backends.routed.netlink import Netlink, Scope

    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", LOCAL, "dev", "eth0", "nolearning")
    ns.ip("link", "set", "flannel.1", "up")
    ns.exec("sysctl", "-qw", f"net.ipv4.nexthop_compat_mode={compat}")
    scope = Scope(network=N("10.5.0.0/16"), devs=("flannel.1", "eth0"), overlay_dev="flannel.1",
                  exclude=N("10.5.1.0/24"))
    r2, r3, r4 = (rm.Route(N(f"10.5.{i}.0/24"), A(f"10.5.{i}.0"), "flannel.1", True) for i in (2, 3, 4))
    expect = rm.KernelState(routes=frozenset({r2, r3, r4}), neighs=frozenset(), fdbs=frozenset())
    out: dict[str, Any] = {}

    def run() -> None:
        nl = Netlink()
        try:
            assert nl.apply(rm.Plan(set_routes=(r2, r3, r4))) == []
            nl.dump(scope)                           # learns which nexthop each route goes through
            nh3 = nexthops(ns)[int(route_json(ns)["10.5.3.0/24"]["nhid"])]
            ns.ip("nexthop", "replace", "id", str(nh3["id"]), "via", "10.5.3.9", "dev", "flannel.1", "onlink",
                  "proto", "152")                    # ours, rewritten under us
            ns.ip("nexthop", "add", "id", "77", "via", "10.5.4.0", "dev", "flannel.1", "onlink")
            ns.ip("route", "replace", "10.5.4.0/24", "nhid", "77", "proto", "152")   # through a foreign nexthop
            out["expecting"] = nl.dump(scope, expect)
            # a route read on the fast path is still known to go through its nexthop: deleting it
            # must name that nexthop (the kernel matches a nexthop route by id, not by gateway)
            out["deleted"] = nl.apply(rm.Plan(del_routes=(r2,)))
            out["after"] = set(route_json(ns))
            out["plain"] = nl.dump(scope)
        finally:
            nl.close()
    in_ns(ns, run)
    got, plain = out["expecting"], out["plain"]
    assert out["deleted"] == [] and "10.5.2.0/24" not in out["after"]
    assert got.routes - {r2} == plain.routes and got.foreign == plain.foreign
    assert {str(r) for r in got.routes} == {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink",
                                           "10.5.3.0/24 via 10.5.3.9 dev flannel.1 onlink",
                                           "10.5.4.0/24 via 10.5.4.0 dev flannel.1 onlink"}
