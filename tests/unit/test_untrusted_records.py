"""Every etcd record is untrusted: fuzzing the lease-value codec (flannel.wire), subnet-key parsing
and the etcd registry's record boundary (listing and watch paths) with hypothesis, plus the
garbage set every store must survive: nesting 5000+ levels deep, 1 MB values, non-UTF-8 bytes, lone
surrogates, NaN, 5000-digit numbers and wrong JSON types in every field.

The property everywhere: decoding one record either gives a Lease or raises BadLeaseRecord (the
codec) / skips the record with a counted reason (the registry) — never any other exception.
"""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Network
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyetcd.etcdrpc import kv_pb2, rpc_pb2

from flannel import errors, wire
from flannel.lease import EventType, LeaseAttrs
from flannel.records import SkippedRecords
from flannel.subnet_managers.etcd import registry as registry_mod
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from flannel.subnet_managers.etcd.store import ConfigUpdate

PREFIX = "/coreos.com/network"
SUBNETS = f"{PREFIX}/subnets/"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
FIELDS = ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data", "publicip", "backenddata"]
lease_like = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values | st.sampled_from(
    ["1.2.3.4", "fd00::1", "vxlan", "0.0.0.0", "::"]), max_size=6)


def deep(n: int, open_: str = "[", close: str = "]") -> str:
    return open_ * n + close * n


def deep_object(n: int) -> str:
    return '{"a":' * n + "1" + "}" * n


# the garbage set (also written to a real etcd by the integration tests)
GARBAGE_VALUES: dict[str, bytes] = {
    "nested 5000 arrays": deep(5000).encode(),
    "nested 100000 arrays": deep(100_000).encode(),
    "nested 5000 objects": deep_object(5000).encode(),
    "nested BackendData": ('{"PublicIP":"1.2.3.4","BackendData":' + deep(5000) + "}").encode(),
    "1 MB valid JSON": json.dumps({"PublicIP": "1.2.3.4", "BackendData": {"x": "a" * 1_000_000}}).encode(),
    "1 MB garbage": b"\x00\xff" * 500_000,
    "non-UTF-8": b'{"PublicIP":"1.2.3.4","BackendType":"\xff\xfe"}',
    "UTF-16": '{"PublicIP":"1.2.3.4"}'.encode("utf-16"),
    "lone surrogate": b'{"PublicIP":"1.2.3.4","BackendData":{"k":"\\ud800"}}',
    "NaN": b'{"PublicIP":"1.2.3.4","BackendData":{"x":NaN}}',
    "5000 digits": b'{"PublicIP":"1.2.3.4","BackendData":{"x":' + b"9" * 5000 + b"}}",
    "top-level list": b'["1.2.3.4"]',
    "top-level string": b'"1.2.3.4"',
    "empty": b"",
    "PublicIP number": b'{"PublicIP":7}',
    "PublicIP null": b'{"PublicIP":null}',
    "PublicIP object": b'{"PublicIP":{"ip":"1.2.3.4"}}',
    "PublicIP IPv6": b'{"PublicIP":"fd00::1"}',
    "PublicIPv6 number": b'{"PublicIP":"1.2.3.4","PublicIPv6":6}',
    "BackendType number": b'{"PublicIP":"1.2.3.4","BackendType":7}',
    "BackendData number": b'{"PublicIP":"1.2.3.4","BackendData":7}',
    "BackendData array": b'{"PublicIP":"1.2.3.4","BackendData":[1,2]}',
    "BackendData boolean": b'{"PublicIP":"1.2.3.4","BackendData":true}',
    "BackendV6Data number": b'{"PublicIP":"1.2.3.4","BackendV6Data":1.5}',
    "truncated": b'{"PublicIP":"1.2.3.4"',
}
GARBAGE_KEYS: dict[str, bytes] = {
    "not a subnet": b"junk",
    "non-UTF-8 key": b"10.5.1.0-24\xff",
    "no length": b"10.5.1.0",
    "/32": b"10.5.1.0-32",
    "host bits": b"10.5.1.7-24",
    "other digits": "10.5.1.0-٢٤".encode(),
    "deeper": b"10.5.1.0-24/x",
    "huge": b"1" * 1_000_000,
    "ipv6 uppercase": b"10.5.1.0-24&FD00::-64",
    "ipv6 /128": b"10.5.1.0-24&fd00::-128",
}


