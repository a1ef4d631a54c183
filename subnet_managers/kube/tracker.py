"""Node objects (from lists and watch events) → lease events: the kube manager's trust boundary.

Every node object is untrusted. ``NodeTracker`` is the one place where a raw node becomes a
``Lease`` or is skipped: *any* exception while reading one node (wrong JSON types, a value nested
too deeply for the decoder, a megabyte-long annotation, a bug) skips that node with one counted,
rate-limited log line naming the node and the reason (``skips``), and the rest of the batch goes on.

Why remember each node's last lease: flannel filtered node updates with a per-family "unchanged"
test that ignored a change confined to one address family (§14.9), and dropped broken nodes on the
floor. Here every change to a node's lease (either family, type, address, data, CIDR) is an event,
and a node whose annotations become unreadable keeps its last good lease instead of being torn
down: bad input never removes working routes. The same rule applies on relists, so a snapshot
after a 410 agrees with what the events said.

Why remember each node's lease *inputs*: most node updates are kubelet heartbeats that change
nothing flannel reads. Comparing the few raw values a lease depends on (``nodes.LeaseInputs``)
with the last ones seen costs a handful of dict look-ups, so such an update is dropped before any
parsing. Nothing else of a node object is kept.

Our own node is never a peer: it is handed to ``on_own`` (the manager decides what a change to it
means) and never becomes a lease here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flannel.config import NetworkConfig
from flannel.lease import EventType, Lease, LeaseEvent
from flannel.records import SkippedRecords
from flannel.subnet_managers.kube import nodes, skips
from flannel.subnet_managers.kube.annotations import AnnotationNames

log = logging.getLogger(__name__)

#: ``on_own`` kinds besides the watch event types: our node was in a relist / missing from it.
LISTED = "LISTED"
MISSING = "MISSING"

OwnCallback = Callable[[str, Any], None]


class _Bad:
    """A node we could not read: why (its log line is written once per distinct problem)."""

    __slots__ = ("detail", "inputs", "reason")

    def __init__(self, reason: str, detail: str, inputs: nodes.LeaseInputs | None) -> None:
        self.reason, self.detail, self.inputs = reason, detail, inputs


class NodeTracker:
    """Not thread-safe: used by the one watch loop."""

    def __init__(self, names: AnnotationNames, config: NetworkConfig, *, own_name: str | None = None,
                 on_own: OwnCallback | None = None, skipped: SkippedRecords = skips.SKIPPED) -> None:
        self._names = names
        self._config = config
        self._own_name = own_name
        self._on_own = on_own
        self._skips = skipped
        self._leases: dict[str, Lease] = {}
        self._inputs: dict[str, nodes.LeaseInputs] = {}  # last readable inputs per node
        self._bad: dict[str, _Bad] = {}

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def lease_of(self, name: str) -> Lease | None:
        return self._leases.get(name)

    # -- the boundary -----------------------------------------------------------------------------

    def _name(self, node: Any) -> str | None:
        """The node's name, or None (counted and logged) if the object cannot even say that."""
        try:
            return nodes.node_name(node)
        except Exception as e:  # the trust boundary: any failure skips this one record
            self._skips.skip(nodes.display_name(node), skips.reason_of(e), skips.describe(e))
            return None

    def _read(self, name: str, node: Any,
              inputs: dict[str, nodes.LeaseInputs], bad: dict[str, _Bad]) -> tuple[str, Lease | None]:
        """Read one named node into ``inputs``/``bad``. Returns ("same", None) when nothing flannel
        reads changed, ("ok", lease or None if unmanaged), or ("bad", None) when it was skipped."""
        new: nodes.LeaseInputs | None = None
        try:
            new = nodes.lease_inputs(node, self._names)
            prev_bad = bad.get(name)
            if prev_bad is None and inputs.get(name) == new:
                return "same", None
            if prev_bad is not None and prev_bad.inputs == new:
                self._skips.count(prev_bad.reason)  # the same broken values again (a heartbeat)
                return "bad", None
            lease = nodes.lease_from_inputs(name, new, self._names, self._config)
        except Exception as e:  # the trust boundary: any failure skips this one record
            reason, detail = skips.reason_of(e), skips.describe(e)
            detail = detail.removeprefix(f"node {name!r}: ")  # the log line names the node already
            inputs.pop(name, None)
            prev = bad.get(name)
            if prev is not None and prev.detail == detail:
                self._skips.count(reason)  # same problem as last time: counted, not logged again
            else:
                kept = self._leases.get(name)
                self._skips.skip(name, reason, detail + (f" (keeping its last good lease {kept.describe()})"
                                                         if kept else ""))
            bad[name] = _Bad(reason, detail, new)
            return "bad", None
        inputs[name] = new
        if bad.pop(name, None) is not None:
            log.info("node %r is readable again", name)
        return "ok", lease

    def _own(self, kind: str, node: Any) -> None:
        if self._on_own is not None:
            self._on_own(kind, node)

    # -- relist -----------------------------------------------------------------------------------

    def reset(self, items: Iterable[Any]) -> list[Lease]:
        """A full list of nodes → the snapshot of leases (broken nodes keep their last lease).

        ``items`` may be a generator over the pages of a paginated list; the tracker's state is
        replaced only once it is exhausted, so a list that fails half-way changes nothing.
        """
        fresh: dict[str, Lease] = {}
        inputs: dict[str, nodes.LeaseInputs] = {}
        bad: dict[str, _Bad] = {}
        own_seen = False
        for node in items:
            name = self._name(node)
            if name is None:
                continue
            if name == self._own_name:
                own_seen = True
                self._own(LISTED, node)
                continue
            old_inputs = self._inputs.get(name)
            if old_inputs is not None:
                inputs[name] = old_inputs
            if name in self._bad:
                bad[name] = self._bad[name]
            status, lease = self._read(name, node, inputs, bad)
            if status in ("same", "bad"):
                lease = self._leases.get(name)
            if lease is not None:
                fresh[name] = lease
        if self._own_name is not None and not own_seen:
            self._own(MISSING, None)
        self._leases, self._inputs, self._bad = fresh, inputs, bad
        return list(fresh.values())

    # -- watch events -----------------------------------------------------------------------------

    def apply(self, etype: str, node: Any) -> list[LeaseEvent]:
        """One watch event (ADDED / MODIFIED / DELETED) → zero or more lease events."""
        name = self._name(node)
        if name is None:
            return []
        if name == self._own_name:
            self._own(etype, node)
            return []
        old = self._leases.get(name)
        if etype == "DELETED":
            self._bad.pop(name, None)
            self._inputs.pop(name, None)
            if old is None:
                return []
            del self._leases[name]
            return [LeaseEvent(EventType.REMOVED, old)]
        if etype not in ("ADDED", "MODIFIED"):
            self._skips.skip(name, skips.MALFORMED_EVENT, f"unknown event type {str(etype)[:40]!r}",
                             kind="watch event for node")
            return []
        status, lease = self._read(name, node, self._inputs, self._bad)
        if status != "ok":
            return []  # a heartbeat (nothing we read changed), or unreadable: keep the old lease
        if lease is None:  # no longer (or never) managed by flannel
            if old is None:
                return []
            log.info("node %r is no longer marked %s=true; removing its lease", name, self._names.subnet_manager)
            del self._leases[name]
            return [LeaseEvent(EventType.REMOVED, old)]
        if lease == old:
            return []
        self._leases[name] = lease
        out = []
        if old is not None and old.ident != lease.ident:
            out.append(LeaseEvent(EventType.REMOVED, old))  # the node's pod CIDR changed
        out.append(LeaseEvent(EventType.ADDED, lease))
        return out
