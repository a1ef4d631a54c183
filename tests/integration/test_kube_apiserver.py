"""The stand-in API server itself, as the real ``kubernetes`` client and curl see it: as a process
(``python -m flannel.lab.kubeapi``), in-process, and listening inside a network namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kubernetes import client, watch

from flannel.lab import netns as netns_mod
from flannel.lab.kubeapi import KubeAPIServer
from flannel.lab.topology import Underlay
from tests.support import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "tkn"


def api_for(url: str, token: str | None = TOKEN) -> client.CoreV1Api:
    cfg = client.Configuration()
    cfg.host = url
    if token:
        cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.CoreV1Api(client.ApiClient(cfg))


def start_process(*args: str, prefix: list[str] | None = None, ready: str) -> subprocess.Popen:
    cmd = [*(prefix or []), sys.executable, "-m", "flannel.lab.kubeapi", *args, "--ready-file", ready]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists(ready) or proc.poll() is not None, what="stand-in to listen")
    if proc.poll() is not None:
        raise AssertionError(f"stand-in exited: {proc.stderr.read()}")
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def process_server(tmp_path):
    ready = str(tmp_path / "url")
    proc = start_process("--port", "0", "--token", TOKEN, "--node", "a=10.244.1.0/24",
                         "--node", "b=10.244.2.0/24,fd00::/64", "--pod", "kube-flannel/ds-1=a", ready=ready)
    with open(ready) as f:
        url = f.read().strip()
    yield url
    stop_process(proc)


def test_process_serves_the_real_client(process_server):
    api = api_for(process_server)
    nodes = api.list_node()
    assert nodes.kind == "NodeList" and nodes.api_version == "v1"
    assert [n.metadata.name for n in nodes.items] == ["a", "b"]
    assert int(nodes.metadata.resource_version) > 0
    assert api.read_node("b").spec.pod_cidrs == ["10.244.2.0/24", "fd00::/64"]
    assert api.read_namespaced_pod("ds-1", "kube-flannel").spec.node_name == "a"
    with pytest.raises(client.ApiException) as exc:
        api.read_node("zzz")
    assert exc.value.status == 404 and json.loads(exc.value.body)["reason"] == "NotFound"


def test_bearer_token_is_required(process_server):
    with pytest.raises(client.ApiException) as exc:
        api_for(process_server, token=None).list_node()
    assert exc.value.status == 401
    assert json.loads(exc.value.body) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                          "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


def test_watch_versions_patches_and_410(process_server):
    api = api_for(process_server)
    rv0 = api.list_node().metadata.resource_version
    patched = api.patch_node_status("a", {"metadata": {"annotations": {"x.io/k": "v"}},
                                          "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]},
                                          "spec": {"podCIDR": "ignored on the status subresource"}})
    assert patched.metadata.annotations == {"x.io/k": "v"}
    assert {c.type for c in patched.status.conditions} == {"Ready", "NetworkUnavailable"}
    assert patched.spec.pod_cidr == "10.244.1.0/24"
    # the same patch again is a no-op: no new version
    again = api.patch_node_status("a", {"metadata": {"annotations": {"x.io/k": "v"}}})
    assert again.metadata.resource_version == patched.metadata.resource_version
    merged = api.patch_node("b", {"metadata": {"annotations": {"m": "1"}}},
                            _content_type="application/merge-patch+json")
    assert int(merged.metadata.resource_version) > int(patched.metadata.resource_version)

    seen = [(e["type"], e["object"].metadata.name, e["object"].metadata.resource_version)
            for e in watch.Watch().stream(api.list_node, resource_version=rv0, timeout_seconds=1)]
    assert [(t, n) for t, n, _ in seen] == [("MODIFIED", "a"), ("MODIFIED", "b")]
    assert [v for _, _, v in seen] == [patched.metadata.resource_version, merged.metadata.resource_version]

    api.api_client.call_api("POST", process_server + "/_test/compact",
                            header_params={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(client.ApiException) as exc:
        list(watch.Watch().stream(api.list_node, resource_version=rv0, timeout_seconds=1))
    assert exc.value.status == 410


def test_forbidden_rule_gives_the_rbac_message():
    srv = KubeAPIServer(token=TOKEN).start()
    try:
        srv.add_node("n1", ["10.244.1.0/24"])
        srv.deny("patch", "nodes/status")
        with pytest.raises(client.ApiException) as exc:
            api_for(srv.url).patch_node_status("n1", {"metadata": {"annotations": {"a": "b"}}})
        body = json.loads(exc.value.body)
        assert exc.value.status == 403 and body["reason"] == "Forbidden"
        assert 'cannot patch resource "nodes/status" in API group ""' in body["message"]
        assert api_for(srv.url).read_node("n1").metadata.name == "n1"  # other verbs still allowed
    finally:
        srv.stop()


@pytest.mark.root
def test_listens_inside_a_namespace_in_process_and_as_a_process(ns_prefix, tmp_path):
    with Underlay(ns_prefix) as lab:
        host = lab.add_host("h1")
        hub_ip = str(lab.hub_ip)
        srv = KubeAPIServer(host=hub_ip, port=6443, token=TOKEN, netns=lab.hub.name).start()
        try:
            srv.add_node("h1", ["10.244.1.0/24"])
            out = host.ns.exec("curl", "-sf", "-H", f"Authorization: Bearer {TOKEN}",
                               f"http://{hub_ip}:6443/api/v1/nodes/h1")
            assert json.loads(out)["spec"]["podCIDR"] == "10.244.1.0/24"
            srv.stop()  # a restart keeps the port, the namespace and the state
            srv.start()
            out = host.ns.exec("curl", "-sf", "-H", f"Authorization: Bearer {TOKEN}",
                               f"http://{hub_ip}:6443/api/v1/nodes/h1")
            assert json.loads(out)["metadata"]["name"] == "h1"
        finally:
            srv.stop()
        proc = start_process("--host", hub_ip, "--port", "6444", "--node", "h9=10.244.9.0/24",
                             prefix=["ip", "netns", "exec", lab.hub.name], ready=str(tmp_path / "url"))
        try:
            out = host.ns.exec("curl", "-sf", f"http://{hub_ip}:6444/api/v1/nodes")
            assert [n["metadata"]["name"] for n in json.loads(out)["items"]] == ["h9"]
        finally:
            stop_process(proc)
    assert not [line for line in netns_mod.run("ip", "netns", "list").splitlines() if line.startswith(ns_prefix)]


@pytest.fixture
def server():
    srv = KubeAPIServer(token=TOKEN).start()
    yield srv
    srv.stop()


def test_paginated_list_is_consistent_at_the_first_pages_version(server):
    for i in range(1, 8):
        server.add_node(f"n{i}", [f"10.244.{i}.0/24"])
    api = api_for(server.url)
    first = api.list_node(limit=3)
    assert [n.metadata.name for n in first.items] == ["n1", "n2", "n3"]
    assert first.metadata.remaining_item_count == 4 and first.metadata._continue
    # the cluster changes between the pages; the list still shows it as of the first page
    server.delete_node("n5")
    server.add_node("n4a", ["10.244.40.0/24"])
    server.set_annotations("n6", {"x.io/changed": "yes"})
    second = api.list_node(limit=3, _continue=first.metadata._continue)
    third = api.list_node(limit=3, _continue=second.metadata._continue)
    assert [n.metadata.name for n in second.items + third.items] == ["n4", "n5", "n6", "n7"]
    assert second.items[2].metadata.annotations is None, "n6 as it was at the list's version"
    assert second.metadata.resource_version == third.metadata.resource_version == first.metadata.resource_version
    assert not third.metadata._continue and third.metadata.remaining_item_count is None
    # a fresh list sees the changes
    assert [n.metadata.name for n in api.list_node().items] == ["n1", "n2", "n3", "n4", "n4a", "n6", "n7"]


def test_a_continue_token_older_than_the_history_is_410(server):
    for i in range(1, 5):
        server.add_node(f"n{i}", [f"10.244.{i}.0/24"])
    api = api_for(server.url)
    first = api.list_node(limit=2)
    server.compact()
    with pytest.raises(client.ApiException) as exc:
        api.list_node(limit=2, _continue=first.metadata._continue)
    assert exc.value.status == 410 and json.loads(exc.value.body)["reason"] == "Expired"


def test_bookmarks_come_periodically_and_just_before_the_deadline(server):
    server.bookmark_interval = 1.0
    api = api_for(server.url)
    rv = api.list_node().metadata.resource_version
    resp = api.list_node(watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=5,
                         _preload_content=False)
    lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert lines and all(e["type"] == "BOOKMARK" for e in lines)
    assert 3 <= len(lines) <= 6, f"~1/s over 5 s, plus one 2 s before the end: {len(lines)}"
    assert all(e["object"]["metadata"]["resourceVersion"] == rv for e in lines)
    # the real default: about once a minute, and one 2 s before the deadline
    server.bookmark_interval = 60.0
    before = server.bookmarks_sent
    resp = api.list_node(watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=3,
                         _preload_content=False)
    assert [json.loads(line)["type"] for line in resp.read().splitlines() if line.strip()] == ["BOOKMARK"]
    assert server.bookmarks_sent == before + 1
    assert KubeAPIServer().bookmark_interval == 60.0


def test_injected_raw_lines_reach_watches_in_order(server):
    api = api_for(server.url)
    rv = api.list_node().metadata.resource_version
    server.add_node("n1", ["10.244.1.0/24"])
    server.inject_watch_line(b"{not json")
    server.add_node("n2", ["10.244.2.0/24"])
    resp = api.list_node(watch=True, resource_version=rv, timeout_seconds=1, _preload_content=False)
    lines = [line for line in resp.read().splitlines() if line.strip()]
    assert len(lines) == 3 and lines[1] == b"{not json"
    assert [json.loads(lines[i])["object"]["metadata"]["name"] for i in (0, 2)] == ["n1", "n2"]


def test_generated_nodes_look_like_real_ones_and_heartbeats_are_status_only(server):
    from flannel.lab.kubeapi.generate import flannel_annotations, realistic_cluster

    nodes = realistic_cluster(20)
    sizes = [len(json.dumps(n, separators=(",", ":"))) for n in nodes]
    assert all(8000 <= s <= 12000 for s in sizes), sizes
    server.add_nodes(nodes)
    api = api_for(server.url)
    got = api.list_node(limit=500)
    assert len(got.items) == 20 and got.items[0].status.images and len(got.items[0].metadata.labels) > 10
    assert got.items[3].metadata.annotations.items() >= flannel_annotations(4).items()
    rv = got.metadata.resource_version
    assert server.state.heartbeat_nodes() == 20
    events = [json.loads(line) for line in api.list_node(watch=True, resource_version=rv, timeout_seconds=1,
                                                         _preload_content=False).read().splitlines()]
    assert len(events) == 20 and {e["type"] for e in events} == {"MODIFIED"}
    before = {n.metadata.name: n for n in got.items}
    for e in events:
        old = api.api_client.sanitize_for_serialization(before[e["object"]["metadata"]["name"]])
        new = e["object"]
        assert new["spec"] == old["spec"] and new["metadata"]["annotations"] == old["metadata"]["annotations"]
        assert new["status"]["conditions"] != old["status"]["conditions"]