def registry() -> EtcdRegistry:
    """A registry that is never connected: only its record boundary is used."""
    return EtcdRegistry(endpoints=["http://127.0.0.1:1"], prefix=PREFIX)


# -- the codec ------------------------------------------------------------------------------------

def decodes_or_refuses(value: str | bytes) -> LeaseAttrs | None:
    try:
        return wire.decode_attrs(value)
    except errors.BadLeaseRecord as e:
        assert e.reason in {"size", "encoding", "json", "depth", "type", "address"}, e.reason
        return None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
@example(b"\xff")
@example(b"[" * 3000)
def test_any_bytes_decode_or_are_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value_decodes_or_is_refused(value: Any) -> None:
    decodes_or_refuses(json.dumps(value))


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(lease_like)
def test_lease_like_objects_decode_or_are_refused_and_round_trip(obj: dict[str, Any]) -> None:
    attrs = decodes_or_refuses(json.dumps(obj))
    if attrs is not None:
        assert wire.decode_attrs(wire.encode_attrs(attrs)) == attrs  # what we accept, we can write back


@pytest.mark.parametrize("name", sorted(GARBAGE_VALUES))
def test_garbage_values_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(errors.BadLeaseRecord) as exc:
        wire.decode_attrs(GARBAGE_VALUES[name])
    assert exc.value.reason != "invalid" and str(exc.value)
    assert len(str(exc.value)) < 400  # the message never carries the (huge) value itself


def test_huge_values_are_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_parse(*a: Any, **k: Any) -> Any:
        raise AssertionError("a 1 MB value was handed to the JSON parser")
    monkeypatch.setattr(wire.json, "loads", must_not_parse)
    for name in ("1 MB valid JSON", "1 MB garbage"):
        with pytest.raises(errors.BadLeaseRecord) as exc:
            wire.decode_attrs(GARBAGE_VALUES[name])
        assert exc.value.reason == "size"
    with pytest.raises(errors.BadLeaseRecord, match="more than the 65536 allowed"):
        wire.decode_attrs("x" * (wire.MAX_VALUE_BYTES + 1))


