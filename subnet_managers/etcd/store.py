"""The storage interface between the etcd allocation policy (manager.py) and etcd (registry.py).

It exists so that the policy can be unit-tested against an in-memory ``FakeRegistry`` (as flannel
tests its ``MockSubnetRegistry``) while registry.py stays the only module that imports pyetcd.
Everything here speaks the lease model (``flannel.lease``); etcd revisions appear only as the
opaque ``revision`` integers the manager hands back to ``watch``.

Expirations: ``Lease.expiration is None`` means a *reservation* (a key without an etcd lease,
which etcd reports with TTL -1). For leased keys, listings made with ``ttl=False`` do not ask etcd
for the remaining TTL (one RPC per key) and report :data:`TTL_NOT_LOOKED_UP` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from flannel import errors
from flannel.lease import Lease, LeaseAttrs, LeaseEvent

#: ``Lease.expiration`` of a leased key whose remaining TTL was not asked for (``ttl=False``).
TTL_NOT_LOOKED_UP = 0.0


class Compacted(errors.StoreError):
    """A watch asked for a revision etcd has compacted away: relist and diff."""

    def __init__(self, compacted_revision: int) -> None:
        self.compacted_revision = compacted_revision
        super().__init__(f"etcd history compacted up to revision {compacted_revision}")


@dataclass(frozen=True)
class WatchChunk:
    """The decoded events of one etcd watch response, and the revision they bring us to.

    ``events`` may be empty (every record in the response was skipped as undecodable); the
    revision still advances so a resumed watch does not replay them.
    """

    revision: int
    events: tuple[LeaseEvent, ...]


class WatchHandle(Protocol):
    def get(self, timeout: float) -> WatchChunk | None:
        """The next chunk, or ``None`` after ``timeout`` seconds without one.

        :raises Compacted: the start revision was compacted (relist).
        :raises errors.StoreUnavailable: the watch stream broke (re-watch from the last revision).
        """
        ...

    def cancel(self) -> None:
        """Stop the watch. Idempotent, never raises."""
        ...


class Registry(Protocol):
    """Lease and config storage under one etcd prefix. Every method may raise
    ``errors.StoreUnavailable`` (transient) or ``errors.PermissionDenied``."""

    def get_config(self) -> str:
        """:raises errors.ConfigNotFound: no ``<prefix>/config`` key."""
        ...

    def put_config(self, text: str) -> None: ...

    def list_leases(self, *, ttl: bool = False) -> tuple[list[Lease], int]:
        """All decodable leases (bad records are logged and skipped) and the listing's revision."""
        ...

    def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, *,
                  ttl: bool = True) -> tuple[Lease | None, int]:
        """One lease by its subnets (``None`` if absent) and the read's revision."""
        ...

    def create_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int) -> Lease:
        """Create the key only if it does not exist, attached to a new ``ttl``-second etcd lease.

        :raises errors.LeaseConflict: the key exists (another node won the race).
        """
        ...

    def update_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int | None) -> Lease:
        """Unconditional put. ``ttl=None`` writes a reservation (no etcd lease, never expires)."""
        ...

    def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> None: ...

    def watch_leases(self, start_revision: int) -> WatchHandle:
        """Watch every key under ``<prefix>/subnets/`` from ``start_revision`` (inclusive)."""
        ...

    def watch_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None,
                    start_revision: int) -> WatchHandle:
        """Watch one lease key from ``start_revision``; PUT events carry the remaining TTL."""
        ...

    def describe(self) -> str:
        """Where this registry points (endpoints and prefix), for logs. Never contains secrets."""
        ...

    def close(self) -> None: ...
