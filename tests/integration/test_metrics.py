"""/metrics of a real agent (``python -m flannel`` in a host namespace, real etcd, vxlan), scraped with
urllib from inside the agent's namespace and parsed with prometheus_client's parser.

What moves is checked against what happened: a peer lease put into etcd and deleted again (events
received and applied, leases by backend type, apply times, and the route in the kernel), records
that are not leases (skipped by reason), our own lease's expiry, and an etcd outage (reconnects).
The udp and wireguard data-path metrics are scraped in a lab: tests/e2e/test_lab_metrics.py.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flannel.lab.agent import AgentProcess
from flannel.lab.etcd import EtcdServer
from flannel.lab.netns import cleanup_prefix, run_prefix
from flannel.lab.topology import Host, Underlay
from tests.support import Samples, metrics_of, scrape, wait_for

pytestmark = [pytest.mark.root, pytest.mark.etcd]

CONFIG = '{"Network": "10.9.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}'
HEALTH_PORT = 8471
PEER_KEY = "10.9.200.0-24"
PEER_VALUE = ('{"PublicIP":"198.18.0.200","PublicIPv6":null,"BackendType":"vxlan",'
              '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:c8:01"}}')
_counter = itertools.count(1)


@pytest.fixture(scope="module")
def underlay() -> Iterator[Underlay]:
    prefix = run_prefix()
    u = Underlay(prefix)
    try:
        yield u
    finally:
        u.close()
        cleanup_prefix(prefix)


@pytest.fixture
def etcd(underlay: Underlay) -> Iterator[EtcdServer]:
    server = EtcdServer(host=str(underlay.hub_ip), netns=underlay.hub.name)
    try:
        server.start()
        yield server
    finally:
        server.close()


class Node:
    """One host namespace with an agent whose /metrics we read."""

    def __init__(self, underlay: Underlay, etcd: EtcdServer, workdir: Path, prefix: str) -> None:
        self.host: Host = underlay.add_host(f"m{next(_counter)}")
        self.underlay = underlay
        self.agent = AgentProcess(self.host.name, netns=self.host.ns.name, workdir=workdir, healthz_port=HEALTH_PORT,
                                  args=["--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix, "--iface", "eth0"])

    def metrics(self) -> Samples:
        return metrics_of(HEALTH_PORT, netns=self.host.ns.name)

    def wait(self, what: str, cond: Callable[[Samples], Any], timeout: float = 30.0) -> Samples:
        """Scrape until ``cond(samples)`` holds; the agent's log tail is shown if it never does."""
        def check() -> Samples | None:
            s = self.metrics()
            return s if cond(s) else None
        return wait_for(check, what, timeout=timeout, interval=0.2,  # type: ignore[no-any-return]
                        on_timeout=self.agent.log_tail)

    def routes(self) -> str:
        return self.host.ns.ip("route", "show")

    def close(self) -> None:
        self.agent.kill()
        self.underlay.remove_host(self.host.name)


@pytest.fixture
def node(underlay: Underlay, etcd: EtcdServer, tmp_path: Path) -> Iterator[tuple[Node, EtcdServer, str]]:
    prefix = f"/metrics{next(_counter)}/network"
    etcd.etcdctl("put", f"{prefix}/config", CONFIG)
    n = Node(underlay, etcd, tmp_path, prefix)
    try:
        yield n, etcd, prefix
    finally:
        n.close()


def full_reconciles(s: Samples) -> float:
    return s.value("flannel_full_reconcile_duration_seconds_count") or 0


def applies(s: Samples) -> float:
    """Apply attempts of either kind (a batch can coincide with the periodic full reconcile)."""
    return (s.value("flannel_apply_duration_seconds_count") or 0) + \
        (s.value("flannel_full_reconcile_duration_seconds_count") or 0)


