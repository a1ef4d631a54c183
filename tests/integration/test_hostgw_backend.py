"""host-gw backend in a fresh namespace per test, checked with ``ip route``."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest

from flannel.backends.hostgw import HostGWBackend
from flannel.lease import Lease, LeaseAttrs
from tests.support import (
    Agent,
    FakeLeases,
    added,
    ext_of,
    make_ns,
    removed,
    routes,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

CFG = '{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}'


def hg(i: int, ip: str | None = None, typ: str = "host-gw") -> Lease:
    return Lease(N(f"10.6.{i}.0/24"), LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), backend_type=typ))


@pytest.fixture
def ns(ns_prefix):
    n = make_ns(ns_prefix)
    yield n
    n.delete()


def fast_resync(net) -> None:
    net.resync_interval = 0.2


def test_routes_added_removed_and_off_link_peer_refused(ns, caplog):
    caplog.set_level(logging.INFO)
    leases = FakeLeases("10.6.1.0/24")
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG, leases).start()
    try:
        assert leases.attrs == LeaseAttrs(public_ip=A("198.18.0.1"), backend_type="host-gw")
        assert agent.net.mtu == 1500
        p2, p3, far, vx = hg(2), hg(3), hg(4, ip="198.19.4.4"), hg(5, typ="vxlan")
        agent.send(*added(p2, p3, far, vx), synced=True)
        want = {"10.6.2.0/24 via 198.18.0.2 dev eth0", "10.6.3.0/24 via 198.18.0.3 dev eth0"}
        wait_for(lambda: routes(ns) == want, what="host-gw routes")
        assert "refusing host-gw route to 10.6.4.0/24: peer 198.19.4.4 is not on the same L2 network" in caplog.text
        assert "ignoring non-host-gw subnet 10.6.5.0/24" in caplog.text
        agent.send(*removed(p3))
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0"}, what="route removed")
    finally:
        agent.stop()


def test_reconcile_removes_only_its_own_stale_routes_and_restores_deleted_ones(ns):
    """Ownership (issue 8): a stale route of ours (proto 152) goes; an operator's route inside the
    Network on the external interface (proto boot or static) or on another device survives any
    number of full reconciles; a deleted route of ours comes back."""
    ns.ip("route", "add", "10.6.9.0/24", "via", "198.18.0.9", "dev", "eth0", "proto", "152")   # ours: a peer that left
    ns.ip("route", "add", "10.6.10.0/24", "via", "198.18.0.10", "dev", "eth0")                  # operator: proto boot
    ns.ip("route", "add", "10.6.11.0/24", "via", "198.18.0.11", "dev", "eth0", "proto", "static")
    ns.ip("link", "add", "dummy-op", "type", "veth", "peer", "name", "dummy-op2")
    ns.ip("link", "set", "dummy-op", "up")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "dummy-op")
    ns.ip("route", "add", "10.6.12.0/24", "via", "192.0.2.12", "dev", "dummy-op")               # another device
    ns.ip("route", "add", "192.0.2.128/25", "via", "198.18.0.9", "dev", "eth0")                 # outside Network
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG, FakeLeases("10.6.1.0/24"), tweak=fast_resync).start()
    operator = {"10.6.10.0/24 via 198.18.0.10 dev eth0", "10.6.11.0/24 via 198.18.0.11 dev eth0",
                "10.6.12.0/24 via 192.0.2.12 dev dummy-op", "192.0.2.128/25 via 198.18.0.9 dev eth0"}
    try:
        agent.send(*added(hg(2)), synced=True)
        want = {"10.6.2.0/24 via 198.18.0.2 dev eth0"} | operator
        wait_for(lambda: routes(ns) == want, what="our stale route removed, the operator's kept")
        fulls = agent.net.stats["full_reconciles"]
        wait_for(lambda: agent.net.stats["full_reconciles"] >= fulls + 10, what="ten more full reconciles")
        assert routes(ns) == want
        ns.ip("route", "del", "10.6.2.0/24")
        wait_for(lambda: routes(ns) == want, what="deleted route recovered")
    finally:
        agent.stop()


def test_a_lease_never_replaces_a_local_or_operator_route(ns, caplog):
    """Issue 8 item 5: a lease for our own subnet, or for a subnet routed via another device,
    is refused (logged, counted); the local routes stay as they are."""
    caplog.set_level(logging.INFO)
    ns.ip("link", "add", "cni0", "type", "bridge")
    ns.ip("link", "set", "cni0", "up")
    ns.ip("addr", "add", "10.6.1.1/24", "dev", "cni0")            # our pod subnet's connected route
    ns.ip("link", "add", "br-op", "type", "bridge")
    ns.ip("link", "set", "br-op", "up")
    ns.ip("addr", "add", "10.6.3.1/24", "dev", "br-op")           # someone's local subnet inside Network
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG, FakeLeases("10.6.1.0/24")).start()
    try:
        stray = hg(1, ip="198.18.0.77")                           # a stray lease with our subnet
        agent.send(*added(stray, hg(2), hg(3)), synced=True)
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0"}, what="only peer 2 routed")
        table = ns.ip("route", "show", "table", "main")
        assert "10.6.1.0/24 dev cni0 proto kernel" in table and "10.6.3.0/24 dev br-op proto kernel" in table
        assert "overlaps our own subnet 10.6.1.0/24" in caplog.text
        assert "would replace '10.6.3.0/24 dev br-op proto 2" in caplog.text
        assert agent.net.stats["leases_refused_conflict"] == 2
        ns.ip("link", "del", "br-op")                             # the bridge goes: the lease is programmed
        wait_for(lambda: "10.6.3.0/24 via 198.18.0.3 dev eth0" in routes(ns), what="peer 3 routed once free")
        assert "10.6.1.0/24 dev cni0 proto kernel" in ns.ip("route", "show", "table", "main")
    finally:
        agent.stop()


def test_two_hosts_reach_each_other_via_host_gw(ns_prefix):
    import json

    from flannel.backends.base import ExternalInterface
    from flannel.lab.topology import Underlay, ping

    with Underlay(ns_prefix + "u") as u:
        hosts = [u.add_host("h1"), u.add_host("h2")]
        agents = []
        try:
            for i, h in enumerate(hosts, start=1):
                h.ns.ip("addr", "add", f"10.6.{i}.1/32", "dev", "lo")     # stands in for a pod
                idx = int(json.loads(h.ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
                agents.append(Agent(h.ns, HostGWBackend(ExternalInterface("eth0", idx, 1500, h.ip, h.ip)), CFG,
                                    FakeLeases(f"10.6.{i}.0/24")).start())
            agents[0].send(*added(Lease(N("10.6.2.0/24"), agents[1].leases.attrs)), synced=True)   # type: ignore[arg-type]
            agents[1].send(*added(Lease(N("10.6.1.0/24"), agents[0].leases.attrs)), synced=True)   # type: ignore[arg-type]
            wait_for(lambda: ping(hosts[0].ns, "10.6.2.1", src="10.6.1.1"), "h1 → h2 via host-gw", timeout=10)
            assert ping(hosts[1].ns, "10.6.1.1", src="10.6.2.1")
        finally:
            for a in agents:
                a.stop()


def test_peer_changing_its_address_replaces_the_route(ns):
    """flannel's route-cache case: the same subnet via a new gateway leaves exactly one route."""
    agent = Agent(ns, HostGWBackend(ext_of(ns)), CFG, FakeLeases("10.6.1.0/24")).start()
    try:
        agent.send(*added(hg(2)), synced=True)
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0"}, what="first gateway")
        agent.send(*added(hg(2, ip="198.18.0.20")))
        wait_for(lambda: routes(ns) == {"10.6.2.0/24 via 198.18.0.20 dev eth0"}, what="route replaced")
    finally:
        agent.stop()


