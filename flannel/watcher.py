"""LeaseWatcher: turns a subnet manager's snapshots and events into diffed batches for a backend.

Differences from flannel's LeaseWatcher (reference §6.2, §14):
* a snapshot re-emits ADDED for leases whose attributes changed (flannel silently dropped them);
* an empty event list is just nothing: it is never treated as an empty snapshot;
* an ADDED that repeats exactly what we already track (a renewal) is not re-emitted;
* batches are bounded (``max_batch``), so one huge snapshot does not become one huge transaction;
  the last batch of every snapshot carries ``synced=True`` so backends know when to reconcile.
"""

from __future__ import annotations

import logging

from flannel.lease import Batch, EventType, Lease, LeaseEvent, WatchResult

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 500

Ident = tuple[object, object]


class LeaseWatcher:
    """Tracks the remote leases a backend has been told about. Not thread-safe: one consumer."""

    def __init__(self, own: Lease, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._own = own
        self._max_batch = max_batch
        self._tracked: dict[Ident, Lease] = {}

    @property
    def own(self) -> Lease:
        return self._own

    def set_own(self, lease: Lease) -> None:
        """A renewal (or re-acquisition) of our lease, always in the same subnet: the daemon exits
        when our lease comes back with another subnet, so the slot we filter never moves.

        :raises ValueError: ``lease`` is in another subnet than our lease.
        """
        if lease.ident != self._own.ident:
            raise ValueError(f"our lease cannot move from {self._own.describe()} to {lease.describe()} "
                             "(the daemon restarts instead)")
        self._own = lease

    def tracked(self) -> list[Lease]:
        return list(self._tracked.values())

    def apply(self, result: WatchResult) -> list[Batch]:
        """Diff one watch result against what we track. Returns zero or more bounded batches."""
        if result.snapshot is not None:
            return self._chunk(self._reset(result.snapshot), synced=True)
        return self._chunk(self._update(result.events), synced=False)

    def _update(self, events: tuple[LeaseEvent, ...]) -> list[LeaseEvent]:
        # runs for every lease event on the watch thread: each lease's ident is built once
        out: list[LeaseEvent] = []
        own = self._own.ident
        tracked = self._tracked
        for ev in events:
            lease = ev.lease
            ident = (lease.subnet, lease.ipv6_subnet)
            if ident == own:
                continue
            if ev.type is EventType.ADDED:
                old = tracked.get(ident)
                tracked[ident] = lease
                if old is None or old.attrs != lease.attrs:
                    out.append(ev)
            else:
                old = tracked.pop(ident, None)
                if old is None:
                    log.info("removed lease %s was not known; passing it on", ev.lease.describe())
                    out.append(ev)
                else:
                    out.append(LeaseEvent(EventType.REMOVED, old))  # carries the stored attributes
        return out

    def _reset(self, snapshot: tuple[Lease, ...]) -> list[LeaseEvent]:
        # the first snapshot holds every lease of the cluster (a cold start): each ident is built
        # and hashed once, and nothing is looked up while nothing is tracked
        out: list[LeaseEvent] = []
        fresh: dict[Ident, Lease] = {}
        own = self._own.ident
        tracked = self._tracked
        added = EventType.ADDED
        for lease in snapshot:
            ident = (lease.subnet, lease.ipv6_subnet)
            if ident == own:
                continue
            fresh[ident] = lease
            old = tracked.get(ident) if tracked else None
            if old is None or old.attrs != lease.attrs:
                out.append(LeaseEvent(added, lease))
        for gone, old in tracked.items():
            if gone not in fresh:
                out.append(LeaseEvent(EventType.REMOVED, old))
        self._tracked = fresh
        return out

    def _chunk(self, events: list[LeaseEvent], *, synced: bool) -> list[Batch]:
        n = self._max_batch
        if not synced and len(events) <= n:   # the common case: a few events, one batch (or none)
            return [Batch(tuple(events))] if events else []
        chunks = [tuple(events[i:i + n]) for i in range(0, len(events), n)]
        if synced:
            if not chunks:
                return [Batch((), synced=True)]
            return [Batch(c, synced=(i == len(chunks) - 1)) for i, c in enumerate(chunks)]
        return [Batch(c) for c in chunks]
