"""flannelctl doctor, pure parts: the diff (routed and wireguard) on fixtures, the store views
(etcd from a fake registry + subnet.env, kube from node objects), the report, and the CLI's
"cannot check" exit status for what needs neither root nor a store."""

from __future__ import annotations

import json
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from flannel import errors
from flannel.backends.base import ExternalInterface
from flannel.backends.hostgw.backend import HostGWNetwork
from flannel.backends.hostgw.network import hostgw_entries
from flannel.backends.routed import model as rm
from flannel.backends.vxlan import network as vx
from flannel.backends.vxlan.backend import VXLANNetwork
from flannel.backends.vxlan.device import VXLANSpec
from flannel.backends.wireguard import keys
from flannel.backends.wireguard import network as wg
from flannel.backends.wireguard.backend import make_context
from flannel.backends.wireguard.model import DeviceStatus, Endpoint, PeerStatus
from flannel.config import parse_network_config
from flannel.ctl import cli
from flannel.doctor import diff as d
from flannel.doctor import findings as fd
from flannel.doctor.check import routed_setup
from flannel.doctor.store import StoreView, from_etcd, from_kube
from flannel.lease import Lease, LeaseAttrs
from flannel.subnet_managers.kube.annotations import AnnotationNames
from tests.support import FakeRegistry

NET = "10.244.0.0/16"
UNDERLAY = N("198.18.0.0/24")
MAC = {i: f"02:00:00:00:00:0{i}" for i in range(1, 6)}


def vx_lease(i: int, *, mac: str | None = None, typ: str = "vxlan", ip: str | None = None) -> Lease:
    data = vx.encode_backend_data(1, mac or MAC[i]) if typ == "vxlan" else None
    return Lease(N(f"10.244.{i}.0/24"), LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), backend_type=typ,
                                                   backend_data=data))


VX_CTX = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0", local_nets=(UNDERLAY,))
HG_CTX = rm.Context(backend_type="host-gw", dev="eth0", ext_dev="eth0", local_nets=(UNDERLAY,))
VX_LEASES = [vx_lease(2), vx_lease(3), vx_lease(4)]
HG_LEASES = [vx_lease(2, typ="host-gw"), vx_lease(3, typ="host-gw")]


def healthy(leases: list[Lease], ctx: rm.Context, translate: rm.Translate) -> rm.KernelState:
    return rm.desired_state(leases, ctx, translate).state


def with_(state: rm.KernelState, *, routes: tuple[set[Any], set[Any]] = (set(), set()),
          neighs: tuple[set[Any], set[Any]] = (set(), set()),
          fdbs: tuple[set[Any], set[Any]] = (set(), set())) -> rm.KernelState:
    """``state`` minus the first set plus the second, per table (a hand-broken kernel)."""
    return rm.KernelState(frozenset((state.routes - routes[0]) | routes[1]),
                          frozenset((state.neighs - neighs[0]) | neighs[1]),
                          frozenset((state.fdbs - fdbs[0]) | fdbs[1]))


def one(diff: d.Diff) -> fd.Finding:
    assert len(diff.findings) == 1, [f.line() for f in diff.findings]
    return diff.findings[0]


# ---- routed: vxlan ---------------------------------------------------------------------------------

ROUTE3 = rm.Route(N("10.244.3.0/24"), A("10.244.3.0"), "flannel.1", onlink=True)
NEIGH3 = rm.Neigh(A("10.244.3.0"), MAC[3], "flannel.1")
FDB3 = rm.Fdb(MAC[3], A("198.18.0.3"), "flannel.1")


def test_healthy_vxlan_node_has_no_findings():
    diff = d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, healthy(VX_LEASES, VX_CTX, vx.vxlan_entries))
    assert diff.findings == () and diff.notes == ()
    assert diff.desired == 9   # route + neighbour + fdb per peer


def test_deleted_route_is_missing_and_names_its_lease():
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), routes=({ROUTE3}, set()))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual))
    assert (f.problem, f.kind, f.kernel, f.expected) == ("missing", "route", None, str(ROUTE3))
    assert f.lease == fd.LeaseRef("10.244.3.0/24", public_ip="198.18.0.3")
    assert f.line() == ("missing route: 10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink — "
                        "lease 10.244.3.0/24 (public IP 198.18.0.3)")


