"""The reconcile loop of vxlan/host-gw (RoutedNetwork) against a fake kernel port (tests.support.FakeKernel).

The kernel side has its own integration tests; here the fake lets us check the loop's promises:
a failing entry is logged and retried with backoff while other peers are programmed; a batch of
k events costs O(k) (no dump, no rebuild); what the agent removes is only what it owns; a remote
lease never replaces a route to a local subnet; and, as a property, any sequence of batches
applied incrementally leaves the kernel exactly as a full reconcile would.
"""

from __future__ import annotations

import logging
import queue
import threading
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest
from hypothesis import HealthCheck, given, settings

from flannel.backends.base import ExternalInterface
from flannel.backends.routed import model as rm
from flannel.backends.routed import reconcile as be
from flannel.backends.routed.desired import Index
from flannel.backends.vxlan import network as vx
from flannel.config import parse_network_config
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent
from tests.support import FakeClock, FakeKernel, lease_ops, vxlan_lease

CFG = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
EXT = ExternalInterface("eth0", 2, 1500, A("198.18.0.1"), A("198.18.0.1"))
OWN = N("10.5.1.0/24")


def lease(i: int) -> Lease:
    return vxlan_lease(i, mac=f"02:00:00:00:00:{i:02x}")


def make(kernel: FakeKernel, *, direct: bool = False) -> be.RoutedNetwork:
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0", direct_routing=direct)

    class Net(be.RoutedNetwork):
        def overlay_dev(self) -> str | None:
            return "flannel.1"

        def route_devs(self) -> tuple[str, ...]:
            return ("flannel.1", "eth0")

    return Net(lease=Lease(OWN, LeaseAttrs()), mtu=1450, nl=kernel, ctx=ctx,  # type: ignore[arg-type]
               config=CFG, translate=vx.vxlan_entries, ext_iface=EXT)


def entries(*leases: Lease) -> rm.KernelState:
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0")
    return rm.desired_state(leases, ctx, vx.vxlan_entries).state


def ours(k: FakeKernel) -> rm.KernelState:
    """What the fake kernel holds of the agent's (proto 152 routes, neighbours, fdb)."""
    return rm.KernelState(frozenset(rm.Route(d, g, dev, o) for d, g, dev, o, p, _ in k.routes.values()
                                    if p == rm.FLANNEL_PROTO),
                          frozenset(k.neighs.values()), frozenset(k.fdbs))


def added(*ls: Lease, synced: bool = False) -> Batch:
    return Batch(tuple(LeaseEvent(EventType.ADDED, lz) for lz in ls), synced=synced)


def removed(*ls: Lease) -> Batch:
    return Batch(tuple(LeaseEvent(EventType.REMOVED, lz) for lz in ls))


