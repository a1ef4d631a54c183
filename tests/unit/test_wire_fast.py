"""The fast paths of the lease-value decoder agree with the general decoder on every input.

``wire.decode_attrs`` decodes the values flannel writes without the general decoder's steps
(``_decode_common``: one regular expression for vxlan/host-gw values, one JSON scan for other flat
ones); anything else goes to ``wire.decode_attrs_general``, which alone refuses values. The
property: for any bytes, both give the same ``LeaseAttrs`` or the same refusal (reason and message),
and whenever the fast path answers, its answer is the general decoder's. The corpus: the values
flannel's backends write, every one of them mutated byte by byte, random lease-like JSON in several
spellings, and random bytes.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flannel import errors, wire
from flannel.lease import Lease, LeaseAttrs
from flannel.subnet_managers.etcd.registry import EtcdRegistry


def outcome(decode: Any, raw: bytes | str) -> LeaseAttrs | tuple[str, str]:
    try:
        return decode(raw)  # type: ignore[no-any-return]
    except errors.BadLeaseRecord as e:
        return (e.reason, str(e))


def same_as_general(raw: bytes) -> LeaseAttrs | tuple[str, str]:
    """Check the property for ``raw``; return the outcome."""
    general = outcome(wire.decode_attrs_general, raw)
    assert outcome(wire.decode_attrs, raw) == general
    fast = wire._decode_common(raw)
    if fast is not None:
        assert fast == general
        assert type(fast.backend_data) is type(general.backend_data)  # type: ignore[union-attr]
    return general


# -- what flannel's backends write ------------------------------------------------------------------

FLANNEL_VALUES = [
    b'{"PublicIP":"198.19.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"host-gw"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"udp"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":0,"VtepMAC":""}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":4096,"VtepMAC":"AA:bb:cc:dd:ee:ff"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"wireguard",'
    b'"BackendData":{"PublicKey":"q7Fz0dXn2vV9b6Pj1d2nG3k4l5m6n7o8p9q0r1s2t3U=","Port":51820}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":null}',
    b'{"PublicIP":"10.0.0.2","BackendType":"","BackendData":{}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"x","BackendData":{"a":true,"b":false,"c":null,"d":-7}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:01"},'
    b'"BackendV6Data":{"VNI":1,"VtepMAC":"aa:02"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2","BackendType":"host-gw"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"::ffff:1.2.3.4","BackendType":"host-gw"}',
]
# written by flannel too, but rare enough to be left to the general decoder
GENERAL_FLANNEL_VALUES = [
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"extension","BackendData":"output of a command"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2","BackendType":"wireguard","BackendData":{"PublicKey":"k","Port":1},'
    b'"BackendV6Data":{"PublicKey":"k","Port":1}}',
]

# near misses: each is one detail away from a fast-path shape; the general decoder decides
NEAR_MISSES = [
    b'{"PublicIP":"010.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.256","PublicIPv6":null,"BackendType":"vxlan"}',
    b'{"PublicIP":"1.2.3","PublicIPv6":null}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":01,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":-0,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1.0,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1e400,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VNI":2}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"VNI":1,"VtepMAC":"a<b>&c"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"k":"\\ud800"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"k":"\\u0041"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"k":"\xc3\xa9"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"k":NaN}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"k":[1]}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":{"k":{"j":1}}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":[1]}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendData":7}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":null}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":7}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":6}',
    b'{"PublicIP":"fd00::1","PublicIPv6":null}',
    b'{"PublicIP":null}',
    b'{"PublicIPv6":null}',
    b'{"publicip":"10.0.0.2","PublicIP":"10.0.0.3"}',
    b'{"PublicIP":"10.0.0.2","publicip":"10.0.0.3"}',
    b'{"PublicIP":"10.0.0.2","Extra":1}',
    b'{"PublicIP":"10.0.0.2","PublicIP":"10.0.0.3"}',
    b' {"PublicIP":"10.0.0.2"}',
    b'{"PublicIP":"10.0.0.2"} ',
    b'{"PublicIP":"10.0.0.2"}{}',
    b'{"PublicIP": "10.0.0.2", "BackendData": {"VNI": 1}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"m"}',
    b'{"PublicIP":"10.0.0.2","BackendData":{"x":' + b"9" * 5000 + b"}}",
    b'{"PublicIP":"10.0.0.2","BackendData":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"PublicIP":"10.0.0.2","BackendData":{"x":"' + b"a" * (wire.MAX_VALUE_BYTES + 1) + b'"}}',
    b"[]", b"", b"null", b"\xff", b"{}",
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"1.2.3.4","BackendType":"vxlan"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::g","BackendType":"vxlan"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00:::2","BackendType":"vxlan"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":":","BackendType":"vxlan"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"FD00::2","BackendType":"vxlan"}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2","BackendV6Data":{"VNI":1,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":null,"BackendV6Data":{"VNI":1,"VtepMAC":"m"}}',
    b'{"PublicIP":"10.0.0.2","PublicIPv6":"fd00::2","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VNI":2}}',
]


@pytest.mark.parametrize("raw", FLANNEL_VALUES + GENERAL_FLANNEL_VALUES + NEAR_MISSES)
def test_fast_and_general_paths_agree(raw: bytes) -> None:
    same_as_general(raw)


@pytest.mark.parametrize("raw", FLANNEL_VALUES)
def test_what_flannel_writes_takes_a_fast_path(raw: bytes) -> None:
    """Not only equal: the fast path really answers for these (else the speed-up is gone)."""
    attrs = wire._decode_common(raw)
    assert attrs is not None and attrs == wire.decode_attrs_general(raw)


def test_the_vxlan_shape_is_decoded_without_parsing_json(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(*a: Any) -> Any:
        raise AssertionError("scanned JSON")
    monkeypatch.setattr(wire._DECODER, "raw_decode", no_scan)
    attrs = wire.decode_attrs(FLANNEL_VALUES[0])
    assert attrs == LeaseAttrs(public_ip=IPv4Address("198.19.0.1"), backend_type="vxlan",
                               backend_data='{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}')


@pytest.mark.parametrize("raw", FLANNEL_VALUES + GENERAL_FLANNEL_VALUES + NEAR_MISSES)
def test_every_one_byte_mutation_agrees(raw: bytes) -> None:
    """Deleting, doubling or replacing any one byte of a value (with a byte that matters to JSON
    or to the fast paths' patterns): both paths still agree."""
    if len(raw) > 400:
        raw = raw[:400]
    for i in range(len(raw) + 1):
        same_as_general(raw[:i] + raw[i + 1:])
        same_as_general(raw[:i] + raw[i:i + 1] * 2 + raw[i + 1:])
        for b in (b'"', b"0", b"9", b".", b":", b",", b"{", b"}", b"\\", b" ", b"\xe9", b"-", b"a"):
            same_as_general(raw[:i] + b + raw[i + 1:])


# -- random lease-like values ---------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=12) | st.sampled_from(["<", "&", "\u2028", "é", "\\", '"', "02:00:00:00:00:01"]))
flat_objects = st.dictionaries(st.text(max_size=8) | st.sampled_from(["VNI", "VtepMAC", "PublicKey", "Port"]),
                               scalars, max_size=4)
values = scalars | flat_objects | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=3), flat_objects,
                                                                                  max_size=2)
