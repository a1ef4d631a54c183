"""What the leases want in the kernel, kept per lease so that a batch of k events costs O(k).

Pure (no kernel access). ``Index`` holds, for every remote lease, the entries its translation
yields, and for every kernel *key* the leases that claim it:

* a route is keyed by its destination (``route replace`` overwrites whatever the main table holds
  for that prefix), a neighbour by (device, IP), an fdb entry by (device, MAC) (``bridge fdb
  replace`` rewrites the MAC's remote);
* when several leases claim one key (two leases with the same subnet and different IPv6 subnets,
  two peers with the same VtepMAC), the lease with the smallest identity wins. The winner depends
  only on the current set of leases, never on the order events came in, so an incremental apply
  and a full rebuild always want the same kernel (the property tests check exactly that);
* a lease is *blocked* -- skipped with a reason, nothing of it programmed -- when one of its
  routes would overlap our own subnet, or would replace a route the agent does not own
  (``ForeignRoute.blocks``): ``cni0``'s connected route, an operator's route on another device
  or with another protocol. Go flannel's ``proto boot`` routes on our devices are adopted instead.

``put``/``drop``/``set_foreign`` return the keys whose winner may have changed (``Touched``); the
reconcile loop turns exactly those into a plan against its cache of what it programmed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flannel import errors
from flannel.backends.routed.model import (
    Context,
    Fdb,
    ForeignRoute,
    KernelState,
    Neigh,
    Net,
    Route,
    Skip,
    Translate,
)
from flannel.lease import Lease

Ident = tuple[Any, Any]
NeighKey = tuple[str, Any]
FdbKey = tuple[str, str]


def ident_key(ident: Ident) -> tuple[tuple[int, ...], ...]:
    """A total order on lease identities (IPv4 subnet, IPv6 subnet; either may be None)."""
    return tuple((0,) if n is None else (1, n.version, int(n.network_address), n.prefixlen) for n in ident)


def route_key(r: Route) -> Net:
    return r.dst


def neigh_key(n: Neigh) -> NeighKey:
    return (n.dev, n.ip)


def fdb_key(f: Fdb) -> FdbKey:
    return (f.dev, f.mac)


@dataclass
class Touched:
    """Keys whose desired entry may have changed."""

    routes: set[Net] = field(default_factory=set)
    neighs: set[NeighKey] = field(default_factory=set)
    fdbs: set[FdbKey] = field(default_factory=set)

    def add(self, st: KernelState) -> None:
        self.routes.update(r.dst for r in st.routes)
        self.neighs.update(neigh_key(n) for n in st.neighs)
        self.fdbs.update(fdb_key(f) for f in st.fdbs)

    def update(self, other: Touched) -> None:
        self.routes |= other.routes
        self.neighs |= other.neighs
        self.fdbs |= other.fdbs

    def __len__(self) -> int:
        return len(self.routes) + len(self.neighs) + len(self.fdbs)


class Index:
    """The desired kernel state, per lease and per key (see the module docstring)."""

    def __init__(self, ctx: Context, translate: Translate, *, own: Iterable[Net] = (),
                 devs: Iterable[str] = ()) -> None:
        self.ctx = ctx
        self.translate = translate
        self.own = tuple(own)
        self.devs = tuple(devs)             # devices our routes use: a proto-boot route there is adoptable
        self.leases: dict[Ident, Lease] = {}
        self.entries: dict[Ident, KernelState] = {}     # every lease that translated (blocked or not)
        self.skipped: dict[Ident, str] = {}             # why a lease yields nothing (bad record or blocked)
        self.blocked: set[Ident] = set()
        self.foreign: dict[Net, tuple[ForeignRoute, ...]] = {}
        self._wants: dict[Net, set[Ident]] = {}         # route dst -> translated leases that route there
        self._routes: dict[Net, dict[Ident, Route]] = {}
        self._neighs: dict[NeighKey, dict[Ident, Neigh]] = {}
        self._fdbs: dict[FdbKey, dict[Ident, Fdb]] = {}

    # ---- leases ---------------------------------------------------------------------------

    def put(self, lease: Lease) -> Touched:
        """A lease was added or changed."""
        ident = lease.ident
        touched = self.drop(ident)
        self.leases[ident] = lease
        try:
            st = self.translate(lease, self.ctx)
        except (Skip, errors.BadLeaseRecord) as e:
            self.skipped[ident] = str(e)
            return touched
        self.entries[ident] = st
        for r in st.routes:
            self._wants.setdefault(r.dst, set()).add(ident)
        reason = self._block_reason(lease, st)
        if reason is not None:
            self.blocked.add(ident)
            self.skipped[ident] = reason
            return touched
        self._claim(ident, st)
        touched.add(st)
        return touched

    def drop(self, ident: Ident) -> Touched:
        """A lease went away (or is about to be replaced)."""
        touched = Touched()
        if self.leases.pop(ident, None) is None:
            return touched
        self.skipped.pop(ident, None)
        st = self.entries.pop(ident, None)
        if st is None:
            return touched
        for r in st.routes:
            wants = self._wants.get(r.dst)
            if wants is not None:
                wants.discard(ident)
                if not wants:
                    del self._wants[r.dst]
        if ident in self.blocked:
            self.blocked.discard(ident)
            return touched
        self._unclaim(ident, st)
        touched.add(st)
        return touched

    def rebuild(self, ctx: Context | None = None, foreign: Iterable[ForeignRoute] | None = None) -> None:
        """Translate every lease again (the context or the kernel's foreign routes changed)."""
        if ctx is not None:
            self.ctx = ctx
        if foreign is not None:
            fr: dict[Net, list[ForeignRoute]] = {}
            for f in foreign:
                fr.setdefault(f.dst, []).append(f)
            self.foreign = {k: tuple(v) for k, v in fr.items()}
        leases = list(self.leases.values())
        self.leases.clear()
        self.entries.clear()
        self.skipped.clear()
        self.blocked.clear()
        self._wants.clear()
        self._routes.clear()
        self._neighs.clear()
        self._fdbs.clear()
        for lease in leases:
            self.put(lease)

    # ---- foreign routes (from a dump, or a kernel notification) ----------------------------

    def set_foreign(self, dst: Net, routes: tuple[ForeignRoute, ...]) -> Touched:
        """The non-flannel routes to ``dst`` are now ``routes``; re-check the leases that route there."""
        if routes:
            self.foreign[dst] = routes
        else:
            self.foreign.pop(dst, None)
        touched = Touched()
        for ident in sorted(self._wants.get(dst, ()), key=ident_key):
            lease = self.leases[ident]
            st = self.entries[ident]
            reason = self._block_reason(lease, st)
            if reason is None and ident in self.blocked:
                self.blocked.discard(ident)
                self.skipped.pop(ident, None)
                self._claim(ident, st)
                touched.add(st)
            elif reason is not None and ident not in self.blocked:
                self.blocked.add(ident)
                self.skipped[ident] = reason
                self._unclaim(ident, st)
                touched.add(st)
            elif reason is not None:
                self.skipped[ident] = reason
        return touched

    # ---- winners --------------------------------------------------------------------------

    def route(self, dst: Net) -> Route | None:
        r: Route | None = _winner(self._routes.get(dst))
        return r

    def neigh(self, key: NeighKey) -> Neigh | None:
        n: Neigh | None = _winner(self._neighs.get(key))
        return n

    def fdb(self, key: FdbKey) -> Fdb | None:
        f: Fdb | None = _winner(self._fdbs.get(key))
        return f

    def state(self) -> KernelState:
        """Everything the leases want: the winner of every key (O(N): full reconciles only)."""
        return KernelState(frozenset(_winner(c) for c in self._routes.values()),
                           frozenset(_winner(c) for c in self._neighs.values()),
                           frozenset(_winner(c) for c in self._fdbs.values()))

    def wanting(self, dst: Net) -> tuple[Ident, ...]:
        """The leases (blocked or not) whose route goes to ``dst``."""
        return tuple(self._wants.get(dst, ()))

    def skip_reasons(self) -> Iterator[tuple[Lease, str]]:
        for ident, reason in self.skipped.items():
            yield self.leases[ident], reason

    # ---- internals ------------------------------------------------------------------------

    def _block_reason(self, lease: Lease, st: KernelState) -> str | None:
        for r in st.routes:
            for own in self.own:
                if own.version == r.dst.version and r.dst.overlaps(own):  # type: ignore[arg-type,unused-ignore]
                    return (f"refusing lease {lease.describe()}: its subnet {r.dst} overlaps our own subnet {own}; "
                            "a remote lease must never replace the route to a local subnet")
            for f in self.foreign.get(r.dst, ()):
                if not f.adoptable(self.devs):
                    return (f"refusing lease {lease.describe()}: its route would replace '{f}', "
                            "a route flannel did not install")
        return None

    def _claim(self, ident: Ident, st: KernelState) -> None:
        for r in st.routes:
            self._routes.setdefault(r.dst, {})[ident] = r
        for n in st.neighs:
            self._neighs.setdefault(neigh_key(n), {})[ident] = n
        for f in st.fdbs:
            self._fdbs.setdefault(fdb_key(f), {})[ident] = f

    def _unclaim(self, ident: Ident, st: KernelState) -> None:
        tables: tuple[tuple[dict[Any, dict[Ident, Any]], list[Any]], ...] = (
            (self._routes, [r.dst for r in st.routes]), (self._neighs, [neigh_key(n) for n in st.neighs]),
            (self._fdbs, [fdb_key(f) for f in st.fdbs]))
        for table, keys in tables:
            for k in keys:
                claims = table.get(k)
                if claims is not None:
                    claims.pop(ident, None)
                    if not claims:
                        del table[k]


def _winner(claims: dict[Ident, Any] | None) -> Any:
    if not claims:
        return None
    if len(claims) == 1:
        return next(iter(claims.values()))
    return claims[min(claims, key=ident_key)]
