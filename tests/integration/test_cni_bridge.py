"""The CNI plugin end to end with Debian's real bridge and host-local plugins, in namespaces.

Layout per test: a "host" namespace (where the plugin runs, like kubelet's namespace on a node,
so the bridge and any iptables rules land there, never in the machine's own namespace) and pod
namespaces; subnet.env, the plugin's dataDir and host-local's dataDir in tmp_path; a per-test
bridge name. Checked with iproute2 and the files host-local keeps, not with the plugin's own output.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flannel.cni import errors as cerr
from flannel.cni import install
from flannel.lab.netns import NetNS, run

pytestmark = pytest.mark.root

CNI_BIN = "/usr/lib/cni"
NETWORK = ipaddress.ip_network("10.99.0.0/16")
SUBNET = ipaddress.ip_network("10.99.7.0/24")
MTU = 1400

if not (os.path.exists(f"{CNI_BIN}/bridge") and os.path.exists(f"{CNI_BIN}/host-local")):
    pytestmark = [pytest.mark.root,
                  pytest.mark.skip(reason="containernetworking-plugins not installed (scripts/setup)")]


class Node:
    """One test "node": host namespace, subnet.env, data dirs, and a way to call the plugin."""

    def __init__(self, prefix: str, tmp: Path, *, ipmasq: bool = True, ipv6: bool = False) -> None:
        self.prefix, self.tmp = prefix, tmp
        self.host = NetNS(prefix + "host")
        self.bridge = prefix + "br"
        self.subnet_env = tmp / "subnet.env"
        lines = [f"FLANNEL_NETWORK={NETWORK}", f"FLANNEL_SUBNET={SUBNET.network_address + 1}/{SUBNET.prefixlen}"]
        if ipv6:
            lines += ["FLANNEL_IPV6_NETWORK=fd99:1::/48", "FLANNEL_IPV6_SUBNET=fd99:1:0:7::1/64"]
        lines += [f"FLANNEL_MTU={MTU}", f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}"]
        self.subnet_env.write_text("\n".join(lines) + "\n")
        self.data_dir = tmp / "flannel-data"
        self.ipam_dir = tmp / "ipam"
        self.cmd = [sys.executable, "-m", "flannel.cni"]

    def conf(self, **extra) -> dict:
        c = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
             "subnetFile": str(self.subnet_env), "dataDir": str(self.data_dir),
             "delegate": {"bridge": self.bridge}, "ipam": {"dataDir": str(self.ipam_dir)}}
        c.update(extra)
        return c

    def pod(self, name: str) -> NetNS:
        return NetNS(self.prefix + name)

    def cni(self, command: str, pod: NetNS | None, cid: str, conf: dict | None = None, *, cmd=None):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": f"/run/netns/{pod.name}" if pod else "", "CNI_IFNAME": "eth0", "CNI_PATH": CNI_BIN}
        args = ["ip", "netns", "exec", self.host.name, "env", "-i"] + [f"{k}={v}" for k, v in env.items()]
        res = subprocess.run(args + (cmd or self.cmd), input=json.dumps(conf or self.conf()).encode(),
                             capture_output=True, timeout=60)
        out = json.loads(res.stdout) if res.stdout.strip() else None
        return res.returncode, out

    def add(self, pod: NetNS, cid: str, **kw) -> dict:
        rc, out = self.cni("ADD", pod, cid, **kw)
        assert rc == 0, out
        return out

    def allocated(self) -> set[str]:
        d = self.ipam_dir / "cbr0"
        return {p.name for p in d.iterdir() if p.name[0].isdigit()} if d.exists() else set()

    def host_veths(self) -> list[str]:
        out = json.loads(self.host.ip("-j", "link", "show", "master", self.bridge) or "[]")
        return [link["ifname"] for link in out]


@pytest.fixture
def node(ns_prefix, tmp_path):
    return Node(ns_prefix, tmp_path)


def pod_addr(pod: NetNS) -> tuple[ipaddress.IPv4Interface, int]:
    info = json.loads(pod.ip("-j", "addr", "show", "dev", "eth0"))[0]
    v4 = [a for a in info["addr_info"] if a["family"] == "inet"]
    assert len(v4) == 1
    return ipaddress.ip_interface(f"{v4[0]['local']}/{v4[0]['prefixlen']}"), info["mtu"]


def test_add_check_del_lifecycle(node):
    pod = node.pod("p1")
    result = node.add(pod, "ctr1")
    assert result["cniVersion"] == "1.0.0"
    # the pod's eth0: an address in the node's subnet (not the gateway), the flannel MTU
    addr, mtu = pod_addr(pod)
    assert addr.ip in SUBNET and addr.ip != SUBNET.network_address + 1
    assert mtu == MTU
    assert [ip["address"] for ip in result["ips"]] == [str(addr)]
    # routes: the cluster network and the default via the bridge address
    routes = {r["dst"]: r.get("gateway") for r in json.loads(pod.ip("-j", "route", "show"))}
    assert routes[str(NETWORK)] == str(SUBNET.network_address + 1)
    assert routes["default"] == str(SUBNET.network_address + 1)
    # the host side: bridge with the gateway address, one veth in it, hairpin on
    br = json.loads(node.host.ip("-j", "addr", "show", "dev", node.bridge))[0]
    addrs = {f"{a['local']}/{a['prefixlen']}" for a in br["addr_info"]}
    assert f"{SUBNET.network_address + 1}/{SUBNET.prefixlen}" in addrs
    veths = node.host_veths()
    assert len(veths) == 1
    assert "hairpin on" in run("ip", "netns", "exec", node.host.name, "bridge", "-d", "link", "show", "dev", veths[0])
    assert node.allocated() == {str(addr.ip)}
    assert (node.data_dir / "ctr1").exists()

    # CHECK with the ADD result passes
    rc, out = node.cni("CHECK", pod, "ctr1", node.conf(prevResult=result))
    assert (rc, out) == (0, None)

    # DEL removes the veth, frees the address and forgets the container; a second DEL is a no-op
    rc, out = node.cni("DEL", pod, "ctr1", node.conf(prevResult=result))
    assert (rc, out) == (0, None)
    assert node.host_veths() == []
    assert node.allocated() == set()
    assert not (node.data_dir / "ctr1").exists()
    assert "eth0" not in pod.ip("link", "show")
    rc, out = node.cni("DEL", pod, "ctr1")
    assert (rc, out) == (0, None)


def test_check_fails_when_the_pod_lost_its_route(node):
    pod = node.pod("p1")
    result = node.add(pod, "ctr1")
    pod.ip("route", "del", str(NETWORK))
    rc, out = node.cni("CHECK", pod, "ctr1", node.conf(prevResult=result))
    assert rc != 0 and str(NETWORK.network_address) in out["msg"] and "delegate bridge CHECK failed" in out["msg"]


def test_two_pods_reach_each_other_one_through_the_installed_zipapp(node):
    a, b = node.pod("pa"), node.pod("pb")
    node.add(a, "ctr-a")
    # the second pod goes through the file `flannel-cni install` puts in a CNI bin dir
    plugin = install.install_plugin(str(node.tmp / "bin"), mode="zipapp", python=sys.executable)
    node.add(b, "ctr-b", cmd=[str(plugin)])
    ip_a, _ = pod_addr(a)
    ip_b, _ = pod_addr(b)
    assert ip_a.ip != ip_b.ip and {ip_a.ip, ip_b.ip} <= set(SUBNET)
    a.exec("ping", "-c", "1", "-W", "2", str(ip_b.ip))
    b.exec("ping", "-c", "1", "-W", "2", str(ip_a.ip))
    b.exec("ping", "-c", "1", "-W", "2", str(SUBNET.network_address + 1))  # the bridge (gateway)
    assert len(node.host_veths()) == 2


def test_del_works_after_subnet_env_is_gone(node):
    pod = node.pod("p1")
    node.add(pod, "ctr1")
    assert len(node.allocated()) == 1
    os.unlink(node.subnet_env)
    rc, out = node.cni("DEL", pod, "ctr1")
    assert (rc, out) == (0, None)
    assert node.allocated() == set() and node.host_veths() == []


def test_del_after_the_netns_is_gone_still_frees_the_address(node):
    pod = node.pod("p1")
    node.add(pod, "ctr1")
    pod.delete()  # the container died; the runtime calls DEL with an empty CNI_NETNS
    rc, out = node.cni("DEL", None, "ctr1")
    assert (rc, out) == (0, None)
    assert node.allocated() == set()


def test_delegate_error_is_passed_through_with_its_code(node):
    missing = node.pod("p1")
    missing.delete()
    rc, out = node.cni("ADD", missing, "ctr1")
    assert rc != 0
    assert isinstance(out["code"], int) and out["code"] > 0
    assert out["msg"].startswith("delegate bridge ADD failed:") and missing.name in out["msg"]
    assert node.allocated() == set()


def test_missing_subnet_env_creates_nothing(node):
    os.unlink(node.subnet_env)
    rc, out = node.cni("ADD", node.pod("p1"), "ctr1")
    assert rc != 0 and out["code"] == cerr.TRY_AGAIN_LATER
    assert node.bridge not in node.host.ip("link", "show")


def test_unknown_delegate_creates_nothing(node):
    rc, out = node.cni("ADD", node.pod("p1"), "ctr1", node.conf(delegate={"type": "no-such-plugin"}))
    assert rc != 0 and out["code"] == cerr.INVALID_NETWORK_CONFIG and "no-such-plugin" in out["msg"]
    assert node.bridge not in node.host.ip("link", "show") and node.allocated() == set()


def test_bridge_masquerades_when_the_agent_does_not(ns_prefix, tmp_path):
    node = Node(ns_prefix, tmp_path, ipmasq=False)
    pod = node.pod("p1")
    node.add(pod, "ctr1")
    addr, _ = pod_addr(pod)
    rules = node.host.exec("iptables-save", "-t", "nat")
    assert "MASQUERADE" in rules and f"{addr.ip}/32" in rules
    rc, _ = node.cni("DEL", pod, "ctr1")
    assert rc == 0
    assert f"{addr.ip}/32" not in node.host.exec("iptables-save", "-t", "nat")


def test_dual_stack_pod_gets_both_families(ns_prefix, tmp_path):
    node = Node(ns_prefix, tmp_path, ipv6=True)
    pod = node.pod("p1")
    result = node.add(pod, "ctr1")
    addrs = {ipaddress.ip_interface(ip["address"]) for ip in result["ips"]}
    assert {a.version for a in addrs} == {4, 6}
    v6 = next(a for a in addrs if a.version == 6)
    assert v6.ip in ipaddress.ip_network("fd99:1:0:7::/64")
    shown = json.loads(pod.ip("-j", "-6", "addr", "show", "dev", "eth0"))[0]["addr_info"]
    assert str(v6.ip) in {a["local"] for a in shown}
    routes6 = {r["dst"] for r in json.loads(pod.ip("-j", "-6", "route", "show"))}
    assert "fd99:1::/48" in routes6
    rc, _ = node.cni("DEL", pod, "ctr1")
    assert rc == 0 and node.allocated() == set()


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_result_is_in_the_requested_cni_version(node, version):
    pod = node.pod("p1")
    result = node.add(pod, "ctr1", conf=node.conf(cniVersion=version))
    assert result["cniVersion"] == version
    assert ipaddress.ip_interface(result["ips"][0]["address"]).ip in SUBNET
    assert json.loads((node.data_dir / "ctr1").read_text())["cniVersion"] == version
    rc, _ = node.cni("DEL", pod, "ctr1", node.conf(cniVersion=version))
    assert rc == 0 and node.allocated() == set()