def test_route_for_a_subnet_no_lease_has_is_stale():
    extra = rm.Route(N("10.244.99.0/24"), A("10.244.99.0"), "flannel.1", onlink=True)
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), routes=(set(), {extra}))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual))
    assert (f.problem, f.kind, f.kernel, f.expected, f.lease) == ("stale", "route", str(extra), None, None)
    assert f.line().endswith("(no lease justifies it; the agent deletes it) — no lease")


def test_changed_neighbour_mac_is_wrong_mac_not_missing_plus_stale():
    bad = rm.Neigh(A("10.244.3.0"), "02:aa:bb:cc:dd:ee", "flannel.1")
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), neighs=({NEIGH3}, {bad}))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual))
    assert (f.problem, f.kind, f.kernel, f.expected) == ("wrong-mac", "neigh", str(bad), str(NEIGH3))
    assert f.lease is not None and f.lease.subnet == "10.244.3.0/24"
    assert "kernel has neigh 10.244.3.0 lladdr 02:aa:bb:cc:dd:ee" in f.line()


def test_deleted_fdb_entry_is_missing():
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), fdbs=({FDB3}, set()))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual))
    assert (f.problem, f.kind, f.expected) == ("missing", "fdb", str(FDB3))
    assert f.lease is not None and f.lease.public_ip == "198.18.0.3"


def test_fdb_entry_pointing_elsewhere_is_one_wrong_endpoint():
    bad = rm.Fdb(MAC[3], A("198.18.0.77"), "flannel.1")
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), fdbs=({FDB3}, {bad}))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual))
    assert (f.problem, f.kind, f.kernel, f.expected) == ("wrong-endpoint", "fdb", str(bad), str(FDB3))


def test_extra_fdb_destination_next_to_the_right_one_is_stale():
    extra = rm.Fdb(MAC[3], A("198.18.0.77"), "flannel.1")
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), fdbs=(set(), {extra}))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual))
    assert (f.problem, f.kind, f.kernel) == ("stale", "fdb", str(extra))


def test_a_lease_with_changed_mac_shows_both_of_its_entries_wrong():
    leases = [vx_lease(2), vx_lease(3, mac="02:00:00:00:99:03")]
    old = healthy([vx_lease(2), vx_lease(3)], VX_CTX, vx.vxlan_entries)
    diff = d.diff_routed(leases, VX_CTX, vx.vxlan_entries, old)
    # the fdb entry is keyed by the MAC itself: the new MAC's entry is missing, the old one stale
    assert sorted((f.problem, f.kind) for f in diff.findings) == [("missing", "fdb"), ("stale", "fdb"),
                                                                  ("wrong-mac", "neigh")]
    assert {f.lease.subnet for f in diff.findings if f.lease} == {"10.244.3.0/24"}


# ---- routed: host-gw -------------------------------------------------------------------------------

def test_hostgw_route_via_another_gateway_is_wrong_gateway():
    good = rm.Route(N("10.244.2.0/24"), A("198.18.0.2"), "eth0")
    bad = rm.Route(N("10.244.2.0/24"), A("198.18.0.3"), "eth0")
    actual = with_(healthy(HG_LEASES, HG_CTX, hostgw_entries), routes=({good}, {bad}))
    f = one(d.diff_routed(HG_LEASES, HG_CTX, hostgw_entries, actual))
    assert (f.problem, f.kind, f.kernel, f.expected) == ("wrong-gateway", "route", str(bad), str(good))
    assert f.lease == fd.LeaseRef("10.244.2.0/24", public_ip="198.18.0.2")


def test_same_gateway_other_flags_is_wrong_route():
    good = rm.Route(N("10.244.2.0/24"), A("198.18.0.2"), "eth0")
    bad = rm.Route(N("10.244.2.0/24"), A("198.18.0.2"), "eth0", onlink=True)
    actual = with_(healthy(HG_LEASES, HG_CTX, hostgw_entries), routes=({good}, {bad}))
    assert one(d.diff_routed(HG_LEASES, HG_CTX, hostgw_entries, actual)).problem == "wrong-route"


def test_off_link_hostgw_lease_is_a_note_and_its_route_is_stale_with_the_reason():
    far = vx_lease(5, typ="host-gw", ip="203.0.113.5")
    leases = [*HG_LEASES, far]
    left = rm.Route(N("10.244.5.0/24"), A("198.18.0.5"), "eth0")   # from before the peer moved
    actual = with_(healthy(HG_LEASES, HG_CTX, hostgw_entries), routes=(set(), {left}))
    diff = d.diff_routed(leases, HG_CTX, hostgw_entries, actual)
    f = one(diff)
    assert (f.problem, f.kernel) == ("stale", str(left))
    assert f.lease is not None and f.lease.subnet == "10.244.5.0/24"
    assert "not on the same L2 network" in f.detail
    assert len(diff.notes) == 1 and "the agent skips lease 10.244.5.0/24" in diff.notes[0]


