"""The pure core of ``flannelctl doctor``: desired state (from leases) vs. actual state (from the kernel).

It does not re-implement the agent: the desired entries come from the backend's own translation
(``model.desired_state`` with ``vxlan_entries`` / ``hostgw_entries``; wireguard's ``PeerTable``),
and the differences are the agent's own plan (``model.plan`` / wireguard ``network.plan``), i.e.
exactly what the agent would change at its next full reconcile. This module only sorts that plan
into findings an operator can read (a replaced neighbour is a *wrong MAC*, a replaced fdb entry a
*wrong endpoint*, ...) and names the lease each one concerns.

**Stale means "flannel would delete it".** The actual state is whatever the backend's
``Netlink.dump(scope)`` returns: the dump decides which kernel entries are flannel's, so a stale
finding is precisely an entry the agent's reconcile would delete, and an entry the dump leaves out
(an operator's route) is never a difference. When route ownership changes (a routing protocol of
our own), it changes in the dump/``Scope`` and doctor follows without a change here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from itertools import zip_longest

from flannel import errors
from flannel.backends.routed import model
from flannel.backends.routed.model import Fdb, KernelState, Neigh, Route
from flannel.backends.wireguard import network as wgnet
from flannel.backends.wireguard.model import DeviceStatus, PeerConfig
from flannel.doctor.findings import (
    MISSING,
    STALE,
    WRONG_ALLOWED_IPS,
    WRONG_ENDPOINT,
    WRONG_GATEWAY,
    WRONG_KEEPALIVE,
    WRONG_LISTEN_PORT,
    WRONG_MAC,
    WRONG_PSK,
    WRONG_PUBLIC_KEY,
    WRONG_ROUTE,
    Finding,
    LeaseRef,
)
from flannel.lease import Lease

Net = IPv4Network | IPv6Network
RefOf = Callable[[Lease], LeaseRef]

STALE_DETAIL = "no lease justifies it; the agent deletes it"


@dataclass(frozen=True)
class Diff:
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()
    desired: int = 0            # how many entries (or peers) the leases justify


def _default_ref(lease: Lease) -> LeaseRef:
    return LeaseRef.of(lease)


# --------------------------------------------------------------------------------------------
# vxlan / host-gw: routes, neighbours, fdb entries
# --------------------------------------------------------------------------------------------

def diff_routed(leases: Sequence[Lease], ctx: model.Context, translate: model.Translate, actual: KernelState, *,
                ref: RefOf = _default_ref, kept: Iterable[Net] = ()) -> Diff:
    """Findings for a routed backend (vxlan, host-gw).

    :param leases: the remote leases (our own excluded), as the agent's watcher would hand them on.
    :param actual: ``Netlink.dump(scope)`` with the scope the running backend uses.
    :param kept: subnets of leases the store holds but cannot be read now (kube: a node with broken
        annotations); the agent keeps their last good entries, so those are notes, not "stale".
    """
    desired = model.desired_state(leases, ctx, translate)
    plan = model.plan(desired.state, actual)
    s = _Sorter(leases, _owners(leases, ctx, translate), {lease.ident: reason for lease, reason in desired.skipped},
                tuple(kept), ref)
    s.notes += [f"the agent skips {ref(lease)}: {reason}" for lease, reason in desired.skipped
                if not reason.startswith("ignoring non-")]
    s.routes(plan, actual)
    s.neighs(plan, actual)
    s.fdbs(plan)
    return Diff(tuple(s.findings), tuple(s.notes), len(desired.state))


class _Sorter:
    """Sorts a plan's entries into findings, naming the lease each concerns."""

    def __init__(self, leases: Sequence[Lease], owners: Mapping[object, Lease], skipped: Mapping[object, str],
                 kept: tuple[Net, ...], ref: RefOf) -> None:
        self.leases = leases
        self.owners = owners
        self.skipped = skipped
        self.kept = kept
        self.ref = ref
        self.findings: list[Finding] = []
        self.notes: list[str] = []

    def owner(self, entry: object) -> LeaseRef | None:
        lease = self.owners.get(entry)
        return self.ref(lease) if lease is not None else None

    def add(self, problem: str, kind: str, kernel: object | None, expected: object | None) -> None:
        self.findings.append(Finding(problem, kind, None if kernel is None else str(kernel),
                                     None if expected is None else str(expected),
                                     self.owner(expected) if expected is not None else None))

    def stale(self, kind: str, entry: Route | Neigh | Fdb) -> None:
        net = _entry_net(entry)
        if net is not None and any(net.version == k.version and net.subnet_of(k) for k in self.kept):  # type: ignore[arg-type]
            self.notes.append(f"{kind} {entry} is not justified by a readable lease, but the store's record for it "
                              "is unreadable and the agent keeps the last good one")
            return
        related = _related_lease(entry, self.leases)
        if related is not None and related.ident in self.skipped:
            self.findings.append(Finding(STALE, kind, str(entry), None, self.ref(related),
                                         "the agent skips this lease and deletes the entry: "
                                         f"{self.skipped[related.ident]}"))
        else:
            self.findings.append(Finding(STALE, kind, str(entry), None, None, STALE_DETAIL))

    def routes(self, plan: model.Plan, actual: KernelState) -> None:
        have_routes: dict[Net, list[Route]] = defaultdict(list)
        for r in actual.routes:
            have_routes[r.dst].append(r)
        for r in plan.set_routes:
            have = sorted(have_routes.get(r.dst, []), key=lambda h: (h.dev != r.dev, str(h)))
            if not have:
                self.add(MISSING, "route", None, r)
            else:
                self.add(WRONG_GATEWAY if have[0].gateway != r.gateway else WRONG_ROUTE, "route", have[0], r)
        for r in plan.del_routes:
            self.stale("route", r)

    def neighs(self, plan: model.Plan, actual: KernelState) -> None:
        have = {(n.dev, n.ip): n for n in actual.neighs}
        for n in plan.set_neighs:
            h = have.get((n.dev, n.ip))
            self.add(MISSING if h is None else WRONG_MAC, "neigh", h, n)
        for n in plan.del_neighs:
            self.stale("neigh", n)

    def fdbs(self, plan: model.Plan) -> None:
        """fdb entries are (MAC, destination) pairs: a wanted MAC whose entry points elsewhere is
        one "wrong endpoint" (the plan replaces it), not a missing plus a stale entry."""
        extra: dict[tuple[str, str], list[Fdb]] = defaultdict(list)
        for f in plan.del_fdbs:
            extra[(f.dev, f.mac)].append(f)
        want: dict[tuple[str, str], list[Fdb]] = defaultdict(list)
        for f in plan.set_fdbs:
            want[(f.dev, f.mac)].append(f)
        for key in sorted(want):
            for w, e in zip_longest(want[key], extra.pop(key, [])):
                if w is None:
                    self.stale("fdb", e)
                else:
                    self.add(MISSING if e is None else WRONG_ENDPOINT, "fdb", e, w)
        for key in sorted(extra):
            for e in extra[key]:
                self.stale("fdb", e)


