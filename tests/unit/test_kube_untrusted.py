"""Every node record is untrusted (issue 8 item 1): fuzzing the kube manager's one trust boundary.

Whatever a node object looks like — wrong JSON types anywhere, an annotation nested 5000+ levels
deep, a megabyte-long value, undecodable backend data — reading it never raises: the node is
skipped with a counted reason, a node that becomes unreadable keeps its last good lease, and the
rest of the batch (and of the watch) is still delivered. Our own node never comes out as a peer.
"""

from __future__ import annotations

import json
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel.config import parse_network_config
from flannel.lease import EventType, LeaseEvent
from flannel.options import AgentOptions
from flannel.subnet_managers.kube import KubeSubnetManager, skips
from flannel.subnet_managers.kube.annotations import AnnotationNames, stored_backend_data
from flannel.subnet_managers.kube.tracker import NodeTracker
from tests.support import ScriptedClient

N = AnnotationNames.for_prefix("flannel.alpha.coreos.com")
V4 = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
DUAL = parse_network_config('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10::/48",'
                            ' "Backend": {"Type": "vxlan"}}')
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])

#: Every annotation flannel defines (the remote-lease ones and those only our own node reads).
ALL_KEYS = [N.subnet_manager, N.backend_type, N.backend_data, N.backend_v6_data, N.public_ip, N.public_ipv6,
            N.public_ip_overwrite, N.public_ipv6_overwrite, N.node_public_ip, N.node_public_ipv6]
#: The ones a remote node's lease is read from in an IPv4 network (a bad value makes it unreadable).
READ_V4 = [N.backend_data, N.public_ip]

DEEP_LIST = "[" * 6000 + "]" * 6000
DEEP_OBJ = '{"a":' * 5000 + "1" + "}" * 5000
DEEP_BD = '{"VNI":1,"VtepMAC":' + "[" * 5000 + "]" * 5000 + "}"
HUGE = "x" * (1 << 20)
HUGE_BD = '{"VNI":1,"VtepMAC":"' + "a" * (1 << 20) + '"}'
MODERATELY_DEEP_BD = "[" * 200 + "]" * 200  # decodes, but no backend should ever parse this

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=12)
non_string = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.lists(json_leaf, max_size=3) | st.dictionaries(st.text(max_size=5), json_leaf, max_size=3)
bad_value_text = st.sampled_from([DEEP_LIST, DEEP_OBJ, DEEP_BD, HUGE, HUGE_BD, MODERATELY_DEEP_BD,
                                  "{", "nul", "\x00", "[1,", "10.0.0.300", "::zz", "-1"])
annotation_value = bad_value_text | st.text(max_size=40) | json_value.map(json.dumps) | non_string


