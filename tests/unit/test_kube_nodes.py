"""Node → lease conversion, own lease, containsCIDR and the node tracker (reference §5.4-5.6, §14.9-12)."""

from __future__ import annotations

import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest

from flannel import errors
from flannel.config import parse_network_config
from flannel.lease import EventType, LeaseAttrs
from flannel.subnet_managers.kube import nodes
from flannel.subnet_managers.kube.annotations import AnnotationNames
from flannel.subnet_managers.kube.tracker import NodeTracker

N = AnnotationNames.for_prefix("flannel.alpha.coreos.com")
V4 = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
DUAL = parse_network_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10::/48",'
                            ' "Backend": {"Type": "vxlan"}}')
V6 = parse_network_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10::/48",'
                          ' "Backend": {"Type": "vxlan"}}')
BD = '{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:01"}'
BD6 = '{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"}'


def node(name="n1", cidrs=("10.244.1.0/24",), ann=None, managed=True, single_field=False):
    a = {N.backend_type: "vxlan", N.backend_data: BD, N.public_ip: "198.18.0.1"}
    if managed:
        a[N.subnet_manager] = "true"
    a.update(ann or {})
    a = {k: v for k, v in a.items() if v is not None}
    spec = {}
    if cidrs:
        spec["podCIDR"] = cidrs[0]
        if not single_field:
            spec["podCIDRs"] = list(cidrs)
    return {"metadata": {"name": name, "resourceVersion": "7", "annotations": a}, "spec": spec, "status": {}}


def dual_node(name="n1", **ann):
    base = {N.public_ipv6: "fd00::1", N.backend_v6_data: BD6}
    base.update(ann)
    return node(name, cidrs=("10.244.1.0/24", "fd00:10:0:1::/64"), ann=base)


# -- node_to_lease ------------------------------------------------------------------------------

def test_single_stack_node_becomes_a_lease():
    lease = nodes.node_to_lease(node(), N, V4)
    assert lease.subnet == IPv4Network("10.244.1.0/24")
    assert lease.ipv6_subnet is None
    assert lease.attrs == LeaseAttrs(public_ip=IPv4Address("198.18.0.1"), backend_type="vxlan", backend_data=BD)
    assert lease.expiration is None


def test_old_clusters_with_only_spec_podcidr_work():
    assert nodes.node_to_lease(node(single_field=True), N, V4).subnet == IPv4Network("10.244.1.0/24")