def test_leases_of_another_backend_type_are_not_notes():
    diff = d.diff_routed([*HG_LEASES, vx_lease(4)], HG_CTX, hostgw_entries,
                         healthy(HG_LEASES, HG_CTX, hostgw_entries))
    assert diff.findings == () and diff.notes == ()


def test_entries_of_an_unreadable_record_are_notes_not_stale():
    held = rm.Route(N("10.244.7.0/24"), A("198.18.0.7"), "eth0")
    actual = with_(healthy(HG_LEASES, HG_CTX, hostgw_entries), routes=(set(), {held}))
    diff = d.diff_routed(HG_LEASES, HG_CTX, hostgw_entries, actual, kept=[N("10.244.7.0/24")])
    assert diff.findings == ()
    assert len(diff.notes) == 1 and "10.244.7.0/24" in diff.notes[0] and "unreadable" in diff.notes[0]


def test_findings_name_the_kube_node():
    names = {vx_lease(3).ident: "node-3"}
    actual = with_(healthy(VX_LEASES, VX_CTX, vx.vxlan_entries), neighs=({NEIGH3}, set()))
    f = one(d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual,
                          ref=lambda lease: fd.LeaseRef.of(lease, names.get(lease.ident))))
    assert f.lease is not None and f.lease.node == "node-3"
    assert f.line().endswith("lease 10.244.3.0/24 (public IP 198.18.0.3, node node-3)")


_ALL = healthy(VX_LEASES, VX_CTX, vx.vxlan_entries)
_NOISE = rm.KernelState(
    routes=frozenset({rm.Route(N("10.244.9.0/24"), A("10.244.9.0"), "flannel.1", onlink=True),
                      rm.Route(N("10.244.3.0/24"), A("198.18.0.3"), "eth0")}),
    neighs=frozenset({rm.Neigh(A("10.244.2.0"), "02:00:00:00:00:99", "flannel.1"),
                      rm.Neigh(A("10.244.9.0"), "02:00:00:00:00:09", "flannel.1")}),
    fdbs=frozenset({rm.Fdb(MAC[2], A("198.18.0.99"), "flannel.1"),
                    rm.Fdb("02:00:00:00:00:09", A("198.18.0.9"), "flannel.1")}))


@settings(max_examples=200, deadline=None)
@given(keep=st.sets(st.sampled_from(sorted(map(str, _ALL.routes | _ALL.neighs | _ALL.fdbs)))),
       noise=st.sets(st.sampled_from(sorted(map(str, _NOISE.routes | _NOISE.neighs | _NOISE.fdbs)))))
def test_findings_are_exactly_the_agents_plan(keep, noise):
    """Whatever the kernel holds, doctor reports a difference iff the agent's reconcile would change
    something, and every entry the agent would touch appears in a finding."""
    def pick(state: rm.KernelState, names: set[str]) -> rm.KernelState:
        return rm.KernelState(frozenset(e for e in state.routes if str(e) in names),
                              frozenset(e for e in state.neighs if str(e) in names),
                              frozenset(e for e in state.fdbs if str(e) in names))
    actual = pick(_ALL, keep).union(pick(_NOISE, noise))
    # the kernel keeps one route per destination and one neighbour per address: drop what
    # it could not hold at the same time as a kept entry
    kept_dsts = {r.dst for r in actual.routes if r in _ALL.routes}
    kept_ips = {n.ip for n in actual.neighs if n in _ALL.neighs}
    actual = rm.KernelState(frozenset(r for r in actual.routes if r in _ALL.routes or r.dst not in kept_dsts),
                            frozenset(n for n in actual.neighs if n in _ALL.neighs or n.ip not in kept_ips),
                            actual.fdbs)
    plan = rm.plan(_ALL, actual)
    diff = d.diff_routed(VX_LEASES, VX_CTX, vx.vxlan_entries, actual)
    assert bool(diff.findings) == (not plan.empty)
    mentioned = {f.kernel for f in diff.findings} | {f.expected for f in diff.findings}
    for entry in (*plan.del_routes, *plan.del_neighs, *plan.del_fdbs, *plan.set_fdbs, *plan.set_neighs,
                  *plan.set_routes):
        assert str(entry) in mentioned, f"{entry} is in the agent's plan but in no finding"