def good_node(name: str = "good", i: int = 2, **ann: Any) -> dict[str, Any]:
    a: dict[str, Any] = {N.subnet_manager: "true", N.backend_type: "vxlan",
                         N.backend_data: f'{{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:{i:02x}"}}',
                         N.public_ip: f"198.18.0.{i}"}
    a.update(ann)
    return {"metadata": {"name": name, "resourceVersion": "7", "annotations": a},
            "spec": {"podCIDR": f"10.244.{i}.0/24", "podCIDRs": [f"10.244.{i}.0/24"]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def deep_python(n: int) -> Any:
    """A Python value nested ``n`` levels (as a JSON decoder with a high limit could produce)."""
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


@st.composite
def corrupted_good(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A version of node "good" with one thing broken; the flag says whether flannel still reads
    the same lease from it (True: the broken part is something a remote lease does not use)."""
    node = good_node()
    what = draw(st.sampled_from(["annotation", "read-annotation", "annotations", "metadata", "spec",
                                 "podCIDRs", "podCIDR", "manager-flag"]))
    if what == "annotation":  # any flannel annotation a remote lease does not read: still readable
        key = draw(st.sampled_from([k for k in ALL_KEYS if k not in (*READ_V4, N.subnet_manager, N.backend_type)]))
        node["metadata"]["annotations"][key] = draw(annotation_value)
        value = node["metadata"]["annotations"][key]
        readable = key not in (N.backend_v6_data, N.public_ipv6) or (isinstance(value, str) and len(value) <= 65536)
        return node, readable
    if what == "read-annotation":
        key = draw(st.sampled_from(READ_V4))
        node["metadata"]["annotations"][key] = draw(bad_value_text | non_string.filter(lambda v: v is not None))
        return node, False
    if what == "annotations":
        node["metadata"]["annotations"] = draw(st.one_of(st.text(max_size=5), st.integers(), st.lists(json_leaf),
                                                         st.just(deep_python(6000))))
        return node, False
    if what == "metadata":
        node["metadata"] = {"name": "good", "annotations": deep_python(6000)} if draw(st.booleans()) else \
            {"name": "good", "annotations": {N.subnet_manager: "true", N.backend_data: deep_python(6000)}}
        return node, False
    if what == "spec":
        node["spec"] = draw(st.one_of(st.text(max_size=5), st.integers(), st.lists(json_leaf, max_size=3)))
        return node, False
    if what == "podCIDRs":
        node["spec"]["podCIDRs"] = draw(st.one_of(
            st.text(min_size=1, max_size=5), st.integers(), st.just(["10.244.2.0/24", "fd00::/64", "10.9.0.0/24"]),
            st.lists(non_string.filter(lambda v: v is not None), min_size=1, max_size=2), st.just(["garbage"]),
            st.just([HUGE])))
        return node, False
    if what == "podCIDR":
        node["spec"] = {"podCIDR": draw(st.one_of(st.integers(), st.lists(json_leaf, min_size=1), st.just("x/99")))}
        return node, False
    node["metadata"]["annotations"][N.subnet_manager] = draw(non_string.filter(lambda v: v is not None))
    return node, False


#: Objects that are not usable nodes at all (no name, not an object, wrong metadata).
nameless = st.one_of(
    json_value,
    st.just({}), st.just({"metadata": None}), st.just({"metadata": "x"}), st.just({"metadata": [1]}),
    st.builds(lambda n: {"metadata": {"name": n}, "spec": {}}, non_string),
    st.just({"metadata": {"name": ""}}),
    st.just({"metadata": {"name": deep_python(6000)}}),
)


@st.composite
def other_node(draw: st.DrawFn) -> dict[str, Any]:
    """Any node named other than "good"/"me", with any flannel annotations and spec shape."""
    name = draw(st.sampled_from(["x1", "x2", "x3"]))
    ann = draw(st.one_of(st.none(), non_string, st.dictionaries(st.sampled_from(ALL_KEYS), annotation_value,
                                                                max_size=len(ALL_KEYS))))
    spec = draw(st.one_of(st.none(), non_string, st.fixed_dictionaries(
        {}, optional={"podCIDR": st.one_of(st.text(max_size=20), non_string, st.just("10.244.9.0/24")),
                      "podCIDRs": st.one_of(st.lists(st.one_of(st.text(max_size=20), non_string,
                                                               st.just("10.244.9.0/24")), max_size=3),
                                            non_string)})))
    node: dict[str, Any] = {"metadata": {"name": name}}
    if ann is not None:
        node["metadata"]["annotations"] = ann
    if spec is not None:
        node["spec"] = spec
    return node


event_type = st.sampled_from(["ADDED", "MODIFIED", "MODIFIED", "DELETED", "BOGUS"])


# -- the tracker ------------------------------------------------------------------------------------

@FUZZ
@given(versions=st.lists(corrupted_good(), min_size=1, max_size=6),
       noise=st.lists(st.tuples(event_type, st.one_of(nameless, other_node())), max_size=8))
def test_no_node_record_can_raise_or_take_a_good_lease_away(versions, noise):
    counter = skips.counter()
    t = NodeTracker(N, V4, own_name="me", skipped=counter)
    first = t.apply("ADDED", good_node())
    assert [e.type for e in first] == [EventType.ADDED]
    original = first[0].lease
    unreadable = 0
    for (node, readable), (etype, other) in zip(versions, noise + [("MODIFIED", {})] * len(versions)):
        events = t.apply("MODIFIED", node)  # never raises
        assert events == [], "a broken or irrelevant change to a node is not a lease event"
        unreadable += not readable
        t.apply(etype, other)
    assert t.lease_of("good") == original, "an unreadable node keeps its last good lease"
    assert counter.total >= unreadable
    # a relist that holds only broken versions (and noise) keeps it too
    snapshot = t.reset([v for v, _ in versions] + [o for _, o in noise])
    assert original in snapshot
    # and the node comes back to life with a readable version
    changed = good_node(**{N.public_ip: "198.18.1.2"})
    events = t.apply("MODIFIED", changed)
    assert [(e.type, e.lease.attrs.public_ip) for e in events] == [(EventType.ADDED, IPv4Address("198.18.1.2"))]


@FUZZ
@given(noise=st.lists(st.tuples(event_type, st.one_of(nameless, other_node())), max_size=12),
       config=st.sampled_from([V4, DUAL]))
def test_any_event_stream_is_absorbed_and_good_nodes_still_arrive(noise, config):
    t = NodeTracker(N, config, own_name="me", skipped=skips.counter())
    for etype, obj in noise:
        t.apply(etype, obj)
    if config is V4:
        events = t.apply("ADDED", good_node("late", 5))
        assert [(e.type, e.lease.subnet) for e in events] == [(EventType.ADDED, IPv4Network("10.244.5.0/24"))]
    t.reset([obj for _, obj in noise])  # any list is absorbed as well


@FUZZ
@given(value=annotation_value, key=st.sampled_from(ALL_KEYS))
def test_every_flannel_annotation_with_any_value(value, key):
    """Each annotation, alone, with any value: reading never raises; our stored data reads safely."""
    counter = skips.counter()
    for config in (V4, DUAL):
        t = NodeTracker(N, config, skipped=counter)
        t.apply("ADDED", good_node(**{key: value}))
        t.reset([good_node(**{key: value})])
    node = good_node(**{key: value})
    bd, bd6 = stored_backend_data(N, {k: v for k, v in node["metadata"]["annotations"].items()
                                      if isinstance(v, str)})
    for text in (bd, bd6):
        assert text is None or json.loads(text) is not None


def test_deep_and_huge_backend_data_are_counted_by_reason():
    counter = skips.counter()
    t = NodeTracker(N, V4, skipped=counter)
    assert t.apply("ADDED", good_node("a", 3, **{N.backend_data: DEEP_BD})) == []
    assert t.apply("ADDED", good_node("b", 4, **{N.backend_data: HUGE_BD})) == []
    assert t.apply("ADDED", good_node("c", 5, **{N.backend_data: MODERATELY_DEEP_BD})) == []
    assert t.apply("ADDED", good_node("d", 6, **{N.public_ip: 7})) == []
    assert counter.snapshot() == {skips.TOO_DEEP: 2, skips.TOO_LARGE: 1, skips.BAD_ANNOTATIONS: 1}
    # the same broken node heartbeating is counted again, but logged once
    assert t.apply("MODIFIED", good_node("a", 3, **{N.backend_data: DEEP_BD})) == []
    assert counter.snapshot()[skips.TOO_DEEP] == 3


def test_one_log_line_per_problem_naming_the_node_and_reason(caplog):
    t = NodeTracker(N, V4, skipped=skips.counter())
    caplog.set_level("WARNING")
    for _ in range(3):
        t.apply("MODIFIED", good_node("n7", 7, **{N.backend_data: DEEP_BD}))
    lines = [r.getMessage() for r in caplog.records if "n7" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("skipping node n7 (too-deep): ") and "backend-data" in lines[0]
    assert len(lines[0]) < 500, "the bad value itself never reaches the log"


def test_log_lines_are_rate_limited_but_every_skip_is_counted(caplog):
    now = [0.0]
    counter = skips.counter(burst=5, interval=60.0, clock=lambda: now[0])
    t = NodeTracker(N, V4, skipped=counter)
    caplog.set_level("WARNING")
    for i in range(50):
        t.apply("ADDED", good_node(f"bad{i}", 7, **{N.public_ip: "nope"}))
    assert counter.snapshot() == {skips.BAD_PUBLIC_IP: 50}
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 5
    now[0] += 60.0
    t.apply("ADDED", good_node("bad-last", 7, **{N.public_ip: "nope"}))
    summary, line = caplog.records[-2].getMessage(), caplog.records[-1].getMessage()
    assert "skipped 45 more bad node records without logging each (bad-public-ip: 45)" in summary
    assert line.startswith("skipping node bad-last (bad-public-ip): ")


# -- our own node -----------------------------------------------------------------------------------

own_versions = st.builds(lambda i, cidrs: {**good_node("me", i), "spec": {"podCIDRs": cidrs}},
                         st.integers(1, 250),
                         st.lists(st.sampled_from(["10.244.1.0/24", "10.244.77.0/24", "fd00::/64"]), max_size=2))


@FUZZ
@given(versions=st.lists(st.tuples(event_type, st.one_of(other_node(), own_versions)), max_size=10))
def test_our_own_node_is_never_a_peer(versions):
    seen: list[str] = []
    t = NodeTracker(N, V4, own_name="me", on_own=lambda kind, node: seen.append(kind), skipped=skips.counter())
    for etype, obj in versions:
        if obj["metadata"].get("name") in ("x1", "x2", "x3"):
            obj = {**obj, "metadata": {**obj["metadata"], "name": "me"}}
        assert t.apply(etype, obj) == []
    assert t.leases() == []
    assert t.reset([obj for _, obj in versions if isinstance(obj, dict)]) == []
    assert len(seen) >= len(versions)


# -- the whole list + watch loop --------------------------------------------------------------------

def run_loop(tmp_path, lists, watches) -> list:
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    stop = threading.Event()
    m = KubeSubnetManager(AgentOptions(subnet_manager="kube", net_config_path=str(conf)),
                          client=ScriptedClient(lists, watches, stop), node_name="me")  # type: ignore[arg-type]
    return list(m.watch_leases(m.get_network_config(), stop))


@FUZZ
@given(garbage=st.lists(st.one_of(nameless, other_node(), corrupted_good().map(lambda p: p[0])), max_size=10),
       etypes=st.lists(event_type, min_size=10, max_size=10))
def test_watch_loop_delivers_good_nodes_among_any_garbage(tmp_path_factory, garbage, etypes):
    tmp = tmp_path_factory.mktemp("loop")
    listed = [*garbage, good_node("good", 2), *garbage]
    stream = [(etypes[i % 10], g) for i, g in enumerate(garbage)] + [("ADDED", good_node("late", 5))] + \
             [(etypes[i % 10], g) for i, g in enumerate(garbage)] + [("ADDED", good_node("later", 6))]
    results = run_loop(tmp, [(listed, "10")], [stream])
    assert results[0].snapshot is not None
    assert {str(le.subnet) for le in results[0].snapshot} >= {"10.244.2.0/24"}
    arrived = [e for r in results[1:] for e in r.events if e.type is EventType.ADDED]
    assert {"10.244.5.0/24", "10.244.6.0/24"} <= {str(e.lease.subnet) for e in arrived}


def test_a_node_nested_5000_levels_in_backend_data_does_not_end_the_watch(tmp_path):
    """The review's reproduction: this raised RecursionError out of watch_leases."""
    bad = good_node("evil", 9, **{N.backend_data: DEEP_BD})
    results = run_loop(tmp_path, [([bad, good_node("good", 2)], "10")],
                       [[("ADDED", good_node("evil2", 8, **{N.backend_data: DEEP_LIST})),
                         ("ADDED", good_node("late", 5))]])
    assert [str(le.subnet) for le in results[0].snapshot] == ["10.244.2.0/24"]
    assert [str(e.lease.subnet) for e in results[1].events] == ["10.244.5.0/24"]


@pytest.mark.parametrize("etype", ["ADDED", "MODIFIED"])
def test_heartbeat_update_is_no_lease_event_and_is_not_parsed_again(etype, monkeypatch):
    """The cheap path: a status-only update (kubelet heartbeat) does no parsing at all."""
    from flannel.subnet_managers.kube import nodes

    t = NodeTracker(N, V4, skipped=skips.counter())
    assert t.apply("ADDED", good_node()) != []
    calls = []
    real = nodes.lease_from_inputs
    monkeypatch.setattr(nodes, "lease_from_inputs", lambda *a: calls.append(a) or real(*a))
    beat = good_node()
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:00:10Z"
    beat["metadata"]["resourceVersion"] = "8"
    beat["metadata"]["labels"] = {"x": "y"}
    beat["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] = "0"
    assert t.apply(etype, beat) == []
    assert calls == []


@FUZZ
@given(changes=st.lists(st.sampled_from(["status", "labels", "other-annotation", "images", "addresses", "rv"]),
                        max_size=8))
def test_any_update_that_does_not_touch_flannel_fields_is_silent(changes):
    t = NodeTracker(N, V4, skipped=skips.counter())
    base = good_node()
    assert [e.type for e in t.apply("ADDED", base)] == [EventType.ADDED]
    for i, what in enumerate(changes):
        n = json.loads(json.dumps(base))
        if what == "status":
            n["status"]["conditions"][0]["lastHeartbeatTime"] = str(i)
        elif what == "labels":
            n["metadata"]["labels"] = {"l": str(i)}
        elif what == "other-annotation":
            n["metadata"]["annotations"]["example.com/x"] = str(i)
        elif what == "images":
            n["status"]["images"] = [{"names": [f"img{i}"], "sizeBytes": i}]
        elif what == "addresses":
            n["status"]["addresses"] = [{"type": "InternalIP", "address": f"192.0.2.{i}"}]
        else:
            n["metadata"]["resourceVersion"] = str(100 + i)
        assert t.apply("MODIFIED", n) == []


def test_lease_event_type_is_what_changed():
    t = NodeTracker(N, V4, skipped=skips.counter())
    t.apply("ADDED", good_node())
    ev: list[LeaseEvent] = t.apply("MODIFIED", good_node(**{N.backend_data: '{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:aa"}'}))
    assert [e.type for e in ev] == [EventType.ADDED]


@pytest.mark.parametrize("value", ["-1", "true", "[1, 2]", "3.5"])
def test_backend_data_that_is_not_an_object_or_string_makes_the_node_unreadable(value):
    """As the etcd side: a number, boolean or array is published by no flannel backend; the node
    keeps its last good lease instead of getting BackendData -1 (found by the fuzz test above)."""
    counter = skips.counter()
    t = NodeTracker(N, V4, own_name="me", skipped=counter)
    original = t.apply("ADDED", good_node())[0].lease
    assert t.apply("MODIFIED", good_node(**{N.backend_data: value})) == []
    assert t.lease_of("good") == original
    assert counter.total == 1
