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
