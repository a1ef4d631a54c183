"""The etcd manager's watch loop against a scripted registry (no etcd): it resumes from the last
delivered revision after an outage, relists after a compaction, follows the config key (an
incompatible change ends it with ConfigChanged, anything else is logged) and stops promptly.
The lease keeper's loops are in test_etcd_keeper.py."""

from __future__ import annotations

import logging
import re
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flannel import errors
from flannel.config import NetworkConfig, parse_network_config
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd.store import Compacted, ConfigUpdate, ResponseTooLarge, WatchChunk
from tests.support import FakeRegistry

CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'


def peer(net: str, ip: str) -> Lease:
    return Lease(subnet=IPv4Network(net), attrs=LeaseAttrs(public_ip=IPv4Address(ip)))


class ScriptedHandle:
    """Plays back chunks / exceptions; once the script is exhausted, blocks until cancelled (as a
    real watch does: only the stop hook ends the wait)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.cancelled = threading.Event()

    def next(self) -> WatchChunk:
        if self.script:
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item  # type: ignore[no-any-return]
        assert self.cancelled.wait(30), "the watch was never cancelled"
        raise errors.StoreUnavailable("watch cancelled")

    def cancel(self) -> None:
        self.cancelled.set()


class ScriptedRegistry(FakeRegistry):
    def __init__(self, config: str, leases: list[Lease], handles: list[list[Any]]) -> None:
        super().__init__(config, leases)
        self.handles = [ScriptedHandle(h) for h in handles]
        self.watch_starts: list[int] = []
        self.lists = 0

    def list_leases(self, *, ttl: bool = False) -> Any:
        self.lists += 1
        return super().list_leases(ttl=ttl)

    def watch_leases(self, start_revision):  # type: ignore[no-untyped-def]
        self.watch_starts.append(start_revision)
        return self.handles.pop(0) if self.handles else ScriptedHandle([])


def make(reg: FakeRegistry, tmp_path: Any) -> EtcdSubnetManager:
    return EtcdSubnetManager(AgentOptions(subnet_file=str(tmp_path / "subnet.env")), registry=reg)  # type: ignore[arg-type]


def running() -> NetworkConfig:
    return parse_network_config(CONFIG)


def test_watch_resumes_after_outage_and_relists_after_compaction(tmp_path):
    a, b, c = peer("10.5.1.0/24", "198.18.0.1"), peer("10.5.2.0/24", "198.18.0.2"), peer("10.5.3.0/24", "198.18.0.3")
    reg = ScriptedRegistry(CONFIG, [a], handles=[
        [WatchChunk(12, (LeaseEvent(EventType.ADDED, b),)), errors.StoreUnavailable("connection reset")],
        [WatchChunk(15, ()), WatchChunk(16, (LeaseEvent(EventType.REMOVED, a),)), Compacted(18)],
    ])
    reg.revision = 10
    stop = threading.Event()
    results = []
    gen = make(reg, tmp_path).watch_leases(running(), stop)
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


def test_a_config_chunk_does_not_move_the_lease_cursor(tmp_path):
    """Config changes arrive on the same watch: a chunk with only a config change (here with
    revision 0) must not move the cursor back; resuming uses the last event's revision."""
    b, c = peer("10.5.2.0/24", "198.18.0.2"), peer("10.5.3.0/24", "198.18.0.3")
    reg = ScriptedRegistry(CONFIG, [], handles=[
        [WatchChunk(12, (LeaseEvent(EventType.ADDED, b),)), WatchChunk(0, (), ConfigUpdate(CONFIG)),
         errors.StoreUnavailable("connection reset")],
        [WatchChunk(13, (LeaseEvent(EventType.ADDED, c),))],
    ])
    reg.revision = 10
    stop = threading.Event()
    gen = make(reg, tmp_path).watch_leases(running(), stop)
    assert next(gen).snapshot == ()
    assert [e.lease for e in next(gen).events] == [b]
    assert [e.lease for e in next(gen).events] == [c]
    stop.set()
    gen.close()
    assert reg.watch_starts == [11, 13]


