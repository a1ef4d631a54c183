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

from collections.abc import Callable, Iterable, Iterator
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
    flat_translation,
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


class _Many(dict):  # type: ignore[type-arg]
    """Several leases claim one key (rare): ident -> None, in a dict to keep insertion cheap."""


class Index:
    """The desired kernel state, per lease and per key (see the module docstring).

    Memory matters at 10 000 peers, so per lease it keeps one flat tuple of the lease's entries,
    and per key the claiming lease's identity (a ``_Many`` only when several leases claim it);
    the winner's entry is found in the winner's tuple.
    """

    def __init__(self, ctx: Context, translate: Translate, *, own: Iterable[Net] = (),
                 devs: Iterable[str] = (), leases: dict[Ident, Lease] | None = None) -> None:
        """``leases``: the caller's table of current leases, shared (not copied): ``put``/``drop``
        keep it up to date, and ``rebuild`` translates what it holds."""
        self.ctx = ctx
        self.translate = translate          # (and its flat twin: the setter)
        self.own = tuple(own)
        self._own_ranges = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in self.own)
        self.devs = tuple(devs)             # devices our routes use: a proto-boot route there is adoptable
        self.leases: dict[Ident, Lease] = {} if leases is None else leases
        self.entries: dict[Ident, tuple[Any, ...]] = {}  # every lease that translated (blocked or not)
        self.skipped: dict[Ident, str] = {}             # why a lease yields nothing (bad record or blocked)
        self.blocked: set[Ident] = set()
        self.foreign: dict[Net, tuple[ForeignRoute, ...]] = {}
        self._blocked_wants: dict[Net, set[Ident]] = {}  # route dst -> blocked leases that route there
        self._claims: tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]] = ({}, {}, {})   # route, neigh, fdb
        self._many = 0         # keys claimed by several leases (a ``_Many``)
        self._claimed = 0      # entries of unblocked leases (each claims its key)
        #: bumped by every change (put, drop, set_foreign, rebuild): a caller that kept ``state()``
        #: knows it is still current while the generation is the same
        self.generation = 0

    @property
    def translate(self) -> Translate:
        return self._translate

    @translate.setter
    def translate(self, translate: Translate) -> None:
        self._translate = translate
        self._flat = flat_translation(translate)

    # ---- leases ---------------------------------------------------------------------------

    def put(self, lease: Lease, *, touch: bool = True, into: Touched | None = None) -> Touched:
        """A lease was added or changed. ``touch=False``: don't collect the touched keys (a rebuild).
        ``into``: collect them there (and return it) rather than in a new ``Touched``."""
        ident = lease.ident
        touched = Touched() if into is None else into
        if ident in self.leases:
            self.drop(ident, into=touched)
        self.generation += 1
        self.leases[ident] = lease
        flat = self._enter(ident, lease)
        if touch and flat is not None:
            _touch(touched, flat)
        return touched

    def _enter(self, ident: Ident, lease: Lease) -> tuple[Any, ...] | None:
        """Translate a lease already in ``leases`` and record its entries; returns those it
        claims (None: skipped or blocked)."""
        try:
            routes, flat = self._flat(lease, self.ctx)
        except (Skip, errors.BadLeaseRecord) as e:
            self.skipped[ident] = str(e)
            return None
        self.entries[ident] = flat
        reason = self._block_reason(lease, routes)
        if reason is not None:
            self.blocked.add(ident)
            self.skipped[ident] = reason
            for r in routes:
                self._blocked_wants.setdefault(r.dst, set()).add(ident)
            return None
        self._claim(ident, flat)
        return flat

    def drop(self, ident: Ident, *, into: Touched | None = None) -> Touched:
        """A lease went away (or is about to be replaced). ``into``: as for ``put``."""
        touched = Touched() if into is None else into
        if self.leases.pop(ident, None) is None:
            return touched
        self.generation += 1
        self.skipped.pop(ident, None)
        flat = self.entries.pop(ident, None)
        if flat is None:
            return touched
        if ident in self.blocked:
            self.blocked.discard(ident)
            self._unwant(ident, flat)
            return touched
        self._unclaim(ident, flat)
        _touch(touched, flat)
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
        self.entries.clear()
        self.skipped.clear()
        self.blocked.clear()
        self._blocked_wants.clear()
        for c in self._claims:
            c.clear()
        self._many = self._claimed = 0
        self.generation += 1
        enter = self._enter
        for ident, lease in self.leases.items():   # the table stays as it is: only the entries are new
            enter(ident, lease)

    # ---- foreign routes (from a dump, or a kernel notification) ----------------------------

    def set_foreign(self, dst: Net, routes: tuple[ForeignRoute, ...]) -> Touched:
        """The non-flannel routes to ``dst`` are now ``routes``; re-check the leases that route there."""
        if routes:
            self.foreign[dst] = routes
        else:
            self.foreign.pop(dst, None)
        self.generation += 1
        touched = Touched()
        for ident in sorted(self.wanting(dst), key=ident_key):
            lease = self.leases[ident]
            flat = self.entries[ident]
            reason = self._block_reason(lease, [e for e in flat if type(e) is Route])
            if reason is None and ident in self.blocked:
                self.blocked.discard(ident)
                self.skipped.pop(ident, None)
                self._unwant(ident, flat)
                self._claim(ident, flat)
                _touch(touched, flat)
            elif reason is not None and ident not in self.blocked:
                self.blocked.add(ident)
                self.skipped[ident] = reason
                self._unclaim(ident, flat)
                for e in flat:
                    if type(e) is Route:
                        self._blocked_wants.setdefault(e.dst, set()).add(ident)
                _touch(touched, flat)
            elif reason is not None:
                self.skipped[ident] = reason
        return touched

    # ---- winners --------------------------------------------------------------------------

    def route(self, dst: Net) -> Route | None:
        r: Route | None = self._winner(0, dst)
        return r

    def neigh(self, key: NeighKey) -> Neigh | None:
        n: Neigh | None = self._winner(1, key)
        return n

    def fdb(self, key: FdbKey) -> Fdb | None:
        f: Fdb | None = self._winner(2, key)
        return f

    def state(self) -> KernelState:
        """Everything the leases want: the winner of every key (O(N): full reconciles only).

        When no key is claimed twice -- no lease shares a key with another, nor holds two entries
        with one key: the number of claimed entries equals the number of keys -- every entry of
        every unblocked lease is its key's winner, so they are collected as they are, without a
        lookup per key (the usual case; a third of the cost at 5000 peers)."""
        claims = self._claims
        if self._many == 0 and self._claimed == len(claims[0]) + len(claims[1]) + len(claims[2]):
            blocked = self.blocked
            routes: list[Route] = []
            neighs: list[Neigh] = []
            fdbs: list[Fdb] = []
            for ident, es in self.entries.items():
                if blocked and ident in blocked:
                    continue
                for e in es:
                    t = type(e)
                    if t is Route:
                        routes.append(e)
                    elif t is Neigh:
                        neighs.append(e)
                    else:
                        fdbs.append(e)
            return KernelState(frozenset(routes), frozenset(neighs), frozenset(fdbs))
        return self.winners()

    def winners(self) -> KernelState:
        """``state()`` by its definition: the winner of every key, looked up key by key."""
        r, n, f = (frozenset(self._winner(kind, k) for k in self._claims[kind]) for kind in range(3))
        return KernelState(r, n, f)

    def wanting(self, dst: Net) -> tuple[Ident, ...]:
        """The leases (blocked or not) whose route goes to ``dst``."""
        c = self._claims[0].get(dst)
        out = [] if c is None else list(c) if type(c) is _Many else [c]
        out.extend(self._blocked_wants.get(dst, ()))
        return tuple(out)

    def skip_reasons(self) -> Iterator[tuple[Lease, str]]:
        for ident, reason in self.skipped.items():
            yield self.leases[ident], reason

    # ---- internals ------------------------------------------------------------------------

    def _block_reason(self, lease: Lease, routes: Iterable[Route]) -> str | None:
        foreign = self.foreign
        for r in routes:
            dst = r.dst
            if self._own_ranges:
                lo = int(dst.network_address)
                hi = lo | ((1 << (dst.max_prefixlen - dst.prefixlen)) - 1)
                for (version, olo, ohi), own in zip(self._own_ranges, self.own):
                    if version == dst.version and lo <= ohi and olo <= hi:
                        return (f"refusing lease {lease.describe()}: its subnet {dst} overlaps our own subnet "
                                f"{own}; a remote lease must never replace the route to a local subnet")
            for f in foreign.get(dst, ()) if foreign else ():
                if not f.adoptable(self.devs):
                    return (f"refusing lease {lease.describe()}: its route would replace '{f}', "
                            "a route flannel did not install")
        return None

    def _winner(self, kind: int, key: Any) -> Any:
        c = self._claims[kind].get(key)
        if c is None:
            return None
        ident = min(c, key=ident_key) if type(c) is _Many else c
        keyf = _KEYS[kind]
        cls = _KINDS[kind]
        for e in self.entries[ident]:
            if type(e) is cls and keyf(e) == key:
                return e
        return None

    def _claim(self, ident: Ident, flat: tuple[Any, ...]) -> None:
        self._claimed += len(flat)
        routes, neighs, fdbs = self._claims
        for e in flat:
            # the keys of ``_KEYS`` spelled out (a cold start claims 15 000 entries at 5000 peers)
            t = type(e)
            if t is Route:
                table, key = routes, e.dst
            elif t is Neigh:
                table, key = neighs, (e.dev, e.ip)
            else:
                table, key = fdbs, (e.dev, e.mac)
            c = table.setdefault(key, ident)    # one hash of the key (an address object's: a Python call)
            if c is ident:
                continue
            if type(c) is _Many:
                c[ident] = None
            elif c != ident:
                table[key] = _Many({c: None, ident: None})
                self._many += 1

    def _unclaim(self, ident: Ident, flat: tuple[Any, ...]) -> None:
        self._claimed -= len(flat)
        for e in flat:
            kind = _KIND_OF[type(e)]
            table, key = self._claims[kind], _KEYS[kind](e)
            c = table.get(key)
            if c is None:
                continue
            if type(c) is _Many:
                c.pop(ident, None)
                if len(c) == 1:
                    table[key] = next(iter(c))
                    self._many -= 1
                elif not c:
                    del table[key]
                    self._many -= 1
            elif c == ident:
                del table[key]

    def _unwant(self, ident: Ident, flat: tuple[Any, ...]) -> None:
        for e in flat:
            if type(e) is Route:
                w = self._blocked_wants.get(e.dst)
                if w is not None:
                    w.discard(ident)
                    if not w:
                        del self._blocked_wants[e.dst]


_KINDS: tuple[type, ...] = (Route, Neigh, Fdb)
_KIND_OF: dict[type, int] = {Route: 0, Neigh: 1, Fdb: 2}
_KEYS: tuple[Callable[[Any], Any], ...] = (route_key, neigh_key, fdb_key)


def _touch(touched: Touched, flat: tuple[Any, ...]) -> None:
    for e in flat:
        t = type(e)
        if t is Route:
            touched.routes.add(e.dst)
        elif t is Neigh:
            touched.neighs.add(neigh_key(e))
        else:
            touched.fdbs.add(fdb_key(e))
