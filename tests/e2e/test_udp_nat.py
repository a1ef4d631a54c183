"""e2e: udp peers behind ``--public-ip`` (issue 8 item 4), in the lab with real etcd and agents.

Host h2 is started with ``--public-ip`` = an address that is not on any interface, made real by
iptables in h2's namespace: DNAT of that address to h2's interface address on the way in, and SNAT
back to it on the way out (a 1:1 NAT, as a cloud's elastic IP); the hub and h1 route it to h2.

1. 1:1 NAT: h2's datagrams arrive from its PublicIP: pods ping across both ways, nothing else
   configured.
2. The same node behind an inbound-only NAT (SNAT removed): its datagrams now arrive from its
   interface address, which no lease names, so h1 drops them as ``drop_unknown_peer`` (the
   anti-spoof rule, docs/udp.md) until the operator lists that address in the udp option
   ``TrustedSources``; then pods ping across again.
"""

from __future__ import annotations

import ast
import json
import sys
import time
from collections.abc import Iterator

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import ETCD_PREFIX, Lab
from tests.support import build_lab

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e]

PUBLIC = "198.19.250.2"   # h2's --public-ip: on no interface, in the fake-peer range, no route out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = build_lab("udp", tmp_path_factory.mktemp("lab-udp-nat"), hosts=2, pods_per_host=1)
    yield lab
    lab.teardown(keep_dir=True)


def _sh(ns: str, *cmd: str) -> str:
    return pt.ns_exec(ns, *cmd, check=True).stdout


def _logs(lab: Lab) -> str:
    return "".join(f"\n--- {lab.log_file(h)} (tail)\n" + "\n".join(
        lab.log_file(h).read_text(errors="replace").splitlines()[-10:]) for h in lab.hosts)


def _assert_full(lab: Lab, deadline_s: float = 45) -> None:
    pods = lab.pods()
    m = pt.wait_full_matrix(pods, time.monotonic() + deadline_s)
    assert all(m.values()), "pods that cannot reach each other:\n" + pt.format_matrix(pods, m) + _logs(lab)


def _lease(lab: Lab, host: str) -> dict[str, object]:
    key = f"{ETCD_PREFIX}/subnets/{lab.hosts[host].subnet.replace('/', '-')}"
    return dict(json.loads(lab.etcdctl("get", key, "--print-value-only")))


def _counters_at_shutdown(lab: Lab, host: str) -> dict[str, int]:
    lines = [line for line in lab.log_file(host).read_text(errors="replace").splitlines()
             if "counters at shutdown:" in line]
    assert lines, "no counters at shutdown in the log" + _logs(lab)
    return dict(ast.literal_eval(lines[-1].split("counters at shutdown:", 1)[1].strip()))


def _restart_with_public_ip(lab: Lab, host: str) -> None:
    """Restart ``host`` with ``--public-ip`` on the subnet it had (its pods keep their addresses):
    its old lease, which names the interface address, is deleted first, so no lease in the store
    names that address any more and only the new PublicIP can identify the node."""
    subnet = lab.hosts[host].subnet
    assert lab.stop_agent(host)
    lab.delete_lease(host)
    lab.start_agent(host, extra=[f"--public-ip={PUBLIC}"])
    assert str(lab.wait_subnet(host)) == subnet, "the agent did not take its previous subnet back (subnet.env)"
    lab.save()
    assert len(lab.lease_keys()) == 2
    assert _lease(lab, host)["PublicIP"] == PUBLIC


def _snat(ns: str, op: str, iface_ip: str) -> None:
    _sh(ns, "iptables", "-w", "-t", "nat", op, "POSTROUTING", "-o", "eth0", "-s", iface_ip,
        "-j", "SNAT", "--to-source", PUBLIC)


def test_public_ip_behind_1to1_nat_then_inbound_only_nat(lab: Lab) -> None:
    assert lab.underlay is not None
    h1, h2 = list(lab.hosts)
    ip1, ip2, ns2 = lab.hosts[h1].ip, lab.hosts[h2].ip, lab.hosts[h2].ns
    _assert_full(lab)

    # --- 1. a real 1:1 NAT in h2's namespace; h2's agent advertises the NAT address
    _sh(ns2, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-d", PUBLIC,
        "-j", "DNAT", "--to-destination", ip2)
    _snat(ns2, "-A", ip2)
    for ns in (lab.underlay.hub.name, lab.hosts[h1].ns):
        _sh(ns, "ip", "route", "add", f"{PUBLIC}/32", "via", ip2)
    _restart_with_public_ip(lab, h2)
    _assert_full(lab)
    # the datagrams really came through the NAT: h2's conntrack shows the overlay flow translated
    ct = pt.ns_exec(ns2, sys.executable, "-c", "from pyroute2 import Conntrack\n"
                    "for e in Conntrack().dump(): print(e)", check=True).stdout
    assert PUBLIC in ct and ip1 in ct, ct[-2000:]

    # --- 2. inbound-only NAT: the NAT moves to the hub (a NAT router in front of h2), while h2
    # reaches h1 directly on the LAN: h2's datagrams now come from its interface address, which
    # no lease names
    hub = lab.underlay.hub.name
    _snat(ns2, "-D", ip2)
    _sh(ns2, "iptables", "-w", "-t", "nat", "-F", "PREROUTING")
    pt.ns_exec(ns2, sys.executable, "-c", "from pyroute2 import Conntrack; Conntrack().flush()", check=True)
    _sh(lab.hosts[h1].ns, "ip", "route", "del", f"{PUBLIC}/32")        # h1 → PUBLIC: default route, the hub
    _sh(hub, "ip", "route", "del", f"{PUBLIC}/32")
    for setting in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.br0.send_redirects=0", "net.bridge.bridge-nf-call-iptables=0"):
        _sh(hub, "sysctl", "-qw", setting)   # route, don't redirect h1 to h2, don't NAT bridged h2 → h1
    _sh(hub, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-d", PUBLIC, "-j", "DNAT", "--to-destination", ip2)
    p1, p2 = lab.pods([h1])[0], lab.pods([h2])[0]
    lab.restart_agent(h1)   # a clean counter set on h1
    assert not pt.ping_once(p2.ns, p1.ip, count=4), "h1 accepted datagrams from an address no lease names"
    assert lab.stop_agent(h1)
    c = _counters_at_shutdown(lab, h1)
    assert c["drop_unknown_peer"] >= 1 and c["drop_spoofed"] == 0, c
    # the operator declares h2's sending address: the agents that read the config accept it
    config = json.loads(lab.etcdctl("get", f"{ETCD_PREFIX}/config", "--print-value-only"))
    config["Backend"]["TrustedSources"] = [f"{ip2}/32"]
    lab.etcdctl("put", f"{ETCD_PREFIX}/config", json.dumps(config))
    lab.start_agent(h1)
    lab.wait_subnet(h1)
    _assert_full(lab)
    assert lab.stop_agent(h1)
    c = _counters_at_shutdown(lab, h1)
    assert c["tun_tx_packets"] > 0 and c["drop_spoofed"] == 0, c
    lab.start_agent(h1)
    lab.wait_subnet(h1)
