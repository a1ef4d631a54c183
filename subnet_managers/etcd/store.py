"""The storage interface between the etcd allocation policy (manager.py) and etcd (registry.py).

It exists so that the policy can be unit-tested against an in-memory ``FakeRegistry`` (as flannel
tests its ``MockSubnetRegistry``) while registry.py stays the only module that imports pyetcd.
Everything here speaks the lease model (``flannel.lease``); etcd revisions appear only as the
opaque ``revision`` integers the manager hands back to ``watch``.

Expirations: ``Lease.expiration is None`` means a *reservation* (a key without an etcd lease,
which etcd reports with TTL -1). For leased keys, listings made with ``ttl=False`` do not ask etcd
for the remaining TTL (one RPC per key) and report :data:`TTL_NOT_LOOKED_UP` instead.

Records are untrusted: the registry turns each key/value into a ``Lease`` or skips it (counted,
logged). A skipped key whose name is a subnet key still *occupies* that subnet: ``Listing.occupied``
lists them so that allocation never tries to create over an existing key.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from flannel import errors
from flannel.lease import Lease, LeaseAttrs, LeaseEvent
from flannel.records import SkippedRecords

#: ``Lease.expiration`` of a leased key whose remaining TTL was not asked for (``ttl=False``).
TTL_NOT_LOOKED_UP = 0.0


class Compacted(errors.StoreError):
    """A watch asked for a revision etcd has compacted away: relist and diff."""

    def __init__(self, compacted_revision: int) -> None:
        self.compacted_revision = compacted_revision
        super().__init__(f"etcd history compacted up to revision {compacted_revision}")


class ResponseTooLarge(errors.StoreError):
    """A watch response was larger than we accept (a catch-up over many large values): relist,
    which reads in pages, and watch on from the listing's revision."""


class KeyChanged(errors.StoreError):
    """A conditional write found the key changed (or gone) since we last read it: re-read it."""


#: the subnets a key names
Subnets = tuple[IPv4Network, IPv6Network | None]
#: subnets to prefer when acquiring (subnet.env's, or the ones we just lost); None: no preference
Hints = tuple[IPv4Network | None, IPv6Network | None]


@dataclass(frozen=True)
class Listing:
    """Every lease under ``<prefix>/subnets/`` and the revision of the read.

    ``occupied``: subnets of keys that exist but could not be decoded (skipped records). Nobody
    can use them, but their keys exist, so allocation must not pick them.
    """

    leases: list[Lease]
    revision: int
    occupied: tuple[Subnets, ...] = ()


@dataclass(frozen=True)
class Stored:
    """One lease key as read now.

    ``lease`` is None when the key is absent *or* could not be decoded (``exists`` tells which).
    ``mod_revision`` (0 when absent) is what a conditional renewal compares on; ``revision`` is
    the read's header revision (a watch of the key resumes after it).
    """

    lease: Lease | None
    exists: bool
    mod_revision: int
    revision: int


@dataclass(frozen=True)
class ConfigUpdate:
    """The network config key changed: its new text, or None if it was deleted."""

    text: str | None


@dataclass(frozen=True)
class WatchChunk:
    """The decoded events of one etcd watch response, and the revision they bring us to.

    ``revision`` is the mod revision of the response's last event (not the header revision,
    which is the store's current revision and runs ahead during catch-up): a watch resumed from
    ``revision + 1`` neither skips nor replays an event. ``events`` may be empty (every record in
    the response was skipped as undecodable); the revision still advances past them.

    ``config`` is set for a change of the network config key, which the lease watch also follows
    (the latest one in the response; ``revision`` covers it like any event).

    ``touched``: every subnet key the response wrote or deleted, with the mod revision, including
    keys whose value was skipped as undecodable (the lease keeper re-reads its own key on any of them).
    """

    revision: int
    events: tuple[LeaseEvent, ...]
    config: ConfigUpdate | None = None
    touched: tuple[tuple[Subnets, int], ...] = ()


class WatchHandle(Protocol):
    def next(self) -> WatchChunk:
        """The next chunk; blocks until there is one (``cancel`` ends the wait).

        :raises Compacted: the start revision was compacted (relist).
        :raises ResponseTooLarge: a response was too large to receive (relist).
        :raises errors.StoreUnavailable: the watch stream broke or was cancelled (re-watch from the
            last revision).
        """
        ...

    def cancel(self) -> None:
        """Stop the watch; callable from any thread (a ``next`` waiting raises). Idempotent, never raises."""
        ...


class Registry(Protocol):
    """Lease and config storage under one etcd prefix. Every method may raise
    ``errors.StoreUnavailable`` (transient) or ``errors.PermissionDenied``."""

    #: records skipped at the trust boundary, counted per reason
    skipped: SkippedRecords

    def get_config(self) -> str:
        """:raises errors.ConfigNotFound: no ``<prefix>/config`` key."""
        ...

    def put_config(self, text: str) -> None: ...

    def list_leases(self, *, ttl: bool = False) -> Listing:
        """All decodable leases (bad records are counted, logged and skipped), the listing's
        revision, and the subnets whose keys exist but could not be decoded."""
        ...

    def get_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, *, ttl: bool = True) -> Stored:
        """One lease key by its subnets."""
        ...

    def create_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int) -> Lease:
        """Create the key only if it does not exist, attached to a new ``ttl``-second etcd lease.

        :raises errors.LeaseConflict: the key exists (another node won the race).
        """
        ...

    def update_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                     ttl: int | None) -> Lease:
        """Unconditional put. ``ttl=None`` writes a reservation (no etcd lease, never expires).
        After an ambiguous failure (a timeout: the put may have happened) nothing is revoked."""
        ...

    def renew_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs,
                    ttl: int, *, mod_revision: int) -> Lease:
        """Put ``attrs`` with a new ``ttl``-second etcd lease, only if the key's mod revision is
        still ``mod_revision`` (nobody deleted, expired or rewrote it since we read it).

        :raises KeyChanged: the key changed or is gone (re-read it; nothing was written).
        :raises errors.StoreUnavailable: the outcome is unknown; nothing is revoked or deleted.
        """
        ...

    def delete_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> None: ...

    def watch_leases(self, start_revision: int) -> WatchHandle:
        """Watch every key under ``<prefix>/subnets/`` and the config key (one watch) from
        ``start_revision`` (inclusive). Config changes arrive as chunks with ``config`` set."""
        ...

    def watch_lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None,
                    start_revision: int) -> WatchHandle:
        """Watch one lease key from ``start_revision`` (the lease keeper re-reads the key on any event)."""
        ...

    def describe(self) -> str:
        """Where this registry points (endpoints and prefix), for logs. Never contains secrets."""
        ...

    def close(self) -> None: ...