def test_the_size_limit_counts_utf8_bytes() -> None:
    big = '{"PublicIP":"1.2.3.4","BackendData":"' + "é" * (wire.MAX_VALUE_BYTES // 2) + '"}'
    assert len(big) < wire.MAX_VALUE_BYTES < len(big.encode())
    with pytest.raises(errors.BadLeaseRecord, match="allowed"):
        wire.decode_attrs(big)


def test_wrong_types_say_what_was_expected() -> None:
    with pytest.raises(errors.BadLeaseRecord, match="PublicIP must be an IPv4 address string, got a number"):
        wire.decode_attrs(GARBAGE_VALUES["PublicIP number"])
    with pytest.raises(errors.BadLeaseRecord, match=r"BackendData must be a JSON object .*, got an array"):
        wire.decode_attrs(GARBAGE_VALUES["BackendData array"])
    with pytest.raises(errors.BadLeaseRecord, match="lease value must be a JSON object, got an array"):
        wire.decode_attrs(GARBAGE_VALUES["top-level list"])


def test_backend_data_may_be_an_object_or_a_string() -> None:
    """vxlan publishes an object; flannel's extension backend publishes its command output as a
    JSON string. Whether the *backend* can use it is the backend's decision (vxlan refuses it)."""
    assert wire.decode_attrs('{"PublicIP":"1.2.3.4","BackendData":"x"}').backend_data == '"x"'
    assert wire.decode_attrs('{"PublicIP":"1.2.3.4","BackendData":{"VNI":1}}').backend_data == '{"VNI":1}'


def test_nesting_within_the_limit_is_fine() -> None:
    data = '{"PublicIP":"1.2.3.4","BackendData":' + deep_object(wire.MAX_DEPTH - 2) + "}"
    assert wire.decode_attrs(data).backend_data is not None
    with pytest.raises(errors.BadLeaseRecord, match="nested too deeply"):
        wire.decode_attrs('{"PublicIP":"1.2.3.4","BackendData":' + deep_object(wire.MAX_DEPTH) + "}")


# -- subnet keys ----------------------------------------------------------------------------------

@settings(max_examples=400)
@given(st.text(max_size=60) | st.from_regex(r"\d{1,4}\.\d{1,4}\.\d{1,4}\.\d{1,4}-\d{1,3}(&[0-9a-f:]{2,12}-\d{1,3})?",
                                             fullmatch=True))
def test_any_key_parses_or_is_not_a_subnet_key(name: str) -> None:
    nets = wire.parse_subnet_key(name)
    if nets is not None:  # what parses is canonical: formatting gives the same key back
        assert wire.format_subnet_key(*nets) == name


@pytest.mark.parametrize("name", sorted(GARBAGE_KEYS))
def test_garbage_keys_are_not_subnet_keys(name: str) -> None:
    try:
        text = GARBAGE_KEYS[name].decode("utf-8")
    except UnicodeDecodeError:
        return  # not even text: the registry refuses it before parsing (tested below)
    assert wire.parse_subnet_key(text) is None


# -- the registry's record boundary ---------------------------------------------------------------

@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.binary(max_size=40) | st.text(max_size=30).map(lambda t: (SUBNETS + t).encode("utf-8", "surrogatepass")),
       value=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_registry_record_boundary_never_raises(key: bytes, value: bytes) -> None:
    reg = registry()
    lease, occupied = reg._record(key, value)
    assert lease is None or occupied is None
    if lease is None:
        assert reg.skipped.total == 1
    reg.close()


@pytest.mark.parametrize("name", sorted(GARBAGE_VALUES))
def test_registry_skips_each_garbage_value_and_its_key_still_occupies_the_subnet(name: str, caplog) -> None:
    caplog.set_level(logging.WARNING)
    reg = registry()
    lease, occupied = reg._record((SUBNETS + "10.5.1.0-24").encode(), GARBAGE_VALUES[name])
    assert lease is None and occupied == (IPv4Network("10.5.1.0/24"), None)
    assert reg.skipped.total == 1
    assert [r.getMessage() for r in caplog.records if SUBNETS + "10.5.1.0-24" in r.getMessage()]  # names the key


@pytest.mark.parametrize("name", sorted(GARBAGE_KEYS))
def test_registry_skips_each_garbage_key(name: str) -> None:
    reg = registry()
    lease, occupied = reg._record(SUBNETS.encode() + GARBAGE_KEYS[name], b'{"PublicIP":"1.2.3.4"}')
    assert lease is None and occupied is None
    assert reg.skipped.counts == {"key": 1}


def test_registry_counts_an_unexpected_failure_as_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever escapes the codec (a bug, MemoryError) is still contained by the boundary."""
    def explode(*a: Any, **k: Any) -> Any:
        raise MemoryError("simulated")
    monkeypatch.setattr(registry_mod.wire, "decode_attrs", explode)
    reg = registry()
    assert reg._record((SUBNETS + "10.5.1.0-24").encode(), b"{}") == (None, (IPv4Network("10.5.1.0/24"), None))
    assert reg.skipped.counts == {"internal": 1}


def _event(kind: int, key: bytes, value: bytes, mod_revision: int) -> Any:
    return kv_pb2.Event(type=kind, kv=kv_pb2.KeyValue(key=key, value=value, mod_revision=mod_revision, lease=0))


def _stream(reg: EtcdRegistry, responses: list[Any]) -> Any:
    """A registry watch stream reading ``responses`` (real etcd protobuf messages) instead of gRPC."""
    w = registry_mod._Stream.__new__(registry_mod._Stream)
    w._reg, w._key, w._client, w._cancelled, w._created = reg, PREFIX + "/", None, False, True
    w._responses = iter(responses)
    return w


def test_watch_chunks_skip_garbage_and_resume_after_the_last_event() -> None:
    """A watch response with good, garbage and deleted records: the good ones become events, the
    rest are skipped, and the chunk's revision is the last event's mod revision (not the header's,
    which runs ahead during catch-up). Every subnet key written is reported in ``touched`` (the
    lease keeper looks for its own there), undecodable ones included; other keys are not."""
    reg = registry()
    put, delete = kv_pb2.Event.PUT, kv_pb2.Event.DELETE
    events = [_event(put, (SUBNETS + "10.5.1.0-24").encode(), b'{"PublicIP":"198.18.0.1"}', 101)]
    events += [_event(put, (SUBNETS + f"10.5.{i + 2}.0-24").encode(), v, 102 + i)
               for i, v in enumerate(GARBAGE_VALUES.values())]
    events += [_event(put, SUBNETS.encode() + k, b'{"PublicIP":"198.18.0.9"}', 200 + i)
               for i, k in enumerate(GARBAGE_KEYS.values())]
    events += [_event(put, (PREFIX + "/something-else").encode(), b"{}", 298),
               _event(delete, SUBNETS.encode() + b"junk\xff", b"", 300),
               _event(delete, (SUBNETS + "10.5.1.0-24").encode(), b"", 301)]
    chunk = _stream(reg, [rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(revision=5000), events=events)]).next()
    assert [(e.type, str(e.lease.subnet)) for e in chunk.events] == [(EventType.ADDED, "10.5.1.0/24"),
                                                                      (EventType.REMOVED, "10.5.1.0/24")]
    assert chunk.revision == 301
    assert chunk.config is None
    assert reg.skipped.total == len(GARBAGE_VALUES) + len(GARBAGE_KEYS) + 1
    assert [str(nets[0]) for nets, _ in chunk.touched] == (
        ["10.5.1.0/24"] + [f"10.5.{i + 2}.0/24" for i in range(len(GARBAGE_VALUES))] + ["10.5.1.0/24"])


def test_watch_chunks_carry_the_config_key() -> None:
    reg = registry()
    config = _event(kv_pb2.Event.PUT, (PREFIX + "/config").encode(), b'{"Network":"10.5.0.0/16"}', 7)
    gone = _event(kv_pb2.Event.DELETE, (PREFIX + "/config").encode(), b"", 8)
    too_big = _event(kv_pb2.Event.PUT, (PREFIX + "/config").encode(), b"x" * 100_000, 9)
    chunks = [_stream(reg, [rpc_pb2.WatchResponse(events=evs)]).next() for evs in ([config], [gone], [too_big])]
    assert [c.config for c in chunks[:2]] == [ConfigUpdate('{"Network":"10.5.0.0/16"}'), ConfigUpdate(None)]
    assert chunks[2].config is None and chunks[2].revision == 9  # logged, the running config is kept
    assert [c.events for c in chunks] == [(), (), ()]


# -- skipped-record logging -----------------------------------------------------------------------

def test_skips_are_counted_always_but_logged_at_a_bounded_rate(caplog) -> None:
    caplog.set_level(logging.WARNING)
    now = [0.0]
    sk = SkippedRecords("etcd key", logging.getLogger("test.skips"), interval=60, burst=3, clock=lambda: now[0])
    for _ in range(5):  # the same key again and again (every relist): one line
        sk.skip("k1", "json", "not JSON")
    for i in range(10):  # many different keys: at most `burst` lines per interval
        sk.skip(f"other{i}", "json", "not JSON")
    assert sk.counts == {"json": 15}
    assert len(caplog.records) == 3
    now[0] = 61.0
    sk.skip("k1", "json", "not JSON")  # a new interval: the key is logged again, after a summary
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and "skipped 8 more bad etcd key records" in lines[3] and "k1" in lines[4]


def test_skip_lines_escape_and_cut_keys(caplog) -> None:
    caplog.set_level(logging.WARNING)
    sk = SkippedRecords("etcd key", logging.getLogger("test.skips"))
    sk.skip("a\nb" + "x" * 5000, "key", "bad")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and len(line) < 400 and "(5003 characters)" in line