def _owners(leases: Iterable[Lease], ctx: model.Context, translate: model.Translate) -> dict[object, Lease]:
    """Each desired entry → the lease that justifies it."""
    out: dict[object, Lease] = {}
    for lease in leases:
        try:
            st = translate(lease, ctx)
        except (model.Skip, errors.BadLeaseRecord):
            continue
        for entry in (*st.routes, *st.neighs, *st.fdbs):
            out.setdefault(entry, lease)
    return out


def _entry_net(entry: Route | Neigh | Fdb) -> Net | None:
    if isinstance(entry, Route):
        return entry.dst
    if isinstance(entry, Neigh):
        return IPv4Network(entry.ip) if entry.ip.version == 4 else IPv6Network(entry.ip)
    return None


def _related_lease(entry: Route | Neigh | Fdb, leases: Iterable[Lease]) -> Lease | None:
    """The lease an entry no lease justifies still refers to (for a skipped lease), if any."""
    for lease in leases:
        nets = [n for n in lease.ident if n is not None]
        if isinstance(entry, Route) and entry.dst in nets:
            return lease
        if isinstance(entry, Neigh) and any(entry.ip.version == n.version and entry.ip in n for n in nets):
            return lease
        if isinstance(entry, Fdb) and entry.dst in (lease.attrs.public_ip, lease.attrs.public_ipv6):
            return lease
    return None


# --------------------------------------------------------------------------------------------
# wireguard: devices and peers
# --------------------------------------------------------------------------------------------

