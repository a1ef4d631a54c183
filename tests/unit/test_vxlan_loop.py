"""The reconcile loop of vxlan/host-gw (RoutedNetwork) against a fake kernel port.

The kernel side has its own integration tests; here a fake port lets us make one peer's entries
fail and check the loop's promises: the failure is logged and retried with backoff, other peers
are programmed, nothing is removed, and the loop never ends because of it.
"""

from __future__ import annotations

import logging
import queue
import threading
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

from flannel.backends.base import ExternalInterface
from flannel.backends.routed import model as rm
from flannel.backends.routed import reconcile as be
from flannel.backends.routed.netlink import Scope
from flannel.backends.vxlan import network as vx
from flannel.config import parse_network_config
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent

CFG = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
EXT = ExternalInterface("eth0", 2, 1500, A("198.18.0.1"), A("198.18.0.1"))


class FakeKernel:
    """Holds entries like the kernel; ``bad`` entries fail to be set while ``failing`` is True."""

    batch_threshold = 10 ** 9

    def __init__(self) -> None:
        self.state = rm.EMPTY
        self.failing = True
        self.bad: set[object] = set()
        self.applied: list[rm.Plan] = []
        self.dumps = 0

    def link_index(self, name: str) -> int | None:
        return 2 if name == "eth0" else None

    def connected_nets(self, index: int, version: int = 4) -> tuple[N, ...]:
        return (N("198.18.0.0/24"),) if version == 4 else ()

    def dump(self, scope: Scope) -> rm.KernelState:
        self.dumps += 1
        return self.state

    def apply(self, plan: rm.Plan) -> list[tuple[object, str]]:
        self.applied.append(plan)
        failed: list[tuple[object, str]] = []
        routes, neighs, fdbs = set(self.state.routes), set(self.state.neighs), set(self.state.fdbs)
        routes -= set(plan.del_routes)
        neighs -= set(plan.del_neighs)
        fdbs -= set(plan.del_fdbs)
        for kind, items in ((fdbs, plan.set_fdbs), (neighs, plan.set_neighs), (routes, plan.set_routes)):
            for e in items:
                if self.failing and e in self.bad:
                    failed.append((e, f"set {e}: (22, 'Invalid argument')"))
                    continue
                if isinstance(e, rm.Route):
                    kind -= {r for r in kind if r.dst == e.dst}
                kind.add(e)
        self.state = rm.KernelState(frozenset(routes), frozenset(neighs), frozenset(fdbs))
        return failed

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def lease(i: int) -> Lease:
    return Lease(N(f"10.5.{i}.0/24"), LeaseAttrs(public_ip=A(f"198.18.0.{i}"), backend_type="vxlan",
                                                  backend_data=f'{{"VNI":1,"VtepMAC":"02:00:00:00:00:{i:02x}"}}'))


def make(kernel: FakeKernel) -> be.RoutedNetwork:
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0")
    return be.RoutedNetwork(lease=Lease(N("10.5.1.0/24"), LeaseAttrs()), mtu=1450, nl=kernel, ctx=ctx,  # type: ignore[arg-type]
                            config=CFG, translate=vx.vxlan_entries, ext_iface=EXT)


def entries(*leases: Lease) -> rm.KernelState:
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0")
    return rm.desired_state(leases, ctx, vx.vxlan_entries).state


def test_failing_peer_is_retried_with_backoff_and_others_are_programmed(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    monkeypatch.setattr(be, "time", clock)
    k = FakeKernel()
    net = make(k)
    p2, p3 = lease(2), lease(3)
    k.bad = set(entries(p3).neighs)
    net.step(Batch((LeaseEvent(EventType.ADDED, p2), LeaseEvent(EventType.ADDED, p3)), synced=True))
    assert k.state.routes >= entries(p2).routes and k.state.neighs == entries(p2).neighs
    assert "set neigh 10.5.3.0 lladdr 02:00:00:00:00:03 dev flannel.1: (22, 'Invalid argument')" in caplog.text
    n_applied = len(k.applied)
    net.step(None)                      # before the backoff expires: no new attempt
    assert len(k.applied) == n_applied
    clock.now += 1.01
    net.step(None)                      # retry (still failing): backoff doubles
    assert len(k.applied) == n_applied + 1
    k.failing = False
    clock.now += 1.5
    net.step(None)
    assert len(k.applied) == n_applied + 1   # 2 s backoff not over yet
    clock.now += 1.0
    net.step(None)
    assert k.state == entries(p2, p3)
    # converged: a tick with nothing to do writes nothing
    n_applied = len(k.applied)
    net.step(None)
    assert len(k.applied) == n_applied


def test_events_before_first_snapshot_only_update_the_peer_table():
    k = FakeKernel()
    k.state = entries(lease(2))
    net = make(k)
    net.step(Batch((LeaseEvent(EventType.ADDED, lease(3)),)))
    assert k.applied == [] and k.dumps == 0
    net.step(Batch((LeaseEvent(EventType.ADDED, lease(2)),), synced=True))
    assert k.dumps == 1
    assert len(k.applied) == 1 and set(k.applied[0].set_routes) == set(entries(lease(3)).routes)
    assert k.applied[0].del_routes == ()


def test_incremental_batches_diff_against_cache_without_dumping():
    k = FakeKernel()
    net = make(k)
    net.step(Batch((LeaseEvent(EventType.ADDED, lease(2)),), synced=True))
    dumps = k.dumps
    net.step(Batch((LeaseEvent(EventType.ADDED, lease(3)),)))
    net.step(Batch((LeaseEvent(EventType.REMOVED, lease(2)),)))
    assert k.dumps == dumps
    assert k.state == entries(lease(3))


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
    q.put(Batch((LeaseEvent(EventType.ADDED, lease(2)),), synced=True))
    q.put(Batch((LeaseEvent(EventType.ADDED, lease(2)),), synced=True))
    q.put(None)
    t = threading.Thread(target=net.run, args=(q, threading.Event()))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert "unexpected error in reconcile step" in caplog.text
    assert k.state == entries(lease(2))
