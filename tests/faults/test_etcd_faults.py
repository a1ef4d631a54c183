"""Chaos: faults of the etcd store under a running vxlan lab (real etcd, real agents, pods pinging).

One lab for the module (hub + etcd + 3 hosts with one pod each). Every scenario starts from a
working lab (``healthy``: an agent that an earlier scenario killed is restarted first, that
scenario has already failed for it) and removes what it wrote to etcd. Peers that exist only in
the store ("fake leases") use subnets in 10.244.128.0/17 (agents allocate among the first 100
free subnets, far below) and public IPs 198.18.0.100-199, 198.18.1.x and 198.18.2.x (nothing
answers there; nothing leaves the lab).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import ETCD_PREFIX, Lab
from flannel.lab.etcd import b64
from flannel.lab.netns import Blackhole
from tests.support import (
    Figure,
    dead_agents,
    ensure_healthy,
    etcd_key,
    etcd_leases,
    expected_vxlan_state,
    fake_vxlan_lease,
    kernel_routes,
    lab_logs,
    report_echoes,
    ring_pingers,
    running_lab,
    stop_pingers,
    vxlan_state,
    wait_for,
    wait_routed,
)

pytestmark = [pytest.mark.faults, pytest.mark.root, pytest.mark.etcd]

SUBNETS = f"{ETCD_PREFIX}/subnets/"


FAKE_RANGE = IPv4Network("10.244.128.0/17")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab("vxlan", tmp_path_factory.mktemp("faults-etcd"), hosts=3, pods_per_host=1)


@pytest.fixture(autouse=True)
def healthy(lab: Lab) -> None:
    ensure_healthy(lab, FAKE_RANGE)


# ---- helpers -------------------------------------------------------------------------------------

def put(lab: Lab, k: str | bytes, value: str | bytes | dict[str, Any]) -> int:
    """Write any bytes under any key (etcd's JSON gateway); returns the new revision."""
    assert lab.etcd is not None
    raw = json.dumps(value) if isinstance(value, dict) else value
    resp = lab.etcd.v3("/v3/kv/put", {"key": b64(k), "value": b64(raw)})
    return int(resp["header"]["revision"])


def delete(lab: Lab, k: str | bytes) -> int:
    assert lab.etcd is not None
    return int(lab.etcd.v3("/v3/kv/deleterange", {"key": b64(k)})["header"]["revision"])


def fake_mac(i: int, gen: int = 0) -> str:
    return f"0e:{gen:02x}:00:00:{i // 256:02x}:{i % 256:02x}"


def cleanup_keys(lab: Lab, subnets: list[str]) -> None:
    """Delete the keys a scenario wrote (the next scenario's ``healthy`` waits for their routes to go:
    waiting here could hide the scenario's own failure behind a cleanup timeout)."""
    for s in subnets:
        delete(lab, etcd_key(s))


# ---- scenarios -----------------------------------------------------------------------------------

def test_etcd_stopped_10s_loses_no_packets_and_a_later_lease_arrives(lab: Lab, figure: Figure) -> None:
    assert lab.etcd is not None
    ps = ring_pingers(lab)
    late = "10.244.131.0/24"
    try:
        lab.etcd.stop()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 10:  # the outage itself
                assert not dead_agents(lab), f"agents died while etcd was down: {dead_agents(lab)}" + lab_logs(lab)
                time.sleep(0.5)
        finally:
            lab.etcd.start()
        figure("etcd down", time.monotonic() - t0, "s")
        put(lab, etcd_key(late), fake_vxlan_lease("198.18.0.131", fake_mac(131)))
        figure("lease written after the restart reached every agent", wait_routed(lab, late, "the late lease"), "s")
    finally:
        results = stop_pingers(ps)
    try:
        assert not dead_agents(lab), f"agents died: {dead_agents(lab)}" + lab_logs(lab)
        lost = report_echoes(figure, results)
        assert lost == 0, f"pods lost echoes during the etcd outage: {[(n, r.lost) for n, r in results]}"
    finally:
        cleanup_keys(lab, [late])


def test_operator_deletes_our_lease_key_and_it_is_reacquired_with_the_same_subnet(lab: Lab, figure: Figure) -> None:
    host = list(lab.hosts)[2]
    others = [h for h in lab.hosts if h != host]
    subnet, ip = lab.hosts[host].subnet, lab.hosts[host].ip
    pid = lab.agent(host).pid
    delete(lab, etcd_key(subnet))
    t0 = time.monotonic()
    value = wait_for(lambda: etcd_leases(lab).get(subnet), f"{host}'s key {etcd_key(subnet)} to be written again",
                     timeout=60, interval=0.1, on_timeout=lambda: lab_logs(lab))
    figure("deleted key re-acquired after", time.monotonic() - t0, "s")
    assert value["PublicIP"] == ip, f"the key came back for someone else: {value}"
    assert lab.agent(host).pid == pid and lab.agent_alive(host), "the agent restarted or exited" + lab_logs(lab)
    assert lab.agent(host).subnet() == IPv4Network(subnet), "subnet.env changed"
    assert [s for s, v in etcd_leases(lab).items() if v.get("PublicIP") == ip] == [subnet], "a second lease appeared"
    figure("peers route it again after", wait_routed(lab, subnet, "peers to route the re-acquired lease",
                                                     hosts=others), "s")
    m = pt.wait_full_matrix(lab.pods(), time.monotonic() + 30)
    assert all(m.values()), pt.format_matrix(lab.pods(), m) + lab_logs(lab)


# The garbage set of issue 8 item 1: every way a record can be wrong, under keys the agents watch.
DEEP = 6000
MB = 1_000_000


def garbage() -> list[tuple[bytes, bytes, str]]:
    def k(name: str | bytes) -> bytes:
        return SUBNETS.encode() + (name.encode() if isinstance(name, str) else name)

    good = json.dumps(fake_vxlan_lease("198.18.0.160", fake_mac(160))).encode()
    return [
        (k("10.244.150.0-24"), b"[" * DEEP + b"]" * DEEP, f"{DEEP} levels of nested lists"),
        (k("10.244.151.0-24"), b'{"PublicIP":"198.18.0.151","BackendType":"vxlan","BackendData":'
         + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}", f"{DEEP} levels of nesting inside BackendData"),
        (k("10.244.152.0-24"), b'"' + b"x" * MB + b'"', "a 1 MB JSON string"),
        (k("10.244.153.0-24"), b'{"PublicIP":"198.18.0.153","BackendType":"vxlan","BackendData":{"VtepMAC":"'
         + b"x" * MB + b'"}}', "a 1 MB VtepMAC"),
        (k("10.244.154.0-24"), b'\xff\xfe{"PublicIP":"198.18.0.154"}', "not UTF-8"),
        (k("10.244.155.0-24"), b'{"PublicIP":"198.18.0.155","BackendType":"vx\xc3\x28lan"}', "invalid UTF-8 inside"),
        (k("10.244.156.0-24"), b'{"PublicIP":7}', "PublicIP is a number"),
        (k("10.244.157.0-24"), b"[]", "a list"),
        (k("10.244.158.0-24"), b"null", "null"),
        (k("10.244.159.0-24"), b'"text"', "a string"),
        (k("10.244.161.0-24"), b"12", "a number"),
        (k("10.244.162.0-24"), b'{"PublicIP":"198.18.0.162","BackendType":["vxlan"]}', "BackendType is a list"),
        (k("10.244.163.0-24"), b'{"PublicIP":"198.18.0.163","BackendType":"vxlan","BackendData":{"VtepMAC":12}}',
         "VtepMAC is a number"),
        (k("10.244.164.0-24"), b'{"PublicIP":"198.18.0.164","BackendType":"vxlan","BackendData":"nope"}',
         "BackendData is a string"),
        (k("10.244.165.0-24"), b'{"PublicIP":"999.1.1.1","BackendType":"vxlan"}', "PublicIP is not an address"),
        (k("10.244.166.0-24"), b'{"PublicIP":"198.18.0.166","PublicIPv6":5}', "PublicIPv6 is a number"),
        (k("10.244.167.0-24"), b'{"PublicIP":"198.18.0.167"', "truncated JSON"),
        (k("garbage"), good, "not a subnet key"),
        (k("10.244.300.0-24"), good, "octet out of range"),
        (k("10.244.168.0-99"), good, "prefix length out of range"),
        (k("10.244.169.0-24/extra"), good, "a key below a subnet key"),
        (k(b"\xff\xfe-24"), good, "a non-UTF-8 key"),
        (k("10.244.171.5-24"), good, "host bits set"),
        (k("10.244.172.0-24&zz::-64"), good, "bad IPv6 part"),
        (k(""), good, "empty name"),
    ]


def test_garbage_records_crash_no_agent_and_good_leases_still_arrive(lab: Lab, figure: Figure) -> None:
    records = garbage()
    h2 = list(lab.hosts)[1]
    good1, good2 = "10.244.180.0/24", "10.244.181.0/24"
    ps = ring_pingers(lab)
    results: list[tuple[str, pt.PingResult]] = []
    try:
        for k, v, _why in records:
            put(lab, k, v)
        figure("garbage records written", len(records))
        figure("largest garbage value", max(len(v) for _, v, _ in records), "bytes")
        put(lab, etcd_key(good1), fake_vxlan_lease("198.18.0.180", fake_mac(180)))
        figure("good lease written after the garbage reached every agent",
               wait_routed(lab, good1, "a good lease written after the garbage"), "s")
        assert not dead_agents(lab), f"agents exited on garbage records: {dead_agents(lab)}" + lab_logs(lab, 25)
        # an agent (re)starting with the garbage present
        t0 = time.monotonic()
        lab.restart_agent(h2)
        figure("restart with the garbage present, to ready", time.monotonic() - t0, "s")
        put(lab, etcd_key(good2), fake_vxlan_lease("198.18.0.181", fake_mac(181)))
        figure("good lease written after the restart reached every agent",
               wait_routed(lab, good2, "a good lease written after the restart"), "s")
        assert good1 in kernel_routes(lab, h2), "the restarted agent lost a good lease"
        assert not dead_agents(lab), f"agents exited: {dead_agents(lab)}" + lab_logs(lab, 25)
        m = pt.wait_full_matrix(lab.pods(), time.monotonic() + 30)
        assert all(m.values()), pt.format_matrix(lab.pods(), m) + lab_logs(lab)
        log = lab.log_file(next(iter(lab.hosts))).read_text(errors="replace")
        figure("log lines naming the deep-nesting record (h1)", log.count("10.244.150.0-24"))
        figure("log size after the garbage (h1)", len(log), "bytes")
    finally:
        results = stop_pingers(ps)
        for k, _v, _why in records:
            delete(lab, k)
        cleanup_keys(lab, [good1, good2])
    assert report_echoes(figure, results) == 0, f"pods lost echoes: {[(n, r.lost) for n, r in results]}"


def test_compaction_while_an_agent_is_paused_leaves_kernel_equal_to_the_store(lab: Lab, figure: Figure) -> None:
    """SIGSTOP an agent, make 200 adds/changes/deletes, compact etcd, SIGCONT: its routes, neigh and
    fdb entries must equal what the final store says, exactly (stale MACs gone, new ones in).

    Deterministic: before the first change the paused agent's connection to etcd is cut (dropped
    both ways, and kept dead after ``heal``, which lets new connections through), so not one of the
    changes reaches its watch. After SIGCONT it notices the dead connection (gRPC keepalive),
    watches again on a new one from the revision after the last event it saw, which the compaction
    removed: it must relist (and say so), not crash-loop or miss a change."""
    host = next(iter(lab.hosts))
    agent = lab.agent(host)
    assert agent.pid is not None
    assert lab.underlay is not None and lab.etcd is not None and isinstance(lab.etcd.client_port, int)
    rng = random.Random(8)
    pool = [f"10.244.{i}.0/24" for i in range(128, 255)]
    state: dict[str, dict[str, Any]] = {}
    bh = Blackhole(lab.hosts[host].ns, str(lab.underlay.hub_ip), lab.etcd.client_port)

    def expect_all() -> dict[str, str]:
        leases = etcd_leases(lab)
        return {h: d for h in lab.hosts
                if (d := vxlan_state(lab, h).diff(expected_vxlan_state(leases, lab.hosts[h].subnet)))}

    try:
        for i, s in enumerate(pool[:60]):
            state[s] = fake_vxlan_lease(f"198.18.1.{i + 1}", fake_mac(i))
            put(lab, etcd_key(s), state[s])
        wait_for(lambda: not expect_all(), "60 fake peers programmed everywhere", timeout=90, interval=0.5,
                 on_timeout=lambda: str(expect_all()) + lab_logs(lab))
        log_before = len(agent.log_text())
        counts = {"add": 0, "change": 0, "delete": 0}
        os.kill(agent.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            cut = bh.cut()
            assert cut, f"the paused agent on {host} has no connection to etcd to cut"
            rev = 0
            for n in range(200):
                i = rng.randrange(len(pool))
                s = pool[i]
                if s not in state:
                    state[s] = fake_vxlan_lease(f"198.18.1.{i + 1}", fake_mac(i, n % 250 + 1))
                    counts["add"] += 1
                    rev = put(lab, etcd_key(s), state[s])
                elif rng.random() < 0.6:
                    ip = f"198.18.{rng.choice((1, 2))}.{i + 1}"
                    state[s] = fake_vxlan_lease(ip, fake_mac(i, n % 250 + 1))
                    counts["change"] += 1
                    rev = put(lab, etcd_key(s), state[s])
                else:
                    del state[s]
                    counts["delete"] += 1
                    rev = delete(lab, etcd_key(s))
            assert lab.etcd is not None
            lab.etcd.v3("/v3/kv/compaction", {"revision": rev, "physical": True})
            bh.heal()  # new connections only: the one the paused agent watched on stays dead
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        t0 = time.monotonic()
        for what, n in counts.items():
            figure(f"{what}s while paused", n)
        figure("paused for", t0 - t_stop, "s")
        wait_for(lambda: not expect_all(), "kernel state == final store state on every host", timeout=150,
                 interval=0.5, on_timeout=lambda: f"differences: {expect_all()}" + lab_logs(lab))
        figure("kernel equal to the store after SIGCONT", time.monotonic() - t0, "s")
        figure("peers in the final store", len(etcd_leases(lab)))
        after = agent.log_text()[log_before:]
        relisted = "compacted" in after and "listing all leases again" in after
        figure("the paused agent relisted because of the compaction", relisted)
        assert relisted, "the paused agent did not log a relist due to compaction:\n" + after[-3000:]
        assert lab.agent_alive(host), "the paused agent exited" + lab_logs(lab)
    finally:
        bh.close()
        cleanup_keys(lab, pool)


def test_host_cut_off_from_etcd_longer_than_its_ttl_comes_back_with_the_same_subnet(lab: Lab, figure: Figure) -> None:
    ttl = 10
    assert lab.underlay is not None and lab.etcd is not None and isinstance(lab.etcd.client_port, int)
    h1, h2, h3 = list(lab.hosts)
    subnet, ip = lab.hosts[h3].subnet, lab.hosts[h3].ip
    p1, p3 = lab.pods([h1])[0], lab.pods([h3])[0]
    assert lab.restart_agent(h3, extra=[f"--subnet-lease-ttl={ttl}"]) == IPv4Network(subnet)
    bh = Blackhole(lab.hosts[h3].ns, str(lab.underlay.hub_ip), lab.etcd.client_port)
    try:
        wait_routed(lab, subnet, "peers to route the restarted host", hosts=[h1, h2])
        bh.cut()
        t_cut = time.monotonic()
        wait_for(lambda: subnet not in etcd_leases(lab), f"{h3}'s key to expire ({ttl} s TTL)", timeout=ttl + 60,
                 interval=0.2, on_timeout=lambda: lab_logs(lab))
        figure("key expired after the cut", time.monotonic() - t_cut, "s")
        wait_for(lambda: all(subnet not in kernel_routes(lab, h) for h in lab.hosts if h != h3),
                 "peers to remove the expired host", timeout=60, on_timeout=lambda: lab_logs(lab))
        figure("peers removed it after the cut", time.monotonic() - t_cut, "s")
        while time.monotonic() - t_cut < 1.5 * ttl:  # stay cut off well past the TTL
            assert lab.agent_alive(h3), "the cut-off agent exited" + lab_logs(lab)
            time.sleep(0.5)
        assert lab.agent_alive(h3), "the cut-off agent exited" + lab_logs(lab)
        bh.heal(old_connections=True)
        t_heal = time.monotonic()
        figure("cut off for", t_heal - t_cut, "s")
        value = wait_for(lambda: etcd_leases(lab).get(subnet), "the same subnet to be leased again", timeout=60,
                         interval=0.2, on_timeout=lambda: lab_logs(lab))
        figure("same subnet re-acquired after healing", time.monotonic() - t_heal, "s")
        assert value["PublicIP"] == ip, f"{subnet} was re-leased to someone else: {value}"
        figure("peers route it again after healing", wait_routed(lab, subnet, "peers to route it again",
                                                                 hosts=[h1, h2]), "s")
        wait_for(lambda: pt.ping_once(p1.ns, p3.ip) and pt.ping_once(p3.ns, p1.ip), "pod traffic to resume",
                 timeout=60, interval=0.2, on_timeout=lambda: lab_logs(lab))
        figure("pod traffic resumed after healing", time.monotonic() - t_heal, "s")
        assert lab.agent_alive(h3) and lab.agent(h3).subnet() == IPv4Network(subnet), lab_logs(lab)
    finally:
        bh.close()
        if lab.agent_alive(h3):
            lab.restart_agent(h3)  # back to the lab's default TTL


def test_etcd_host_vanishing_without_a_reset_is_noticed_after_healing(lab: Lab, figure: Figure) -> None:
    """Packets between h1 and etcd dropped for 20 s (no RST, no FIN). The connections that were open
    stay dead afterwards (a replacement host or load balancer never knew them); the agent must
    notice by itself and reconnect, and a lease written meanwhile must reach it within 60 s."""
    assert lab.underlay is not None and isinstance(lab.etcd, object) and lab.etcd is not None
    h1 = next(iter(lab.hosts))
    others = [h for h in lab.hosts if h != h1]
    meanwhile = "10.244.140.0/24"
    bh = Blackhole(lab.hosts[h1].ns, str(lab.underlay.hub_ip), lab.etcd.client_port)  # type: ignore[union-attr]
    try:
        conns = bh.cut()
        t_cut = time.monotonic()
        figure("agent connections to etcd blackholed", len(conns))
        assert conns, "the agent had no connection to etcd to cut (the scenario needs one)"
        put(lab, etcd_key(meanwhile), fake_vxlan_lease("198.18.0.140", fake_mac(140)))
        wait_routed(lab, meanwhile, "the other agents to get the lease", hosts=others)
        while time.monotonic() - t_cut < 20:
            assert lab.agent_alive(h1), "the agent exited while etcd was unreachable" + lab_logs(lab)
            time.sleep(0.5)
        bh.heal()
        t_heal = time.monotonic()
        figure("store unreachable for", t_heal - t_cut, "s")
        wait_routed(lab, meanwhile, "the lease written meanwhile to reach the cut-off agent within 60 s of healing",
                    timeout=60, hosts=[h1])
        figure("lease written meanwhile arrived after healing", time.monotonic() - t_heal, "s")
        assert lab.agent_alive(h1), lab_logs(lab)
    finally:
        bh.close()
        cleanup_keys(lab, [meanwhile])
