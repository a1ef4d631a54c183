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
  else programs it);
* a nexthop object with our protocol (152) is ours: each IPv4 route we write goes through its own
  (``ip route`` shows ``S nhid N via G dev D proto 152``), because the kernel inserts a route with
  its own gateway in O(routes) (docs/benchmarks.md) and one through a nexthop object in O(1). We
  delete only our own nexthops: the one of a route we delete, and, on a full reconcile, ours that
  no route uses. Kernels without nexthop objects (< 5.3) and ``FLANNEL_ROUTE_NEXTHOPS=0`` get
  plain routes; IPv6 routes are always plain (no such cost there). Either kind is read back the
  same way, so switching between them causes no churn.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
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
#: how a kernel without nexthop objects answers their dump
_NO_NEXTHOPS = {errno.EOPNOTSUPP, errno.EINVAL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}
NEXTHOPS_ENV = "FLANNEL_ROUTE_NEXTHOPS"
_MAX_NHID = 0xFFFFFFFF
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
        self._init_nexthops()

    def _init_nexthops(self) -> None:
        #: device name -> index, as found by ``apply`` since the last ``classifier`` (every full
        #: reconcile, which a deleted or re-created device of ours triggers) or a write refused
        #: with ENODEV: kernel indexes are not reused, so a stale one only fails a write
        self._ifindex: dict[str, int | None] = {}
        self._nh_use = nexthops_wanted()
        self._nh_ok: bool | None = None             # the kernel has nexthop objects (None: not asked yet)
        self._nhs: dict[int, rtnl.NexthopMsg] = {}  # every nexthop object in the kernel, as last seen
        self._taken: set[int] = set()               # ids refused as taken (EEXIST) or being created
        self._route_nh: dict[Net, int] = {}         # our IPv4 routes through a nexthop: dst -> id
        self._unused: tuple[int, ...] = ()          # our nexthops no route used at the last dump

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
        self._ifindex.clear()
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
                               overlay=overlay, nexthops=self._nhs)

    @_boundary
    def dump(self, scope: Scope, expect: KernelState | None = None) -> KernelState:
        """Our entries in ``scope`` and the foreign routes inside the network: one route dump per
        family, one neighbour and one fdb dump per overlay device.

        ``expect`` (what the caller believes the kernel holds, e.g. the desired state) only makes
        the dump cheaper: a message whose raw fields (``rtnl.route_key``/``neigh_key``) are exactly
        those of an expected entry *is* that entry and is not parsed; every other message is parsed
        and classified as without it. The result is the same either way (a test checks it)."""
        cl = self.classifier(scope)
        self._read_nexthops(scope)   # before the expectations: a route through a nexthop is matched with it
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
        route_nh: dict[Net, int] = {}
        used: set[int] = set()
        for family, within in ((AF_INET, scope.network), (AF_INET6, scope.network6)):
            if within is None:
                continue
            for data, off, end in self._rt.dump_routes(family):
                key = route_key(data, off, end)
                hit = get(key) if known else None
                if hit is not None:
                    routes.add(hit)
                    _note_nh(rtnl.route_key_nhid(key), hit, used, route_nh)
                    continue
                msg = rtnl.parse_route(data, off, end, cl.within)
                if msg is None:
                    continue
                entry = cl.classify(msg, name_of)
                _note_nh(msg.nhid, entry, used, route_nh)
                if isinstance(entry, Route):
                    routes.add(entry)
                elif entry is not None:
                    foreign.add(entry)
        self._dumped_nexthops(scope, route_nh, used)
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
        nhs = self._nhs
        for r in expect.routes:
            oif = index_of.get(r.dev)
            dst = r.dst
            if (oif is None or r.proto != FLANNEL_PROTO or dst in cl.exclude
                    or not cl.within(dst.version, int(dst.network_address), dst.prefixlen)):
                continue
            nhid = self._route_nh.get(dst) if dst.version == 4 else None
            if nhid is None:
                routes[rtnl.expected_route_key(r, oif)] = r
            else:
                # through our nexthop, which (as just dumped) must hold exactly this gateway and
                # device (field by field: what _nexthop_of would build, without building it)
                nh = nhs.get(nhid)
                if (nh is not None and nh.protocol == FLANNEL_PROTO and nh.single and nh.oif == oif
                        and nh.onlink == r.onlink and nh.gateway == r.gateway):
                    routes[rtnl.expected_route_key_nh(r, nhid)] = r
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
        index: dict[str, int | None] = self._ifindex   # devices found before (a lease event: no ioctl)
        failed: list[tuple[object, str]] = []

        def dev(entry: Route | Neigh | Fdb, deleting: bool) -> int | None:
            i = index.get(entry.dev)
            if i is None:
                i = self._rt.ifindex(entry.dev)
                if i is not None:
                    index[entry.dev] = i
            if i is None and not deleting:
                failed.append((entry, f"set {entry}: no device {entry.dev}"))
            return i

        if self._nh_ok is None:
            self._read_nexthops()
        fresh: list[tuple[tuple[Route, bool], int, int]] = []   # (tag, oif, new id): routes waiting for their nexthop
        routed: list[tuple[tuple[Route, bool], int | None, int]] = []   # (tag, id, oif) of the other routes

        steps: tuple[tuple[tuple[Any, ...], rtnl.Encoder, bool], ...] = (
            (plan.del_routes, rtnl.route_del_msg, True), (plan.del_neighs, rtnl.neigh_del_msg, True),
            (plan.del_fdbs, rtnl.fdb_del_msg, True), (plan.set_fdbs, rtnl.fdb_set_msg, False),
            (plan.set_neighs, rtnl.neigh_set_msg, False), (plan.set_routes, rtnl.route_set_msg, False))

        def items() -> Iterator[tuple[object, rtnl.Encoder, Any, int]]:
            # a generator: only one chunk of encoded messages exists at a time (memory at 10k peers)
            known = index.get
            route_msgs = self._route_msgs
            for entries, encode, deleting in steps:
                routes = encode is rtnl.route_set_msg or encode is rtnl.route_del_msg
                for e in entries:
                    i = known(e.dev)   # (a dict hit per entry, the device looked up once)
                    if i is None:
                        i = dev(e, deleting)
                        if i is None:
                            continue
                    if routes:
                        yield from route_msgs(e, i, deleting, fresh, routed)
                    else:
                        yield (e, deleting), encode, e, i

        try:
            refused = self._rt.send(items())
            refused = self._after_routes(refused, fresh, routed)
        except rtnl.NetlinkFailure as err:
            raise errors.BackendError(f"netlink apply: {err}") from err
        if refused:
            self._refusals(refused, failed)
        return failed

    def _refusals(self, refused: list[tuple[object, int, str]], failed: list[tuple[object, str]]) -> None:
        """What the kernel refused, as ``apply`` reports it (deleting what is gone is no failure)."""
        for tagged, code, text in refused:
            if code == errno.ENODEV:
                self._ifindex.clear()    # a device went away: look them up again next time
            entry, was_delete = tagged if isinstance(tagged, tuple) else (tagged, False)
            if was_delete and code in _GONE:
                continue
            metrics.netlink_error(f"{'delete' if was_delete else 'set'}_{type(entry).__name__}")  # metrics
            failed.append((entry, f"{'delete' if was_delete else 'set'} {entry}: {text} (errno {code})"))

    # ---- nexthop objects (IPv4 routes) ------------------------------------------------------

    def _read_nexthops(self, scope: Scope | None = None) -> None:
        """Refresh the table of nexthop objects (ids in use, and how to read routes through ours);
        the first time, learn whether the kernel has them at all. Only for IPv4 (``scope``)."""
        if self._nh_ok is False or (scope is not None and scope.network is None):
            return
        try:
            nhs = {m.id: m for m in self._rt.dump_nexthops()}
        except rtnl.NetlinkFailure as e:
            if e.errno not in _NO_NEXTHOPS or self._nh_ok:
                raise
            log.info("this kernel has no nexthop objects (%s): IPv4 routes are programmed plain", e)
            self._nh_ok = False
            return
        if self._nh_ok is None and self._nh_use:
            log.info("IPv4 peer routes go through nexthop objects (proto %d); %s=0 keeps plain routes",
                     FLANNEL_PROTO, NEXTHOPS_ENV)
        self._nh_ok = True
        self._nhs.clear()             # in place: the classifiers handed out read this table
        self._nhs.update(nhs)
        self._taken.clear()

    def _dumped_nexthops(self, scope: Scope, route_nh: dict[Net, int], used: set[int]) -> None:
        """After an IPv4 route dump: which of our routes go through which nexthop, and which of our
        nexthops no route uses (``prune_nexthops``)."""
        if scope.network is None:
            return
        self._route_nh = route_nh
        self._unused = tuple(i for i, nh in self._nhs.items() if nh.protocol == FLANNEL_PROTO and i not in used)

    def _owned(self, nhid: int | None) -> bool:
        nh = self._nhs.get(nhid) if nhid is not None else None
        return nh is not None and nh.protocol == FLANNEL_PROTO

    def _free_id(self, dst: Net) -> int:
        """A nexthop id nobody uses, never 0: the destination's address when free (stable across
        restarts, distinct for distinct subnets), else the next free one after it."""
        nhid = int(dst.network_address) & _MAX_NHID or 1
        while nhid in self._nhs or nhid in self._taken:
            nhid = nhid + 1 if nhid < _MAX_NHID else 1
        return nhid

    def _route_msgs(self, r: Route, oif: int, deleting: bool, fresh: list[tuple[tuple[Route, bool], int, int]],
                    routed: list[tuple[tuple[Route, bool], int | None, int]],
                    ) -> Iterator[tuple[object, rtnl.Encoder, Any, int]]:
        """The messages of one route: plain (IPv6, no nexthop objects, or a plain route of ours
        being deleted), or through its nexthop object. Every message of the route carries the same
        tag, so a refusal of either fails the route. A new nexthop's route waits in ``fresh`` for
        the second send (``_after_routes``): if the id was taken meanwhile, the route must not
        point at somebody else's nexthop."""
        tag = (r, deleting)
        # (an empty table: a cold start; no hash of the destination to learn it)
        nhid = self._route_nh.get(r.dst) if self._route_nh and r.dst.version == 4 else None
        if deleting:
            if nhid is None:
                yield tag, rtnl.route_del_msg, r, oif
                return
            routed.append((tag, nhid, oif))
            yield tag, rtnl.prebuilt, rtnl.route_del_nh(r, nhid), 0
            if self._owned(nhid):
                yield tag, rtnl.prebuilt, rtnl.nexthop_del(nhid), 0
            return
        if r.dst.version != 4 or not (self._nh_ok and self._nh_use):
            routed.append((tag, None, oif))
            yield tag, rtnl.route_set_msg, r, oif
            return
        if nhid is not None and self._owned(nhid):
            routed.append((tag, nhid, oif))
            yield tag, rtnl.nexthop_replace_msg, (r, nhid), oif
            yield tag, rtnl.route_nh_msg, (r, nhid), 0
            return
        nhid = self._free_id(r.dst)
        self._taken.add(nhid)
        fresh.append((tag, oif, nhid))
        yield tag, rtnl.nexthop_new_msg, (r, nhid), oif

    def _after_routes(self, refused: list[tuple[object, int, str]], fresh: list[tuple[tuple[Route, bool], int, int]],
                      routed: list[tuple[tuple[Route, bool], int | None, int]]) -> list[tuple[object, int, str]]:
        """Bring the tables up to date with what the kernel accepted, and send the routes whose new
        nexthop was created. Returns the refusals of both sends.

        A new nexthop refused with ENETDOWN (its device has no carrier: the kernel wants one for a
        nexthop object, not for a plain route) gets a plain route instead, as before nexthops."""
        bad = {id(tag): code for tag, code, _text in refused}
        self._settle(bad, routed)
        if not fresh:
            return refused
        later: list[tuple[tuple[Route, bool], int, int]] = []
        plain: set[int] = set()
        for tag, oif, nhid in fresh:
            code = bad.get(id(tag))
            if code == errno.EEXIST:
                continue          # somebody else's id: stays in _taken; the retry picks another
            self._taken.discard(nhid)
            if code is None:
                self._nhs[nhid] = _nexthop_of(tag[0], oif, nhid)
                later.append((tag, nhid, oif))
            elif code == errno.ENETDOWN:
                plain.add(id(tag))
                later.append((tag, 0, oif))
        if not self._taken:
            self._taken = set()   # a set keeps the table it grew to: 5000 new ids left ~0.5 MB behind
        if not later:
            return refused
        return [x for x in refused if id(x[0]) not in plain] + self._send_later(later)

    def _settle(self, bad: dict[int, int], routed: list[tuple[tuple[Route, bool], int | None, int]]) -> None:
        """The tables after the first send, for the routes that needed no new nexthop."""
        for tag, nhid, oif in routed:
            r, deleting = tag
            code = bad.get(id(tag))
            if deleting:
                if code is None or code in _GONE:
                    self._route_nh.pop(r.dst, None)
                    if nhid is not None and self._owned(nhid):
                        self._nhs.pop(nhid, None)
            elif code is not None:
                continue                           # a refused replace leaves what was there
            elif nhid is None:
                self._route_nh.pop(r.dst, None)    # now a plain route (its old nexthop: unused)
            else:
                self._nhs[nhid] = _nexthop_of(r, oif, nhid)
                self._route_nh[r.dst] = nhid

    def _send_later(self, later: list[tuple[tuple[Route, bool], int, int]]) -> list[tuple[object, int, str]]:
        """The second send: routes through their new nexthop (id 0: a plain route). Returns its refusals."""
        refused2 = self._rt.send((tag, rtnl.route_nh_msg, (tag[0], nhid), 0) if nhid
                                 else (tag, rtnl.route_set_msg, tag[0], oif) for tag, nhid, oif in later)
        bad2 = {id(tag) for tag, _code, _text in refused2}
        orphans = []
        for tag, nhid, _oif in later:
            if id(tag) in bad2:
                if nhid:
                    orphans.append(nhid)
                    self._nhs.pop(nhid, None)
            elif nhid:
                self._route_nh[tag[0].dst] = nhid
            else:
                self._route_nh.pop(tag[0].dst, None)
        if orphans:   # best effort: a full reconcile deletes our unused nexthops anyway
            self._rt.send((i, rtnl.prebuilt, rtnl.nexthop_del(i), 0) for i in orphans)
        return refused2

    @_boundary
    def prune_nexthops(self) -> int:
        """Delete our nexthop objects that no route used at the last ``dump`` (a crash between a
        nexthop and its route, a route deleted by someone else). Called by a full reconcile only:
        ``dump`` itself never writes (doctor reads the kernel through it). Returns how many."""
        ids, self._unused = self._unused, ()
        in_use = set(self._route_nh.values())
        ids = tuple(i for i in ids if self._owned(i) and i not in in_use)
        if not ids:
            return 0
        refused = self._rt.send((i, rtnl.prebuilt, rtnl.nexthop_del(i), 0) for i in ids)
        kept = {tag for tag, code, _text in refused if code not in _GONE}
        for i in ids:
            if i not in kept:
                self._nhs.pop(i, None)
        log.info("deleted %d unused nexthop objects of ours (proto %d)", len(ids) - len(kept), FLANNEL_PROTO)
        return len(ids) - len(kept)

    def note_nexthop(self, kind: int, data: bytes, off: int, end: int) -> bool:
        """A nexthop notification (not caused by us): keep the table of ids in use current.
        Returns True when one of our nexthops was deleted or rewritten by someone else: the
        kernel removes a deleted nexthop's routes *without* route notifications, so the caller
        must reconcile against a dump."""
        m = rtnl.parse_nexthop(data, off, end)
        if m is None:
            return False
        cur = self._nhs.get(m.id)
        ours = cur is not None and cur.protocol == FLANNEL_PROTO
        if kind == rtnl.RTM_DELNEXTHOP:
            self._nhs.pop(m.id, None)
            return ours
        self._nhs[m.id] = m
        return ours and cur != m

    def monitor(self) -> rtnl.Monitor:
        """A notification socket in this namespace (routes, neighbours, links)."""
        try:
            return rtnl.Monitor(self._rt.portid)
        except OSError as e:
            raise errors.BackendError(f"netlink monitor: {e}") from e


def _note_nh(nhid: int | None, entry: Route | ForeignRoute | None, used: set[int], route_nh: dict[Net, int]) -> None:
    """A dumped route through nexthop ``nhid``: the id is in use; a route of ours remembers it."""
    if nhid is None:
        return
    used.add(nhid)
    if isinstance(entry, Route) and entry.dst.version == 4:
        route_nh[entry.dst] = nhid


def _nexthop_of(r: Route, oif: int, nhid: int) -> rtnl.NexthopMsg:
    """The nexthop object we write for ``r``, as the kernel reports it back."""
    return rtnl.NexthopMsg(nhid, AF_INET6 if r.gateway.version == 6 else AF_INET, FLANNEL_PROTO, oif, r.gateway,
                           r.onlink)


def nexthops_wanted() -> bool:
    """``FLANNEL_ROUTE_NEXTHOPS``: unset or 1 = IPv4 routes through nexthop objects (when the
    kernel has them), 0 = plain routes as before. Anything else is reported and the default used."""
    raw = os.environ.get(NEXTHOPS_ENV, "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    log.warning("%s=%r is not one of 0, 1, true, false: using nexthop objects (the default)", NEXTHOPS_ENV, raw)
    return True


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.debug("cannot write %s: %s", path, e)
