"""Chaos: faults of the Kubernetes API (the stand-in, flannel.lab.kubeapi) under a running kube lab.

One lab for the module: the stand-in API server in the hub, 3 hosts whose agents run with
``--subnet-manager=kube`` (vxlan), one CNI pod each. Every scenario starts from a working lab and
deletes the nodes it created. Nodes that exist only in the API ("fake nodes") get pod CIDRs
10.244.200.0/24 and up and public IPs 198.18.0.200+ (nothing answers there).

The test talks to the API server from inside the hub namespace (only the hub reaches it), with
plain HTTP requests, so bodies of any size go through.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any
from urllib.parse import urlsplit

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import Lab
from flannel.lab.netns import Blackhole, in_netns
from tests.support import (
    Figure,
    agents_alive,
    ensure_healthy,
    kernel_routes,
    lab_logs,
    report_echoes,
    ring_pingers,
    running_lab,
    stop_pingers,
    wait_for,
    wait_routed,
)

pytestmark = [pytest.mark.faults, pytest.mark.root]

P = "flannel.alpha.coreos.com/"


FAKE_RANGE = IPv4Network("10.244.192.0/18")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab("vxlan", tmp_path_factory.mktemp("faults-kube"), hosts=3, pods_per_host=1,
                           subnet_manager="kube")


@pytest.fixture(autouse=True)
def healthy(lab: Lab) -> None:
    ensure_healthy(lab, FAKE_RANGE)


# ---- helpers -------------------------------------------------------------------------------------

def api(lab: Lab, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
        ctype: str = "application/json", timeout: float = 30) -> dict[str, Any]:
    """One request to the stand-in API server, sent from the hub namespace."""
    assert lab.underlay is not None
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(lab.kubeapi_url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {lab.kube_token}", "Content-Type": ctype})
    with in_netns(lab.underlay.hub.name):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out: dict[str, Any] = json.loads(r.read() or b"{}")
                return out
        except urllib.error.HTTPError as e:
            raise AssertionError(f"API server: {method} {path}: {e.code} {e.read()[:300]!r}") from None


def api_up(lab: Lab) -> bool:
    try:
        api(lab, "GET", "/version", timeout=2)
        return True
    except (OSError, AssertionError, http.client.HTTPException):   # refused, reset, cut mid-answer (going down)
        return False


def fake_node(name: str, cidr: str, ip: str, mac: str, *, annotations: dict[str, Any] | None = None,
              spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A node as a flannel agent on it would have annotated it (vxlan)."""
    ann = {P + "kube-subnet-manager": "true", P + "backend-type": "vxlan",
           P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}), P + "public-ip": ip}
    ann.update(annotations or {})
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name, "annotations": ann},
            "spec": spec if spec is not None else {"podCIDR": cidr, "podCIDRs": [cidr]}}


def add_fake(lab: Lab, i: int, **kw: Any) -> str:
    """Fake node ``chaos-<i>`` with pod CIDR 10.244.<i>.0/24; returns the CIDR."""
    cidr = f"10.244.{i}.0/24"
    api(lab, "POST", "/api/v1/nodes", fake_node(f"chaos-{i}", cidr, f"198.18.0.{i}", f"0e:00:00:00:00:{i:02x}", **kw))
    return cidr


def delete_fakes(lab: Lab) -> None:
    for node in api(lab, "GET", "/api/v1/nodes").get("items", []):
        name = node["metadata"]["name"]
        if name.startswith("chaos-"):
            api(lab, "DELETE", f"/api/v1/nodes/{name}")


# ---- scenarios -----------------------------------------------------------------------------------

def test_api_server_down_10s_loses_no_packets_and_a_later_node_arrives(lab: Lab, figure: Figure) -> None:
    ps = ring_pingers(lab)
    results: list[tuple[str, pt.PingResult]] = []
    try:
        api(lab, "POST", "/_test/outage?seconds=10")
        t0 = time.monotonic()
        wait_for(lambda: not api_up(lab), "the API server to go down", timeout=10)
        while time.monotonic() - t0 < 10:
            agents_alive(lab)
            time.sleep(0.5)
        wait_for(lambda: api_up(lab), "the API server to come back", timeout=30)
        figure("API server down", time.monotonic() - t0, "s")
        cidr = add_fake(lab, 201)
        figure("node added after the outage reached every agent",
               wait_routed(lab, cidr, "the node added after the outage"), "s")
    finally:
        results = stop_pingers(ps)
        # the outage runs its 10 s whatever failed here: the next scenarios need the API server back
        wait_for(lambda: api_up(lab), "the API server to be back", timeout=30)
        delete_fakes(lab)
    agents_alive(lab)
    assert report_echoes(figure, results) == 0, f"pods lost echoes during the outage: {results}"


def test_410_during_the_watch_relists_and_misses_nothing(lab: Lab, figure: Figure) -> None:
    try:
        before = add_fake(lab, 202)
        wait_routed(lab, before, "a node added before the compaction")
        api(lab, "POST", "/_test/compact")  # open watches get ERROR 410 Expired at once
        t0 = time.monotonic()
        api(lab, "DELETE", "/api/v1/nodes/chaos-202")
        after = add_fake(lab, 203)
        figure("node added after the 410 reached every agent", wait_routed(lab, after, "the node added after the 410"),
               "s")
        figure("node deleted after the 410 gone from every agent",
               wait_routed(lab, before, "the node deleted after the 410 to be removed", present=False), "s")
        figure("total after the 410", time.monotonic() - t0, "s")
        agents_alive(lab)
    finally:
        delete_fakes(lab)


