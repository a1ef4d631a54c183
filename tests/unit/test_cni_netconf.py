"""The CNI plugin's pure parts: subnet.env parsing, netconf parsing, the delegate config it builds."""

from __future__ import annotations

import ipaddress
import json

import pytest

from flannel.cni import errors as cerr
from flannel.cni.errors import CNIError
from flannel.cni.netconf import (
    DEFAULT_DATA_DIR,
    DEFAULT_SUBNET_FILE,
    build_delegate,
    load_subnet_env,
    parse_netconf,
    parse_subnet_env,
)

V4_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
DUAL_ENV = ("FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\n"
            "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
V6_ENV = ("FLANNEL_IPV6_NETWORK=fd00:10::/48\nFLANNEL_IPV6_SUBNET=fd00:10:0:5::1/64\n"
          "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n")


def conf(**fields):
    base = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel"}
    base.update(fields)
    return parse_netconf(json.dumps(base))


# ---- subnet.env ---------------------------------------------------------------------------------

def test_subnet_env_v4_gives_network_form_subnet():
    env = parse_subnet_env(V4_ENV, source="x")
    assert env.network == ipaddress.ip_network("10.1.0.0/16")
    assert env.subnet == ipaddress.ip_network("10.1.17.0/24")  # FLANNEL_SUBNET .1 → network form
    assert (env.ipv6_network, env.ipv6_subnet) == (None, None)
    assert (env.mtu, env.ipmasq) == (1472, True)


def test_subnet_env_dual_stack_and_v6_only():
    env = parse_subnet_env(DUAL_ENV, source="x")
    assert env.ipv6_subnet == ipaddress.ip_network("2001:cafe:42::/64")
    assert env.ipmasq is False
    env6 = parse_subnet_env(V6_ENV, source="x")
    assert env6.network is None and env6.ipv6_network == ipaddress.ip_network("fd00:10::/48")


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("TRUE", False), ("1", False)])
def test_subnet_env_ipmasq_is_true_only_for_true(value, expected):
    text = V4_ENV.replace("FLANNEL_IPMASQ=true", f"FLANNEL_IPMASQ={value}")
    assert parse_subnet_env(text, source="x").ipmasq is expected


@pytest.mark.parametrize("text,needle", [
    ("FLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n", "FLANNEL_NETWORK"),
    ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n", "FLANNEL_SUBNET"),
    ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPMASQ=true\n", "FLANNEL_MTU"),
    ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\n", "FLANNEL_IPMASQ"),
    (V4_ENV.replace("10.1.17.1/24", "10.1.17.1"), "FLANNEL_SUBNET='10.1.17.1' is not a CIDR"),
    (V4_ENV.replace("10.1.17.1/24", "ten/24"), "FLANNEL_SUBNET='ten/24'"),
    (V4_ENV.replace("1472", "-5"), "FLANNEL_MTU='-5'"),
    (V4_ENV.replace("1472", "\"1472\""), "FLANNEL_MTU"),  # quotes break flannel's reader too
    ("FLANNEL_NETWORK=fd00::/48\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1\nFLANNEL_IPMASQ=true\n", "not an IPv4"),
])
def test_subnet_env_errors_name_the_key(text, needle):
    with pytest.raises(CNIError) as ei:
        parse_subnet_env(text, source="/run/x.env")
    assert ei.value.code == cerr.INVALID_SUBNET_ENV
    assert needle in ei.value.msg and "/run/x.env" in ei.value.msg


def test_missing_subnet_env_is_try_again(tmp_path):
    with pytest.raises(CNIError) as ei:
        load_subnet_env(str(tmp_path / "nope.env"))
    assert ei.value.code == cerr.TRY_AGAIN_LATER
    assert "nope.env" in ei.value.msg


# ---- netconf ------------------------------------------------------------------------------------

def test_netconf_defaults_and_case_insensitive_keys():
    c = conf()
    assert (c.subnet_file, c.data_dir, dict(c.delegate), c.ipam) == (DEFAULT_SUBNET_FILE, DEFAULT_DATA_DIR, {}, None)
    c2 = conf(SubnetFile="/a.env", datadir="/d", Delegate={"bridge": "x0"})
    assert (c2.subnet_file, c2.data_dir, dict(c2.delegate)) == ("/a.env", "/d", {"bridge": "x0"})


