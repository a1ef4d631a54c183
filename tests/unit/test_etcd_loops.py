"""The etcd manager's long-running loops against a scripted registry (no etcd): watch_leases resumes
from the last revision after an outage and relists after a compaction; complete_lease re-acquires a
lost lease and retries a failed renewal; both stop promptly."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel import errors
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd.store import Compacted, WatchChunk
from tests.support import FakeRegistry


def peer(net: str, ip: str) -> Lease:
    return Lease(subnet=IPv4Network(net), attrs=LeaseAttrs(public_ip=IPv4Address(ip)))


class ScriptedHandle:
    """Plays back chunks / exceptions; blocks (up to the timeout) once the script is exhausted."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.cancelled = False

    def get(self, timeout: float) -> WatchChunk | None:
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item  # type: ignore[no-any-return]
        time.sleep(timeout)
        return None

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedRegistry(FakeRegistry):
    def __init__(self, config: str, leases: list[Lease], handles: list[list[Any]]) -> None:
        super().__init__(config, leases)
        self.handles = [ScriptedHandle(h) for h in handles]
        self.watch_starts: list[int] = []
        self.lists = 0
        self.fail_updates = 0

    def list_leases(self, *, ttl: bool = False) -> tuple[list[Lease], int]:
        self.lists += 1
        return super().list_leases(ttl=ttl)

    def _next_handle(self, start: int) -> ScriptedHandle:
        self.watch_starts.append(start)
        return self.handles.pop(0) if self.handles else ScriptedHandle([])

    def watch_leases(self, start_revision):  # type: ignore[no-untyped-def]
        return self._next_handle(start_revision)

    def watch_lease(self, subnet, ipv6_subnet, start_revision):  # type: ignore[no-untyped-def]
        return self._next_handle(start_revision)

    def update_lease(self, subnet, ipv6_subnet, attrs, ttl):  # type: ignore[no-untyped-def]
        if self.fail_updates:
            self.fail_updates -= 1
            raise errors.StoreUnavailable("etcd down (scripted)")
        return super().update_lease(subnet, ipv6_subnet, attrs, ttl)


def make(reg: FakeRegistry, tmp_path: Any, **kw: Any) -> EtcdSubnetManager:
    return EtcdSubnetManager(AgentOptions(subnet_file=str(tmp_path / "subnet.env"), **kw), registry=reg)  # type: ignore[arg-type]


def test_watch_resumes_after_outage_and_relists_after_compaction(tmp_path):
    a, b, c = peer("10.5.1.0/24", "198.18.0.1"), peer("10.5.2.0/24", "198.18.0.2"), peer("10.5.3.0/24", "198.18.0.3")
    reg = ScriptedRegistry('{"Network": "10.5.0.0/16"}', [a], handles=[
        [WatchChunk(12, (LeaseEvent(EventType.ADDED, b),)), errors.StoreUnavailable("connection reset")],
        [WatchChunk(15, ()), WatchChunk(16, (LeaseEvent(EventType.REMOVED, a),)), Compacted(18)],
    ])
    reg.revision = 10
    stop = threading.Event()
    results = []
    gen = make(reg, tmp_path).watch_leases(stop)
    results.append(next(gen))  # snapshot [a] at revision 10
    results.append(next(gen))  # +b
    results.append(next(gen))  # after the outage: -a (the empty chunk produced nothing)
    reg.kv = {(b.subnet, None): b, (c.subnet, None): c}  # type: ignore[dict-item]
    reg.revision = 20
    results.append(next(gen))  # compaction → relist
    stop.set()
    assert list(gen) == []
    assert [r.snapshot for r in results] == [(a,), None, None, (b, c)]
    assert [e.type for e in results[1].events] == [EventType.ADDED]
    assert [(e.type, e.lease.subnet) for e in results[2].events] == [(EventType.REMOVED, a.subnet)]
    assert reg.watch_starts[:3] == [11, 13, 21]  # resumed after the last revision seen, then after the relist
    assert reg.lists == 2


def test_watch_stops_promptly(tmp_path):
    reg = ScriptedRegistry('{"Network": "10.5.0.0/16"}', [], handles=[])
    stop = threading.Event()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.extend(make(reg, tmp_path).watch_leases(stop)))
    t.start()
    deadline = time.monotonic() + 5
    while not reg.watch_starts and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(2)
    assert not t.is_alive()
    assert len(got) == 1 and got[0].snapshot == ()


def test_lost_lease_is_reacquired_with_the_same_subnet(tmp_path):
    own_attrs = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"))
    reg = ScriptedRegistry('{"Network": "10.5.0.0/16"}', [], handles=[])
    m = make(reg, tmp_path)
    own = m.acquire_lease(own_attrs)
    assert own.subnet is not None
    removed = LeaseEvent(EventType.REMOVED, Lease(subnet=own.subnet, attrs=LeaseAttrs()))
    reg.handles = [ScriptedHandle([WatchChunk(50, (removed,))])]
    reg.kv.clear()  # the key is gone (deleted or expired)
    stop = threading.Event()
    seen: list[Lease] = []

    def on_lease(lease: Lease) -> None:
        seen.append(lease)
        stop.set()
    t = threading.Thread(target=m.complete_lease, args=(own, stop, on_lease))
    t.start()
    t.join(5)
    assert not t.is_alive()
    assert [x.subnet for x in seen] == [own.subnet]
    assert reg.creates[-1] == (own.subnet, None)
    assert reg.kv[(own.subnet, None)].attrs == own_attrs


def test_failed_renewal_is_retried(tmp_path):
    reg = ScriptedRegistry('{"Network": "10.5.0.0/16"}', [], handles=[])
    m = make(reg, tmp_path, subnet_lease_ttl=2)
    own = m.acquire_lease(LeaseAttrs(public_ip=IPv4Address("192.0.2.1")))
    reg.fail_updates = 1
    stop = threading.Event()
    seen: list[Lease] = []

    def on_lease(lease: Lease) -> None:
        seen.append(lease)
        stop.set()
    t = threading.Thread(target=m.complete_lease, args=(own, stop, on_lease))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert reg.fail_updates == 0  # the failing renewal happened ...
    assert len(seen) == 1 and seen[0].subnet == own.subnet  # ... and a later one succeeded
    assert seen[0].expiration is not None and own.expiration is not None and seen[0].expiration > own.expiration