def diff_wireguard(table: wgnet.PeerTable, devices: Mapping[str, DeviceStatus | None],
                   listen_ports: Mapping[str, int], own_key: str | None, *, own: LeaseRef,
                   ref: RefOf = _default_ref, kept: Iterable[Net] = ()) -> Diff:
    """Findings for the wireguard backend.

    :param table: a ``PeerTable`` reset with the remote leases (the agent's own translation).
    :param devices: each of our device names → what it reports (``None``: the device is missing).
    :param listen_ports: each device → the port it must listen on (the backend's ``device_specs``).
    :param own_key: the public key our lease publishes (``None``: unknown).
    """
    findings: list[Finding] = []
    notes = [f"the agent skips {ref(table.leases[i])}: {reason}" for i, reason in table.skipped.items()
             if not reason.startswith("ignoring non-")]
    kept = tuple(kept)
    desired = table.all_desired()
    for name in sorted(listen_ports):
        status = devices.get(name)
        want = desired.get(name, {})
        if status is None:
            findings.append(Finding(MISSING, "device", None, f"wireguard device {name}", own,
                                    f"its {len(want)} peer(s) cannot be there"))
            continue
        if status.listen_port != listen_ports[name]:
            findings.append(Finding(WRONG_LISTEN_PORT, "device", f"{name} listen-port {status.listen_port}",
                                    f"{name} listen-port {listen_ports[name]}", own))
        if own_key is not None and status.public_key != own_key:
            findings.append(Finding(WRONG_PUBLIC_KEY, "device", f"{name} public key {status.public_key}",
                                    f"{name} public key {own_key}", own, "peers cannot reach this node"))
        req = wgnet.plan(want, status.peers)
        have = {p.public_key: p.config() for p in status.peers}
        for key in req.remove:
            h = have[key]
            if any(n.version == k.version and n.subnet_of(k) for n in h.allowed_ips for k in kept):  # type: ignore[arg-type]
                notes.append(f"{name}: {h.describe()} is not justified by a readable lease, but the store's "
                             "record for it is unreadable and the agent keeps the last good one")
                continue
            related = _lease_with_key(table, key)
            findings.append(Finding(STALE, "peer", f"{name}: {h.describe()}", None,
                                    ref(related) if related is not None else None,
                                    f"the agent skips this lease and removes the peer: {table.skipped[related.ident]}"
                                    if related is not None and related.ident in table.skipped else
                                    "no lease justifies it; the agent removes it"))
        for cfg in req.upsert:
            lease = _owner_of_peer(table, name, cfg.public_key)
            lref = ref(lease) if lease is not None else None
            h2 = have.get(cfg.public_key)
            if h2 is None:
                findings.append(Finding(MISSING, "peer", None, f"{name}: {cfg.describe()}", lref))
                continue
            findings.extend(_peer_differences(name, h2, cfg, lref))
    return Diff(tuple(findings), tuple(notes), sum(len(v) for v in desired.values()))


def _peer_differences(dev: str, have: PeerConfig, want: PeerConfig, lref: LeaseRef | None) -> list[Finding]:
    out = []
    who = f"{dev}: peer {want.public_key}"
    if have.endpoint != want.endpoint:
        out.append(Finding(WRONG_ENDPOINT, "peer", f"{who} endpoint {have.endpoint}",
                           f"{who} endpoint {want.endpoint}", lref))
    if have.allowed_ips != want.allowed_ips:
        out.append(Finding(WRONG_ALLOWED_IPS, "peer", f"{who} allowed-ips {_nets(have.allowed_ips)}",
                           f"{who} allowed-ips {_nets(want.allowed_ips)}", lref))
    if have.preshared_key != want.preshared_key:
        # never print a key: only whether one is set
        out.append(Finding(WRONG_PSK, "peer", f"{who} {'a different' if have.preshared_key else 'no'} preshared key",
                           f"{who} {'the configured' if want.preshared_key else 'no'} preshared key", lref))
    if have.keepalive != want.keepalive:
        out.append(Finding(WRONG_KEEPALIVE, "peer", f"{who} persistent-keepalive {have.keepalive}",
                           f"{who} persistent-keepalive {want.keepalive}", lref))
    return out


def _nets(nets: Iterable[Net]) -> str:
    return ",".join(sorted(str(n) for n in nets)) or "(none)"


def _owner_of_peer(table: wgnet.PeerTable, dev: str, key: str) -> Lease | None:
    owners = table.owners.get((dev, key)) or []
    return table.leases.get(owners[-1]) if owners else None


def _lease_with_key(table: wgnet.PeerTable, key: str) -> Lease | None:
    """A (skipped) lease that publishes ``key``, if any."""
    for lease in table.leases.values():
        for text in (lease.attrs.backend_data, lease.attrs.backend_v6_data):
            try:
                obj = json.loads(text) if text else None
            except ValueError:
                continue
            if isinstance(obj, dict) and any(str(k).lower() == "publickey" and v == key for k, v in obj.items()):
                return lease
    return None