def test_dual_stack_node_in_dual_stack_config():
    lease = nodes.node_to_lease(dual_node(), N, DUAL)
    assert lease.ident == (IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:0:1::/64"))
    assert lease.attrs.public_ipv6 == IPv6Address("fd00::1")
    assert lease.attrs.backend_v6_data == BD6
    assert lease.attrs.backend_data == BD


def test_dual_stack_node_in_ipv4_config_reads_only_ipv4():
    lease = nodes.node_to_lease(dual_node(**{N.public_ipv6: "garbage"}), N, V4)
    assert lease.ident == (IPv4Network("10.244.1.0/24"), None)
    assert lease.attrs.public_ipv6 is None and lease.attrs.backend_v6_data is None


def test_ipv6_only_config():
    n = node(cidrs=("fd00:10:0:1::/64",), ann={N.public_ipv6: "fd00::1", N.backend_v6_data: BD6,
                                                N.public_ip: None, N.backend_data: None})
    lease = nodes.node_to_lease(n, N, V6)
    assert lease.ident == (None, IPv6Network("fd00:10:0:1::/64"))
    assert lease.attrs.public_ip == IPv4Address("0.0.0.0")


def test_remote_nodes_use_the_first_cidr_of_each_family():
    n = node(cidrs=("fd00:10:0:1::/64", "10.244.1.0/24"))
    assert nodes.pod_cidrs(n) == (IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:0:1::/64"))


def test_cidr_with_host_bits_is_masked_like_go():
    assert nodes.node_to_lease(node(cidrs=("10.244.1.7/24",)), N, V4).subnet == IPv4Network("10.244.1.0/24")


def test_unmanaged_node_is_not_a_lease():
    assert nodes.node_to_lease(node(managed=False), N, V4) is None
    assert nodes.node_to_lease(node(ann={N.subnet_manager: "false"}), N, V4) is None


def test_node_without_annotations_is_not_a_lease_and_does_not_crash():
    assert nodes.node_to_lease({"metadata": {"name": "bare"}, "spec": {}}, N, V4) is None
    assert nodes.node_to_lease({"metadata": {"name": "bare", "annotations": None}}, N, V4) is None


def test_null_backend_data_is_none():
    lease = nodes.node_to_lease(node(ann={N.backend_data: "null", N.backend_type: ""}), N, V4)
    assert lease.attrs.backend_data is None and lease.attrs.backend_type == ""


@pytest.mark.parametrize("n, match", [
    (node(ann={N.public_ip: "not-an-ip"}), "public-ip"),
    (node(ann={N.public_ip: "fd00::1"}), "not an IPv4"),
    (node(ann={N.public_ip: None}), "public-ip is missing"),
    (node(ann={N.backend_data: "{broken"}), "not JSON"),
    (node(cidrs=()), "missing IPv4"),
    (node(cidrs=("fd00:10:0:1::/64",)), "missing IPv4"),
    (node(cidrs=("10.244.1.0/24", "10.244.2.0/24", "fd00::/64")), "IPv4/IPv6 only or dualstack"),
    (node(cidrs=("10.244.1.0/33",)), "not a CIDR"),
    (node(cidrs=("banana",)), "not a CIDR"),
])
def test_broken_nodes_raise_bad_lease_record_naming_the_node(n, match):
    with pytest.raises(errors.BadLeaseRecord, match=match) as exc:
        nodes.node_to_lease(n, N, V4)
    assert "'n1'" in str(exc.value)


def test_broken_ipv6_half_is_an_error_in_dual_stack():
    with pytest.raises(errors.BadLeaseRecord, match="public-ipv6"):
        nodes.node_to_lease(dual_node(**{N.public_ipv6: "10.0.0.1"}), N, DUAL)


# -- containsCIDR (flannel's table) --------------------------------------------------------------

@pytest.mark.parametrize("outer, inner, expected", [
    ("10.244.0.0/16", "10.244.0.0/16", True),
    ("10.244.0.0/16", "10.244.0.0/24", True),
    ("10.244.0.0/16", "10.244.255.0/24", True),
    ("10.244.0.0/16", "10.244.0.0/15", False),
    ("10.244.0.0/16", "192.168.0.0/24", False),
    ("2001:0db8:1234::/48", "2001:0db8:1234::/48", True),
    ("2001:0db8:1234::/48", "2001:0db8:1234::/64", True),
    ("2001:0db8:1234::/48", "2001:0db8:1234:ffff::/64", True),
    ("2001:0db8:1234::/48", "2001:0db8:1234::/47", False),
    ("2001:0db8:1234::/48", "fe02::/32", False),
    ("10.244.0.0/16", "fd00::/64", False),
])
def test_contains_cidr(outer, inner, expected):
    assert nodes.contains_cidr(ip_network(outer, strict=False), ip_network(inner, strict=False)) is expected


# -- own lease -----------------------------------------------------------------------------------

ATTRS = LeaseAttrs(public_ip=IPv4Address("198.18.0.1"), backend_type="vxlan", backend_data=BD)


def test_own_lease_from_pod_cidr():
    lease = nodes.own_lease(node(), V4, ATTRS)
    assert lease.subnet == IPv4Network("10.244.1.0/24") and lease.attrs == ATTRS


def test_own_lease_has_the_same_identity_as_other_agents_see():
    n = dual_node()
    assert nodes.own_lease(n, DUAL, ATTRS).ident == nodes.node_to_lease(n, N, DUAL).ident
    assert nodes.own_lease(n, V4, ATTRS).ident == nodes.node_to_lease(n, N, V4).ident


def test_own_pod_cidr_outside_network_is_a_clear_config_error():
    with pytest.raises(errors.ConfigError) as exc:
        nodes.own_lease(node(cidrs=("10.99.1.0/24",)), V4, ATTRS)
    msg = str(exc.value)
    assert "10.244.0.0/16" in msg and "10.99.1.0/24" in msg and "'n1'" not in msg and '"n1"' in msg


def test_own_node_without_pod_cidr():
    with pytest.raises(errors.ConfigError, match="pod cidr not assigned"):
        nodes.own_lease(node(cidrs=()), V4, ATTRS)


def test_own_node_missing_a_family_the_config_needs():
    with pytest.raises(errors.ConfigError, match="no IPv6 pod CIDR"):
        nodes.own_lease(node(), DUAL, ATTRS)


def test_network_available_patch_shape():
    body = nodes.network_available_patch(datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
    assert body == {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False", "lastHeartbeatTime": "2026-01-02T03:04:05Z",
        "lastTransitionTime": "2026-01-02T03:04:05Z", "reason": "FlannelIsUp",
        "message": "Flannel is running on this node"}]}}


