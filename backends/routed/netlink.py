"""The kernel side of vxlan and host-gw: the only module of these backends that talks netlink.

``Netlink`` works in the calling thread's network namespace (so a thread switched into a namespace
with ``flannel.lab.netns.in_netns`` programs that namespace): links and addresses go through
``flannel.nl`` (rare, nested attributes), and ``rtnl.Rtnl`` carries the per-peer
entries -- routes, neighbours, fdb -- which are written and dumped with hand-packed messages,
many per system call, each failure still attributed to its entry (see ``rtnl.py`` for why:
pyroute2 costs ~0.2 ms of Python per message). ``dump`` reads what this backend manages and
which foreign routes lie inside the network; ``apply`` carries out a ``Plan``; ``monitor`` opens a
notification socket so that the reconcile loop hears of deletions without polling.

What the agent owns in the kernel (docs/ownership.md has the operator's version):

* a main-table route inside ``Network``/``IPv6Network`` (other than our own subnet) is ours when
  it carries our protocol number ``FLANNEL_PROTO`` (152) -- every route we write does -- or when
  it has Go flannel's exact vxlan shape on our overlay device: ``S via S.0 dev flannel.N onlink
  proto boot``. Only those are ever deleted;
* every other route inside the network is *foreign*: never deleted, never replaced. A lease whose
  route would replace one is skipped (logged, counted) -- except a ``proto boot`` unicast route via
  a gateway on one of our devices (the external interface or the overlay device), which is what
  Go flannel's host-gw and DirectRouting leave for a live peer: the lease's route replaces it
  (atomically; the same next hop), and from then on it carries our protocol. A ``proto boot``
  route on the external interface that no lease claims is indistinguishable from an operator's
  ``ip route add`` and is left alone;
* permanent neighbours and fdb entries on our overlay devices are ours (the device is ours; nobody
  else programs it).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_interface
from socket import AF_INET, AF_INET6
from typing import Any, ParamSpec, TypeVar

from flannel import errors, metrics, nl
from flannel.backends.routed import rtnl
from flannel.backends.routed.model import FLANNEL_PROTO, Addr, Fdb, ForeignRoute, KernelState, Neigh, Net, Plan, Route

log = logging.getLogger(__name__)

_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}
RT_SCOPE_LINK = 253   # wireguard's route


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    mac: str
    mtu: int
    kind: str
    vxlan: dict[str, Any]


@dataclass(frozen=True)
class Scope:
    """Where our entries live: main-table routes inside ``network`` (IPv4) / ``network6`` (IPv6),
    other than our own subnet, via ``devs`` (the devices our routes use); permanent neighbours and
    fdb entries on ``overlay_dev`` / ``overlay_dev6`` (vxlan only). A family whose network is
    ``None`` is not looked at. Which of those routes are *ours* is the rule in the module
    docstring (``rtnl.Classifier``)."""

    network: IPv4Network | None
    devs: tuple[str, ...]
    overlay_dev: str | None = None
    exclude: IPv4Network | None = None   # our own subnet
    network6: IPv6Network | None = None
    overlay_dev6: str | None = None
    exclude6: IPv6Network | None = None

    def wants_route(self, net: Net) -> bool:
        within = self.network if net.version == 4 else self.network6
        own = self.exclude if net.version == 4 else self.exclude6
        return within is not None and net.version == within.version and net.subnet_of(within) and net != own  # type: ignore[arg-type]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _boundary(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Convert netlink errors into ``errors.BackendError`` at the module boundary."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except OSError as e:   # nl.NetlinkError included
            metrics.netlink_error(fn.__name__)  # metrics: errors by operation
            raise errors.BackendError(f"netlink {fn.__name__}: {e}") from e
    return wrapper


class Netlink:
    """Typed port over the kernel's rtnetlink (``flannel.nl`` for links and addresses, ``rtnl``
    for the per-peer entries)."""

    def __init__(self) -> None:
        self._nl = nl.Client()
        try:
            self._rt = rtnl.Rtnl()
        except BaseException:
            self._nl.close()
            raise
        self._pyroute2: Any = None

    @property
    def _ipr(self) -> Any:
        """A pyroute2 ``IPRoute``, opened on first use (in the calling thread's namespace). Only
        ``replace_link_route`` (the wireguard backend's device route) uses it; vxlan and host-gw
        never do, so they do not pay pyroute2's ~22 MB import."""
        if self._pyroute2 is None:
            from pyroute2 import IPRoute
            self._pyroute2 = IPRoute()
        return self._pyroute2

    def close(self) -> None:
        self._nl.close()
        self._rt.close()
        if self._pyroute2 is not None:
            self._pyroute2.close()

    # ---- links ------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        """The interface index of ``name`` in this thread's namespace (an ioctl: microseconds)."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None

    @_boundary
    def link(self, name: str) -> LinkInfo | None:
        idx = self.link_index(name)
        if idx is None:
            return None
        msg = self._nl.link(idx)
        if msg is None:
            return None
        return LinkInfo(index=idx, name=name, mac=msg.mac, mtu=msg.mtu, kind=msg.kind, vxlan=msg.data)

    @_boundary
    def connected_nets(self, index: int, version: int = 4) -> tuple[Any, ...]:
        """The subnets directly connected on a link (its addresses' networks; no link-local)."""
        nets = []
        for a in self._nl.addrs(AF_INET if version == 4 else AF_INET6, index):
            iface = ip_interface(f"{a.address}/{a.prefixlen}")
            if not iface.ip.is_link_local:
                nets.append(iface.network)
        return tuple(nets)

    @_boundary
    def addresses(self, index: int, version: int = 4) -> tuple[Any, ...]:
        """The link's global addresses of one family, in the kernel's order (primary first)."""
        return tuple(a.address for a in self._nl.addrs(AF_INET if version == 4 else AF_INET6, index)
                     if not a.address.is_link_local and not a.address.is_loopback)

    @_boundary
    def delete_link(self, index: int) -> None:
        self._nl.delete_link(index)

    @_boundary
    def add_vxlan(self, *, name: str, vni: int, local: Addr, link_index: int, port: int, gbp: bool,
                  learning: bool, mtu: int, mac: str) -> None:
        """``ip link add <name> type vxlan id <vni> local <local> dev <link> [dstport <port>] [gbp]
        [no]learning ttl 0 tos 0 mtu <mtu> address <mac>``; port 0 = the kernel default (8472)."""
        self._nl.add_link(name, "vxlan", nl.vxlan_data(vni=vni, local=local, link=link_index, learning=learning,
                                                        port=port, gbp=gbp), mtu=mtu, mac=mac)
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "0")

    @_boundary
    def set_mtu(self, index: int, mtu: int) -> None:
        self._nl.set_link(index, mtu=mtu)

    @_boundary
    def set_vxlan_learning(self, index: int, learning: bool) -> None:
        info = nl.nested(nl.IFLA_LINKINFO, nl.attr(nl.IFLA_INFO_KIND, b"vxlan"),
                         nl.nested(nl.IFLA_INFO_DATA, nl.attr(nl.VXLAN_NUM["IFLA_VXLAN_LEARNING"],
                                                              bytes([int(learning)]))))
        self._nl.set_link(index, linkinfo=info)

    @_boundary
    def ensure_address(self, index: int, addr: Addr, network: Net | None) -> None:
        """Ensure ``addr/32`` (``/128``) on the link (§7.4): IPv4 deletes other addresses inside
        ``network``; IPv6 deletes every other address that is not link-local."""
        v6 = addr.version == 6
        full = 128 if v6 else 32
        have = False
        for a in self._nl.addrs(AF_INET6 if v6 else AF_INET, index):
            ip, plen = a.address, a.prefixlen
            if ip == addr and plen == full:
                have = True
            elif (v6 and not ip.is_link_local) or (not v6 and network is not None and ip in network):
                log.info("removing stale address %s/%d from link %d", ip, plen, index)
                self._nl.del_addr(index, ip, plen)
        if not have:
            self._nl.add_addr(index, addr, full)

    @_boundary
    def set_up(self, index: int) -> None:
        self._nl.set_link(index, up=True)

    # ---- wireguard backend additions (flannel.backends.wireguard; owner: the wireguard backend) --

    @_boundary
    def add_wireguard(self, name: str, mtu: int) -> bool:
        """``ip link add <name> mtu <mtu> type wireguard``. Returns False when the kernel has no
        WireGuard link type (EOPNOTSUPP), so the caller can fall back to wireguard-go."""
        try:
            self._nl.add_link(name, "wireguard", b"", mtu=mtu)
        except nl.NetlinkError as e:
            if e.errno == errno.EOPNOTSUPP:
                return False
            raise
        return True

    def replace_link_route(self, dst: Net, index: int) -> None:
        """``ip route replace <dst> dev <link> scope link proto 152`` in the main table (wireguard's
        one route per family, reference §9.4), with our protocol like every route we write. Rare
        (once per device), so it goes through pyroute2 rather than a hand-packed message."""
        try:
            self._ipr.route("replace", dst=str(dst), oif=index, scope=RT_SCOPE_LINK, table=rtnl.RT_TABLE_MAIN,
                            proto=FLANNEL_PROTO, family=AF_INET6 if dst.version == 6 else AF_INET)
        except Exception as e:  # pyroute2's NetlinkError is not an OSError: convert it at this boundary
            raise errors.BackendError(f"netlink replace_link_route {dst}: {e}") from e

    # ---- entries ----------------------------------------------------------------------------

    def classifier(self, scope: Scope) -> rtnl.Classifier:
        names: dict[int, str] = {}
        overlay: dict[int, str] = {}
        for name in scope.devs:
            i = self.link_index(name)
            if i is not None:
                names[i] = name
        for ov in (scope.overlay_dev, scope.overlay_dev6):
            i = self.link_index(ov) if ov else None
            if i is not None and ov is not None:
                names[i] = overlay[i] = ov
        exclude = tuple(n for n in (scope.exclude, scope.exclude6) if n is not None)
        return rtnl.Classifier(network=scope.network, network6=scope.network6, exclude=exclude, names=names,
                               overlay=overlay)

    @_boundary
    def dump(self, scope: Scope, expect: KernelState | None = None) -> KernelState:
        """Our entries in ``scope`` and the foreign routes inside the network: one route dump per
        family, one neighbour and one fdb dump per overlay device.

        ``expect`` (what the caller believes the kernel holds, e.g. the desired state) only makes
        the dump cheaper: a message whose raw fields (``rtnl.route_key``/``neigh_key``) are exactly
        those of an expected entry *is* that entry and is not parsed; every other message is parsed
        and classified as without it. The result is the same either way (a test checks it)."""
        cl = self.classifier(scope)
        known_routes, known_neighs = self._expected(cl, expect) if expect is not None else ({}, {})
        routes, foreign = self._dump_routes(scope, cl, known_routes)
        neighs, fdbs = self._dump_neighs(scope, known_neighs)
        return KernelState(frozenset(routes), frozenset(neighs), frozenset(fdbs), frozenset(foreign))

    def _dump_routes(self, scope: Scope, cl: rtnl.Classifier,
                     known: dict[Any, Route]) -> tuple[set[Route], set[ForeignRoute]]:
        routes: set[Route] = set()
        foreign: set[ForeignRoute] = set()
        names: dict[int, str | None] = {}

        def name_of(index: int) -> str | None:
            if index not in names:
                names[index] = rtnl.ifname(index)
            return names[index]

        route_key, get = rtnl.route_key, known.get
        for family, within in ((AF_INET, scope.network), (AF_INET6, scope.network6)):
            if within is None:
                continue
            for data, off, end in self._rt.dump_routes(family):
                hit = get(route_key(data, off, end)) if known else None
                if hit is not None:
                    routes.add(hit)
                    continue
                msg = rtnl.parse_route(data, off, end, cl.within)
                if msg is None:
                    continue
                entry = cl.classify(msg, name_of)
                if isinstance(entry, Route):
                    routes.add(entry)
                elif entry is not None:
                    foreign.add(entry)
        return routes, foreign

    def _dump_neighs(self, scope: Scope, known: dict[Any, Neigh | Fdb]) -> tuple[set[Neigh], set[Fdb]]:
        neighs: set[Neigh] = set()
        fdbs: set[Fdb] = set()
        neigh_key, get = rtnl.neigh_key, known.get
        for family, ov in ((AF_INET, scope.overlay_dev), (AF_INET6, scope.overlay_dev6)):
            idx = self.link_index(ov) if ov else None
            if ov is None or idx is None:
                continue
            version = 4 if family == AF_INET else 6
            for dump_family in (family, rtnl.AF_BRIDGE):
                for data, off, end in self._rt.dump_neighs_raw(dump_family, idx):
                    e = get(neigh_key(data, off, end)) if known else None
                    if e is None:
                        e = rtnl.neigh_entry(rtnl.parse_neigh(data, off, end), ov)
                    if dump_family == rtnl.AF_BRIDGE:
                        if isinstance(e, Fdb) and e.dst.version == version:
                            fdbs.add(e)
                    elif isinstance(e, Neigh) and e.ip.version == version:
                        neighs.add(e)
        return neighs, fdbs

    def _expected(self, cl: rtnl.Classifier, expect: KernelState) -> tuple[dict[Any, Route], dict[Any, Neigh | Fdb]]:
        """Raw keys of the entries in ``expect`` that a dump would classify as exactly that entry:
        routes within the network, not our own subnet, on one of the scope's devices; neighbours
        and fdb entries of an overlay device. Anything else is left out (its message is parsed)."""
        index_of = {name: i for i, name in cl.names.items()}
        routes: dict[Any, Route] = {}
        for r in expect.routes:
            oif = index_of.get(r.dev)
            dst = r.dst
            if (oif is None or r.proto != FLANNEL_PROTO or dst in cl.exclude
                    or not cl.within(dst.version, int(dst.network_address), dst.prefixlen)):
                continue
            routes[rtnl.expected_route_key(r, oif)] = r
        overlay_of = {name: i for i, name in cl.overlay.items()}
        neighs: dict[Any, Neigh | Fdb] = {}
        entries: tuple[Neigh | Fdb, ...] = (*expect.neighs, *expect.fdbs)
        for e in entries:
            idx = overlay_of.get(e.dev)
            key = rtnl.expected_neigh_key(e, idx) if idx is not None else None
            if key is not None:
                neighs[key] = e
        return routes, neighs

    def apply(self, plan: Plan) -> list[tuple[object, str]]:
        """Carry out ``plan`` (deletions first, then fdb → neighbour → route). Returns the entries
        the kernel refused, with the reason (empty = all done); deleting what is already gone is
        not a failure. A failing socket raises ``errors.BackendError``."""
        index: dict[str, int | None] = {}
        failed: list[tuple[object, str]] = []

        def dev(entry: Route | Neigh | Fdb, deleting: bool) -> int | None:
            if entry.dev not in index:
                index[entry.dev] = self._rt.ifindex(entry.dev)
            i = index[entry.dev]
            if i is None and not deleting:
                failed.append((entry, f"set {entry}: no device {entry.dev}"))
            return i

        steps: tuple[tuple[tuple[Any, ...], rtnl.Encoder, bool], ...] = (
            (plan.del_routes, rtnl.route_del_msg, True), (plan.del_neighs, rtnl.neigh_del_msg, True),
            (plan.del_fdbs, rtnl.fdb_del_msg, True), (plan.set_fdbs, rtnl.fdb_set_msg, False),
            (plan.set_neighs, rtnl.neigh_set_msg, False), (plan.set_routes, rtnl.route_set_msg, False))

        def items() -> Iterator[tuple[object, rtnl.Encoder, Any, int]]:
            # a generator: only one chunk of encoded messages exists at a time (memory at 10k peers)
            for entries, encode, deleting in steps:
                for e in entries:
                    i = dev(e, deleting)
                    if i is not None:
                        yield (e, deleting), encode, e, i

        try:
            refused = self._rt.send(items())
        except rtnl.NetlinkFailure as err:
            raise errors.BackendError(f"netlink apply: {err}") from err
        for tagged, code, text in refused:
            entry, was_delete = tagged if isinstance(tagged, tuple) else (tagged, False)
            if was_delete and code in _GONE:
                continue
            metrics.netlink_error(f"{'delete' if was_delete else 'set'}_{type(entry).__name__}")  # metrics
            failed.append((entry, f"{'delete' if was_delete else 'set'} {entry}: {text} (errno {code})"))
        return failed

    def monitor(self) -> rtnl.Monitor:
        """A notification socket in this namespace (routes, neighbours, links)."""
        try:
            return rtnl.Monitor(self._rt.portid)
        except OSError as e:
            raise errors.BackendError(f"netlink monitor: {e}") from e


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.debug("cannot write %s: %s", path, e)