# ---- doctor's scope is the running backend's scope ---------------------------------------------------

CFG_VX = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}')
CFG_HG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
EXT = ExternalInterface(name="eth0", index=2, mtu=1500, iface_addr=A("198.18.0.1"), ext_addr=A("198.18.0.1"))
OWN = vx_lease(1)


def view(config: Any, own: Lease = OWN, remote: tuple[Lease, ...] = ()) -> StoreView:
    return StoreView(mode="etcd", where="test", config=config, own_ident=own.ident, own=own, remote=remote)


def test_scope_and_context_are_the_running_vxlan_backends():
    ctx, scope, translate = routed_setup(view(CFG_VX), EXT)
    spec = VXLANSpec(name="flannel.7", vni=7, port=0, gbp=False, learning=False, local=A("198.18.0.1"),
                     link_index=2, mtu=1450)
    agent = VXLANNetwork(specs={4: spec}, macs={4: MAC[2]}, lease=OWN, mtu=1450, nl=object(),  # type: ignore[arg-type]
                         ctx=rm.Context(backend_type="vxlan", dev="flannel.7", ext_dev="eth0"), config=CFG_VX,
                         translate=vx.vxlan_entries, ext_iface=EXT)
    assert scope == agent.scope()
    assert ctx == agent.ctx and translate is agent.translate


def test_scope_and_context_are_the_running_hostgw_backends():
    ctx, scope, translate = routed_setup(view(CFG_HG), EXT)
    agent = HostGWNetwork(lease=OWN, mtu=1500, nl=object(), config=CFG_HG, translate=hostgw_entries,  # type: ignore[arg-type]
                          ctx=rm.Context(backend_type="host-gw", dev="eth0", ext_dev="eth0", dev6=None),
                          ext_iface=EXT)
    assert scope == agent.scope()
    assert ctx == agent.ctx and translate is agent.translate


# ---- wireguard ---------------------------------------------------------------------------------------

K = {i: keys.encode_key(bytes([i]) * 32) for i in range(1, 6)}
WG_CFG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}')


def wg_lease(i: int) -> Lease:
    return Lease(N(f"10.244.{i}.0/24"), LeaseAttrs(public_ip=A(f"198.18.0.{i}"), backend_type="wireguard",
                                                   backend_data=wg.encode_backend_data(K[i], 51820)))


def wg_table(leases: list[Lease]) -> wg.PeerTable:
    opts = wg.parse_options({"Type": "wireguard"})
    table = wg.PeerTable(make_context(opts, {4: None}, EXT))
    table.reset(leases)
    return table


def peer(i: int, *, ip: str | None = None, port: int = 51820, nets: tuple[str, ...] | None = None,
         keepalive: int = 0) -> PeerStatus:
    return PeerStatus(K[i], Endpoint(A(ip or f"198.18.0.{i}"), port),
                      frozenset(N(n) for n in (nets or (f"10.244.{i}.0/24",))), None, keepalive)


def device(*peers: PeerStatus, port: int = 51820, key: str = K[1]) -> DeviceStatus:
    return DeviceStatus("flannel-wg", port, key, tuple(peers))


WG_LEASES = [wg_lease(2), wg_lease(3)]
OWN_REF = fd.LeaseRef("10.244.1.0/24", public_ip="198.18.0.1")


def wg_diff(dev: DeviceStatus | None, leases: list[Lease] = WG_LEASES, **kw: Any) -> d.Diff:
    return d.diff_wireguard(wg_table(leases), {"flannel-wg": dev}, {"flannel-wg": 51820}, K[1], own=OWN_REF, **kw)


def test_healthy_wireguard_device_has_no_findings():
    diff = wg_diff(device(peer(2), peer(3)))
    assert diff.findings == () and diff.desired == 2


def test_removed_peer_is_missing_and_names_its_lease():
    f = one(wg_diff(device(peer(2))))
    assert (f.problem, f.kind, f.kernel) == ("missing", "peer", None)
    assert f.expected == f"flannel-wg: peer {K[3]} endpoint 198.18.0.3:51820 allowed-ips 10.244.3.0/24"
    assert f.lease == fd.LeaseRef("10.244.3.0/24", public_ip="198.18.0.3")


