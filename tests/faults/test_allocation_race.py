"""Chaos: 30 agents started at once race for a network with exactly 30 subnets.

All 30 agents wait for the network config; it then appears at once, so they list the free
subnets and create their keys at about the same time. Every agent must end up with its own
subnet (all 30 used, none twice) and none may exit: a lost create race is retried with another
subnet (flannel exits 1 there). Then pods on the first and the last host ping each other across
the overlay.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from flannel.config import parse_network_config
from flannel.lab import podtraffic as pt
from flannel.lab.cluster import ETCD_PREFIX, Lab
from flannel.lab.etcd import EtcdServer
from flannel.lab.netns import tcp_connections
from tests.support import Figure, dead_agents, lab_logs, running_lab, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.root, pytest.mark.etcd]

AGENTS = 30
NETWORK = "10.244.0.0/16"
SUBNET_MIN, SUBNET_MAX = "10.244.1.0", "10.244.30.0"  # exactly 30 /24s


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab("vxlan", tmp_path_factory.mktemp("faults-race"), hosts=0, pods_per_host=0, network=NETWORK,
                           subnet_min=SUBNET_MIN, subnet_max=SUBNET_MAX, agent_timeout=300.0)


def test_thirty_agents_race_for_thirty_subnets(lab: Lab, figure: Figure) -> None:
    config_text = lab.config.network_config()
    config = parse_network_config(config_text)
    candidates = {IPv4Network((n, config.subnet_len)) for n in config.subnet_candidates()}
    assert len(candidates) == AGENTS, f"the network config must offer exactly {AGENTS} subnets: {candidates}"
    # All agents start without a config and poll for it (every second); the config then appears
    # at once, so all 30 list the free subnets and create their keys at about the same time.
    lab.etcdctl("del", f"{ETCD_PREFIX}/config")
    names = [lab.add_host(pods=0, wait=False) for _ in range(AGENTS)]
    assert lab.underlay is not None and isinstance(lab.etcd, EtcdServer)
    hub, port = str(lab.underlay.hub_ip), lab.etcd.client_port

    def waiting(n: str) -> bool:  # running, talking to etcd, no subnet yet
        return (lab.agent_alive(n) and bool(tcp_connections(lab.hosts[n].ns, hub, port))
                and not lab.subnet_file(n).exists())
    wait_for(lambda: all(waiting(n) for n in names), "every agent to wait for the config", timeout=300,
             interval=0.5, on_timeout=lambda: lab_logs(lab))
    lab.etcdctl("put", f"{ETCD_PREFIX}/config", config_text)
    t0 = time.monotonic()
    for n in names:
        lab.wait_subnet(n)
    figure("config written to all 30 agents ready", time.monotonic() - t0, "s")
    subnets = [IPv4Network(lab.hosts[n].subnet) for n in names]
    assert len(set(subnets)) == AGENTS, f"subnets handed out twice: {sorted(subnets)}"
    assert set(subnets) == candidates
    assert len(lab.lease_keys()) == AGENTS
    assert not dead_agents(lab), f"agents exited: {dead_agents(lab)}" + lab_logs(lab)
    races = [len(re.findall(r"lost a race", lab.log_file(h).read_text(errors="replace"))) for h in lab.hosts]
    figure("lost create races retried (all agents)", sum(races))
    figure("most retries by one agent", max(races))
    first, last = names[0], names[-1]
    a, b = lab.add_pods(first, 1)[0], lab.add_pods(last, 1)[0]
    t0 = time.monotonic()
    m = pt.wait_full_matrix([a, b], time.monotonic() + 60)
    assert all(m.values()), pt.format_matrix([a, b], m) + lab_logs(lab)
    figure("pods on h1 and h30 reach each other after", time.monotonic() - t0, "s")
    assert not dead_agents(lab), f"agents exited: {dead_agents(lab)}" + lab_logs(lab)