def test_dual_stack_host_gw_routes(ns_prefix):
    import json
    from ipaddress import IPv6Address, IPv6Network

    from flannel.backends.base import ExternalInterface
    from flannel.lab.netns import NetNS

    ns = make_ns(ns_prefix)
    try:
        ns.ip("-6", "addr", "add", "2001:2::1/64", "dev", "eth0", "nodad")
        idx = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
        ext = ExternalInterface("eth0", idx, 1500, A("198.18.0.1"), A("198.18.0.1"), IPv6Address("2001:2::1"),
                                IPv6Address("2001:2::1"))
        cfg = '{"Network":"10.6.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:6::/48","Backend":{"Type":"host-gw"}}'

        class DS(FakeLeases):
            def acquire_lease(self, config, attrs):
                self.attrs = attrs
                return Lease(self.subnet, attrs, ipv6_subnet=IPv6Network("fd00:10:6:1::/64"))

        def peer(i: int, v6: str) -> Lease:
            return Lease(N(f"10.6.{i}.0/24"), LeaseAttrs(public_ip=A(f"198.18.0.{i}"), public_ipv6=IPv6Address(v6),
                                                          backend_type="host-gw"),
                         ipv6_subnet=IPv6Network(f"fd00:10:6:{i}::/64"))

        agent = Agent(ns, HostGWBackend(ext), cfg, DS("10.6.1.0/24")).start()
        try:
            assert agent.leases.attrs.public_ipv6 == IPv6Address("2001:2::1")
            agent.send(*added(peer(2, "2001:2::2"), peer(3, "2001:db8:99::3")), synced=True)

            def routes6() -> set[str]:
                return {f"{r['dst']} via {r['gateway']} dev {r['dev']}"
                        for r in json.loads(ns.ip("-6", "-j", "route", "show", "table", "main")) if r.get("gateway")}
            wait_for(lambda: routes6() == {"fd00:10:6:2::/64 via 2001:2::2 dev eth0"}
                     and routes(ns) == {"10.6.2.0/24 via 198.18.0.2 dev eth0"}, what="dual-stack routes")
            agent.send(*removed(peer(2, "2001:2::2")))
            wait_for(lambda: routes6() == set() and routes(ns) == set(), what="routes removed")
        finally:
            agent.stop()
    finally:
        NetNS.delete(ns)