ipv4 = st.integers(0, 2**32 - 1).map(lambda i: str(IPv4Address(i)))
field_values = values | ipv4 | st.sampled_from(["vxlan", "host-gw", "fd00::1", "", "1.2.3.04"])
FIELDS = ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data", "publicip", "Other"]
lease_like = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=5)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lease_like, st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans())
@example({"PublicIP": "1.2.3.4", "BackendData": {"VNI": 1, "VtepMAC": "a"}}, (",", ":"), False)
def test_lease_like_json_agrees(obj: dict[str, Any], separators: tuple[str, str], ascii_only: bool) -> None:
    same_as_general(json.dumps(obj, separators=separators, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(public_ip=ipv4, public_ipv6=st.none() | st.just(IPv6Address("fd00::5")),
       backend_type=st.sampled_from(["", "vxlan", "host-gw", "udp", "wireguard"]) | st.text(max_size=10),
       data=st.none() | flat_objects | st.text(max_size=10), data6=st.none() | flat_objects)
def test_values_we_write_decode_back_through_a_fast_path_or_the_same_way(
        public_ip: str, public_ipv6: IPv6Address | None, backend_type: str, data: Any, data6: Any) -> None:
    def enc(obj: Any) -> str | None:
        return None if obj is None else wire.compact_json(obj)
    attrs = LeaseAttrs(public_ip=IPv4Address(public_ip), public_ipv6=public_ipv6, backend_type=backend_type,
                       backend_data=enc(data), backend_v6_data=enc(data6))
    raw = wire.encode_attrs(attrs).encode("utf-8", "surrogatepass")
    got = same_as_general(raw)
    if isinstance(got, LeaseAttrs):
        assert got == attrs


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_agree(raw: bytes) -> None:
    same_as_general(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FLANNEL_VALUES + GENERAL_FLANNEL_VALUES), st.data())
def test_random_edits_of_flannel_values_agree(raw: bytes, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw)))
        j = data.draw(st.integers(i, min(len(raw), i + 3)))
        edit = data.draw(st.binary(max_size=3) | st.sampled_from([b'"', b'\\u00', b'1', b'{}', b'null']))
        raw = raw[:i] + edit + raw[j:]
    same_as_general(raw)


# -- subnet keys ----------------------------------------------------------------------------------