def test_changed_endpoint_is_only_wrong_endpoint():
    f = one(wg_diff(device(peer(2), peer(3, ip="198.18.0.99", port=4000))))
    assert (f.problem, f.kind) == ("wrong-endpoint", "peer")
    assert f.kernel == f"flannel-wg: peer {K[3]} endpoint 198.18.0.99:4000"
    assert f.expected == f"flannel-wg: peer {K[3]} endpoint 198.18.0.3:51820"
    assert f.lease is not None and f.lease.subnet == "10.244.3.0/24"


def test_peer_no_lease_has_is_stale():
    f = one(wg_diff(device(peer(2), peer(3), peer(4))))
    assert (f.problem, f.kind, f.lease) == ("stale", "peer", None)
    assert K[4] in (f.kernel or "")


def test_allowed_ips_and_keepalive_differences_are_named_separately():
    diff = wg_diff(device(peer(2, nets=("10.244.2.0/24", "10.244.99.0/24"), keepalive=25), peer(3)))
    assert sorted(f.problem for f in diff.findings) == ["wrong-allowed-ips", "wrong-keepalive"]


def test_psk_difference_never_prints_a_key():
    psk = keys.encode_key(bytes([9]) * 32)
    with_psk = PeerStatus(K[3], Endpoint(A("198.18.0.3"), 51820), frozenset({N("10.244.3.0/24")}), psk, 0)
    f = one(wg_diff(device(peer(2), with_psk)))
    assert f.problem == "wrong-psk" and psk not in json.dumps(f.to_json())


def test_missing_device_listen_port_and_public_key():
    f = one(wg_diff(None))
    assert (f.problem, f.kind, f.lease) == ("missing", "device", OWN_REF)
    diff = wg_diff(device(peer(2), peer(3), port=40000, key=K[5]))
    assert sorted(f.problem for f in diff.findings) == ["wrong-listen-port", "wrong-public-key"]


def test_wireguard_peer_of_an_unreadable_record_is_a_note():
    diff = wg_diff(device(peer(2), peer(3), peer(4)), kept=[N("10.244.4.0/24")])
    assert diff.findings == () and len(diff.notes) == 1


# ---- store views -------------------------------------------------------------------------------------

ETCD_CFG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'


def registry(leases: list[Lease]) -> FakeRegistry:
    reg = FakeRegistry(ETCD_CFG, leases)
    reg.config_key = "/coreos.com/network/config"  # type: ignore[attr-defined]
    return reg


