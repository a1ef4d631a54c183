"""The kernel side of vxlan and host-gw: the only module of these backends that talks netlink.

``Netlink`` wraps one pyroute2 ``IPRoute`` opened in the calling thread's network namespace (so a
thread switched into a namespace with ``flannel.lab.netns.in_netns`` programs that namespace).
It speaks the value types of ``network.py``: ``dump`` reads the entries this backend manages, one
dump per table, and ``apply`` carries out a ``Plan``.

Speed: pyroute2 spends ~0.2 ms of Python per message; ``ip -batch`` / ``bridge -batch`` encode in C
and are 5-25x faster (reference dependency-facts §3, bench/netlink_scale.py). So ``apply`` sends
large plans (>= ``BATCH_THRESHOLD`` entries) through ``ip -force -batch -`` and ``bridge -force
-batch -`` and small ones (the steady state: one peer joins) through pyroute2. When a batch reports
an error, the caller dumps again and retries whatever is still wrong entry by entry, so one bad
entry in a batch can never hide behind the others. Dumps read ``ip -j`` / ``bridge -j`` output for the same
reason (pyroute2 remains the fallback). The iproute2 children are only used when the calling
thread is in the namespace the pyroute2 socket was opened in (children inherit the *thread's*
namespace), so both paths always see the same kernel.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_interface, ip_network
from socket import AF_INET, AF_INET6
from typing import Any, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel import errors, metrics
from flannel.backends.routed.model import ZERO_MAC, Addr, Fdb, KernelState, Neigh, Net, Plan, Route

log = logging.getLogger(__name__)

MAIN_TABLE = 254
PROTO_BOOT = 3
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RTN_UNICAST = 1
RT_SCOPE_LINK = 253   # wireguard backend addition
BATCH_THRESHOLD = 64
BATCH_UNVERIFIED = "batch"   # marker in apply()'s result: re-dump and redo the rest entry by entry

_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}


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
    """Which kernel entries belong to us: main-table routes whose destination lies inside
    ``network`` (IPv4) / ``network6`` (IPv6), other than our own subnet, and that go out via
    ``devs`` with a gateway; permanent neighbours and fdb entries on ``overlay_dev`` /
    ``overlay_dev6`` (vxlan only). A family whose network is ``None`` is not looked at."""

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


def _netns_id() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


_P = ParamSpec("_P")
_R = TypeVar("_R")
_E = TypeVar("_E")


def _boundary(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Convert pyroute2's errors into ``errors.BackendError`` at the module boundary."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except (NetlinkError, OSError) as e:
            metrics.netlink_error(fn.__name__)  # metrics: errors by operation
            raise errors.BackendError(f"netlink {fn.__name__}: {e}") from e
    return wrapper


class Netlink:
    """Typed port over pyroute2 (and iproute2's batch mode for big plans)."""

    def __init__(self, *, batch_threshold: int = BATCH_THRESHOLD) -> None:
        self._ipr = IPRoute()
        self.batch_threshold = batch_threshold
        self._has_ip = shutil.which("ip") is not None and shutil.which("bridge") is not None
        # the namespace the socket lives in: a batch subprocess must run in the same one, and a
        # child process inherits the *calling thread's* namespace (see flannel.lab.netns.in_netns)
        self._netns = _netns_id()

    def close(self) -> None:
        self._ipr.close()

    # ---- links ------------------------------------------------------------------------------

    @_boundary
    def link_index(self, name: str) -> int | None:
        idx = self._ipr.link_lookup(ifname=name)
        return idx[0] if idx else None

    @_boundary
    def link(self, name: str) -> LinkInfo | None:
        idx = self.link_index(name)
        if idx is None:
            return None
        try:
            msg = self._ipr.get_links(idx)[0]
        except NetlinkError as e:
            if e.code in _GONE:
                return None
            raise
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        vx: dict[str, Any] = {}
        if data is not None:
            vx = {k: v for k, v in data.get("attrs", []) if k.startswith("IFLA_VXLAN_")}
        return LinkInfo(index=idx, name=name, mac=str(msg.get("IFLA_ADDRESS")), mtu=int(msg.get("IFLA_MTU")),
                        kind=str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""), vxlan=vx)

    @_boundary
    def connected_nets(self, index: int, version: int = 4) -> tuple[Any, ...]:
        """The subnets directly connected on a link (its addresses' networks; no link-local)."""
        nets = []
        for a in self._ipr.get_addr(family=AF_INET if version == 4 else AF_INET6, index=index):
            iface = ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
            if not iface.ip.is_link_local:
                nets.append(iface.network)
        return tuple(nets)

    @_boundary
    def delete_link(self, index: int) -> None:
        self._ipr.link("del", index=index)

    @_boundary
    def add_vxlan(self, *, name: str, vni: int, local: Addr, link_index: int, port: int, gbp: bool,
                  learning: bool, mtu: int, mac: str) -> None:
        """``ip link add <name> type vxlan id <vni> local <local> dev <link> [dstport <port>] [gbp]
        [no]learning ttl 0 tos 0 mtu <mtu> address <mac>``; port 0 = the kernel default (8472)."""
        local_key = "vxlan_local6" if local.version == 6 else "vxlan_local"
        kw: dict[str, Any] = dict(ifname=name, kind="vxlan", vxlan_id=vni, **{local_key: str(local)},
                                  vxlan_link=link_index, vxlan_learning=int(learning),
                                  vxlan_ttl=0, vxlan_tos=0, mtu=mtu, address=mac)
        if port:
            kw["vxlan_port"] = port
        if gbp:
            kw["vxlan_gbp"] = True
        self._ipr.link("add", **kw)
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "0")

    @_boundary
    def set_mtu(self, index: int, mtu: int) -> None:
        self._ipr.link("set", index=index, mtu=mtu)

    @_boundary
    def set_vxlan_learning(self, index: int, learning: bool) -> None:
        self._ipr.link("set", index=index, kind="vxlan", vxlan_learning=int(learning))

    @_boundary
    def ensure_address(self, index: int, addr: Addr, network: Net | None) -> None:
        """Ensure ``addr/32`` (``/128``) on the link (§7.4): IPv4 deletes other addresses inside
        ``network``; IPv6 deletes every other address that is not link-local."""
        v6 = addr.version == 6
        full = 128 if v6 else 32
        have = False
        for a in self._ipr.get_addr(family=AF_INET6 if v6 else AF_INET, index=index):
            ip, plen = ip_address(a.get("IFA_ADDRESS")), a["prefixlen"]
            if ip == addr and plen == full:
                have = True
            elif (v6 and not ip.is_link_local) or (not v6 and network is not None and ip in network):
                log.info("removing stale address %s/%d from link %d", ip, plen, index)
                self._ipr.addr("del", index=index, address=str(ip), prefixlen=plen)
        if not have:
            self._ipr.addr("add", index=index, address=str(addr), prefixlen=full)

    @_boundary
    def set_up(self, index: int) -> None:
        self._ipr.link("set", index=index, state="up")

    # ---- wireguard backend additions (flannel.backends.wireguard; owner: the wireguard backend) --

    @_boundary
    def add_wireguard(self, name: str, mtu: int) -> bool:
        """``ip link add <name> mtu <mtu> type wireguard``. Returns False when the kernel has no
        WireGuard link type (EOPNOTSUPP), so the caller can fall back to wireguard-go."""
        try:
            self._ipr.link("add", ifname=name, kind="wireguard", mtu=mtu)
        except NetlinkError as e:
            if e.code == errno.EOPNOTSUPP:
                return False
            raise
        return True

    @_boundary
    def replace_link_route(self, dst: Net, index: int) -> None:
        """``ip route replace <dst> dev <link> scope link`` in the main table (wireguard's one
        route per family, reference §9.4). Same protocol as the routes ``apply`` installs."""
        self._ipr.route("replace", dst=str(dst), oif=index, scope=RT_SCOPE_LINK, table=MAIN_TABLE,
                        proto=PROTO_BOOT, family=AF_INET6 if dst.version == 6 else AF_INET)

    # ---- entries ----------------------------------------------------------------------------

    def dump(self, scope: Scope) -> KernelState:
        """The entries in ``scope``: one route dump, one neighbour dump, one fdb dump.

        Read through iproute2's JSON output when it runs in our namespace (C does the netlink
        decoding: ~5x faster than pyroute2 for thousands of entries, bench/netlink_scale.py);
        pyroute2 otherwise, or if iproute2 fails. Both give the same result (tested).
        """
        if self._has_ip and _netns_id() == self._netns:
            try:
                return self.dump_iproute2(scope)
            except (OSError, ValueError, KeyError, TypeError, subprocess.SubprocessError) as e:
                log.debug("iproute2 dump failed (%s); using pyroute2", e)
        return self.dump_pyroute2(scope)

    def dump_iproute2(self, scope: Scope) -> KernelState:
        devs = set(scope.devs) | {d for d in (scope.overlay_dev, scope.overlay_dev6) if d}
        routes = set()
        for fam, net_scope in (("-4", scope.network), ("-6", scope.network6)):
            if net_scope is None:
                continue
            for r in _ip_json("ip", fam, "route", "show", "table", "main"):
                dev, gw, dst = r.get("dev"), r.get("gateway"), r.get("dst")
                if dev not in devs or gw is None or dst in (None, "default") or r.get("type", "unicast") != "unicast":
                    continue
                net = ip_network(dst if "/" in dst else f"{dst}/{32 if fam == '-4' else 128}")
                if scope.wants_route(net):
                    routes.add(Route(net, ip_address(gw), dev, "onlink" in r.get("flags", [])))
        neighs: set[Neigh] = set()
        fdbs: set[Fdb] = set()
        for fam, ov in (("-4", scope.overlay_dev), ("-6", scope.overlay_dev6)):
            if ov is None or self.link_index(ov) is None:
                continue
            version = 4 if fam == "-4" else 6
            for n in _ip_json("ip", fam, "neigh", "show", "dev", ov):
                ip, mac = n.get("dst"), n.get("lladdr")
                if ip and mac and "PERMANENT" in n.get("state", []):
                    neighs.add(Neigh(ip_address(ip), mac.lower(), ov))
            for f in _ip_json("bridge", "fdb", "show", "dev", ov):
                mac, dst = f.get("mac"), f.get("dst")
                if mac and dst and f.get("state") == "permanent" and mac != ZERO_MAC:
                    addr = ip_address(dst)
                    if addr.version == version:
                        fdbs.add(Fdb(mac.lower(), addr, ov))
        return KernelState(frozenset(routes), frozenset(neighs), frozenset(fdbs))

    @_boundary
    def dump_pyroute2(self, scope: Scope) -> KernelState:
        neighs, fdbs = self._pyroute2_overlay_entries(scope)
        return KernelState(frozenset(self._pyroute2_routes(scope)), frozenset(neighs), frozenset(fdbs))

    def _pyroute2_routes(self, scope: Scope) -> set[Route]:
        """Our main-table unicast routes with a gateway, via one of the scope's devices."""
        names: dict[int, str] = {}
        for name in (*scope.devs, *(d for d in (scope.overlay_dev, scope.overlay_dev6) if d)):
            idx = self.link_index(name)
            if idx is not None:
                names[idx] = name
        routes = set()
        for family, net_scope in ((AF_INET, scope.network), (AF_INET6, scope.network6)):
            if net_scope is None:
                continue
            for r in self._ipr.route("dump", family=family):
                if r.get("RTA_TABLE", r["table"]) != MAIN_TABLE or r["type"] != RTN_UNICAST:
                    continue
                dev = names.get(r.get("RTA_OIF"))
                gw = r.get("RTA_GATEWAY")
                dst = r.get("RTA_DST")
                if dev is None or gw is None or dst is None:
                    continue
                net = ip_network(f"{dst}/{r['dst_len']}")
                if scope.wants_route(net):
                    routes.add(Route(net, ip_address(gw), dev, bool(r["flags"] & RTNH_F_ONLINK)))
        return routes

    def _pyroute2_overlay_entries(self, scope: Scope) -> tuple[set[Neigh], set[Fdb]]:
        """The permanent neighbour and fdb entries on the scope's overlay devices (vxlan)."""
        neighs: set[Neigh] = set()
        fdbs: set[Fdb] = set()
        for family, ov in ((AF_INET, scope.overlay_dev), (AF_INET6, scope.overlay_dev6)):
            ov_idx = self.link_index(ov) if ov else None
            if ov is None or ov_idx is None:
                continue
            version = 4 if family == AF_INET else 6
            for n in self._ipr.neigh("dump", family=family, ifindex=ov_idx):
                if n["ifindex"] != ov_idx or not n["state"] & NUD_PERMANENT:
                    continue
                ip, mac = n.get("NDA_DST"), n.get("NDA_LLADDR")
                if ip and mac:
                    neighs.add(Neigh(ip_address(ip), mac.lower(), ov))
            for n in self._ipr.fdb("dump", ifindex=ov_idx):
                if n["ifindex"] != ov_idx or not n["state"] & NUD_PERMANENT:
                    continue
                mac, dst = n.get("NDA_LLADDR"), n.get("NDA_DST")
                if mac and dst and mac != ZERO_MAC:
                    addr = ip_address(dst)
                    if addr.version == version:
                        fdbs.add(Fdb(mac.lower(), addr, ov))
        return neighs, fdbs

    def apply(self, plan: Plan) -> list[tuple[object, str]]:
        """Carry out ``plan``. Returns the failed entries with the error (empty = all done).

        Large plans go through iproute2's batch mode. When every line succeeded (exit status 0)
        we are done; otherwise its errors are not attributed to entries, so this returns
        ``[(BATCH_UNVERIFIED, stderr)]`` and the caller re-dumps and redoes the rest one by one.
        """
        if len(plan) >= self.batch_threshold and self._has_ip and _netns_id() == self._netns:
            errs = self._apply_batch(plan)
            return [(BATCH_UNVERIFIED, errs)] if errs else []
        return self.apply_each(plan)

    def apply_each(self, plan: Plan) -> list[tuple[object, str]]:
        failed: list[tuple[object, str]] = []
        idx_cache: dict[str, int | None] = {}

        def idx(dev: str) -> int:
            if dev not in idx_cache:
                idx_cache[dev] = self.link_index(dev)
            i = idx_cache[dev]
            if i is None:
                raise NetlinkError(errno.ENODEV, f"no device {dev}")
            return i

        def do(entry: _E, fn: Callable[[_E], object], deleting: bool) -> None:
            try:
                fn(entry)
            except (NetlinkError, OSError, errors.BackendError) as e:
                if deleting and isinstance(e, NetlinkError) and e.code in _GONE:
                    return
                metrics.netlink_error(f"{'delete' if deleting else 'set'}_{type(entry).__name__}")  # metrics
                failed.append((entry, f"{'delete' if deleting else 'set'} {entry}: {e}"))

        def set_route(r: Route) -> None:
            kw: dict[str, Any] = {"dst": str(r.dst), "gateway": str(r.gateway), "oif": idx(r.dev),
                                  "table": MAIN_TABLE, "proto": PROTO_BOOT, "family": _family(r.gateway)}
            if r.onlink:
                kw["flags"] = RTNH_F_ONLINK
            self._ipr.route("replace", **kw)

        for r in plan.del_routes:
            do(r, lambda r: self._ipr.route("del", dst=str(r.dst), gateway=str(r.gateway), oif=idx(r.dev),
                                            table=MAIN_TABLE, family=_family(r.gateway)), True)
        for n in plan.del_neighs:
            do(n, lambda n: self._ipr.neigh("del", dst=str(n.ip), lladdr=n.mac, ifindex=idx(n.dev),
                                            family=_family(n.ip)), True)
        for f in plan.del_fdbs:
            do(f, lambda f: self._ipr.fdb("del", ifindex=idx(f.dev), lladdr=f.mac, dst=str(f.dst)), True)
        for f in plan.set_fdbs:
            do(f, lambda f: self._ipr.fdb("replace", ifindex=idx(f.dev), lladdr=f.mac, dst=str(f.dst),
                                          state=NUD_PERMANENT, flags=NTF_SELF), False)
        for n in plan.set_neighs:
            do(n, lambda n: self._ipr.neigh("replace", dst=str(n.ip), lladdr=n.mac, ifindex=idx(n.dev),
                                            state=NUD_PERMANENT, family=_family(n.ip)), False)
        for r in plan.set_routes:
            do(r, set_route, False)
        return failed

    def _apply_batch(self, plan: Plan) -> str:
        first = [f"route del {r.dst} via {r.gateway} dev {r.dev}" for r in plan.del_routes]
        first += [f"neigh del {n.ip} lladdr {n.mac} dev {n.dev}" for n in plan.del_neighs]
        fdb = [f"fdb del {f.mac} dev {f.dev} dst {f.dst} self" for f in plan.del_fdbs]
        fdb += [f"fdb replace {f.mac} dev {f.dev} dst {f.dst} self permanent" for f in plan.set_fdbs]
        last = [f"neigh replace {n.ip} lladdr {n.mac} dev {n.dev} nud permanent" for n in plan.set_neighs]
        last += [f"route replace {r.dst} via {r.gateway} dev {r.dev}{' onlink' if r.onlink else ''} proto boot"
                 for r in plan.set_routes]
        errs = []
        for tool, lines in (("ip", first), ("bridge", fdb), ("ip", last)):
            if lines:
                errs.append(_run_batch(tool, lines))
        return "; ".join(e for e in errs if e)


def _family(addr: Addr) -> int:
    return AF_INET6 if addr.version == 6 else AF_INET


def _ip_json(tool: str, *args: str) -> list[dict[str, Any]]:
    res = subprocess.run([tool, "-j", *args], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise OSError(f"{tool} {' '.join(args)}: {res.stderr.strip()}")
    out = json.loads(res.stdout or "[]")
    if not isinstance(out, list):
        raise ValueError(f"{tool} -j {' '.join(args)}: not a JSON list")
    return out


def _run_batch(tool: str, lines: list[str]) -> str:
    """Run ``tool -force -batch -``; returns its error text ("" when every line succeeded)."""
    res = subprocess.run([tool, "-force", "-batch", "-"], input="\n".join(lines) + "\n",
                         capture_output=True, text=True, timeout=120)
    if res.returncode == 0:
        return ""
    # per-line errors (e.g. deleting what is already gone) are possible; the caller re-dumps
    log.debug("%s -batch: %d lines, exit %d: %s", tool, len(lines), res.returncode, res.stderr.strip()[:500])
    return f"{tool} -batch exit {res.returncode}: {res.stderr.strip()[:300]}"


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.debug("cannot write %s: %s", path, e)
