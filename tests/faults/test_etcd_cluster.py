"""Chaos: a 3-member etcd cluster (one member per namespace); agents are given every endpoint.

The member an agent talks to is killed (SIGKILL), then, after it is back, the raft leader. After
each kill the agents' renewals must go on (with an 8 s TTL a key whose renewals stop is gone
within seconds) and their watches too: a lease written after the kill must reach every agent
within 15 s. Pods ping throughout and lose nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from flannel.lab.cluster import Lab
from flannel.lab.etcd import EtcdCluster, EtcdServer
from tests.support import (
    Figure,
    agents_alive,
    etcd_key,
    etcd_leases,
    fake_vxlan_lease,
    kernel_routes,
    lab_logs,
    lab_ns,
    report_echoes,
    ring_pingers,
    running_lab,
    stop_pingers,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.root, pytest.mark.etcd]

TTL = 8
REACH_WITHIN = 15.0  # the bound for a new lease to reach every agent after a member dies


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab("vxlan", tmp_path_factory.mktemp("faults-etcd-cluster"), hosts=3, pods_per_host=1,
                           etcd_members=3, lease_ttl=TTL)


def cluster(lab: Lab) -> EtcdCluster:
    assert isinstance(lab.etcd, EtcdCluster)
    return lab.etcd


def member_used_by(lab: Lab, host: str) -> EtcdServer | None:
    """The member the host's agent holds a TCP connection to (read with ``ss`` in its namespace)."""
    out = lab_ns(lab, host).exec("ss", "-Htn", "state", "established")
    # gRPC uses IPv6 sockets: IPv4 peers show as [::ffff:198.18.0.241]:2379
    peers = {tok.replace("[::ffff:", "").replace("]", "") for line in out.splitlines() for tok in line.split()[2:4]}
    for m in cluster(lab).members:
        if f"{m.host}:{m.client_port}" in peers:
            return m
    return None


def keys_stay(lab: Lab, seconds: float) -> None:
    """Every agent's key exists at every look for ``seconds`` (without renewals it expires in TTL)."""
    own = {h.subnet for h in lab.hosts.values()}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        agents_alive(lab)
        missing = own - set(etcd_leases(lab))
        assert not missing, f"leases expired: {missing} (renewals stopped)" + lab_logs(lab, 25)
        time.sleep(0.5)


def put(lab: Lab, k: str, value: str) -> bool:
    """One write; False while the cluster cannot take it (e.g. electing a new leader)."""
    try:
        lab.etcdctl("put", k, value)
        return True
    except RuntimeError:
        return False


def renewals(lab: Lab) -> int:
    return sum(lab.log_file(h).read_text(errors="replace").count("Lease renewed") for h in lab.hosts)


def after_kill(lab: Lab, figure: Figure, label: str, victim: EtcdServer, subnet: str, n: int) -> None:
    before = renewals(lab)
    victim.kill()
    t_kill = time.monotonic()
    value = json.dumps(fake_vxlan_lease(f"198.18.0.{n}", f"0e:00:00:00:01:{n:02x}"))
    wait_for(lambda: put(lab, etcd_key(subnet), value), "the cluster to accept a write again", timeout=60, interval=0.5)
    t0 = time.monotonic()
    figure(f"cluster accepted writes again after killing {label}", t0 - t_kill, "s")
    wait_for(lambda: agents_alive(lab) and all(subnet in kernel_routes(lab, h) for h in lab.hosts),
             f"a lease written after killing {label} to reach every agent within {REACH_WITHIN:.0f}s",
             timeout=REACH_WITHIN, interval=0.2, on_timeout=lambda: lab_logs(lab, 25))
    figure(f"new lease reached every agent after killing {label}", time.monotonic() - t0, "s")
    keys_stay(lab, 2.5 * TTL)
    figure(f"renewals logged in the {2.5 * TTL:.0f} s after killing {label}", renewals(lab) - before)


def test_killing_the_used_member_then_the_leader_keeps_renewals_and_watches(lab: Lab, figure: Figure) -> None:
    c = cluster(lab)
    h1 = next(iter(lab.hosts))
    used = wait_for(lambda: member_used_by(lab, h1), f"{h1}'s agent to hold a connection to a member", timeout=30)
    figure("members", len(c.members))
    ps = ring_pingers(lab)
    try:
        after_kill(lab, figure, f"the member {h1} used ({used.name})", used, "10.244.150.0/24", 150)
        used.start(timeout=60)
        wait_for(lambda: len(c.status()) == len(c.members), "the killed member to rejoin", timeout=60)
        leader = wait_for(c.leader, "a leader", timeout=30)
        figure("leader killed next", f"{leader.name} (the member {h1} used: {used.name})")
        after_kill(lab, figure, f"the leader ({leader.name})", leader, "10.244.151.0/24", 151)
        leader.start(timeout=60)
        wait_for(lambda: len(c.status()) == len(c.members), "the killed leader to rejoin", timeout=60)
    finally:
        results = stop_pingers(ps)
        for m in c.members:
            if not m.running:
                m.start(timeout=60)
        for s in ("10.244.150.0/24", "10.244.151.0/24"):
            lab.etcdctl("del", etcd_key(s))
    assert report_echoes(figure, results) == 0, f"pods lost echoes: {results}"
