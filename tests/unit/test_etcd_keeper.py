"""The lease keeper (keeper.py): its pure decisions, and its states driven against the in-memory
FakeRegistry: conditional renewals, re-reading instead of deleting after an ambiguous failure,
re-acquisition after a loss (same subnet when it is free, another one when it is not)."""

from __future__ import annotations

import queue
import threading
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

import pytest

from flannel import errors
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd.keeper import LeaseKeeper, Verdict, judge, renew_at
from flannel.subnet_managers.etcd.store import Hints, Stored, WatchChunk
from tests.support import FakeRegistry, acquire

CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'
OURS = LeaseAttrs(public_ip=IPv4Address("192.0.2.1"), backend_type="vxlan")
SN = IPv4Network("10.5.7.0/24")
SN_OF: list[Any] = [SN]  # the subnet the running keeper holds (set by Run)


def lease(ip: str = "192.0.2.1", *, net: IPv4Network = SN, expiration: float | None = 1e12) -> Lease:
    return Lease(subnet=net, attrs=LeaseAttrs(public_ip=IPv4Address(ip)), expiration=expiration)


# -- pure decisions -------------------------------------------------------------------------------

@pytest.mark.parametrize("stored,verdict", [
    (Stored(lease(), True, 5, 9), Verdict.OURS),
    (Stored(None, False, 0, 9), Verdict.GONE),
    (Stored(lease("192.0.2.99"), True, 5, 9), Verdict.TAKEN),
    (Stored(None, True, 5, 9), Verdict.UNREADABLE),  # the key exists but its value is garbage
])
def test_judge(stored, verdict):
    assert judge(lease(), stored) is verdict


def test_judge_ipv6_only_node_compares_its_ipv6_address():
    ours = Lease(subnet=SN, attrs=LeaseAttrs(public_ipv6=IPv6Address("fd00::1")))
    other = Lease(subnet=SN, attrs=LeaseAttrs(public_ipv6=IPv6Address("fd00::2")))
    assert judge(ours, Stored(ours, True, 1, 1)) is Verdict.OURS
    assert judge(ours, Stored(other, True, 1, 1)) is Verdict.TAKEN  # both have PublicIP 0.0.0.0


def test_renew_at_reservation_never():
    assert renew_at(None, 100.0, 3600) is None


# -- the keeper against the fake registry ---------------------------------------------------------

class Handle:
    """A watch handle the test can push chunks into (``next`` blocks, as a real watch does)."""

    def __init__(self) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.cancelled = False

    def next(self) -> WatchChunk:
        item = self.q.get(timeout=60)
        if item is None:
            raise errors.StoreUnavailable("watch cancelled")
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def cancel(self) -> None:
        self.cancelled = True
        self.q.put(None)


class KeeperRegistry(FakeRegistry):
    """FakeRegistry plus own-key watches, and scripted renewal failures."""

    def __init__(self) -> None:
        super().__init__(CONFIG)
        self.handles: list[Handle] = []
        self.renew_errors: list[BaseException] = []
        self.apply_before_failing = False
        self.reads = 0
        self.attempts = 0

    def get_lease(self, subnet, ipv6_subnet, *, ttl=True):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().get_lease(subnet, ipv6_subnet, ttl=ttl)

    def watch_lease(self, subnet, ipv6_subnet, start_revision):  # type: ignore[no-untyped-def]
        h = Handle()
        self.handles.append(h)
        return h

    def renew_lease(self, subnet, ipv6_subnet, attrs, ttl, *, mod_revision):  # type: ignore[no-untyped-def]
        self.attempts += 1
        if self.renew_errors:
            err = self.renew_errors.pop(0)
            if self.apply_before_failing:  # the put happened, but the answer was lost (a timeout)
                super().renew_lease(subnet, ipv6_subnet, attrs, ttl, mod_revision=mod_revision)
            raise err
        return super().renew_lease(subnet, ipv6_subnet, attrs, ttl, mod_revision=mod_revision)

    def put_raw(self, net: IPv4Network, value: Lease | None) -> None:
        """Someone else writes our key: a lease, or (None) a value we cannot decode."""
        self.revision += 1
        key = (net, None)
        if value is None:
            self.kv.pop(key, None)
            self.unreadable.add(key)
        else:
            self.kv[key] = value
        self.mods[key] = self.revision

    def notify(self, ev: LeaseEvent) -> None:
        """A watch response about our key (``touched`` names it, as the real registry does)."""
        self.touch((ev,))

    def touch(self, events: tuple[LeaseEvent, ...] = ()) -> None:
        """A response that wrote our key; without events when the value was undecodable."""
        touched = (((SN_OF[0], None), self.revision),)
        for h in self.handles:
            if not h.cancelled:
                h.q.put(WatchChunk(self.revision, events, touched=touched))  # type: ignore[arg-type]


