"""EtcdSubnetManager against a real etcd (in-process managers in the root namespace talking to
127.0.0.1; no agents, no packets): concurrent allocation, reuse, renewal, loss of our key,
compaction, garbage records, an etcd outage, reservations."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flannel import wire
from flannel.lease import EventType, Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.watcher import LeaseWatcher
from tests.support import acquire, wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
#: our managers allocate from 10.8.1-50.0/24; fake peers live at 10.8.99.0 and above (created directly)
CONFIG_8 = '{"Network": "10.8.0.0/16", "SubnetMax": "10.8.50.0"}'


def put_config(srv, cfg: str) -> None:  # type: ignore[no-untyped-def]
    srv.etcdctl("put", f"{PREFIX}/config", cfg)


def key_of(net: str) -> str:
    return f"{PREFIX}/subnets/{net.replace('/', '-')}"


def put_lease(srv, net: str, ip: str, **extra: Any) -> None:  # type: ignore[no-untyped-def]
    value = json.dumps({"PublicIP": ip, "PublicIPv6": None, **extra}, separators=(",", ":"))
    srv.etcdctl("put", key_of(net), value)


def attrs(ip: str) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan", backend_data='{"VNI":1}')


@pytest.fixture
def make_manager(etcd_server, tmp_path):  # type: ignore[no-untyped-def]
    managers: list[EtcdSubnetManager] = []

    def make(**kw: Any) -> EtcdSubnetManager:
        kw.setdefault("subnet_file", str(tmp_path / "subnet.env"))
        m = EtcdSubnetManager(AgentOptions(etcd_endpoints=(etcd_server.endpoint,), **kw))
        managers.append(m)
        return m
    yield make
    for m in managers:
        m.close()


class Background:
    """Runs a callable on a thread with a stop event; joined (and checked) at the end."""

    def __init__(self, fn: Callable[[threading.Event], Any]) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                fn(self.stop)
            except BaseException as e:  # surfaced by close()
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "did not stop within 5 s of the stop event"
        assert self.error is None, f"background thread failed: {self.error!r}"


class WatchFeed:
    """watch_leases on a thread, every result kept and also diffed by a LeaseWatcher."""

    def __init__(self, manager: EtcdSubnetManager, own: Lease) -> None:
        self.results: list[WatchResult] = []
        self.watcher = LeaseWatcher(own)
        self.lock = threading.Lock()

        def run(stop: threading.Event) -> None:
            for result in manager.watch_leases(manager.get_network_config(), stop):
                with self.lock:
                    self.results.append(result)
                    self.watcher.apply(result)
        self.bg = Background(run)

    def tracked(self) -> dict[IPv4Network | None, Lease]:
        with self.lock:
            return {lease.subnet: lease for lease in self.watcher.tracked()}

    def snapshots(self) -> int:
        with self.lock:
            return sum(1 for r in self.results if r.snapshot is not None)


def test_30_concurrent_managers_get_30_distinct_subnets(etcd_server, make_manager):
    put_config(etcd_server, '{"Network": "10.7.0.0/16", "SubnetMin": "10.7.1.0", "SubnetMax": "10.7.30.0"}')
    managers = [make_manager() for _ in range(30)]
    barrier = threading.Barrier(30)

    def take(i: int) -> Lease:
        barrier.wait()
        return acquire(managers[i], attrs(f"192.0.2.{i + 1}"))
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        leases = list(pool.map(take, range(30)))
    subnets = {lease.subnet for lease in leases}
    assert len(subnets) == 30
    assert subnets == {IPv4Network(f"10.7.{i}.0/24") for i in range(1, 31)}
    stored = etcd_server.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").split()
    assert len(stored) == 30


def test_restart_gets_same_subnet(etcd_server, make_manager):
    put_config(etcd_server, CONFIG_8)
    first = acquire(make_manager(), attrs("192.0.2.1"))
    acquire(make_manager(), attrs("192.0.2.2"))
    again = acquire(make_manager(subnet_file="/nonexistent/subnet.env"), attrs("192.0.2.1"))
    assert again.subnet == first.subnet


def test_short_ttl_renewed_and_deleted_key_reacquired(etcd_server, make_manager):
    put_config(etcd_server, CONFIG_8)
    ttl = 4
    m = make_manager(subnet_lease_ttl=ttl)
    lease = acquire(m, attrs("192.0.2.1"))
    key = key_of(str(lease.subnet))
    seen: list[Lease] = []
    bg = Background(lambda stop: m.complete_lease(m.get_network_config(), lease, stop, seen.append))
    try:
        t_end = time.monotonic() + 2 * ttl + 1
        while time.monotonic() < t_end:  # the key must survive two TTLs (renewals)
            assert etcd_server.etcdctl("get", "--keys-only", key).strip() == key
            time.sleep(0.5)
        assert len(seen) >= 2
        lease_id = json.loads(etcd_server.etcdctl("get", "-w", "json", key))["kvs"][0]["lease"]
        assert lease_id != 0

        before = len(seen)
        etcd_server.etcdctl("del", key)
        wait_for(lambda: etcd_server.etcdctl("get", "--keys-only", key).strip() == key, what="re-acquired key")
        wait_for(lambda: len(seen) > before, what="on_lease after re-acquisition")
        assert all(x.subnet == lease.subnet for x in seen[before:])  # same subnet
        assert json.loads(etcd_server.etcdctl("get", "--print-value-only", key))["PublicIP"] == "192.0.2.1"
    finally:
        bg.close()


def test_compaction_relists_and_reemits_changed_attributes(etcd_server, make_manager):
    put_config(etcd_server, CONFIG_8)
    own = acquire(make_manager(), attrs("192.0.2.1"))
    put_lease(etcd_server, "10.8.100.0/24", "198.18.0.100", BackendType="vxlan",
              BackendData={"VtepMAC": "aa:00:00:00:00:01"})
    put_lease(etcd_server, "10.8.101.0/24", "198.18.0.101")
    m = make_manager()
    stop = threading.Event()
    gen: Iterator[WatchResult] = m.watch_leases(m.get_network_config(), stop)
    watcher = LeaseWatcher(own)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def pull() -> WatchResult:
            result = pool.submit(next, gen).result(timeout=15)
            watcher.apply(result)
            return result
        try:
            snap = pull()
            assert snap.snapshot is not None and len(snap.snapshot) == 3
            # while the watch is not established (the generator is suspended after its snapshot):
            # change one peer's attributes, delete another, add a third, and compact everything.
            put_lease(etcd_server, "10.8.100.0/24", "198.18.0.200", BackendType="vxlan",
                      BackendData={"VtepMAC": "aa:00:00:00:00:02"})
            etcd_server.etcdctl("del", key_of("10.8.101.0/24"))
            put_lease(etcd_server, "10.8.102.0/24", "198.18.0.102")
            rev = json.loads(etcd_server.etcdctl("get", "-w", "json", f"{PREFIX}/config"))["header"]["revision"]
            etcd_server.etcdctl("compact", str(rev))

            relist = pull()
            assert relist.snapshot is not None  # compaction → a new snapshot
            batches = watcher.apply(relist)  # idempotent second apply → no events
            assert all(not b.events for b in batches)
            tracked = {x.subnet: x for x in watcher.tracked()}
            assert set(tracked) == {IPv4Network("10.8.100.0/24"), IPv4Network("10.8.102.0/24")}
            assert tracked[IPv4Network("10.8.100.0/24")].attrs.public_ip == IPv4Address("198.18.0.200")

            # and the watch goes on from the new snapshot
            put_lease(etcd_server, "10.8.103.0/24", "198.18.0.103")
            ev = pull()
            assert [(e.type, e.lease.subnet) for e in ev.events] == [(EventType.ADDED, IPv4Network("10.8.103.0/24"))]
        finally:
            stop.set()
            pool.submit(gen.close)


def test_compaction_diff_through_lease_watcher(etcd_server, make_manager):
    """The LeaseWatcher re-emits a peer whose attributes changed across the compaction gap."""
    put_config(etcd_server, CONFIG_8)
    own = acquire(make_manager(), attrs("192.0.2.1"))
    put_lease(etcd_server, "10.8.100.0/24", "198.18.0.100")
    m = make_manager()
    stop = threading.Event()
    gen = m.watch_leases(m.get_network_config(), stop)
    watcher = LeaseWatcher(own)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            watcher.apply(pool.submit(next, gen).result(timeout=15))
            put_lease(etcd_server, "10.8.100.0/24", "198.18.0.110")
            put_lease(etcd_server, "10.8.100.0/24", "198.18.0.111")  # compact past the watch's start
            rev = json.loads(etcd_server.etcdctl("get", "-w", "json", f"{PREFIX}/config"))["header"]["revision"]
            etcd_server.etcdctl("compact", str(rev))
            result = pool.submit(next, gen).result(timeout=15)
            assert result.snapshot is not None
            events = [e for b in watcher.apply(result) for e in b.events]
            assert [(e.type, e.lease.attrs.public_ip) for e in events] == [
                (EventType.ADDED, IPv4Address("198.18.0.111"))]
        finally:
            stop.set()
            pool.submit(gen.close)


def test_garbage_and_stray_keys_do_not_remove_peers(etcd_server, make_manager, caplog):
    caplog.set_level(logging.WARNING)
    put_config(etcd_server, CONFIG_8)
    own = acquire(make_manager(), attrs("192.0.2.1"))
    put_lease(etcd_server, "10.8.100.0/24", "198.18.0.100")
    put_lease(etcd_server, "10.8.101.0/24", "198.18.0.101")
    feed = WatchFeed(make_manager(), own)
    try:
        wait_for(lambda: len(feed.tracked()) == 2, what="snapshot with two peers")
        etcd_server.etcdctl("put", key_of("10.8.102.0/24"), "this is not json")
        etcd_server.etcdctl("put", f"{PREFIX}/subnets/not-a-subnet", "{}")
        etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.8.103.0-24/deeper", '{"PublicIP":"198.18.0.103"}')
        etcd_server.etcdctl("put", f"{PREFIX}/subnetsX/10.8.104.0-24", '{"PublicIP":"198.18.0.104"}')
        etcd_server.etcdctl("put", key_of("10.8.105.0/24"), '{"PublicIP":"not an ip"}')
        put_lease(etcd_server, "10.8.106.0/24", "198.18.0.106")
        wait_for(lambda: IPv4Network("10.8.106.0/24") in feed.tracked(), what="the valid lease after the garbage")
        assert set(feed.tracked()) == {IPv4Network(n) for n in ("10.8.100.0/24", "10.8.101.0/24", "10.8.106.0/24")}
        assert feed.snapshots() == 1  # garbage never became a snapshot
        removed = [e for r in feed.results for e in r.events if e.type == EventType.REMOVED]
        assert removed == []
        assert key_of("10.8.102.0/24") in caplog.text and key_of("10.8.105.0/24") in caplog.text
        assert f"{PREFIX}/subnets/not-a-subnet" in caplog.text
    finally:
        feed.bg.close()


def test_etcd_outage_watch_resumes_and_lease_survives(etcd_server, make_manager, caplog):
    caplog.set_level(logging.WARNING)
    put_config(etcd_server, CONFIG_8)
    m = make_manager()
    own = acquire(m, attrs("192.0.2.1"))
    put_lease(etcd_server, "10.8.100.0/24", "198.18.0.100")
    feed = WatchFeed(make_manager(), own)
    keeper = Background(lambda stop: m.complete_lease(m.get_network_config(), own, stop))
    try:
        wait_for(lambda: IPv4Network("10.8.100.0/24") in feed.tracked(), what="initial snapshot")
        put_lease(etcd_server, "10.8.99.0/24", "198.18.0.99")  # seen only through an established watch
        wait_for(lambda: IPv4Network("10.8.99.0/24") in feed.tracked(), what="watch established")
        etcd_server.etcdctl("del", key_of("10.8.99.0/24"))
        wait_for(lambda: IPv4Network("10.8.99.0/24") not in feed.tracked(), what="watch established")
        etcd_server.stop()
        time.sleep(10)  # the outage itself is the scenario
        assert feed.bg.thread.is_alive() and keeper.thread.is_alive()
        etcd_server.start()
        put_lease(etcd_server, "10.8.101.0/24", "198.18.0.101")
        etcd_server.etcdctl("del", key_of("10.8.100.0/24"))
        wait_for(lambda: set(feed.tracked()) == {IPv4Network("10.8.101.0/24")}, timeout=30,
                 what="changes made after the restart")
        assert feed.snapshots() == 1  # resumed from the last revision, no relist needed
        assert "the lease watch failed" in caplog.text
        assert etcd_server.etcdctl("get", "--keys-only", key_of(str(own.subnet))).strip()
    finally:
        feed.bg.close()
        keeper.close()


def test_reservation_survives_owner_acquire(etcd_server, make_manager):
    put_config(etcd_server, CONFIG_8)
    put_lease(etcd_server, "10.8.27.0/24", "192.0.2.1")  # etcdctl put without --lease: a reservation
    m = make_manager(subnet_lease_ttl=2)  # a wrongly renewed lease would be renewed after ~1 s
    lease = acquire(m, attrs("192.0.2.1"))
    assert lease.subnet == IPv4Network("10.8.27.0/24")
    assert lease.expiration is None
    bg = Background(lambda stop: m.complete_lease(m.get_network_config(), lease, stop))
    try:
        time.sleep(1.5)  # give a (wrong) renewal the chance to attach a lease
        kv = json.loads(etcd_server.etcdctl("get", "-w", "json", key_of("10.8.27.0/24")))["kvs"][0]
        assert kv.get("lease", 0) == 0  # still no etcd lease: a reservation
    finally:
        bg.close()
    value = etcd_server.etcdctl("get", "--print-value-only", key_of("10.8.27.0/24")).strip()
    assert wire.decode_attrs(value) == attrs("192.0.2.1")  # our attrs were published