KEYS = ["10.5.34.0-24", "10.0.0.0-31", "0.0.0.0-0", "255.255.255.0-24", "10.5.34.0-32", "10.5.34.1-24",
        "10.05.34.0-24", "10.5.34.0-024", "10.5.34.0-08", "10.5.34.0-", "10.5.34-24", "1.2.3.4.5-24",
        "10.5.34.0-24&fd00::-64", "256.0.0.0-8", "10.5.34.0-2 4", "10.5.34.0-24\n", "..........-24",
        "10.5.34.0-24&fd00:5:22::-64", "10.5.34.0-24&FD00::-64", "10.5.34.0-24&fd00::1-64", "10.5.34.0-24&fd00::-128",
        "10.5.34.0-24&fd00::-127", "10.5.34.0-24&fd00::-0", "10.5.34.0-24&fd00::-064", "10.5.34.0-24&::-0",
        "10.5.34.0-24&fd00:::-64", "10.5.34.0-24&fd00::", "10.5.34.0-24&:-64", "10.5.34.0-24&1:2:3:4:5:6:7:8-64",
        "10.5.34.0-24&1:2:3:4:5:6:7:8:9-64", "10.5.34.0-24&::ffff:1.2.3.4-64"]


def key_outcome(name: bytes) -> Any:
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return wire.parse_subnet_key(text)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(KEYS).map(str.encode) | st.binary(max_size=24)
       | st.from_regex(rb"[0-9.]{7,15}-[0-9]{1,3}", fullmatch=True)
       | st.from_regex(rb"10\.5\.[0-9]{1,3}\.0-2[0-9]&[0-9a-f:]{2,12}-[0-9]{1,3}", fullmatch=True)
       | st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 130)).map(
           lambda t: f"10.5.0.0-16&{IPv6Address(t[0])}-{t[1]}".encode())
       | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 40)).map(
           lambda t: f"{IPv4Address(t[0])}-{t[1]}".encode())
       | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 31)).map(   # network addresses: the fast path
           lambda t: str(IPv4Network((t[0], t[1]), strict=False)).replace("/", "-").encode()))
@example(b"10.5.34.0-24")
def test_the_fast_key_parser_agrees(name: bytes) -> None:
    fast = wire.parse_subnet_key_bytes(name)
    if fast is not None:
        slow = key_outcome(name)
        assert fast == slow
        # the same objects, not only equal ones: the fast path builds IPv4Network without its constructor
        assert [shape(n) for n in fast if n] == [shape(n) for n in slow if n]


def shape(net: Any) -> tuple[Any, ...]:
    """A network's attributes (a bound ``hosts`` method, which /31 and /32 get, by name only), text and hash."""
    attrs = {k: (v if k != "hosts" else v.__name__) for k, v in vars(net).items()}
    return attrs, str(net), hash(net)


@pytest.mark.parametrize("name", ["10.5.34.0-24", "10.0.0.0-31", "0.0.0.0-0", "10.5.34.0-24&fd00:5:22::-64"])
def test_the_common_key_takes_the_fast_path(name: str) -> None:
    fast = wire.parse_subnet_key_bytes(name.encode())
    assert fast is not None and fast == wire.parse_subnet_key(name)


# -- the etcd registry's record boundary, which uses both fast paths -----------------------------

PREFIX = "/coreos.com/network"
SUBNETS = PREFIX + "/subnets/"
record_keys = (st.sampled_from(KEYS).map(lambda k: (SUBNETS + k).encode())
               | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 33)).map(
                   lambda t: f"{SUBNETS}{IPv4Address(t[0])}-{t[1]}".encode())
               | st.binary(max_size=12).map(lambda b: SUBNETS.encode() + b)
               | st.sampled_from([b"/coreos.com/network/subnets10.5.1.0-24", b"/other/subnets/10.5.1.0-24",
                                  (PREFIX + "/config").encode()]))
record_values = st.sampled_from(FLANNEL_VALUES + GENERAL_FLANNEL_VALUES + NEAR_MISSES) | lease_like.map(
    lambda o: json.dumps(o, separators=(",", ":")).encode("utf-8", "surrogatepass")) | st.binary(max_size=40)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_keys, record_values, st.sampled_from([None, 0.0]))
def test_registry_records_agree_with_the_general_decoders(key: bytes, value: bytes, expiration: float | None) -> None:
    """A record read through the fast paths is what the general key parser and value decoder make
    of it: the same Lease, or the same skip (reason counted) and the same occupied subnet."""
    reg = EtcdRegistry(endpoints=["http://127.0.0.1:1"], prefix=PREFIX)
    lease, occupied = reg._record(key, value, expiration)
    try:
        name = key.decode("utf-8")
    except UnicodeDecodeError:
        name = ""
    nets = wire.parse_subnet_key(name[len(SUBNETS):]) if name.startswith(SUBNETS) else None
    if nets is None:
        assert (lease, occupied) == (None, None) and reg.skipped.counts == {"key": 1}
        return
    try:
        attrs = wire.decode_attrs_general(value)
    except errors.BadLeaseRecord as e:
        assert (lease, occupied) == (None, nets) and reg.skipped.counts == {e.reason: 1}
        return
    assert lease == Lease(subnet=nets[0], ipv6_subnet=nets[1], attrs=attrs) and occupied is None
    assert lease.expiration == expiration and not reg.skipped.counts
