"""Real agents (``python -m flannel`` processes) in host namespaces against a real etcd.

One underlay (hub namespace + bridge) and one etcd inside the hub serve the whole module; each
test uses its own etcd prefix and its own hosts, so tests do not see each other's leases. Agents
use the ``alloc`` backend (leases only); their logs are in tmp_path and the tail is printed when
an agent misbehaves (AgentFailed carries it).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel.config import parse_network_config
from flannel.lab.agent import AgentProcess
from flannel.lab.etcd import EtcdServer
from flannel.lab.netns import cleanup_prefix, run_prefix
from flannel.lab.topology import Host, Underlay
from flannel.traffic import iptables as ipt
from tests import support as waiting

pytestmark = [pytest.mark.root, pytest.mark.etcd]

CONFIG = '{"Network": "10.9.0.0/16", "SubnetLen": 24, "Backend": {"Type": "alloc"}}'
HEALTH_PORT = 8471
_counter = itertools.count(1)


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20.0, agents: tuple[AgentProcess, ...] = ()) -> Any:
    return waiting.wait_for(cond, what, timeout=timeout, on_timeout=lambda: "\n".join(a.log_tail() for a in agents))


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Underlay, EtcdServer]]:
    prefix = run_prefix()
    underlay = Underlay(prefix)
    etcd = EtcdServer(host=str(underlay.hub_ip), netns=underlay.hub.name, memory=True)  # 4 s leases below
    try:
        etcd.start()
        yield underlay, etcd
    finally:
        etcd.close()
        underlay.close()
        cleanup_prefix(prefix)


class Cluster:
    """One test's slice of the lab: an etcd prefix, hosts, agents."""

    def __init__(self, underlay: Underlay, etcd: EtcdServer, workdir: Path) -> None:
        self.underlay, self.etcd, self.workdir = underlay, etcd, workdir
        self.prefix = f"/test{next(_counter)}/network"
        self.hosts: list[Host] = []
        self.agents: list[AgentProcess] = []

    def put_config(self, text: str = CONFIG) -> None:
        self.etcd.etcdctl("put", f"{self.prefix}/config", text)

    def agent(self, *extra: str, host: Host | None = None, health: bool = True,
              env: dict[str, str] | None = None) -> AgentProcess:
        if host is None:
            host = self.underlay.add_host(f"a{len(self.underlay.hosts) + 1}-{next(_counter)}")
            self.hosts.append(host)
        a = AgentProcess(host.name, netns=host.ns.name, workdir=self.workdir, env=env,
                         healthz_port=HEALTH_PORT if health else None,
                         args=["--etcd-endpoints", self.etcd.endpoint, "--etcd-prefix", self.prefix,
                               "--iface", "eth0", *extra])
        self.agents.append(a)
        return a

    def host_of(self, agent: AgentProcess) -> Host:
        return next(h for h in self.hosts if h.ns.name == agent.netns)

    def keys(self) -> dict[str, dict[str, Any]]:
        """subnet key name → {"value": decoded JSON, "lease": etcd lease id (0 = none)}."""
        out = json.loads(self.etcd.etcdctl("get", "--prefix", f"{self.prefix}/subnets/", "-w", "json"))
        import base64
        res = {}
        for kv in out.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
            res[key] = {"value": json.loads(base64.b64decode(kv["value"])), "lease": int(kv.get("lease", 0))}
        return res

    def close(self) -> None:
        for a in self.agents:
            a.kill()
        for h in self.hosts:
            self.underlay.remove_host(h.name)


