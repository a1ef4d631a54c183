"""LeaseWatcher diffing (reference §6.2) and our fixes of flannel's bugs (§14.2, §14.3)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent, WatchResult
from flannel.watcher import LeaseWatcher


def lease(n: int, ip: str = "", mac: str = "aa") -> Lease:
    return Lease(subnet=IPv4Network(f"10.5.{n}.0/24"),
                 attrs=LeaseAttrs(public_ip=IPv4Address(ip or f"192.168.0.{n}"), backend_type="vxlan",
                                  backend_data=f'{{"VtepMAC":"{mac}"}}'))


def added(le: Lease) -> LeaseEvent:
    return LeaseEvent(EventType.ADDED, le)


def removed(le: Lease) -> LeaseEvent:
    return LeaseEvent(EventType.REMOVED, le)


def flat(batches: list[Batch]) -> list[tuple[EventType, object]]:
    return [(e.type, e.lease.subnet) for b in batches for e in b.events]


OWN = lease(1)


def test_snapshot_emits_remote_leases_only_and_is_synced():
    w = LeaseWatcher(OWN)
    out = w.apply(WatchResult.of_snapshot([OWN, lease(2), lease(3)]))
    assert flat(out) == [(EventType.ADDED, lease(2).subnet), (EventType.ADDED, lease(3).subnet)]
    assert out[-1].synced


def test_empty_snapshot_still_yields_one_synced_batch():
    out = LeaseWatcher(OWN).apply(WatchResult.of_snapshot([]))
    assert out == [Batch((), synced=True)]


def test_events_skip_own_and_duplicates():
    w = LeaseWatcher(OWN)
    w.apply(WatchResult.of_snapshot([lease(2)]))
    out = w.apply(WatchResult.of_events([added(OWN), added(lease(2)), added(lease(4))]))
    assert flat(out) == [(EventType.ADDED, lease(4).subnet)]  # renewal of 2 is not news
    assert not out[0].synced


def test_changed_attrs_in_event_are_reemitted():
    w = LeaseWatcher(OWN)
    w.apply(WatchResult.of_snapshot([lease(2)]))
    out = w.apply(WatchResult.of_events([added(lease(2, mac="bb"))]))
    assert out[0].events[0].lease.attrs.backend_data == '{"VtepMAC":"bb"}'


def test_removed_carries_stored_attributes():
    w = LeaseWatcher(OWN)
    w.apply(WatchResult.of_snapshot([lease(2)]))
    bare = Lease(subnet=lease(2).subnet, attrs=LeaseAttrs())  # etcd deletes carry no attributes
    out = w.apply(WatchResult.of_events([removed(bare)]))
    assert out[0].events[0] == removed(lease(2))
    assert w.tracked() == []


def test_unknown_removal_passed_on():
    w = LeaseWatcher(OWN)
    out = w.apply(WatchResult.of_events([removed(lease(7))]))
    assert flat(out) == [(EventType.REMOVED, lease(7).subnet)]


def test_empty_event_result_removes_nothing():
    """flannel bug §14.2: an empty result was treated as an empty snapshot and removed every peer."""
    w = LeaseWatcher(OWN)
    w.apply(WatchResult.of_snapshot([lease(2), lease(3)]))
    assert w.apply(WatchResult.of_events([])) == []
    assert len(w.tracked()) == 2


def test_relist_diff_reemits_changed_and_removes_missing():
    """flannel bug §14.3: a relist never re-emitted leases whose attributes changed."""
    w = LeaseWatcher(OWN)
    w.apply(WatchResult.of_snapshot([lease(2), lease(3), lease(4)]))
    out = w.apply(WatchResult.of_snapshot([lease(2), lease(3, ip="192.168.9.9"), lease(5)]))
    assert sorted(flat(out), key=str) == sorted([
        (EventType.ADDED, lease(3).subnet), (EventType.ADDED, lease(5).subnet), (EventType.REMOVED, lease(4).subnet),
    ], key=str)
    assert out[-1].synced


def test_batches_are_bounded_and_only_last_is_synced():
    w = LeaseWatcher(OWN, max_batch=3)
    out = w.apply(WatchResult.of_snapshot([lease(n) for n in range(2, 10)]))
    assert [len(b.events) for b in out] == [3, 3, 2]
    assert [b.synced for b in out] == [False, False, True]
    out = w.apply(WatchResult.of_events([added(lease(n)) for n in range(20, 27)]))
    assert [len(b.events) for b in out] == [3, 3, 1] and not any(b.synced for b in out)


def test_set_own_takes_a_renewal_and_refuses_a_move():
    """Our lease never moves under a running watcher (the daemon exits 1 instead), so set_own
    refuses another subnet rather than silently re-filtering a slot it tracked as a peer."""
    w = LeaseWatcher(OWN)
    w.apply(WatchResult.of_snapshot([lease(2)]))
    renewed = replace(OWN, expiration=123.0)
    w.set_own(renewed)
    assert w.own is renewed
    with pytest.raises(ValueError, match="cannot move"):
        w.set_own(lease(2))
    assert w.own is renewed and [le.subnet for le in w.tracked()] == [lease(2).subnet]


def test_max_batch_validation():
    with pytest.raises(ValueError):
        LeaseWatcher(OWN, max_batch=0)


# -- the watcher against a plain model of what it must do (any sequence of results) ------------------

def model_batches(tracked: dict[object, Lease], own: Lease, result: WatchResult, max_batch: int) -> list[Batch]:
    """What the watcher must emit, written as plainly as possible (the reference for the property)."""
    out: list[LeaseEvent] = []
    if result.snapshot is not None:
        fresh = {le.ident: le for le in result.snapshot if le.ident != own.ident}
        out = [added(le) for ident, le in fresh.items() if ident not in tracked or tracked[ident].attrs != le.attrs]
        out += [removed(old) for ident, old in tracked.items() if ident not in fresh]
        tracked.clear()
        tracked.update(fresh)
    else:
        for ev in result.events:
            if ev.lease.ident == own.ident:
                continue
            if ev.type is EventType.ADDED:
                if ev.lease.ident not in tracked or tracked[ev.lease.ident].attrs != ev.lease.attrs:
                    out.append(ev)
                tracked[ev.lease.ident] = ev.lease
            else:
                out.append(removed(tracked.pop(ev.lease.ident)) if ev.lease.ident in tracked else ev)
    chunks = [tuple(out[i:i + max_batch]) for i in range(0, len(out), max_batch)]
    if result.snapshot is None:
        return [Batch(c) for c in chunks]
    chunks = chunks or [()]
    return [Batch(c, synced=i == len(chunks) - 1) for i, c in enumerate(chunks)]


leases_st = st.builds(lease, st.integers(1, 6), st.sampled_from(["", "192.168.9.9"]), st.sampled_from(["aa", "bb"]))
events_st = st.builds(LeaseEvent, st.sampled_from(list(EventType)), leases_st)
results_st = (st.lists(events_st, max_size=6).map(WatchResult.of_events)
              | st.lists(leases_st, max_size=6, unique_by=lambda le: le.ident).map(WatchResult.of_snapshot))
# (a store's snapshot holds each subnet once: etcd keys and kube nodes are unique)


@settings(max_examples=300, deadline=None)
@given(st.lists(results_st, max_size=12), st.integers(1, 4))
def test_any_sequence_of_results_gives_what_the_model_gives(results: list[WatchResult], max_batch: int) -> None:
    w = LeaseWatcher(OWN, max_batch=max_batch)
    tracked: dict[object, Lease] = {}
    for result in results:
        assert w.apply(result) == model_batches(tracked, OWN, result, max_batch)
        assert sorted(map(str, w.tracked())) == sorted(map(str, tracked.values()))
