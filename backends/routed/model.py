"""The kernel-state model every peer-programming backend shares (vxlan, host-gw): pure values and diffs.

Nothing here touches the kernel. ``netlink.py`` dumps the kernel's state into the same value types
(``Route``, ``Neigh``, ``Fdb``), a backend's ``network.py`` translates one lease into the entries it
justifies, and ``plan`` computes the difference between what the leases justify and what the kernel
holds, so reconciling is "one dump per table, then only the diff" (DESIGN §3: reconcile, don't
replay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannel import errors
from flannel.lease import Lease

Net = IPv4Network | IPv6Network
Addr = IPv4Address | IPv6Address
ZERO_MAC = "00:00:00:00:00:00"

#: The routing protocol number on every route the agent installs (``ip route ... proto 152``).
#: Not assigned in iproute2's rt_protos, nor used by bird (12), Calico/felix (80), FRR (186-199),
#: babel (42), keepalived (18), openr (99). It is how a reconcile knows a route is ours: see
#: docs/ownership.md ("what the agent owns in the kernel").
FLANNEL_PROTO = 152
#: What Go flannel (vishvananda/netlink's default) and ``ip route add`` without ``proto`` write.
PROTO_BOOT = 3
_set = object.__setattr__     # how a frozen entry's own ``__init__`` sets its fields


@dataclass(frozen=True, slots=True, init=False)
class Route:
    """``dst via gateway dev <dev> [onlink]`` in the main table (IPv4 or IPv6).

    ``proto`` is the routing protocol the kernel holds for it: ``FLANNEL_PROTO`` for every route
    the agent writes, ``PROTO_BOOT`` for a Go flannel route adopted as ours (see ``Scope``). It
    takes no part in equality: a Go flannel route that already says what a lease wants is left
    alone (no write, no flap); it only makes deletions precise (the kernel deletes a route only
    if its protocol matches).
    """

    dst: Net
    gateway: Addr
    dev: str
    onlink: bool = False
    proto: int = field(default=FLANNEL_PROTO, compare=False)
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __init__(self, dst: Net, gateway: Addr, dev: str, onlink: bool = False, proto: int = FLANNEL_PROTO) -> None:
        # written out rather than generated: a cold start builds 15 000 entries at 5000 peers, and
        # the generated one looks ``object.__setattr__`` up per field. The hash is taken from the
        # addresses' integers: equal routes have equal integers, and ``ipaddress``'s own hashes cost
        # a Python call each
        _set(self, "dst", dst)
        _set(self, "gateway", gateway)
        _set(self, "dev", dev)
        _set(self, "onlink", onlink)
        _set(self, "proto", proto)
        _set(self, "_hash", hash((int(dst.network_address), dst.prefixlen, int(gateway), dev, onlink)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"{self.dst} via {self.gateway} dev {self.dev}{' onlink' if self.onlink else ''}"


@dataclass(frozen=True, slots=True, init=False)
class Neigh:
    """A permanent neighbour ``ip lladdr mac dev <dev>``."""

    ip: Addr
    mac: str
    dev: str
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __init__(self, ip: Addr, mac: str, dev: str) -> None:   # see Route
        _set(self, "ip", ip)
        _set(self, "mac", mac)
        _set(self, "dev", dev)
        _set(self, "_hash", hash((int(ip), mac, dev)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"neigh {self.ip} lladdr {self.mac} dev {self.dev}"


@dataclass(frozen=True, slots=True, init=False)
class Fdb:
    """A permanent vxlan fdb entry ``mac dst <ip> dev <dev> self``."""

    mac: str
    dst: Addr
    dev: str
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __init__(self, mac: str, dst: Addr, dev: str) -> None:   # see Route
        _set(self, "mac", mac)
        _set(self, "dst", dst)
        _set(self, "dev", dev)
        _set(self, "_hash", hash((mac, int(dst), dev)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"fdb {self.mac} dst {self.dst} dev {self.dev}"


@dataclass(frozen=True, slots=True)
class ForeignRoute:
    """A main-table route inside the flannel network that the agent did not install.

    It is never deleted or replaced, and a lease whose route would replace it is skipped
    (``blocks``) -- except a ``proto boot`` unicast route via a gateway on one of our own devices
    (``adoptable``): that is what Go flannel leaves behind for a live peer (host-gw, DirectRouting),
    and the lease's route replaces it, after which it is ours.
    """

    dst: Net
    dev: str | None
    gateway: Addr | None = None
    proto: int = PROTO_BOOT
    kind: str = "unicast"

    def adoptable(self, devs: Iterable[str]) -> bool:
        return (self.proto == PROTO_BOOT and self.kind == "unicast" and self.gateway is not None
                and self.dev in tuple(devs))

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway is not None else ""
        kind = "" if self.kind == "unicast" else f"{self.kind} "
        return f"{kind}{self.dst}{via} dev {self.dev or '-'} proto {self.proto}"


@dataclass(frozen=True, slots=True)
class KernelState:
    """A set of managed entries: either desired (from leases) or actual (a kernel dump).

    A dump also reports ``foreign``: the routes inside the network that are not ours.
    """

    routes: frozenset[Route] = frozenset()
    neighs: frozenset[Neigh] = frozenset()
    fdbs: frozenset[Fdb] = frozenset()
    foreign: frozenset[ForeignRoute] = frozenset()

    def __len__(self) -> int:
        return len(self.routes) + len(self.neighs) + len(self.fdbs)

    def union(self, other: KernelState) -> KernelState:
        return KernelState(self.routes | other.routes, self.neighs | other.neighs, self.fdbs | other.fdbs)

    def minus(self, other: KernelState) -> KernelState:
        return KernelState(self.routes - other.routes, self.neighs - other.neighs, self.fdbs - other.fdbs)


EMPTY = KernelState()


@dataclass(frozen=True, slots=True)
class Plan:
    """What to change, in the order it is applied (deletes first, then fdb → neigh → route, so
    the kernel never ARPs for a gateway whose neighbour is not there yet)."""

    del_routes: tuple[Route, ...] = ()
    del_neighs: tuple[Neigh, ...] = ()
    del_fdbs: tuple[Fdb, ...] = ()
    set_fdbs: tuple[Fdb, ...] = ()
    set_neighs: tuple[Neigh, ...] = ()
    set_routes: tuple[Route, ...] = ()

    def __len__(self) -> int:
        return (len(self.del_routes) + len(self.del_neighs) + len(self.del_fdbs)
                + len(self.set_fdbs) + len(self.set_neighs) + len(self.set_routes))

    @property
    def empty(self) -> bool:
        return len(self) == 0


def plan(desired: KernelState, actual: KernelState) -> Plan:
    """The changes that turn ``actual`` into ``desired``; correct entries are not touched.

    Routes are keyed by destination and neighbours by (device, IP): a changed gateway or MAC is a
    single *replace*, not a delete + add. fdb entries are plain pairs (a MAC may have several
    destinations in the kernel; every pair no lease justifies is deleted). The order inside each
    part does not matter (no sorting: at 10 000 peers it cost more than the kernel writes).
    """
    # only entries the desired state does not hold can be deletions: the key sets are built (a
    # hash of an address object each) only when there are such entries
    extra_routes = actual.routes - desired.routes
    extra_neighs = actual.neighs - desired.neighs
    want_route_dsts = {r.dst for r in desired.routes} if extra_routes else set()
    want_neigh_keys = {(n.dev, n.ip) for n in desired.neighs} if extra_neighs else set()
    return Plan(
        del_routes=_sorted(r for r in extra_routes if r.dst not in want_route_dsts),
        del_neighs=_sorted(n for n in extra_neighs if (n.dev, n.ip) not in want_neigh_keys),
        del_fdbs=_sorted(actual.fdbs - desired.fdbs),
        set_fdbs=_sorted(desired.fdbs - actual.fdbs),
        set_neighs=_sorted(desired.neighs - actual.neighs),
        set_routes=_sorted(desired.routes - actual.routes),
    )


def _sorted(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(items)


# --------------------------------------------------------------------------------------------
# Lease → entries: the contract of a backend's translation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What the translation needs to know about this host.

    ``dev`` is the IPv4 device (``None`` when IPv4 is disabled), ``dev6`` the IPv6 one (``None``
    when IPv6 is disabled); for host-gw both are the external interface.
    """

    backend_type: str
    dev: str | None                              # flannel.<VNI> (vxlan) or the ext iface (host-gw)
    ext_dev: str
    local_nets: tuple[IPv4Network, ...] = ()     # connected IPv4 subnets of the ext iface
    direct_routing: bool = False
    dev6: str | None = None                      # flannel-v6.<VNI> (vxlan) or the ext iface (host-gw)
    local_nets6: tuple[IPv6Network, ...] = ()    # connected IPv6 subnets of the ext iface