def test_a_peer_lease_added_and_removed_moves_events_leases_and_applies(node: tuple[Node, EtcdServer, str]) -> None:
    n, etcd, prefix = node
    started = time.time()
    n.agent.start()
    n.agent.wait_ready()
    status, ctype, _ = scrape(HEALTH_PORT, netns=n.host.ns.name)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    # the first snapshot (no peers) has been reconciled in full once the network thread got it
    s0 = n.wait("the first full reconcile", lambda s: full_reconciles(s) >= 1)
    assert s0.value("flannel_ready") == 1
    assert s0.matching("flannel_remote_leases") == []
    own = n.agent.subnet()
    assert s0.value("flannel_own_lease_info", subnet=str(own), ipv6_subnet="", public_ip=str(n.host.ip),
                    backend_type="vxlan") == 1
    expiry = s0.value("flannel_own_lease_expiry_timestamp_seconds")
    assert expiry is not None and started + 23 * 3600 < expiry < time.time() + 24 * 3600 + 60   # flannel's 24 h TTL
    received0 = s0.total("flannel_lease_events_received_total", type="added")
    applied0 = s0.total("flannel_lease_events_applied_total", type="added")

    etcd.etcdctl("put", f"{prefix}/subnets/{PEER_KEY}", PEER_VALUE)
    s1 = n.wait("the peer lease counted", lambda s: s.value("flannel_remote_leases", backend_type="vxlan") == 1
                and s.total("flannel_lease_events_applied_total", type="added") >= applied0 + 1)
    assert s1.total("flannel_lease_events_received_total", type="added") >= received0 + 1
    assert applies(s1) >= applies(s0) + 1
    # applied means in the kernel (through a nexthop object: "10.9.200.0/24 nhid N via ...")
    route = r"^10\.9\.200\.0/24 (nhid \d+ )?via 10\.9\.200\.0 dev flannel\.1 proto 152 onlink"
    assert re.search(route, n.routes(), re.M), n.routes()
    assert not s1.matching("flannel_netlink_errors_total")

    etcd.etcdctl("del", f"{prefix}/subnets/{PEER_KEY}")
    s2 = n.wait("the removal counted", lambda s: s.total("flannel_lease_events_applied_total", type="removed") >= 1)
    assert s2.total("flannel_lease_events_received_total", type="removed") >= 1
    assert s2.matching("flannel_remote_leases") == []
    assert applies(s2) >= applies(s1) + 1
    assert "10.9.200.0/24" not in n.routes()
    # the health endpoints are unchanged next to /metrics
    assert n.agent.http_get("/healthz") == (200, "flanneld is running")
    assert json.loads(n.agent.http_get("/healthz?verbose=1")[1])["workers"]["network"]["state"] == "running"


def test_records_that_are_not_leases_are_skipped_by_reason(node: tuple[Node, EtcdServer, str]) -> None:
    n, etcd, prefix = node
    n.agent.start()
    n.agent.wait_ready()
    etcd.etcdctl("put", f"{prefix}/subnets/garbage", "{}")
    etcd.etcdctl("put", f"{prefix}/subnets/10.9.201.0-24", "not json")
    etcd.etcdctl("put", f"{prefix}/subnets/{PEER_KEY}", PEER_VALUE)       # a good one after them
    s = n.wait("the skipped records counted", lambda s: s.value(
        "flannel_store_records_skipped_total", store="etcd", reason="key") and s.value(
        "flannel_store_records_skipped_total", store="etcd", reason="json"))
    assert n.wait("the good lease", lambda s: s.value("flannel_remote_leases", backend_type="vxlan") == 1)
    assert s.total("flannel_remote_leases") <= 1           # the bad records never became leases
    assert n.agent.running


def test_an_etcd_outage_is_counted_as_reconnects_and_the_watch_works_after_it(
        node: tuple[Node, EtcdServer, str]) -> None:
    n, etcd, prefix = node
    n.agent.start()
    n.agent.wait_ready()
    s0 = n.wait("the first snapshot", lambda s: full_reconciles(s) >= 1)
    assert s0.value("flannel_store_reconnects_total", store="etcd") == 0
    etcd.stop()
    n.wait("a reconnect counted", lambda s: (s.value("flannel_store_reconnects_total", store="etcd") or 0) >= 1)
    etcd.start()
    etcd.etcdctl("put", f"{prefix}/subnets/{PEER_KEY}", PEER_VALUE)
    s = n.wait("the peer after the outage", lambda s: s.value("flannel_remote_leases", backend_type="vxlan") == 1,
               timeout=60)
    assert s.total("flannel_lease_events_received_total", type="added") >= 1
    assert n.agent.running and n.agent.http_get("/healthz")[0] == 200