@pytest.fixture
def cluster(lab: tuple[Underlay, EtcdServer], tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(*lab, tmp_path)
    try:
        yield c
    finally:
        c.close()


def key_of(subnet: IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


def test_two_agents_get_different_subnets_and_see_each_other(cluster: Cluster) -> None:
    cluster.put_config()
    a, b = cluster.agent().start(), cluster.agent().start()
    env_a, env_b = a.wait_ready(), b.wait_ready()
    sa, sb = a.subnet(), b.subnet()
    assert sa != sb and sa.subnet_of(IPv4Network("10.9.0.0/16")) and sb.prefixlen == 24
    keys = cluster.keys()
    assert set(keys) == {key_of(sa), key_of(sb)}
    assert keys[key_of(sa)]["value"]["PublicIP"] == str(cluster.host_of(a).ip)
    assert keys[key_of(sb)]["value"]["PublicIP"] == str(cluster.host_of(b).ip)
    assert keys[key_of(sa)]["lease"] != 0  # a real lease with a TTL, not a reservation
    # subnet.env: content and mode
    assert env_a == {"FLANNEL_NETWORK": "10.9.0.0/16", "FLANNEL_SUBNET": f"{sa.network_address + 1}/24",
                     "FLANNEL_MTU": "1500", "FLANNEL_IPMASQ": "false"}
    assert Path(a.subnet_file).read_text() == "".join(f"{k}={v}\n" for k, v in env_a.items())
    assert Path(a.subnet_file).stat().st_mode & 0o777 == 0o644
    assert env_b["FLANNEL_SUBNET"] == f"{sb.network_address + 1}/24"
    # health endpoints
    assert a.http_get("/healthz") == (200, "flanneld is running")
    assert a.http_get("/readyz") == (200, "flanneld is ready")
    assert a.http_get("/nope")[0] == 404
    wait_for(lambda: a.remote_subnets() == {str(sb)} and b.remote_subnets() == {str(sa)},
             "each agent to see the other's lease", agents=(a, b))
    # SIGTERM → exit 0 promptly; the lease stays (flannel leaves it for a restart)
    assert a.stop(timeout=10) == 0 and b.stop(timeout=10) == 0
    assert "Exiting cleanly" in a.log_text()
    assert set(cluster.keys()) == {key_of(sa), key_of(sb)}


def test_thirty_agents_fill_a_thirty_subnet_network(cluster: Cluster) -> None:
    text = '{"Network": "10.9.0.0/22", "SubnetLen": 27, "Backend": {"Type": "alloc"}}'
    config = parse_network_config(text)
    assert config.subnet_count == 31  # /22 holds 32 /27s; flannel's default SubnetMin skips the first
    cluster.put_config(text)
    # a reservation of some absent host takes one more: exactly 30 free subnets are left
    cluster.etcd.etcdctl("put", f"{cluster.prefix}/subnets/10.9.2.0-27",
                         json.dumps({"PublicIP": "198.18.0.253", "PublicIPv6": None}))
    agents = [cluster.agent(health=False) for _ in range(30)]
    for a in agents:
        a.start()
    subnets = []
    for a in agents:
        a.wait_ready(timeout=120)
        subnets.append(a.subnet())
    assert len(set(subnets)) == 30
    expected = {IPv4Network((n, 27)) for n in config.subnet_candidates()} - {IPv4Network("10.9.2.0/27")}
    assert len(expected) == 30 and set(subnets) == expected
    assert set(cluster.keys()) == {key_of(s) for s in expected} | {"10.9.2.0-27"}
    assert cluster.keys()["10.9.2.0-27"]["value"]["PublicIP"] == "198.18.0.253"  # untouched
    assert all(a.running for a in agents)
    # one more agent: the network is full, a clear error and exit 1
    extra = cluster.agent(health=False).start()
    assert extra.wait_exit(60) == 1
    assert "10.9.0.0/22" in extra.log_text() and not Path(extra.subnet_file).exists()
    for a in agents:
        a.proc.terminate()  # type: ignore[union-attr]
    assert [a.wait_exit(20) for a in agents] == [0] * 30


def test_restart_keeps_the_subnet(cluster: Cluster) -> None:
    cluster.put_config()
    a = cluster.agent().start()
    a.wait_ready()
    first = a.subnet()
    lease_before = cluster.keys()[key_of(first)]["lease"]
    assert a.stop(signal.SIGINT) == 0
    a.start()
    a.wait_ready()
    assert a.subnet() == first
    assert set(cluster.keys()) == {key_of(first)}
    assert cluster.keys()[key_of(first)]["lease"] not in (0,)
    assert lease_before != 0


def test_deleted_key_is_reacquired(cluster: Cluster) -> None:
    cluster.put_config()
    a = cluster.agent().start()
    a.wait_ready()
    subnet = a.subnet()
    cluster.etcd.etcdctl("del", f"{cluster.prefix}/subnets/{key_of(subnet)}")
    keys = wait_for(lambda: cluster.keys() or None, "the key to reappear", agents=(a,))
    assert set(keys) == {key_of(subnet)}
    assert keys[key_of(subnet)]["value"]["PublicIP"] == str(cluster.host_of(a).ip)
    assert a.running
    assert a.debug_leases()["own"]["subnet"] == str(subnet)


def test_reservation_survives_its_owner_restart(cluster: Cluster) -> None:
    cluster.put_config()
    host = cluster.underlay.add_host(f"r{next(_counter)}")
    cluster.hosts.append(host)
    key = f"{cluster.prefix}/subnets/10.9.77.0-24"
    cluster.etcd.etcdctl("put", key, json.dumps({"PublicIP": str(host.ip), "PublicIPv6": None}))
    a = cluster.agent(host=host).start()
    a.wait_ready()
    assert a.subnet() == IPv4Network("10.9.77.0/24")
    assert cluster.keys()["10.9.77.0-24"]["lease"] == 0  # still a reservation (no TTL)
    assert a.stop() == 0
    a.start()
    a.wait_ready()
    assert a.subnet() == IPv4Network("10.9.77.0/24")
    assert cluster.keys()["10.9.77.0-24"]["lease"] == 0


def test_broken_config_in_etcd_exits_1_naming_the_field(cluster: Cluster) -> None:
    cluster.put_config('{"Network": "10.9.0.0/16", "SubnetLen": 31, "Backend": {"Type": "alloc"}}')
    a = cluster.agent().start()
    assert a.wait_exit(30) == 1
    assert "SubnetLen" in a.log_text()
    assert not Path(a.subnet_file).exists()
    assert cluster.keys() == {}


def test_agents_survive_an_etcd_outage(cluster: Cluster) -> None:
    """etcd down for 10 s: agents keep running; a lease added after the restart reaches them."""
    cluster.put_config()
    a, b = cluster.agent().start(), cluster.agent().start()
    a.wait_ready(), b.wait_ready()
    wait_for(lambda: len(a.remote_subnets()) == 1, "a to see b", agents=(a,))
    cluster.etcd.stop()
    c = cluster.agent()
    try:
        c.start()  # an agent that starts during the outage waits for etcd
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the outage itself (the scenario is "10 s without etcd")
            assert a.running and b.running and c.running, a.log_tail() + b.log_tail() + c.log_tail()
            time.sleep(0.5)
        assert not Path(c.subnet_file).exists()
        assert "network config not available yet" in c.log_text()
    finally:
        cluster.etcd.start()
    cluster.etcd.etcdctl("put", f"{cluster.prefix}/subnets/10.9.200.0-24",
                         json.dumps({"PublicIP": "198.18.0.250", "PublicIPv6": None, "BackendType": "alloc"}))
    for agent in (a, b):
        wait_for(lambda agent=agent: "10.9.200.0/24" in agent.remote_subnets(), "the new lease after the outage",
                 timeout=30, agents=(agent,))
    c.wait_ready()
    assert len({a.subnet(), b.subnet(), c.subnet()}) == 3
    assert a.running and b.running
    assert {key_of(a.subnet()), key_of(b.subnet()), key_of(c.subnet())} <= set(cluster.keys())
    wait_for(lambda: str(c.subnet()) in a.remote_subnets(), "a to see the agent that started during the outage",
             agents=(a,))
    assert a.stop() == 0 and b.stop() == 0 and c.stop() == 0


def test_short_ttl_is_renewed(cluster: Cluster) -> None:
    """A 4 s lease outlives several TTLs because the agent renews it (same key, same subnet)."""
    cluster.put_config()
    a = cluster.agent("--subnet-lease-ttl", "4").start()
    a.wait_ready()
    key = key_of(a.subnet())
    lease_id = cluster.keys()[key]["lease"]
    ttl = json.loads(cluster.etcd.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json"))
    assert 0 < ttl["granted-ttl"] <= 4
    end = time.monotonic() + 10
    while time.monotonic() < end:  # 2.5 TTLs: without renewals the key would be gone
        live = cluster.keys()  # a fresh read of etcd, not a dict view
        assert key in live, f"{a.log_tail()}\n{cluster.etcd.log_tail()}"
        time.sleep(0.5)
    assert a.running and a.subnet() == IPv4Network(key.replace("-", "/"))
    assert "Lease renewed" in a.log_text() and "acquiring a lease again" not in a.log_text()


LEGACY_TOOLS = ("iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save")


def legacy_iptables_env(tmp: Path) -> dict[str, str]:
    """An environment where ``iptables*`` is iptables-legacy (which takes the xtables lock;
    iptables-nft, this machine's default, needs none) and the lock is a private file, so that
    holding it blocks only our agent, never the machine's real /run/xtables.lock."""
    shim = tmp / "legacy-bin"
    shim.mkdir()
    for tool in LEGACY_TOOLS:
        target = shutil.which(tool.replace("tables", "tables-legacy", 1))
        assert target, f"{tool}-legacy not installed (iptables package)"
        (shim / tool).symlink_to(target)
    return {"PATH": f"{shim}:{os.environ['PATH']}", "XTABLES_LOCKFILE": str(tmp / "xtables.lock")}


# holds the lock the way iptables takes it (flock(2) on the lock file) until it is terminated
LOCK_HOLDER = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
               "print('locked', flush=True); time.sleep(600)")


@pytest.mark.skipif(not shutil.which("iptables-legacy"), reason="needs iptables-legacy (Debian's iptables package)")
def test_xtables_lock_held_60s_the_agent_survives_and_repairs_the_rules(cluster: Cluster, tmp_path: Path) -> None:
    """Another process holds the xtables lock for 60 s while someone deletes one of our rules.
    Before: the resync's ``iptables -w`` hit its 30 s subprocess timeout, the traffic thread died
    and the agent exited 1. Now: it waits, reports the busy lock in /healthz?verbose, keeps
    running, and repairs the rule once the lock is free (exactly once: no duplicate jump rule)."""
    env = legacy_iptables_env(tmp_path)
    lock = env["XTABLES_LOCKFILE"]
    cluster.put_config()
    a = cluster.agent("--ip-masq", "--iptables-resync", "1", env=env).start()
    a.wait_ready()
    ns = cluster.host_of(a).ns
    expected = [r.line() for r in ipt.masq_rules(IPv4Network("10.9.0.0/16"), a.subnet())]
    expected_fwd = [r.line() for r in ipt.forward_rules(IPv4Network("10.9.0.0/16"))]

    def rules(table: str) -> list[str]:
        return [ln for ln in ns.exec("iptables-legacy-save", "-t", table).splitlines() if ln.startswith("-A ")]
    assert rules("nat") == expected and rules("filter") == expected_fwd
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        # someone deletes our jump rule meanwhile (with another lock file: only our agent is blocked)
        ns.exec("env", f"XTABLES_LOCKFILE={tmp_path / 'other.lock'}", "iptables-legacy", "-t", "nat", "-D",
                "POSTROUTING", "-m", "comment", "--comment", ipt.MASQ_COMMENT, "-j", ipt.POSTRTG)
        held_until = time.monotonic() + 60
        while time.monotonic() < held_until:
            assert a.running, f"the agent exited while the xtables lock was held\n{a.log_tail()}"
            time.sleep(0.5)
        assert rules("nat") == expected[1:], "the rule came back while the lock was held: the test proves nothing"
        traffic = a.http_get("/healthz?verbose=1")
        assert traffic[0] == 200, traffic           # 60 s of a busy lock is not a reason to restart the pod
        state = json.loads(traffic[1])["workers"]["traffic"]
        assert "could not take the xtables lock" in state["last_error"] and state["restarts"] >= 1, state
        assert a.http_get("/healthz") == (200, "flanneld is running")
    finally:
        holder.terminate()
        holder.wait(10)
    wait_for(lambda: rules("nat") == expected, "the masquerade rules to be repaired", timeout=90, agents=(a,))
    assert rules("filter") == expected_fwd
    assert a.running
    assert "could not take the xtables lock" in a.log_text() and "restarting it in" in a.log_text()
    wait_for(lambda: json.loads(a.http_get("/healthz?verbose=1")[1])["workers"]["traffic"]["state"] == "running",
             "the traffic thread running again", agents=(a,))
    assert a.stop() == 0