def test_failing_peer_is_retried_with_backoff_and_others_are_programmed(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    monkeypatch.setattr(be, "time", clock)
    k = FakeKernel()
    net = make(k)
    p2, p3 = lease(2), lease(3)
    k.bad = set(entries(p3).neighs)
    net.step(added(p2, p3, synced=True))
    assert ours(k).routes >= entries(p2).routes and ours(k).neighs == entries(p2).neighs
    assert "set neigh 10.5.3.0 lladdr 02:00:00:00:00:03 dev flannel.1: (22, 'Invalid argument')" in caplog.text
    n_applied = len(k.applied)
    net.step(None)                      # before the backoff expires: no new attempt
    assert len(k.applied) == n_applied
    clock.now += 1.01
    net.step(None)                      # retry (still failing): backoff doubles
    assert len(k.applied) == n_applied + 1
    assert k.applied[-1].set_neighs == tuple(entries(p3).neighs)   # only the failing entry is retried
    k.failing = False
    clock.now += 1.5
    net.step(None)
    assert len(k.applied) == n_applied + 1   # 2 s backoff not over yet
    clock.now += 1.0
    net.step(None)
    assert ours(k) == entries(p2, p3)
    # converged: a tick with nothing to do writes nothing
    n_applied = len(k.applied)
    net.step(None)
    assert len(k.applied) == n_applied


def test_events_before_first_snapshot_only_update_the_peer_table():
    k = FakeKernel()
    net = make(k)
    net.step(added(lease(2)))
    net.step(added(lease(2)))
    assert k.applied == [] and k.dumps == 0
    net.step(added(lease(3), synced=True))
    assert k.dumps == 1
    assert len(k.applied) == 1 and set(k.applied[0].set_routes) == set(entries(lease(2), lease(3)).routes)


def test_incremental_batches_touch_only_their_leases(monkeypatch):
    """A batch of k events: no dump, k translations, a plan of only those leases' entries."""
    k = FakeKernel()
    net = make(k)
    peers = [vxlan_lease(i % 250 + 2, net=f"10.{5 + i // 250}", mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}")
             for i in range(1000)]
    cfg = parse_network_config('{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}')
    net.config = cfg
    net.step(added(*peers, synced=True))
    assert len(ours(k).routes) == 1000
    dumps = k.dumps
    calls: list[Lease] = []
    orig = net.index.translate  # type: ignore[union-attr]
    net.index.translate = lambda lz, ctx: (calls.append(lz), orig(lz, ctx))[1]  # type: ignore[union-attr]
    new = [vxlan_lease(i, net="10.99", mac=f"02:00:00:99:00:{i:02x}") for i in range(2, 5)]
    net.step(added(*new))
    net.step(removed(peers[0]))
    net.step(added(vxlan_lease(3, net="10.99", mac="02:00:00:00:aa:03")))   # a changed MAC
    assert k.dumps == dumps
    assert len(calls) == 4
    # 3 added; 1 removed; neigh replaced and the fdb entry moved to the new MAC
    assert [len(p) for p in k.applied[-3:]] == [9, 3, 3]
    assert len(ours(k).routes) == 1002


def test_run_survives_an_unexpected_error_and_stops_on_none(monkeypatch, caplog):
    k = FakeKernel()
    net = make(k)
    calls = []
    orig = net.step

    def flaky(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return orig(batch)
    monkeypatch.setattr(net, "step", flaky)
    q: queue.Queue[Batch | None] = queue.Queue()
    q.put(added(lease(2), synced=True))
    q.put(added(lease(2), synced=True))
    q.put(None)
    t = threading.Thread(target=net.run, args=(q, threading.Event()))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert "unexpected error in reconcile step" in caplog.text
    assert ours(k) == entries(lease(2))


# ---- ownership (issue 8 item 3) ----------------------------------------------------------------

def test_full_reconciles_remove_only_what_the_agent_or_go_flannel_installed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(be, "time", clock)
    k = FakeKernel()
    operator = [("10.5.9.0/24", "198.18.0.9", "eth0", False, rm.PROTO_BOOT),    # ip route add ... dev eth0
                ("10.5.10.0/24", "198.18.0.10", "eth0", False, 4),               # proto static
                ("10.5.11.0/24", "10.5.11.0", "flannel.1", False, rm.PROTO_BOOT),   # not flannel's shape (no onlink)
                ("10.5.12.0/24", "198.18.0.12", "eth1", False, 4)]               # another device
    for dst, gw, dev, onlink, proto in operator:
        k.add_route(dst, gw, dev, onlink=onlink, proto=proto)
    k.add_route("10.5.20.0/24", "10.5.20.0", "flannel.1", onlink=True, proto=rm.FLANNEL_PROTO)   # ours, stale
    k.add_route("10.5.21.0/24", "10.5.21.0", "flannel.1", onlink=True, proto=rm.PROTO_BOOT)      # Go flannel's, stale
    k.add_route("10.5.22.0/24", "198.18.0.22", "eth0", proto=rm.FLANNEL_PROTO)                   # ours (direct), stale
    net = make(k)
    net.step(added(lease(2), synced=True))
    for _ in range(5):
        clock.now += 2200                 # past the periodic resync
        net.step(None)
    left = {str(d) for d in k.routes}
    assert left == {"10.5.2.0/24", "10.5.9.0/24", "10.5.10.0/24", "10.5.11.0/24", "10.5.12.0/24"}
    assert net.stats["full_reconciles"] >= 6


def test_restart_over_go_flannel_routes_writes_nothing_and_later_removes_them():
    k = FakeKernel()
    p2, p3 = lease(2), lease(3)
    for lz in (p2, p3):   # what Go flannel left: its exact vxlan shape, proto boot, plus neigh and fdb
        st = entries(lz)
        r = next(iter(st.routes))
        k.add_route(str(r.dst), str(r.gateway), r.dev, onlink=True, proto=rm.PROTO_BOOT)
        k.neighs.update({(n.dev, n.ip): n for n in st.neighs})
        k.fdbs.extend(st.fdbs)
    before = k.state()
    net = make(k)
    net.step(added(p2, p3, synced=True))
    assert k.state() == before and k.applied == []           # adopted as is: no write, no flap
    net.step(removed(p3))                                     # the departed peer's Go flannel route goes
    assert {str(d) for d in k.routes} == {"10.5.2.0/24"} and k.routes[N("10.5.2.0/24")][4] == rm.PROTO_BOOT


def test_go_flannel_host_gw_route_of_a_live_peer_is_adopted_and_then_owned():
    """host-gw / DirectRouting: a proto-boot route on the external interface for a leased subnet is
    replaced (same next hop) and carries our protocol from then on; one nobody leases is left."""
    k = FakeKernel()
    k.add_route("10.5.2.0/24", "198.18.0.2", "eth0", proto=rm.PROTO_BOOT)
    k.add_route("10.5.9.0/24", "198.18.0.9", "eth0", proto=rm.PROTO_BOOT)
    net = make(k, direct=True)
    net.step(added(lease(2), synced=True))
    assert k.routes[N("10.5.2.0/24")][4] == rm.FLANNEL_PROTO
    net.step(removed(lease(2)))
    assert set(k.routes) == {N("10.5.9.0/24")}


# ---- a remote lease never replaces a route to a local subnet (issue 8 item 5) ---------------------

def test_remote_lease_for_our_own_subnet_is_refused(caplog):
    caplog.set_level(logging.INFO)
    k = FakeKernel()
    k.add_route(str(OWN), None, "cni0", proto=2)        # cni0's connected route of our pod subnet
    net = make(k)
    stray = vxlan_lease(1, ip="198.18.0.77")            # a stray lease carrying our subnet
    net.step(added(stray, lease(2), synced=True))
    assert k.routes[OWN] == (OWN, None, "cni0", False, 2, "unicast")
    assert entries(stray).neighs.isdisjoint(ours(k).neighs)
    assert "overlaps our own subnet 10.5.1.0/24" in caplog.text
    assert net.stats["leases_refused_conflict"] == 1
    net.step(added(vxlan_lease(1, ip="198.18.0.78")))   # changed again: still refused, counted again
    assert k.routes[OWN][2] == "cni0" and net.stats["leases_refused_conflict"] == 2


def test_lease_is_refused_while_a_foreign_route_holds_its_subnet(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    monkeypatch.setattr(be, "time", clock)
    k = FakeKernel()
    k.add_route("10.5.3.0/24", None, "docker0", proto=2)             # a local bridge's connected route
    k.add_route("10.5.4.0/24", "198.18.0.50", "eth1", proto=4)       # an operator's route via another device
    net = make(k)
    net.step(added(lease(2), lease(3), lease(4), synced=True))
    assert k.routes[N("10.5.3.0/24")][2] == "docker0" and k.routes[N("10.5.4.0/24")][2] == "eth1"
    assert ours(k) == entries(lease(2))
    assert "would replace '10.5.3.0/24 dev docker0 proto 2'" in caplog.text
    assert net.stats["leases_refused_conflict"] == 2
    net.step(added(vxlan_lease(4, mac="02:00:00:00:00:44")))         # an update of a refused lease: still refused
    assert k.routes[N("10.5.4.0/24")][2] == "eth1"
    del k.routes[N("10.5.3.0/24")]                                   # the bridge goes away
    clock.now += 2200
    net.step(None)                                                    # the next full reconcile programs it
    assert ours(k) == entries(lease(2), lease(3))


# ---- incremental == full (issue 9 item 1) -----------------------------------------------------------

def seed(k: FakeKernel) -> None:
    """A kernel that already holds foreign, stale and Go flannel entries."""
    k.add_route("10.5.9.0/24", "198.18.0.9", "eth0", proto=rm.PROTO_BOOT)        # operator (or Go host-gw): kept
    k.add_route("10.5.6.0/24", None, "docker0", proto=4)                          # foreign: blocks lease 6
    k.add_route("10.5.8.0/24", "10.5.8.0", "flannel.1", onlink=True, proto=rm.FLANNEL_PROTO)   # ours, stale
    k.add_route("10.5.5.0/24", "10.5.5.0", "flannel.1", onlink=True, proto=rm.PROTO_BOOT)      # Go flannel's
    k.add_route("10.5.7.0/24", "198.18.0.7", "eth0", proto=rm.PROTO_BOOT)         # Go host-gw/direct: adoptable
    k.add_route(str(OWN), None, "cni0", proto=2)


def full_plan(net: be.RoutedNetwork, k: FakeKernel) -> rm.Plan:
    """What a full reconcile from scratch would change now (a fresh index of the same peers)."""
    actual = k.dump(net.scope())
    fresh = Index(net.ctx, net.translate, own=net.own_nets(),
                  devs=("flannel.1", "eth0"))
    fresh.rebuild(foreign=actual.foreign)
    for lz in net.peers.values():
        fresh.put(lz)
    return rm.plan(fresh.state(), actual)


@pytest.mark.parametrize("direct", [False, True])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=lease_ops())
def test_incremental_apply_equals_full_reconcile(direct: bool, batches: list[list[LeaseEvent]]) -> None:
    """Two agents over two identical kernels receive the same batches; one applies them as usual
    (increments), the other reconciles fully after every batch. Their kernels stay identical, and
    after each batch a full reconcile from scratch would change nothing."""
    k, k2 = FakeKernel(), FakeKernel()
    seed(k)
    seed(k2)
    net, net2 = make(k, direct=direct), make(k2, direct=direct)
    for i, b in enumerate(batches):
        dumps = k.dumps
        net.step(Batch(tuple(b), synced=i == 0))
        net2.step(Batch(tuple(b), synced=i == 0))
        net2.sync_full()
        if i:
            assert k.dumps == dumps, "an ordinary batch must not dump the kernel"
        assert k.state() == k2.state()
        p = full_plan(net, k)
        assert p.empty, f"a full reconcile would still change {p}"
    # foreign routes are never touched
    assert k.routes[N("10.5.9.0/24")][4] == rm.PROTO_BOOT and k.routes[N("10.5.6.0/24")][2] == "docker0"
    assert k.routes[OWN][2] == "cni0"



def _cache_view(c: be.Programmed) -> tuple[object, ...]:
    """A cache as comparable values, with the protocol each route is held with."""
    return ({k: (v, v.proto) for k, v in c.routes.items()}, dict(c.neighs), dict(c.fdbs))


@settings(max_examples=200, deadline=None)
@given(batches=lease_ops())
def test_full_reconcile_shortcuts_give_what_the_long_way_gives(batches: list[list[LeaseEvent]]) -> None:
    """The periodic full reconcile takes shortcuts when nothing changed: ``Index.state`` collects
    the entries as they are when no key is claimed twice, and a cache that already says what a
    rebuild would say is kept. After any batches -- with duplicate subnets and MACs, blocked and
    adopted leases -- the state equals the winners looked up key by key, and the cache kept equals
    the one a rebuild from the desired state and a dump gives (Go flannel routes with ``proto boot``)."""
    k = FakeKernel()
    seed(k)
    net = make(k)
    for i, b in enumerate(batches):
        net.step(Batch(tuple(b), synced=i == 0))
        for _ in range(2):
            net.sync_full()
            assert net.index is not None and net._cache is not None
            desired = net.index.state()
            assert desired == net.index.winners()
            assert _cache_view(net._cache) == _cache_view(be._programmed(desired, k.dump(net.scope())))


def test_a_route_whose_protocol_changed_under_us_is_deleted_with_the_protocol_the_kernel_holds():
    """The cache is kept across a full reconcile that changes nothing only if it holds each route
    with the protocol the kernel reports: Go flannel's route, adopted as is (``proto boot``), then
    rewritten with our protocol by someone else, must be deleted with ours when its lease goes
    (the kernel deletes a route only if the protocol matches)."""
    k = FakeKernel()
    k.add_route("10.5.5.0/24", "10.5.5.0", "flannel.1", onlink=True, proto=rm.PROTO_BOOT)
    net = make(k)
    net.step(added(lease(5), synced=True))
    assert k.routes[N("10.5.5.0/24")][4] == rm.PROTO_BOOT and not net.nl.applied[-1].set_routes   # adopted as is
    k.add_route("10.5.5.0/24", "10.5.5.0", "flannel.1", onlink=True, proto=rm.FLANNEL_PROTO)
    net.sync_full()
    net.step(removed(lease(5)))
    assert N("10.5.5.0/24") not in k.routes


def test_state_of_a_lease_claiming_one_key_twice_is_the_winner_per_key():
    """A translation that yields two routes to one destination (no backend does today): the index
    wants one of them, as a lookup per key says, not both."""
    def two_routes(lz: Lease, ctx: rm.Context) -> rm.KernelState:
        assert lz.subnet is not None
        return rm.KernelState(routes=frozenset({rm.Route(lz.subnet, A("198.18.0.2"), "eth0"),
                                                rm.Route(lz.subnet, A("198.18.0.3"), "eth0")}))

    ctx = rm.Context(backend_type="host-gw", dev="eth0", ext_dev="eth0")
    index = Index(ctx, two_routes)
    index.put(lease(2))
    index.put(lease(3))
    assert len(index.state().routes) == 2 and index.state() == index.winners()


def test_full_reconcile_leaves_the_garbage_collector_as_it_found_it(monkeypatch):
    """The collector is paused during a full reconcile only: on again afterwards, also when the
    reconcile raised, and still off if it was off before."""
    import gc

    k = FakeKernel()
    net = make(k)
    net.step(added(lease(2), synced=True))
    assert gc.isenabled()
    seen: list[bool] = []
    real = be.model.plan

    def spy(desired: rm.KernelState, actual: rm.KernelState) -> rm.Plan:
        seen.append(gc.isenabled())
        return real(desired, actual)

    monkeypatch.setattr(be.model, "plan", spy)
    net.sync_full()
    assert seen == [False] and gc.isenabled()

    def boom(desired: rm.KernelState, actual: rm.KernelState) -> rm.Plan:
        raise RuntimeError("boom")

    monkeypatch.setattr(be.model, "plan", boom)
    with pytest.raises(RuntimeError):
        net.sync_full()
    assert gc.isenabled()
    gc.disable()
    try:
        monkeypatch.setattr(be.model, "plan", real)
        net.sync_full()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_full_reconcile_freezes_the_state_it_leaves_out_of_later_collections():
    """What is alive after a full reconcile (the leases, the index, the cache) moves to the
    collector's permanent generation, so a later collection does not walk it again; a lease
    added afterwards is collected as usual until the next full reconcile."""
    import gc

    k = FakeKernel()
    net = make(k)
    gc.unfreeze()
    try:
        net.step(added(lease(2), synced=True))     # the first snapshot: a full reconcile
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not any(o is net.index for o in gc.get_objects())   # frozen objects are not listed
        net.step(added(lease(3)))                  # incremental: nothing more is frozen
        assert gc.get_freeze_count() == frozen
        net.sync_full()
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


def test_only_echoes_of_entries_we_deleted_and_did_not_write_again_are_dropped():
    """The monitor thread drops a notification datagram only if it holds nothing but deletions of
    fdb entries or neighbours we deleted and have not written since; each echo is dropped once."""
    from flannel.backends.routed import rtnl

    k = FakeKernel()
    net = make(k)
    net.step(added(lease(2), synced=True))
    net._monitor = object()  # type: ignore[assignment]   # as when notifications work
    f = rm.Fdb("02:00:00:00:00:02", A("198.18.0.2"), "flannel.1")
    other = rm.Fdb("02:00:00:00:00:03", A("198.18.0.3"), "flannel.1")
    idx = k.devs["flannel.1"]
    echo = rtnl.fdb_del_msg(f, idx, 1)
    net._expect_echoes(rm.Plan(del_fdbs=(f,)))
    assert net._only_echoes(echo) and not net._only_echoes(echo)                  # once
    net._expect_echoes(rm.Plan(del_fdbs=(f,)))
    assert not net._only_echoes(rtnl.fdb_del_msg(other, idx, 1))                  # not one we deleted
    assert not net._only_echoes(echo + rtnl.route_del_msg(next(iter(entries(lease(2)).routes)), idx, 2))
    assert not net._only_echoes(rtnl.fdb_del_msg(f, idx + 1, 1))                  # another device
    net._expect_echoes(rm.Plan(set_fdbs=(f,)))                                    # written again
    assert not net._only_echoes(echo)
    # neighbours: the kernel reports the removal without the link-layer address
    n = rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:02", "flannel.1")
    n_echo = rtnl.neigh_del_msg(n, idx, 3)
    assert not net._only_echoes(n_echo)
    net._expect_echoes(rm.Plan(del_neighs=(n,), del_fdbs=(f,)))
    assert net._only_echoes(n_echo) and net._only_echoes(echo) and not net._only_echoes(n_echo)
    net._expect_echoes(rm.Plan(del_neighs=(n,)))
    net._expect_echoes(rm.Plan(set_neighs=(rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:09", "flannel.1"),)))
    assert not net._only_echoes(n_echo)                                           # same key, written again


@settings(max_examples=200, deadline=None)
@given(batches=lease_ops())
def test_the_index_with_the_flat_twin_wants_what_the_general_translation_wants(batches: list[list[LeaseEvent]]) -> None:
    """Two indexes over the same events -- one translating with vxlan's flat twin (as the agent
    does), one with the general flattening of ``vxlan_entries`` -- want the same kernel, skip the
    same leases for the same reasons and report the same touched keys, also after a rebuild."""
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0", local_nets=(N("198.18.0.0/24"),),
                     dev6="flannel-v6.1")
    fast = Index(ctx, vx.vxlan_entries, own=(OWN,), devs=("flannel.1", "eth0"))
    slow = Index(ctx, lambda lz, c: vx.vxlan_entries(lz, c), own=(OWN,), devs=("flannel.1", "eth0"))
    for b in batches:
        for ev in b:
            if ev.type is EventType.ADDED:
                t1, t2 = fast.put(ev.lease), slow.put(ev.lease)
            else:
                t1, t2 = fast.drop(ev.lease.ident), slow.drop(ev.lease.ident)
            assert (t1.routes, t1.neighs, t1.fdbs) == (t2.routes, t2.neighs, t2.fdbs)
        assert fast.state() == slow.state() == slow.winners()
        assert fast.skipped == slow.skipped and fast.blocked == slow.blocked
    fast.rebuild()
    slow.rebuild()
    assert fast.state() == slow.state() and fast.skipped == slow.skipped
