"""The lease model: immutable values shared by subnet managers, the watcher and backends.

Addresses are ``ipaddress`` objects, never strings. Store-specific cursors (etcd revisions, kube
resourceVersions) deliberately do not appear here: they stay inside their subnet manager.
The wire format (etcd keys and JSON values, kube annotations) lives in ``flannel.wire``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Protocol, runtime_checkable

from flannel.config import NetworkConfig

UNSPECIFIED_V4 = IPv4Address("0.0.0.0")


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a node advertises about itself with its lease.

    ``backend_data`` / ``backend_v6_data`` hold *compact JSON text* (or ``None``) so the value is
    hashable, compares by content and is re-emitted byte for byte. Use ``backend_data_obj`` to read it.
    """

    public_ip: IPv4Address = UNSPECIFIED_V4
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    backend_data: str | None = None
    backend_v6_data: str | None = None

    @property
    def backend_data_obj(self) -> Any:
        return None if self.backend_data is None else json.loads(self.backend_data)

    @property
    def backend_v6_data_obj(self) -> Any:
        return None if self.backend_v6_data is None else json.loads(self.backend_v6_data)


@dataclass(frozen=True, slots=True)
class Lease:
    """A node's pod subnet(s) and attributes.

    ``expiration`` is a POSIX timestamp (``None`` = never expires, i.e. a reservation or a kube
    lease). It does not take part in equality: two reads of the same lease at different times are
    the same lease.
    """

    subnet: IPv4Network | None
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    expiration: float | None = field(default=None, compare=False)

    @property
    def enable_ipv4(self) -> bool:
        return self.subnet is not None

    @property
    def enable_ipv6(self) -> bool:
        return self.ipv6_subnet is not None

    @property
    def ident(self) -> tuple[IPv4Network | None, IPv6Network | None]:
        """The identity of a lease: its subnets. Two leases with equal idents are the same slot."""
        return (self.subnet, self.ipv6_subnet)

    def describe(self) -> str:
        """Short human form for logs: ``10.5.3.0/24 (192.168.1.2, vxlan)``."""
        nets = " & ".join(str(n) for n in self.ident if n is not None) or "<no subnet>"
        typ = self.attrs.backend_type or "udp/alloc"
        return f"{nets} ({self.attrs.public_ip}, {typ})"


class EventType(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    type: EventType
    lease: Lease


@dataclass(frozen=True)
class Batch:
    """What a backend's ``Network.run`` receives: diffed events for remote leases only.

    ``synced`` is True on the last batch of a snapshot (the first one at start, and each relist):
    at that point every remote lease the store knows has been delivered as ADDED, so the backend
    may remove kernel entries that no lease justifies.
    """

    events: tuple[LeaseEvent, ...] = ()
    synced: bool = False


@dataclass(frozen=True)
class WatchResult:
    """One unit a subnet manager's watch yields: a full snapshot *or* a list of events.

    Unlike flannel, an empty event list is never reinterpreted as an empty snapshot (that bug tore
    down every peer when one record was unparsable): ``snapshot`` is ``None`` for event results.
    """

    events: tuple[LeaseEvent, ...] = ()
    snapshot: tuple[Lease, ...] | None = None

    @classmethod
    def of_snapshot(cls, leases: Iterator[Lease] | tuple[Lease, ...] | list[Lease]) -> WatchResult:
        return cls(snapshot=tuple(leases))

    @classmethod
    def of_events(cls, events: Iterator[LeaseEvent] | tuple[LeaseEvent, ...] | list[LeaseEvent]) -> WatchResult:
        return cls(events=tuple(events))


class LeaseSource(Protocol):
    """What a backend needs from the subnet manager while registering its network.

    Backends must not import subnet managers (DESIGN §2); the daemon passes the manager in, and
    this protocol is all the backend may use. ``config`` is the validated network config the
    backend was registered with (the daemon read it once; the manager does not read it again).
    """

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease: ...


@runtime_checkable
class StoredNodeAttrs(Protocol):
    """An optional capability of a lease store that remembers what this node published before
    (kube keeps it in node annotations; etcd does not). Check with ``isinstance``: a store
    without it simply has nothing stored."""

    def stored_public_ips(self) -> tuple[str | None, str | None]:
        """Public IPv4/IPv6 the store assigns to this node, overriding the flags (kube
        ``node-public-ip`` annotations)."""
        ...

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        """Compact JSON of the BackendData / BackendV6Data this node published last time. Lets
        vxlan keep its MAC across restarts."""
        ...