@pytest.mark.parametrize("stdin,code", [
    (b"{not json", cerr.DECODE_FAILURE),
    (b"[1,2]", cerr.DECODE_FAILURE),
    (b'{"cniVersion":"9.9.9","name":"n"}', cerr.INCOMPATIBLE_VERSION),
    (b'{"cniVersion":"1.0.0","delegate":"bridge"}', cerr.INVALID_NETWORK_CONFIG),
    (b'{"cniVersion":"1.0.0","delegate":{"type":5}}', cerr.INVALID_NETWORK_CONFIG),
    (b'{"cniVersion":"1.0.0","ipam":{"routes":"10.0.0.0/8"}}', cerr.INVALID_NETWORK_CONFIG),
    (b'{"cniVersion":"1.0.0","subnetFile":7}', cerr.INVALID_NETWORK_CONFIG),
])
def test_netconf_errors_have_codes(stdin, code):
    with pytest.raises(CNIError) as ei:
        parse_netconf(stdin)
    assert ei.value.code == code and ei.value.msg


# ---- delegate config ----------------------------------------------------------------------------

def test_delegate_defaults_for_bridge():
    d = build_delegate(conf(), parse_subnet_env(V4_ENV, source="x"))
    assert d == {
        "name": "cbr0", "type": "bridge", "cniVersion": "1.0.0",
        "ipMasq": False,  # the agent masquerades (FLANNEL_IPMASQ=true) → the bridge must not
        "mtu": 1472, "isGateway": True, "isDefaultGateway": True, "hairpinMode": True,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.17.0/24"}]],
                 "routes": [{"dst": "10.1.0.0/16", "gw": "10.1.17.1"}]},
    }


def test_delegate_dual_stack_ranges_and_routes():
    d = build_delegate(conf(), parse_subnet_env(DUAL_ENV, source="x"))
    assert d["ipMasq"] is True and d["mtu"] == 1450
    assert d["ipam"]["ranges"] == [[{"subnet": "10.42.0.0/24"}], [{"subnet": "2001:cafe:42::/64"}]]
    assert d["ipam"]["routes"] == [{"dst": "10.42.0.0/16", "gw": "10.42.0.1"},
                                   {"dst": "2001:cafe:42::/56", "gw": "2001:cafe:42::1"}]


def test_delegate_ipv6_only():
    d = build_delegate(conf(), parse_subnet_env(V6_ENV, source="x"))
    assert d["ipam"]["ranges"] == [[{"subnet": "fd00:10:0:5::/64"}]]
    assert d["ipam"]["routes"] == [{"dst": "fd00:10::/48", "gw": "fd00:10:0:5::1"}]


def test_user_delegate_and_ipam_keys_win_and_are_kept():
    c = conf(delegate={"bridge": "mynet0", "mtu": 1400, "ipMasq": True, "hairpinMode": False,
                       "isDefaultGateway": False},
             ipam={"dataDir": "/tmp/x", "routes": [{"dst": "192.168.0.0/16"}]},
             runtimeConfig={"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]})
    d = build_delegate(c, parse_subnet_env(V4_ENV, source="x"))
    got = (d["bridge"], d["mtu"], d["ipMasq"], d["hairpinMode"], d["isDefaultGateway"])
    assert got == ("mynet0", 1400, True, False, False)
    assert d["isGateway"] is True
    assert d["ipam"]["dataDir"] == "/tmp/x"
    assert d["ipam"]["routes"] == [{"dst": "192.168.0.0/16"}, {"dst": "10.1.0.0/16", "gw": "10.1.17.1"}]
    assert d["runtimeConfig"]["portMappings"][0]["hostPort"] == 80
    assert dict(c.delegate) == {"bridge": "mynet0", "mtu": 1400, "ipMasq": True, "hairpinMode": False,
                                "isDefaultGateway": False}  # input not mutated


def test_non_bridge_delegate_gets_no_bridge_keys():
    d = build_delegate(conf(delegate={"type": "ipvlan", "master": "eth0"}), parse_subnet_env(V4_ENV, source="x"))
    assert d["type"] == "ipvlan" and d["master"] == "eth0"
    assert not {"isGateway", "isDefaultGateway", "hairpinMode"} & set(d)


def test_other_ipam_type_gets_routes_without_gateway():
    d = build_delegate(conf(ipam={"type": "static"}), parse_subnet_env(V4_ENV, source="x"))
    assert d["ipam"]["type"] == "static" and d["ipam"]["routes"] == [{"dst": "10.1.0.0/16"}]


def test_missing_cni_version_is_not_added():
    c = parse_netconf(json.dumps({"name": "n", "type": "flannel"}))
    assert "cniVersion" not in build_delegate(c, parse_subnet_env(V4_ENV, source="x"))


@pytest.mark.parametrize("key", ["name", "ipam"])
def test_delegate_must_not_set_name_or_ipam(key):
    with pytest.raises(CNIError) as ei:
        build_delegate(conf(delegate={key: {} if key == "ipam" else "x"}), parse_subnet_env(V4_ENV, source="x"))
    assert ei.value.code == cerr.INVALID_NETWORK_CONFIG and repr(key) in ei.value.msg
