"""Node objects (from lists and watch events) → lease events, remembering each node's last lease.

Why remember: flannel filtered node updates with a per-family "unchanged" test that ignored a
change confined to one address family (§14.9), and dropped broken nodes on the floor. Here every
change to a node's lease (either family, type, address, data, CIDR) is an event, and a node whose
annotations become unreadable keeps its last good lease (logged once) instead of being torn down:
bad input never removes working routes. The same rule applies on relists, so a snapshot after a
410 agrees with what the events said.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from flannel import errors, metrics
from flannel.config import NetworkConfig
from flannel.lease import EventType, Lease, LeaseEvent
from flannel.subnet_managers.kube import nodes
from flannel.subnet_managers.kube.annotations import AnnotationNames

log = logging.getLogger(__name__)


class NodeTracker:
    """Not thread-safe: used by the one watch loop."""

    def __init__(self, names: AnnotationNames, config: NetworkConfig) -> None:
        self._names = names
        self._config = config
        self._leases: dict[str, Lease] = {}
        self._bad: dict[str, str] = {}  # node → last error logged (log each distinct error once)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def lease_of(self, name: str) -> Lease | None:
        return self._leases.get(name)

    def _convert(self, node: Mapping[str, Any]) -> tuple[bool, Lease | None]:
        """(ok, lease): ok=False means broken (keep the old lease); lease None = not managed."""
        name = nodes.node_name(node)
        try:
            lease = nodes.node_to_lease(node, self._names, self._config)
        except errors.BadLeaseRecord as e:
            metrics.record_skipped("kube", "bad_node")  # metrics
            if self._bad.get(name) != str(e):
                self._bad[name] = str(e)
                kept = self._leases.get(name)
                log.warning("skipping node %r: %s%s", name, e,
                            f" (keeping its last good lease {kept.describe()})" if kept else "")
            return False, None
        if self._bad.pop(name, None) is not None:
            log.info("node %r is readable again", name)
        return True, lease

    def reset(self, items: Iterable[Mapping[str, Any]]) -> list[Lease]:
        """A full list of nodes → the snapshot of leases (broken nodes keep their last lease)."""
        items = [n for n in items if isinstance(n, Mapping)]
        fresh: dict[str, Lease] = {}
        for node in items:
            name = nodes.node_name(node)
            ok, lease = self._convert(node)
            if not ok:
                lease = self._leases.get(name)
            if lease is not None:
                fresh[name] = lease
        for name in set(self._bad) - {nodes.node_name(n) for n in items}:
            self._bad.pop(name, None)
        self._leases = fresh
        return list(fresh.values())

    def apply(self, etype: str, node: Mapping[str, Any]) -> list[LeaseEvent]:
        """One watch event (ADDED / MODIFIED / DELETED) → zero or more lease events."""
        name = nodes.node_name(node)
        old = self._leases.get(name)
        if etype == "DELETED":
            self._bad.pop(name, None)
            if old is None:
                return []
            del self._leases[name]
            return [LeaseEvent(EventType.REMOVED, old)]
        if etype not in ("ADDED", "MODIFIED"):
            log.warning("ignoring watch event of unknown type %r for node %r", etype, name)
            return []
        ok, lease = self._convert(node)
        if not ok:
            return []
        if lease is None:  # no longer (or never) managed by flannel
            if old is None:
                return []
            log.info("node %r is no longer marked %s=true; removing its lease", name, self._names.subnet_manager)
            del self._leases[name]
            return [LeaseEvent(EventType.REMOVED, old)]
        if lease == old:
            return []  # e.g. a kubelet heartbeat: nothing flannel cares about changed
        self._leases[name] = lease
        out = []
        if old is not None and old.ident != lease.ident:
            out.append(LeaseEvent(EventType.REMOVED, old))  # the node's pod CIDR changed
        out.append(LeaseEvent(EventType.ADDED, lease))
        return out
