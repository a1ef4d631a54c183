"""e2e: the lab in kube mode (issue 5 item 5) — agents with ``--subnet-manager=kube`` against the
stand-in API server (flannel/lab/kubeapi) in the hub, nodes pre-created with podCIDRs, pods created
through the project's CNI plugin (delegating to Debian's bridge + host-local), vxlan data plane."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import Lab
from tests.support import build_lab

pytestmark = [pytest.mark.root, pytest.mark.e2e]

ANN = "flannel.alpha.coreos.com/"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = build_lab("vxlan", tmp_path_factory.mktemp("lab-kube"), subnet_manager="kube")
    yield lab
    lab.teardown(keep_dir=True)


def test_leases_come_from_pod_cidrs_and_annotations_are_published(lab: Lab) -> None:
    for name, h in lab.hosts.items():
        node = lab.kube("GET", f"/api/v1/nodes/{name}")
        assert h.subnet == node["spec"]["podCIDR"] == lab.config.pod_cidr(h.index)
        ann = node["metadata"].get("annotations", {})
        assert ann.get(ANN + "public-ip") == h.ip, ann
        assert ann.get(ANN + "backend-type") == "vxlan", ann
        assert "VtepMAC" in json.loads(ann[ANN + "backend-data"]), ann


def test_cni_pods_reach_every_other_pod(lab: Lab) -> None:
    pods = lab.pods()
    assert len(pods) == 6
    for name, h in lab.hosts.items():
        saved = {p.name for p in (lab.dir / name / "cni").iterdir()}
        assert {p["ns"] for p in h.pods} <= saved, "the CNI plugin must save each container's delegate config"
    m = pt.wait_full_matrix(pods, time.monotonic() + 30)
    assert all(m.values()), pt.format_matrix(pods, m)
    with pt.TcpServers(pods):
        res = pt.tcp_matrix(pods)
    assert all(v == "ok" for v in res.values()) and len(res) == 30, res


def test_node_joins_and_leaves(lab: Lab) -> None:
    new = lab.add_host()
    assert lab.hosts[new].subnet == lab.config.pod_cidr(lab.hosts[new].index)
    m = pt.wait_full_matrix(lab.pods(), time.monotonic() + 30)
    assert all(m.values()), pt.format_matrix(lab.pods(), m)
    subnet = lab.hosts[new].subnet
    lab.remove_host(new, delete_lease=True)  # the node object is deleted from the API server
    rest = list(lab.hosts)
    deadline = time.monotonic() + 30
    left: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        left = {h: [r for r in pt.ns_exec(lab.hosts[h].ns, "ip", "route", "show").stdout.splitlines()
                    if r.startswith(subnet + " ")] for h in rest}
        left = {h: r for h, r in left.items() if r}
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"routes to the deleted node's {subnet} remain: {left}"
    m = pt.ping_matrix(lab.pods())
    assert all(m.values()), pt.format_matrix(lab.pods(), m)