def env_file(tmp_path: Path, subnet: str = "10.244.1.1/24") -> str:
    path = tmp_path / "subnet.env"
    path.write_text(f"FLANNEL_NETWORK={NET}\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    return str(path)


def test_etcd_view_takes_our_lease_from_subnet_env(tmp_path):
    v = from_etcd(registry([OWN, *VX_LEASES]), env_file(tmp_path))
    assert v.own == OWN and v.own_ident == (N("10.244.1.0/24"), None)
    assert set(v.remote) == set(VX_LEASES) and v.findings == ()


def test_etcd_view_retries_an_unavailable_store_then_gives_up(tmp_path):
    reg = registry([OWN, *VX_LEASES])
    calls = []

    def flaky() -> tuple[list[Lease], int]:
        calls.append(1)
        if len(calls) < 3:
            raise errors.StoreUnavailable("etcd connection failed")
        return FakeRegistry.list_leases(reg)

    reg.list_leases = flaky  # type: ignore[method-assign]
    assert from_etcd(reg, env_file(tmp_path), store_timeout=30).own == OWN and len(calls) == 3
    calls.clear()
    reg.list_leases = lambda: (_ for _ in ()).throw(errors.StoreUnavailable("down"))  # type: ignore[method-assign]
    with pytest.raises(errors.StoreUnavailable, match="down"):
        from_etcd(reg, env_file(tmp_path), store_timeout=0.3)


def test_etcd_view_without_our_lease_is_a_finding(tmp_path):
    v = from_etcd(registry(VX_LEASES), env_file(tmp_path))
    f = one(d.Diff(v.findings))
    assert (f.problem, f.kind) == ("missing", "lease") and "10.244.1.0/24" in (f.expected or "")
    assert v.own is None and v.own_ref.subnet == "10.244.1.0/24"


def test_etcd_view_needs_subnet_env(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"no subnet file at .*is the flannel agent running"):
        from_etcd(registry(VX_LEASES), str(tmp_path / "nope.env"))
    path = tmp_path / "bad.env"
    path.write_text("FLANNEL_MTU=1450\n")
    with pytest.raises(errors.ConfigError, match="FLANNEL_SUBNET=''"):
        from_etcd(registry(VX_LEASES), str(path))


NAMES = AnnotationNames.for_prefix("flannel.alpha.coreos.com")


def node(name: str, i: int, *, managed: bool = True, public_ip: str | None = None) -> dict[str, Any]:
    ann = {}
    if managed:
        ann = {NAMES.subnet_manager: "true", NAMES.public_ip: public_ip or f"198.18.0.{i}",
               NAMES.backend_type: "vxlan", NAMES.backend_data: vx.encode_backend_data(1, MAC.get(i, MAC[2]))}
    return {"metadata": {"name": name, "annotations": ann}, "spec": {"podCIDR": f"10.244.{i}.0/24"}}


class Nodes:
    host = "https://api.test"

    def __init__(self, *items: dict[str, Any]) -> None:
        self.items = list(items)

    def list_nodes(self) -> tuple[list[dict[str, Any]], str]:
        return self.items, "1"


CFG_K = parse_network_config(ETCD_CFG)


def test_kube_view_names_nodes_and_finds_our_lease(tmp_path):
    v = from_kube(Nodes(node("a", 1), node("b", 2), node("c", 3), node("x", 9, managed=False)), NAMES, CFG_K, "a",
                  str(tmp_path / "none.env"))
    assert v.own_ident == (N("10.244.1.0/24"), None) and v.own is not None
    assert sorted(v.node_names.values()) == ["b", "c"]
    assert v.ref(v.remote[0]).node in ("b", "c") and v.own_ref.node == "a"
    assert v.findings == () and v.notes == ()


def test_kube_view_unknown_node_cannot_be_checked(tmp_path):
    with pytest.raises(errors.ConfigError, match="node 'zz' is not in the API server's node list"):
        from_kube(Nodes(node("a", 1)), NAMES, CFG_K, "zz", str(tmp_path / "none.env"))


def test_kube_view_broken_node_is_kept_and_unannotated_self_is_a_finding(tmp_path):
    v = from_kube(Nodes(node("a", 1, managed=False), node("b", 2, public_ip="not-an-ip")), NAMES, CFG_K, "a",
                  env_file(tmp_path, "10.244.5.1/24"))
    assert v.kept == (N("10.244.2.0/24"),) and v.remote == ()
    assert any("node b: unreadable" in n for n in v.notes)
    assert sorted((f.problem, f.kind) for f in v.findings) == [("missing", "lease"), ("wrong-subnet", "subnet.env")]


# ---- report and CLI ----------------------------------------------------------------------------------

def test_report_text_and_json():
    f = fd.Finding("missing", "route", None, str(ROUTE3), fd.LeaseRef("10.244.3.0/24", public_ip="198.18.0.3"))
    rep = fd.Report(mode="etcd", store="etcd at x", backend="vxlan", node=OWN_REF, interface="eth0",
                    checked={"remote leases": 3}, findings=(f,), notes=("n1",))
    assert rep.exit_code == 1 and not rep.ok
    lines = rep.lines()
    assert lines[2] == "note: n1" and lines[3] == f.line() and lines[-1].startswith("1 difference ")
    obj = json.loads(rep.to_json())
    assert obj["ok"] is False and obj["findings"][0]["problem"] == "missing"
    assert obj["findings"][0]["lease"]["public_ip"] == "198.18.0.3" and obj["node"]["subnet"] == "10.244.1.0/24"
    clean = fd.Report(mode="kube", store="s", backend="vxlan", node=OWN_REF, interface="eth0", checked={})
    assert clean.exit_code == 0 and clean.lines()[-1] == "OK: the kernel matches the store"


def test_cli_unreachable_etcd_cannot_check(tmp_path):
    res = CliRunner().invoke(cli, ["--etcd-endpoints", "http://127.0.0.1:9", "doctor", "--store-timeout", "0.5",
                                   "--subnet-file", env_file(tmp_path), "--json"])
    assert res.exit_code == 2, res.output
    assert "cannot check" in res.stderr and "127.0.0.1:9" in res.stderr
    assert json.loads(res.stdout) == {"ok": None, "error": json.loads(res.stdout)["error"]}


def test_cli_kube_mode_needs_a_node_name(tmp_path):
    res = CliRunner().invoke(cli, ["doctor", "--subnet-manager", "kube"],
                             env={"NODE_NAME": "", "POD_NAME": "", "POD_NAMESPACE": ""})
    assert res.exit_code == 2 and "set NODE_NAME or --node-name" in res.stderr
