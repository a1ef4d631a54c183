"""Golden tests for flannel's etcd wire format (reference §4.2, §4.3, §13.1 subnet keys)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannel import errors, wire
from flannel.lease import LeaseAttrs

VALID_KEYS = [
    ("10.12.13.0-24", IPv4Network("10.12.13.0/24"), None),
    ("10.12.13.0-24&fd00:12:13::-56", IPv4Network("10.12.13.0/24"), IPv6Network("fd00:12:13::/56")),
    ("10.5.34.0-24&fc00:0:0:1::-64", IPv4Network("10.5.34.0/24"), IPv6Network("fc00:0:0:1::/64")),
    ("10.0.0.0-31", IPv4Network("10.0.0.0/31"), None),
]

# the 11 invalid keys flannel's own tests reject, plus the /32 and /128 limits and host bits
INVALID_KEYS = [
    "10", "10.12.13.0", "10.12.13-24", "10.12.13.300-24", "10.12.13.0-24hi", "&2001::-56",
    "10.12.13.0-24&:12:13:-56", "10.12.13.0-24&20011::-56", "10.12.13.0-24&2001-56",
    "10.12.13.0-24&2001::", "10.12.13.0-24&2001::-56hi",
    "10.12.13.0-32", "10.12.13.0-24&fd00::-128", "10.12.13.5-24", "10.12.13.0-24&FD00::-64", "",
    "junk10.12.13.0-24",
]


@pytest.mark.parametrize("key,v4,v6", VALID_KEYS)
def test_valid_keys_parse_and_round_trip(key, v4, v6):
    assert wire.parse_subnet_key(key) == (v4, v6)
    assert wire.format_subnet_key(v4, v6) == key


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_not_subnets(key):
    assert wire.parse_subnet_key(key) is None


GOLDEN_VALUES = [
    (LeaseAttrs(public_ip=IPv4Address("1.2.3.4")), '{"PublicIP":"1.2.3.4","PublicIPv6":null}'),
    (LeaseAttrs(public_ip=IPv4Address("192.168.64.3"), backend_type="vxlan",
                backend_data='{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}'),
     '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'),
    (LeaseAttrs(public_ip=IPv4Address("10.0.0.2"), backend_type="host-gw"),
     '{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}'),
    (LeaseAttrs(public_ip=IPv4Address("192.168.64.3"), public_ipv6=IPv6Address("fd00::3"), backend_type="vxlan",
                backend_data='{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}',
                backend_v6_data='{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}'),
     '{"PublicIP":"192.168.64.3","PublicIPv6":"fd00::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},'
     '"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}'),
]


@pytest.mark.parametrize("attrs,text", GOLDEN_VALUES)
def test_encode_matches_flannel_bytes(attrs, text):
    assert wire.encode_attrs(attrs) == text


@pytest.mark.parametrize("attrs,text", GOLDEN_VALUES)
def test_decode_golden(attrs, text):
    assert wire.decode_attrs(text) == attrs


def test_decode_is_case_insensitive_and_compacts_backend_data():
    attrs = wire.decode_attrs('{"publicip": "1.2.3.4", "BACKENDTYPE": "vxlan", '
                              '"backenddata": {"VNI": 1,  "VtepMAC": "x"}, "extra": 5}')
    assert attrs.public_ip == IPv4Address("1.2.3.4")
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == '{"VNI":1,"VtepMAC":"x"}'
    assert wire.encode_attrs(attrs) == ('{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"vxlan",'
                                        '"BackendData":{"VNI":1,"VtepMAC":"x"}}')


def test_go_html_escaping_in_embedded_json():
    attrs = wire.decode_attrs('{"PublicIP":"1.2.3.4","BackendData":{"note":"a<b>&c"}}')
    assert attrs.backend_data == '{"note":"a\\u003cb\\u003e\\u0026c"}'
    assert wire.decode_attrs(wire.encode_attrs(attrs)).backend_data_obj == {"note": "a<b>&c"}


@pytest.mark.parametrize("text", [
    "", "not json", "[]", "null", '{"PublicIP":null}', '{"PublicIP":"fd00::1"}', '{"PublicIP":"300.1.1.1"}',
    '{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}', '{"PublicIP":5}', '{"PublicIP":"1.2.3.4","BackendType":7}',
    b"\xff\xfe",
])
def test_bad_values_raise_bad_lease_record(text):
    with pytest.raises(errors.BadLeaseRecord):
        wire.decode_attrs(text)


def test_decode_lease_combines_key_and_value():
    lease = wire.decode_lease("10.1.5.0-24", '{"PublicIP":"1.2.3.4","PublicIPv6":null}', expiration=123.0)
    assert lease.subnet == IPv4Network("10.1.5.0/24") and lease.ipv6_subnet is None
    assert lease.expiration == 123.0 and lease.attrs.public_ip == IPv4Address("1.2.3.4")
    with pytest.raises(errors.BadLeaseRecord, match="not a subnet key"):
        wire.decode_lease("garbage", "{}")


def test_fuzz_decode_never_raises_anything_but_bad_record():
    import random
    rnd = random.Random(1234)
    alphabet = '{}[]":,0123456789.abcdefPublicIPv6BackendTypeData null true false -&'
    for _ in range(3000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        try:
            wire.decode_attrs(text)
        except errors.BadLeaseRecord:
            pass
        key = "".join(rnd.choice("0123456789.-&:abcdef") for _ in range(rnd.randint(0, 30)))
        wire.parse_subnet_key(key)
