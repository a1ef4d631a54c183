"""The manager's list/watch loop against a scripted client: which resourceVersion it resumes from,
when it relists, and that events read just before a connection breaks are never lost."""

from __future__ import annotations

import threading
from typing import Any

from flannel import errors
from flannel.options import AgentOptions
from flannel.subnet_managers.kube import KubeSubnetManager
from flannel.subnet_managers.kube.client import END, Expired
from tests.support import ScriptedClient

P = "flannel.alpha.coreos.com/"


def node(name: str, i: int, rv: int, ip: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv), "annotations": {
        P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "backend-data": '{"VNI":1}',
        P + "public-ip": ip or f"198.18.0.{i}"}}, "spec": {"podCIDR": f"10.244.{i}.0/24"}}


def run(tmp_path, lists, watches):
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    stop = threading.Event()
    client = ScriptedClient(lists, watches, stop)
    m = KubeSubnetManager(AgentOptions(subnet_manager="kube", net_config_path=str(conf)), client=client, node_name="me")
    results = list(m.watch_leases(m.get_network_config(), stop))
    return client, results


def subnets(result) -> list[str]:
    if result.snapshot is not None:
        return sorted(str(lease.subnet) for lease in result.snapshot)
    return [f"{e.type.value} {e.lease.subnet} {e.lease.attrs.public_ip}" for e in result.events]


def test_events_read_before_a_break_are_delivered_and_the_watch_resumes_after_them(tmp_path):
    client, results = run(tmp_path, [([node("a", 1, 5)], "10")], [
        [("ADDED", node("b", 2, 11)), ("MODIFIED", node("a", 1, 12, ip="198.18.0.99")),
         errors.StoreUnavailable("connection reset")],
        [("ADDED", node("c", 3, 13))],
    ])
    assert [subnets(r) for r in results] == [
        ["10.244.1.0/24"],
        ["added 10.244.2.0/24 198.18.0.2", "added 10.244.1.0/24 198.18.0.99"],
        ["added 10.244.3.0/24 198.18.0.3"],
    ]
    assert client.watch_from == ["10", "12"]  # resumed after the last event it handed on
    assert client.list_calls == 1


def test_410_relists_and_bookmarks_move_the_resume_point(tmp_path):
    client, results = run(tmp_path, [([node("a", 1, 5)], "10"), ([node("b", 2, 30)], "31")], [
        [("BOOKMARK", {"metadata": {"resourceVersion": "20"}}), END],
        [Expired("410 Gone")],
        [],
    ])
    assert client.watch_from == ["10", "20", "31"]
    assert client.list_calls == 2
    assert [subnets(r) for r in results] == [["10.244.1.0/24"], ["10.244.2.0/24"]]


def test_an_error_event_mid_batch_still_delivers_what_came_before(tmp_path):
    client, results = run(tmp_path, [([], "10"), ([node("b", 2, 30)], "31")], [
        [("ADDED", node("b", 2, 11)), Expired("410 Gone")],
        [],
    ])
    assert [subnets(r) for r in results] == [[], ["added 10.244.2.0/24 198.18.0.2"], ["10.244.2.0/24"]]
    assert client.list_calls == 2
