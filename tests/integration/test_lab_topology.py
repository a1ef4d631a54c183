"""The lab underlay (flannel.lab.topology): the hub keeps its MAC when hosts join, so the hosts'
ARP entries for the hub address (etcd's, the API server's) stay right."""

from __future__ import annotations

import pytest

from flannel.lab.topology import Underlay

pytestmark = pytest.mark.root


def hub_mac(u: Underlay) -> str:
    return u.hub.ip("-br", "link", "show", "br0").split()[2]


def test_the_hub_keeps_its_mac_and_a_host_reaches_it_after_others_joined(ns_prefix: str) -> None:
    with Underlay(ns_prefix + "u") as u:
        first = u.add_host("h1")
        first.ns.exec("ping", "-c1", "-W2", str(u.hub_ip))   # h1 learns the hub's MAC now
        mac = hub_mac(u)
        learned = first.ns.ip("neigh", "show", str(u.hub_ip))
        assert mac in learned, learned
        for i in range(2, 12):   # each new port would have a 1-in-i chance of the lowest MAC
            u.add_host(f"h{i}")
        assert hub_mac(u) == mac
        first.ns.exec("ping", "-c1", "-W2", str(u.hub_ip))   # still through the entry learned before