class Run:
    """A manager's complete_lease on a thread; every published lease is recorded."""

    def __init__(self, reg: KeeperRegistry, tmp_path: Any, *, ttl: int = 3600) -> None:
        self.reg = reg
        self.m = EtcdSubnetManager(AgentOptions(subnet_file=str(tmp_path / "subnet.env"), subnet_lease_ttl=ttl),
                                   registry=reg)  # type: ignore[arg-type]
        self.config = self.m.get_network_config()
        self.own = acquire(self.m, OURS)
        SN_OF[:] = [self.own.subnet]
        self.seen: list[Lease] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.m.complete_lease(self.config, self.own, self.stop, self.seen.append)
        except BaseException as e:  # checked by close()
            self.error = e

    def wait(self, cond: Any, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert self.thread.is_alive(), f"keeper ended while waiting for {what}: {self.error!r}"
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "keeper did not stop within 5 s"
        assert self.error is None, repr(self.error)


def test_renewal_is_conditional_on_the_mod_revision_we_read(tmp_path):
    reg = KeeperRegistry()
    r = Run(reg, tmp_path, ttl=2)  # renews after ~1 s
    try:
        r.wait(lambda: r.seen, "first renewal")
        key = (r.own.subnet, None)
        (k, rev), *_ = reg.renewals
        assert k == key and rev == 2  # the mod revision of our key as created (FakeRegistry revision 2)
        # someone rewrites our key with our IP (say, an operator): the next renewal is refused, we re-read
        reg.put_raw(r.own.subnet, Lease(subnet=r.own.subnet, attrs=OURS, expiration=time.time() + 2))
        stale = reg.mods[key]
        n = len(r.seen)
        r.wait(lambda: len(r.seen) > n, "renewal after the rewrite")
        assert all(rev <= reg.mods[key] for _, rev in reg.renewals)
        assert (key, stale) in reg.renewals  # it renewed against the revision it re-read
        assert reg.deletes == []
    finally:
        r.close()


def test_a_renewal_that_fails_after_being_applied_is_re_read_not_deleted(tmp_path):
    reg = KeeperRegistry()
    reg.renew_errors = [errors.StoreUnavailable("deadline exceeded (the put may have happened)")]
    reg.apply_before_failing = True
    r = Run(reg, tmp_path, ttl=2)
    try:
        key = (r.own.subnet, None)
        r.wait(lambda: len(reg.renewals) >= 2, "the ambiguous renewal and the next one")
        assert key in reg.kv and reg.deletes == []  # nothing deleted or revoked
        # the keeper re-read the key after the failure and adopted what the applied put wrote: its
        # next renewal compares on the new mod revision (a keeper that had not re-read would retry
        # on the old one and be refused)
        assert [rev for _, rev in reg.renewals[:2]] == [2, 3]
        assert r.seen and r.seen[0].subnet == r.own.subnet
    finally:
        r.close()


def test_a_failed_renewal_is_retried(tmp_path):
    reg = KeeperRegistry()
    reg.renew_errors = [errors.StoreUnavailable("etcd down (scripted)")]
    r = Run(reg, tmp_path, ttl=2)
    try:
        r.wait(lambda: r.seen, "a renewal after the failed one", timeout=15)
        assert reg.attempts >= 2 and reg.renew_errors == []
        assert r.seen[0].subnet == r.own.subnet
        assert r.seen[0].expiration is not None and r.seen[0].expiration > r.own.expiration  # type: ignore[operator]
    finally:
        r.close()


def test_deleted_key_is_reacquired_with_the_same_subnet(tmp_path):
    reg = KeeperRegistry()
    r = Run(reg, tmp_path)
    try:
        r.wait(lambda: reg.handles, "the watch on our key")
        reg.delete_lease(r.own.subnet, None)
        reg.notify(LeaseEvent(EventType.REMOVED, Lease(subnet=r.own.subnet, attrs=LeaseAttrs())))
        r.wait(lambda: r.seen, "re-acquisition")
        assert [x.subnet for x in r.seen] == [r.own.subnet]
        assert reg.creates[-1] == (r.own.subnet, None)
        assert reg.kv[(r.own.subnet, None)].attrs == OURS
    finally:
        r.close()


@pytest.mark.parametrize("overwrite", ["another node", "garbage"])
def test_key_taken_or_made_unreadable_is_replaced_by_another_subnet(tmp_path, overwrite):
    reg = KeeperRegistry()
    r = Run(reg, tmp_path)
    try:
        r.wait(lambda: reg.handles, "the watch on our key")
        other = lease("192.0.2.99", net=r.own.subnet)  # type: ignore[arg-type]
        reg.put_raw(r.own.subnet, other if overwrite == "another node" else None)  # type: ignore[arg-type]
        if overwrite == "another node":
            reg.notify(LeaseEvent(EventType.ADDED, other))
        else:  # the registry skipped the undecodable value: the response carries no event, only the key
            reg.touch()
        r.wait(lambda: r.seen, "re-acquisition")
        assert r.seen[0].subnet != r.own.subnet  # never over an existing key
        assert reg.deletes == []  # the other record is left alone
        if overwrite == "another node":
            assert reg.kv[(r.own.subnet, None)] == other
        else:
            assert (r.own.subnet, None) in reg.unreadable
    finally:
        r.close()


def test_reacquiring_after_a_delete_prefers_our_subnet_over_a_stray_with_our_ip(tmp_path):
    reg = KeeperRegistry()
    r = Run(reg, tmp_path)
    try:
        r.wait(lambda: reg.handles, "the watch on our key")
        stray = Lease(subnet=IPv4Network("10.5.200.0/24"), attrs=OURS, expiration=time.time() + 3600)
        reg.kv[(stray.subnet, None)] = stray  # type: ignore[index]
        reg.delete_lease(r.own.subnet, None)
        reg.notify(LeaseEvent(EventType.REMOVED, Lease(subnet=r.own.subnet, attrs=LeaseAttrs())))
        r.wait(lambda: r.seen, "re-acquisition")
        assert r.seen[0].subnet == r.own.subnet
        assert reg.kv[(stray.subnet, None)] == stray  # not adopted, not deleted
    finally:
        r.close()


def test_keeper_stops_promptly_and_never_renews_a_reservation(tmp_path):
    reg = KeeperRegistry()
    res = Lease(subnet=SN, attrs=OURS, expiration=None)
    reg.kv[(SN, None)] = res
    reg.mods[(SN, None)] = 1
    r = Run(reg, tmp_path)
    try:
        assert r.own.subnet == SN and r.own.expiration is None
        r.wait(lambda: reg.handles, "the watch on our key")
    finally:
        t0 = time.monotonic()
        r.close()
    assert time.monotonic() - t0 < 5
    assert reg.renewals == []


def test_keeper_unit_reacquire_receives_the_subnet_we_held(tmp_path):
    """LeaseKeeper alone: what it asks the manager's policy for, per verdict."""
    reg = KeeperRegistry()
    asked: list[Hints] = []
    stop = threading.Event()
    own = Lease(subnet=SN, attrs=OURS, expiration=time.time() + 3600)

    def reacquire(prefer: Hints) -> Lease:
        asked.append(prefer)
        stop.set()
        return own
    keeper = LeaseKeeper(reg, own, stop=stop, ttl=3600, margin=60, reacquire=reacquire)  # type: ignore[arg-type]
    keeper.lost(Verdict.GONE, Stored(None, False, 0, 1))
    keeper.lost(Verdict.TAKEN, Stored(lease("192.0.2.9"), True, 3, 3))
    assert asked == [(SN, None), (None, None)]


def test_with_a_lease_watch_running_the_keeper_holds_no_watch_of_its_own(tmp_path):
    """The lease watch covers our key: once it runs, the keeper drops its own watch and learns of
    writes to its key from the lease watch (one etcd watch per agent); when the lease watch ends,
    the keeper watches its key itself again."""
    reg = KeeperRegistry()
    r = Run(reg, tmp_path)
    feed = r.m._feed
    try:
        r.wait(lambda: reg.handles, "the keeper's own watch (no lease watch yet)")
        feed.opened()  # the lease watch starts
        r.wait(lambda: all(h.cancelled for h in reg.handles), "the keeper to drop its own watch")
        time.sleep(0.3)  # (it re-reads its key; it must not open another watch)
        assert all(h.cancelled for h in reg.handles)
        n = len(reg.handles)
        reg.delete_lease(r.own.subnet, None)
        feed.touched([((IPv4Network("10.5.99.0/24"), None), reg.revision)])  # another key: nothing to do
        feed.touched([((r.own.subnet, None), reg.revision)])  # what the lease watch saw of the delete
        r.wait(lambda: r.seen, "re-acquisition")
        assert [x.subnet for x in r.seen] == [r.own.subnet] and len(reg.handles) == n
        feed.closed()  # the lease watch ends: the keeper watches its key itself again
        r.wait(lambda: len(reg.handles) > n and not reg.handles[-1].cancelled, "the keeper's own watch again")
    finally:
        r.close()


def test_a_snapshot_after_our_read_makes_the_keeper_re_read(tmp_path):
    """A relist may hide writes to our key (compacted history): the keeper re-reads after it."""
    reg = KeeperRegistry()
    r = Run(reg, tmp_path)
    feed = r.m._feed
    try:
        r.wait(lambda: reg.handles, "the keeper's own watch (no lease watch yet)")
        feed.opened()
        r.wait(lambda: all(h.cancelled for h in reg.handles), "the keeper on the lease watch")
        time.sleep(0.2)
        reads = reg.reads
        feed.snapshot(0)  # an old snapshot: nothing new
        time.sleep(0.2)
        assert reg.reads == reads
        reg.revision += 5
        feed.snapshot(reg.revision)
        r.wait(lambda: reg.reads > reads, "the keeper to re-read its key")
    finally:
        feed.closed()
        r.close()