@pytest.mark.parametrize("new,why", [
    ('{"Network": "10.6.0.0/16", "Backend": {"Type": "vxlan"}}', "Network 10.5.0.0/16 → 10.6.0.0/16"),
    ('{"Network": "10.5.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan"}}', "SubnetLen 24 → 26"),
    ('{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}', "Backend.Type vxlan → host-gw"),
])
def test_an_incompatible_config_change_ends_the_watch_with_config_changed(tmp_path, new, why):
    reg = ScriptedRegistry(CONFIG, [], handles=[[WatchChunk(0, (), ConfigUpdate(new))]])
    gen = make(reg, tmp_path).watch_leases(running(), threading.Event())
    assert next(gen).snapshot == ()
    with pytest.raises(errors.ConfigChanged) as exc:
        next(gen)
    assert isinstance(exc.value, errors.ConfigError)  # fatal: the daemon exits 1
    assert why in str(exc.value) and "etcd key /coreos.com/network/config" in str(exc.value)


def test_a_config_changed_while_the_watch_was_down_is_noticed_when_it_resumes(tmp_path):
    reg = ScriptedRegistry(CONFIG, [], handles=[[errors.StoreUnavailable("connection reset")]])
    gen = make(reg, tmp_path).watch_leases(running(), threading.Event())
    assert next(gen).snapshot == ()
    reg.config = '{"Network": "10.9.0.0/16", "Backend": {"Type": "vxlan"}}'  # the config event itself was missed
    with pytest.raises(errors.ConfigChanged, match=re.escape("Network 10.5.0.0/16 → 10.9.0.0/16")):
        next(gen)


@pytest.mark.parametrize("update,logged", [
    (ConfigUpdate('{"Network": "10.5.0.0/16", "SubnetMax": "10.5.200.0", "Backend": {"Type": "vxlan"}}'),
     "SubnetMax 10.5.255.0 → 10.5.200.0"),
    (ConfigUpdate('{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}'), "Backend options"),
    (ConfigUpdate("{not json"), "now invalid"),
    (ConfigUpdate(None), "was deleted"),
])
def test_other_config_changes_are_logged_and_the_watch_goes_on(tmp_path, caplog, update, logged):
    caplog.set_level(logging.WARNING)
    b = peer("10.5.2.0/24", "198.18.0.2")
    reg = ScriptedRegistry(CONFIG, [], handles=[[WatchChunk(0, (), update),
                                                 WatchChunk(12, (LeaseEvent(EventType.ADDED, b),))]])
    stop = threading.Event()
    gen = make(reg, tmp_path).watch_leases(running(), stop)
    assert next(gen).snapshot == ()
    assert [e.lease for e in next(gen).events] == [b]  # still watching
    stop.set()
    gen.close()
    assert logged in caplog.text


def test_watch_stops_promptly(tmp_path):
    reg = ScriptedRegistry(CONFIG, [], handles=[])
    stop = threading.Event()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.extend(make(reg, tmp_path).watch_leases(running(), stop)))
    t.start()
    deadline = time.monotonic() + 5
    while not reg.watch_starts and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(2)
    assert not t.is_alive()
    assert len(got) == 1 and got[0].snapshot == ()


def test_watch_keeps_going_after_a_non_transient_error(tmp_path, caplog):
    """PermissionDenied (or a TLS failure) while running: logged as an error and retried, never fatal."""
    caplog.set_level(logging.ERROR)
    b = peer("10.5.2.0/24", "198.18.0.2")
    reg = ScriptedRegistry(CONFIG, [], handles=[[errors.PermissionDenied("permission denied for user x")],
                                                [WatchChunk(12, (LeaseEvent(EventType.ADDED, b),))]])
    stop = threading.Event()
    gen = make(reg, tmp_path).watch_leases(running(), stop)
    assert next(gen).snapshot == ()
    assert [e.lease for e in next(gen).events] == [b]
    stop.set()
    gen.close()
    assert "permission denied for user x" in caplog.text


