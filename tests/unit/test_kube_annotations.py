"""Kube annotation names and the annotation set we publish (reference §5.3, §5.5)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from flannel import errors
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.kube import annotations as ann

DEFAULT = ann.AnnotationNames.for_prefix("flannel.alpha.coreos.com")
VXLAN_BD = '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}'


# flannel's own test table (pkg/subnet/kube/annotations_test.go), plus the slash/dash cases.
@pytest.mark.parametrize("prefix, backend_type_name", [
    ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
    ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type"),
    ("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-backend-type"),
    ("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-backend-type"),
    ("org.com", "org.com/backend-type"),
    ("org9.com", "org9.com/backend-type"),
    ("org.com/9", "org.com/9-backend-type"),
    ("my_org.example-1.com/a_b", "my_org.example-1.com/a_b-backend-type"),
])
def test_valid_prefixes_give_flannels_names(prefix, backend_type_name):
    assert ann.AnnotationNames.for_prefix(prefix).backend_type == backend_type_name


@pytest.mark.parametrize("prefix, why", [
    ("org", "fqdn"),
    ("org/", "fqdn"),
    ("org/prefix", "fqdn"),
    ("org.COM", "fqdn"),
    ("org.com/PREFIX", "fqdn"),
    ("a.b/c/d", "single slash"),
    ("", "fqdn"),
])
def test_invalid_prefixes_are_refused_with_the_rule(prefix, why):
    with pytest.raises(errors.ConfigError, match=why) as exc:
        ann.AnnotationNames.for_prefix(prefix)
    assert "--kube-annotation-prefix" in str(exc.value)


def test_all_names_share_the_normalised_prefix():
    names = ann.AnnotationNames.for_prefix("example.com/pfx")
    assert names.backend_data == "example.com/pfx-backend-data"
    assert names.subnet_manager == "example.com/pfx-kube-subnet-manager"
    assert names.node_public_ipv6 == "example.com/pfx-node-public-ipv6"
    assert names.public_ip_overwrite == "example.com/pfx-public-ip-overwrite"


def vxlan_attrs(**kw):
    base = {"public_ip": IPv4Address("192.168.1.10"), "backend_type": "vxlan", "backend_data": VXLAN_BD}
    base.update(kw)
    return LeaseAttrs(**base)


def test_desired_annotations_ipv4_vxlan_match_the_worked_example():
    # reference §17: exactly these four annotations
    assert ann.desired_annotations(DEFAULT, vxlan_attrs(), {}) == {
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": VXLAN_BD,
        "flannel.alpha.coreos.com/public-ip": "192.168.1.10",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    }


def test_desired_annotations_dual_stack_vxlan_adds_v6_keys():
    attrs = vxlan_attrs(public_ipv6=IPv6Address("fd00::10"), backend_v6_data='{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:01"}')
    out = ann.desired_annotations(DEFAULT, attrs, {})
    assert out["flannel.alpha.coreos.com/public-ipv6"] == "fd00::10"
    assert out["flannel.alpha.coreos.com/backend-v6-data"] == '{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:01"}'
    assert out["flannel.alpha.coreos.com/public-ip"] == "192.168.1.10"


def test_ipv6_only_vxlan_does_not_publish_ipv4_data():
    attrs = LeaseAttrs(public_ipv6=IPv6Address("fd00::10"), backend_type="vxlan",
                       backend_v6_data='{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:01"}')
    out = ann.desired_annotations(DEFAULT, attrs, {})
    assert "flannel.alpha.coreos.com/backend-data" not in out
    assert "flannel.alpha.coreos.com/public-ip" not in out
    assert out["flannel.alpha.coreos.com/public-ipv6"] == "fd00::10"


def test_udp_without_backend_data_publishes_null_and_empty_type():
    out = ann.desired_annotations(DEFAULT, LeaseAttrs(public_ip=IPv4Address("10.0.0.1")), {})
    assert out["flannel.alpha.coreos.com/backend-data"] == "null"
    assert out["flannel.alpha.coreos.com/backend-type"] == ""
    assert "flannel.alpha.coreos.com/public-ipv6" not in out


def test_host_gw_publishes_v6_when_it_has_a_v6_address():
    attrs = LeaseAttrs(public_ip=IPv4Address("10.0.0.1"), public_ipv6=IPv6Address("fd00::1"), backend_type="host-gw")
    out = ann.desired_annotations(DEFAULT, attrs, {})
    assert out["flannel.alpha.coreos.com/public-ipv6"] == "fd00::1"
    assert out["flannel.alpha.coreos.com/backend-v6-data"] == "null"


def test_public_ip_overwrite_replaces_the_detected_address():
    current = {"flannel.alpha.coreos.com/public-ip-overwrite": "203.0.113.7",
               "flannel.alpha.coreos.com/public-ipv6-overwrite": "2001:db8::7"}
    attrs = vxlan_attrs(public_ipv6=IPv6Address("fd00::10"), backend_v6_data='{"VNI":1}')
    out = ann.desired_annotations(DEFAULT, attrs, current)
    assert out["flannel.alpha.coreos.com/public-ip"] == "203.0.113.7"
    assert out["flannel.alpha.coreos.com/public-ipv6"] == "2001:db8::7"


def test_empty_overwrite_is_ignored():
    out = ann.desired_annotations(DEFAULT, vxlan_attrs(), {"flannel.alpha.coreos.com/public-ip-overwrite": ""})
    assert out["flannel.alpha.coreos.com/public-ip"] == "192.168.1.10"


def test_patch_contains_only_changed_keys():
    desired = ann.desired_annotations(DEFAULT, vxlan_attrs(), {})
    current = dict(desired, **{"flannel.alpha.coreos.com/public-ip": "192.168.1.99", "other/key": "kept"})
    assert ann.annotation_patch(current, desired) == {"flannel.alpha.coreos.com/public-ip": "192.168.1.10"}


def test_patch_is_empty_when_nothing_changed():
    desired = ann.desired_annotations(DEFAULT, vxlan_attrs(), {})
    assert ann.annotation_patch(dict(desired, unrelated="x"), desired) == {}


def test_patch_for_a_node_without_annotations_sets_everything():
    desired = ann.desired_annotations(DEFAULT, vxlan_attrs(), {})
    assert ann.annotation_patch({}, desired) == desired


def test_stored_backend_data_uses_the_normalised_name_even_with_a_slash_prefix():
    # flannel looked up "example.com/pfx/backend-data" and lost the MAC (§14.10)
    names = ann.AnnotationNames.for_prefix("example.com/pfx")
    stored = {"example.com/pfx-backend-data": '{ "VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3" }',
              "example.com/pfx-backend-v6-data": "null"}
    assert ann.stored_backend_data(names, stored) == (VXLAN_BD, None)


def test_stored_backend_data_ignores_garbage():
    stored = {DEFAULT.backend_data: "{not json", DEFAULT.backend_v6_data: '{"VNI":1}'}
    assert ann.stored_backend_data(DEFAULT, stored) == (None, '{"VNI":1}')