class Skip(Exception):
    """A lease that yields no entries, with the reason (logged by the caller)."""


def on_link(ip: Addr, nets: Iterable[Net]) -> bool:
    return any(ip in n for n in nets if n.version == ip.version)


Translate = Callable[[Lease, Context], KernelState]
#: A lease's entries as ``desired.Index`` keeps them: (its routes, all of its entries -- routes,
#: then neighbours and fdb entries -- each once).
Flat = tuple[tuple[Route, ...], tuple[Any, ...]]
FlatTranslate = Callable[[Lease, Context], Flat]
_FLAT: dict[Translate, FlatTranslate] = {}


def register_flat(translate: Translate, flat: FlatTranslate) -> None:
    """Declare ``flat`` the twin of ``translate``: the same entries (and the same ``Skip`` /
    ``BadLeaseRecord``), without a ``KernelState`` and its three sets per lease -- what the index
    needs, ~2 µs a lease cheaper (a cold start translates every peer). A unit test per backend
    holds the twin to the translation."""
    _FLAT[translate] = flat


def flat_translation(translate: Translate) -> FlatTranslate:
    """The registered twin of ``translate``, or the flattening of its ``KernelState``."""
    twin = _FLAT.get(translate)
    if twin is not None:
        return twin

    def flat(lease: Lease, ctx: Context) -> Flat:
        st = translate(lease, ctx)
        routes = tuple(st.routes)
        return routes, (*routes, *st.neighs, *st.fdbs)
    return flat


@dataclass(frozen=True)
class Desired:
    """The desired kernel state for a set of leases, and the leases that were skipped (why)."""

    state: KernelState
    skipped: tuple[tuple[Lease, str], ...] = field(default=())


def desired_state(leases: Iterable[Lease], ctx: Context, translate: Translate) -> Desired:
    """Translate every lease; a bad one is reported in ``skipped`` and never affects the others."""
    routes: set[Route] = set()
    neighs: set[Neigh] = set()
    fdbs: set[Fdb] = set()
    skipped: list[tuple[Lease, str]] = []
    for lease in leases:
        try:
            st = translate(lease, ctx)
        except (Skip, errors.BadLeaseRecord) as e:
            skipped.append((lease, str(e)))
            continue
        routes |= st.routes
        neighs |= st.neighs
        fdbs |= st.fdbs
    return Desired(KernelState(frozenset(routes), frozenset(neighs), frozenset(fdbs)), tuple(skipped))