# -- tracker -------------------------------------------------------------------------------------

def types(events):
    return [(e.type, str(e.lease.subnet)) for e in events]


def test_tracker_added_then_heartbeat_is_silent():
    t = NodeTracker(N, V4)
    assert types(t.apply("ADDED", node())) == [(EventType.ADDED, "10.244.1.0/24")]
    beat = node()
    beat["status"] = {"conditions": [{"type": "Ready", "lastHeartbeatTime": "later"}]}
    assert t.apply("MODIFIED", beat) == []


def test_tracker_change_confined_to_ipv6_is_applied():
    # flannel ignored this (§14.9)
    t = NodeTracker(N, DUAL)
    t.apply("ADDED", dual_node())
    ev = t.apply("MODIFIED", dual_node(**{N.backend_v6_data: '{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:09"}'}))
    assert len(ev) == 1 and ev[0].type is EventType.ADDED
    assert ev[0].lease.attrs.backend_v6_data == '{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:09"}'


def test_tracker_change_confined_to_ipv4_is_applied():
    t = NodeTracker(N, DUAL)
    t.apply("ADDED", dual_node())
    ev = t.apply("MODIFIED", dual_node(**{N.public_ip: "198.18.0.99"}))
    assert [e.lease.attrs.public_ip for e in ev] == [IPv4Address("198.18.0.99")]


def test_tracker_broken_update_keeps_the_last_good_lease():
    t = NodeTracker(N, V4)
    t.apply("ADDED", node())
    assert t.apply("MODIFIED", node(ann={N.public_ip: "garbage"})) == []
    assert t.lease_of("n1").attrs.public_ip == IPv4Address("198.18.0.1")
    # and a relist in that state keeps it too, so snapshot and events agree
    assert [lease.subnet for lease in t.reset([node(ann={N.public_ip: "garbage"})])] == [IPv4Network("10.244.1.0/24")]


def test_tracker_broken_new_node_is_skipped():
    t = NodeTracker(N, V4)
    assert t.apply("ADDED", node(ann={N.public_ip: "garbage"})) == []
    assert t.reset([node(ann={N.public_ip: "garbage"})]) == []


def test_tracker_unmanaged_node_is_removed():
    t = NodeTracker(N, V4)
    t.apply("ADDED", node())
    assert types(t.apply("MODIFIED", node(managed=False))) == [(EventType.REMOVED, "10.244.1.0/24")]
    assert t.leases() == []


def test_tracker_delete_carries_the_stored_lease():
    t = NodeTracker(N, V4)
    t.apply("ADDED", node())
    ev = t.apply("DELETED", {"metadata": {"name": "n1"}})
    assert ev[0].type is EventType.REMOVED and ev[0].lease.attrs.backend_data == BD
    assert t.apply("DELETED", {"metadata": {"name": "n1"}}) == []


def test_tracker_pod_cidr_change_removes_the_old_slot():
    t = NodeTracker(N, V4)
    t.apply("ADDED", node())
    assert types(t.apply("MODIFIED", node(cidrs=("10.244.7.0/24",)))) == [
        (EventType.REMOVED, "10.244.1.0/24"), (EventType.ADDED, "10.244.7.0/24")]


def test_tracker_reset_replaces_everything():
    t = NodeTracker(N, V4)
    t.apply("ADDED", node("a", cidrs=("10.244.1.0/24",)))
    snap = t.reset([node("b", cidrs=("10.244.2.0/24",)), node("c", managed=False)])
    assert [str(lease.subnet) for lease in snap] == ["10.244.2.0/24"]
    assert t.lease_of("a") is None