def test_an_unreadable_config_key_at_rewatch_is_logged_not_fatal(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    b = peer("10.5.2.0/24", "198.18.0.2")

    class BadConfigLater(ScriptedRegistry):
        def get_config(self) -> str:
            if self.watch_starts:  # the first check passes; the one at re-watch finds garbage
                raise errors.ConfigError("invalid network config in etcd key /coreos.com/network/config: not UTF-8")
            return super().get_config()
    reg = BadConfigLater(CONFIG, [], handles=[[errors.StoreUnavailable("connection reset")],
                                              [WatchChunk(12, (LeaseEvent(EventType.ADDED, b),))]])
    stop = threading.Event()
    gen = make(reg, tmp_path).watch_leases(running(), stop)
    assert next(gen).snapshot == ()
    assert [e.lease for e in next(gen).events] == [b]
    stop.set()
    gen.close()
    assert "not UTF-8; keeping the running config" in caplog.text


def test_the_first_snapshot_is_the_acquisitions_listing_and_a_too_large_catch_up_relists(tmp_path):
    """After acquire_lease the watch starts from the listing the acquisition read (no second listing
    of every lease); a response too large to receive is handled like a compaction: a relist."""
    a = peer("10.5.1.0/24", "198.18.0.1")
    reg = ScriptedRegistry(CONFIG, [a], handles=[[ResponseTooLarge("too large")]])
    reg.revision = 10
    m = make(reg, tmp_path)
    own = m.acquire_lease(running(), LeaseAttrs(public_ip=IPv4Address("198.18.0.9")))
    # a peer that appears later, on a subnet other than the one we were given (the choice is random)
    b = peer("10.5.3.0/24" if own.subnet == IPv4Network("10.5.2.0/24") else "10.5.2.0/24", "198.18.0.2")
    assert reg.lists == 1
    stop = threading.Event()
    gen = m.watch_leases(running(), stop)
    first = next(gen)
    assert first.snapshot == (a,)  # as listed before our own lease was created
    assert reg.lists == 1
    reg.kv[(b.subnet, None)] = b  # type: ignore[index]
    second = next(gen)  # the too-large response → relist
    assert reg.watch_starts[0] == 11  # from the acquisition's listing (revision 10)
    assert reg.lists == 2
    assert second.snapshot is not None and set(second.snapshot) == {a, b, own}
    stop.set()
    gen.close()


def test_the_acquisitions_listing_is_not_the_first_snapshot_when_stale_or_when_the_acquisition_deleted_a_lease(
        tmp_path, monkeypatch):
    """The watch lists again (a) when the acquisition's listing is older than FIRST_SNAPSHOT_MAX_AGE
    (the watch would replay a backlog from an old revision), and (b) when the acquisition deleted
    our incompatible lease after reading it (that listing still shows it: it would be handed to the
    backend as a peer until the delete event came)."""
    from flannel.subnet_managers.etcd import manager as etcd_manager
    a = peer("10.5.1.0/24", "198.18.0.1")
    me = LeaseAttrs(public_ip=IPv4Address("198.18.0.9"))
    stale = ScriptedRegistry(CONFIG, [a], handles=[])
    m = make(stale, tmp_path)
    m.acquire_lease(running(), me)
    monkeypatch.setattr(etcd_manager, "FIRST_SNAPSHOT_MAX_AGE", -1.0)
    stop = threading.Event()
    gen = m.watch_leases(running(), stop)
    assert next(gen).snapshot is not None and stale.lists == 2
    stop.set()
    gen.close()
    monkeypatch.undo()

    old = Lease(subnet=IPv4Network("10.99.0.0/24"), attrs=me, expiration=time.time() + 600)  # outside 10.5/16
    reg = ScriptedRegistry(CONFIG, [a, old], handles=[])
    m = make(reg, tmp_path)
    own = m.acquire_lease(running(), me)
    assert reg.deletes == [(old.subnet, None)] and own.subnet != old.subnet and reg.lists == 1
    stop = threading.Event()
    gen = m.watch_leases(running(), stop)
    first = next(gen)
    assert reg.lists == 2
    assert first.snapshot is not None and old not in first.snapshot and a in first.snapshot
    stop.set()
    gen.close()


class GatedRegistry(ScriptedRegistry):
    """Listings wait for ``gate`` (etcd still answering) and the first ``fail`` of them raise."""

    def __init__(self, leases: list[Lease], *, fail: int = 0) -> None:
        super().__init__(CONFIG, leases, handles=[])
        self.gate = threading.Event()
        self.fail = fail
        self.listing_threads: list[str] = []

    def list_leases(self, *, ttl: bool = False) -> Any:
        self.listing_threads.append(threading.current_thread().name)
        assert self.gate.wait(30)
        if self.fail:
            self.fail -= 1
            self.lists += 1
            raise errors.StoreUnavailable("connection refused")
        return super().list_leases(ttl=ttl)


def test_a_prefetched_listing_serves_the_acquisition_and_the_first_snapshot(tmp_path):
    """prefetch_leases lists on a thread of its own while the caller goes on (here: while etcd has
    not answered yet); the acquisition waits for that listing instead of listing again, and the
    watch starts from it. A second prefetch_leases does nothing."""
    a = peer("10.5.1.0/24", "198.18.0.1")
    reg = GatedRegistry([a])
    reg.revision = 10
    m = make(reg, tmp_path)
    m.prefetch_leases()
    m.prefetch_leases()
    assert reg.gate.wait(0) is False  # the caller was not held up by the listing
    got: list[Lease] = []
    acquiring = threading.Thread(target=lambda: got.append(m.acquire_lease(running(), LeaseAttrs(
        public_ip=IPv4Address("198.18.0.9")))))
    acquiring.start()
    reg.gate.set()
    acquiring.join(30)
    assert got and got[0].subnet != a.subnet
    assert reg.lists == 1 and reg.listing_threads == ["lease-prefetch"]
    stop = threading.Event()
    gen = m.watch_leases(running(), stop)
    assert next(gen).snapshot == (a,)
    assert reg.lists == 1
    stop.set()
    gen.close()


def test_a_failed_or_stale_prefetch_makes_the_acquisition_list_itself(tmp_path, monkeypatch):
    from flannel.subnet_managers.etcd import manager as etcd_manager
    me = LeaseAttrs(public_ip=IPv4Address("198.18.0.9"))
    reg = GatedRegistry([peer("10.5.1.0/24", "198.18.0.1")], fail=1)
    reg.gate.set()
    m = make(reg, tmp_path)
    m.prefetch_leases()
    own = m.acquire_lease(running(), me)   # the prefetch failed: no error, a listing of its own
    assert own.subnet is not None and reg.lists == 2
    assert reg.listing_threads[0] == "lease-prefetch" and reg.listing_threads[1] != "lease-prefetch"

    stale = GatedRegistry([])
    stale.gate.set()
    m = make(stale, tmp_path)
    m.prefetch_leases()
    monkeypatch.setattr(etcd_manager, "FIRST_SNAPSHOT_MAX_AGE", -1.0)
    m.acquire_lease(running(), me)
    assert stale.lists == 2 and stale.listing_threads[1] != "lease-prefetch"


def test_only_the_first_acquisition_takes_the_prefetch(tmp_path):
    """A later acquisition (the keeper re-acquiring a lost lease, hours later) lists afresh."""
    reg = GatedRegistry([])
    reg.gate.set()
    m = make(reg, tmp_path)
    m.prefetch_leases()
    me = LeaseAttrs(public_ip=IPv4Address("198.18.0.9"))
    m.acquire_lease(running(), me)
    m.prefetch_leases()   # not again
    m.acquire_lease(running(), me)
    assert reg.lists == 2 and reg.listing_threads == ["lease-prefetch", "MainThread"]