def test_api_host_vanishing_without_a_reset_is_noticed_after_healing(lab: Lab, figure: Figure) -> None:
    """Packets between h1 and the API server dropped for 20 s (no RST, no FIN); the connections open
    before stay dead afterwards (a replacement host or load balancer never knew them). The agent must
    notice by itself (bookmarks, a read timeout well under the watch timeout) and a node added
    meanwhile must reach it within 60 s of the network healing."""
    assert lab.underlay is not None
    h1 = next(iter(lab.hosts))
    others = [h for h in lab.hosts if h != h1]
    port = urlsplit(lab.kubeapi_url).port or 443
    bh = Blackhole(lab.hosts[h1].ns, str(lab.underlay.hub_ip), port)
    try:
        conns = bh.cut()
        t_cut = time.monotonic()
        figure("agent connections to the API server blackholed", len(conns))
        assert conns, "the agent had no connection to the API server to cut (the scenario needs one)"
        cidr = add_fake(lab, 204)
        wait_routed(lab, cidr, "the other agents to get the node", hosts=others)
        while time.monotonic() - t_cut < 20:
            agents_alive(lab)
            time.sleep(0.5)
        bh.heal()
        t_heal = time.monotonic()
        figure("API server unreachable for", t_heal - t_cut, "s")
        wait_routed(lab, cidr, "the node added meanwhile to reach the cut-off agent within 60 s of healing",
                    hosts=[h1], timeout=60)
        figure("node added meanwhile arrived after healing", time.monotonic() - t_heal, "s")
    finally:
        bh.close()
        delete_fakes(lab)


DEEP = 6000
MB = 1_000_000


def garbage_nodes() -> list[tuple[dict[str, Any], dict[str, Any] | None, str]]:
    """(annotation overrides, spec override, why) for fake nodes 210, 211, ..."""
    bd = P + "backend-data"
    return [
        ({bd: "[" * DEEP + "]" * DEEP}, None, f"backend-data: {DEEP} levels of nested lists"),
        ({bd: '{"VtepMAC":' + '{"a":' * DEEP + "1" + "}" * DEEP + "}"}, None, "backend-data: deep object"),
        ({bd: '{"VtepMAC":"' + "x" * MB + '"}'}, None, "backend-data: a 1 MB VtepMAC"),
        ({bd: '{"VtepMAC":"\\ud800\\udfff\\ud800"}'}, None, "backend-data: lone surrogates (not encodable)"),
        ({bd: "12"}, None, "backend-data: a number"),
        ({bd: '{"VtepMAC":12}'}, None, "backend-data: VtepMAC is a number"),
        ({bd: "{not json"}, None, "backend-data: not JSON"),
        ({P + "public-ip": "999.1.1.1"}, None, "public-ip: not an address"),
        ({P + "public-ip": "fd00::1"}, None, "public-ip: IPv6 in the IPv4 annotation"),
        ({P + "public-ip": 7}, None, "public-ip: a number, not a string"),
        ({P + "backend-type": ["vxlan"]}, None, "backend-type: a list"),
        ({}, {"podCIDR": "garbage", "podCIDRs": ["garbage"]}, "podCIDR: not a CIDR"),
        ({}, {"podCIDR": "10.244.222.0/99", "podCIDRs": ["10.244.222.0/99"]}, "podCIDR: bad length"),
        ({}, {"podCIDRs": ["10.244.223.0/24", "fd00::/64", "10.244.224.0/24"]}, "podCIDRs: three entries"),
        ({}, {"podCIDR": 7, "podCIDRs": 5}, "podCIDR(s): numbers"),
        ({}, {}, "no podCIDR at all"),
    ]


def test_garbage_annotations_crash_no_agent_and_good_nodes_still_arrive(lab: Lab, figure: Figure) -> None:
    h2 = list(lab.hosts)[1]
    ps = ring_pingers(lab)
    results: list[tuple[str, pt.PingResult]] = []
    records = garbage_nodes()
    try:
        for n, (ann, spec, _why) in enumerate(records, 210):
            add_fake(lab, n, annotations=ann, spec=spec)
        figure("garbage nodes written", len(records))
        good1 = add_fake(lab, 240)
        figure("good node added after the garbage reached every agent",
               wait_routed(lab, good1, "a good node added after the garbage"), "s")
        t0 = time.monotonic()
        lab.restart_agent(h2)
        figure("restart with the garbage present, to ready", time.monotonic() - t0, "s")
        good2 = add_fake(lab, 241)
        figure("good node added after the restart reached every agent",
               wait_routed(lab, good2, "a good node added after the restart"), "s")
        assert good1 in kernel_routes(lab, h2), "the restarted agent lost a good node"
        m = pt.wait_full_matrix(lab.pods(), time.monotonic() + 30)
        assert all(m.values()), pt.format_matrix(lab.pods(), m) + lab_logs(lab)
        agents_alive(lab)
    finally:
        results = stop_pingers(ps)
        delete_fakes(lab)
    assert report_echoes(figure, results) == 0, f"pods lost echoes: {results}"
