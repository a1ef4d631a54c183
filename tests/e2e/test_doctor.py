"""e2e: ``flannelctl doctor`` on lab nodes broken by hand (issue 11 item 4).

One lab per case — etcd with vxlan, host-gw and wireguard (wireguard-go), and kube mode with vxlan
— with real agents. Each test breaks ``h1`` in one way, runs ``flannelctl doctor`` as a real
command inside h1's namespace (``ip netns exec``, the agent's own flags and environment) and
asserts it names exactly that difference, with the lease it concerns, and exits 1; then it undoes
the breakage and doctor exits 0 again.

So that the agent cannot repair the breakage before doctor looks, h1's agent is **paused with
SIGSTOP** (and resumed with SIGCONT) around each breakage; it is not stopped, because a stopped
wireguard agent deletes its device. Only the agent process is paused (its wireguard-go child keeps
serving the device's UAPI socket, which doctor reads). Entries added by hand carry the routing
protocol of the routes the agent installed, so that they look like the agent's own (a route of
another protocol may be an operator's, which flannel never removes).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flannel.lab.cluster import ETCD_PREFIX, Lab
from tests.support import build_lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(900)]

_bin = Path(sys.executable).with_name("flannelctl")
FLANNELCTL = [str(_bin)] if _bin.exists() else [sys.executable, "-m", "flannel.ctl"]
WRONG_MAC = "02:de:ad:be:ef:01"
WRONG_IP = "198.18.0.77"


# ---- helpers ------------------------------------------------------------------------------------

class Doctor:
    """Runs ``flannelctl doctor`` on one lab host, with the agent's store flags and environment."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.lab = lab
        self.host = host
        self.ns = lab.hosts[host].ns

    def command(self, *extra: str) -> tuple[list[str], dict[str, str]]:
        lab = self.lab
        env = dict(os.environ, **lab.agent_env(self.host))
        if lab.config.subnet_manager == "kube":
            args = [*FLANNELCTL, "doctor", "--subnet-manager=kube", f"--kubeconfig-file={lab.dir / 'kubeconfig'}",
                    f"--net-config-path={lab.dir / 'net-conf.json'}"]
        else:
            args = [*FLANNELCTL, "--etcd-endpoints", lab.etcd_endpoint, "--etcd-prefix", ETCD_PREFIX, "doctor"]
        return ["ip", "netns", "exec", self.ns, *args, "--subnet-file", str(lab.subnet_file(self.host)),
                *extra], env

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd, env = self.command(*extra)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    def json(self) -> tuple[int, dict[str, Any]]:
        res = self.run("--json")
        assert res.returncode in (0, 1), f"doctor could not check ({res.returncode}): {res.stderr}"
        return res.returncode, json.loads(res.stdout)

    def one_finding(self) -> dict[str, Any]:
        code, rep = self.json()
        assert code == 1 and len(rep["findings"]) == 1, \
            f"expected exactly one difference, got exit {code}:\n" + "\n".join(f["text"] for f in rep["findings"])
        return rep["findings"][0]  # type: ignore[no-any-return]

    def assert_clean(self) -> None:
        res = self.run()
        assert res.returncode == 0, f"doctor on {self.host} exited {res.returncode}:\n{res.stdout}{res.stderr}"
        assert res.stdout.rstrip().endswith("OK: the kernel matches the store"), res.stdout


@contextmanager
def agent_paused(lab: Lab, host: str) -> Iterator[None]:
    """SIGSTOP the host's agent for the block (SIGCONT after), so it cannot repair anything."""
    pid = lab.hosts[host].agent.pid
    assert pid and lab.agent_alive(host), f"agent on {host} is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _state(pid) == "T", what=f"agent {pid} stopped")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def ip(lab: Lab, host: str, *args: str) -> str:
    res = subprocess.run(["ip", "-n", lab.hosts[host].ns, *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"
    return res.stdout


def bridge(lab: Lab, host: str, *args: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", lab.hosts[host].ns, "bridge", *args], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, f"bridge {' '.join(args)}: {res.stderr}"


def route_json(lab: Lab, host: str, dst: str) -> dict[str, Any]:
    routes = json.loads(ip(lab, host, "-d", "-j", "route", "show", dst))
    assert len(routes) == 1, f"expected one route to {dst} on {host}: {routes}"
    return routes[0]  # type: ignore[no-any-return]


def stale_net(lab: Lab) -> str:
    """A /24 inside the lab network (10.244.0.0/16) that no lease has."""
    used = {h.subnet for h in lab.hosts.values()}
    return next(f"10.244.{i}.0/24" for i in range(250, 256) if f"10.244.{i}.0/24" not in used)


def lease_of(lab: Lab, host: str) -> dict[str, Any]:
    """The store's lease of ``host`` as a finding's ``lease`` names it."""
    h = lab.hosts[host]
    return {"subnet": h.subnet, "ipv6_subnet": None, "public_ip": h.ip, "public_ipv6": None,
            "node": host if lab.config.subnet_manager == "kube" else None}


def vtep_mac(lab: Lab, host: str) -> str:
    net = lab.hosts[host].subnet.replace("/", "-")
    value = lab.etcdctl("get", f"{ETCD_PREFIX}/subnets/{net}", "--print-value-only")
    return str(json.loads(value)["BackendData"]["VtepMAC"])


def lab_fixture(backend: str, **kw: Any) -> Any:
    @pytest.fixture(scope="module")
    def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
        lab = build_lab(backend, tmp_path_factory.mktemp(f"lab-doctor-{backend}"), pods_per_host=0, **kw)
        yield lab
        lab.teardown(keep_dir=True)
    return lab


# ---- vxlan (etcd) -------------------------------------------------------------------------------

vxlan_lab = lab_fixture("vxlan")


def test_vxlan_healthy_nodes_are_clean(vxlan_lab: Lab) -> None:
    for host in vxlan_lab.hosts:
        Doctor(vxlan_lab, host).assert_clean()
    code, rep = Doctor(vxlan_lab, "h1").json()
    assert code == 0 and rep["ok"] is True and rep["backend"] == "vxlan" and rep["interface"] == "eth0"
    assert rep["node"]["subnet"] == vxlan_lab.hosts["h1"].subnet
    assert rep["checked"]["remote leases"] == 2 and rep["checked"]["expected kernel entries"] == 6


def test_vxlan_deleted_route_is_missing(vxlan_lab: Lab) -> None:
    lab, doc = vxlan_lab, Doctor(vxlan_lab, "h1")
    s2 = lab.hosts["h2"].subnet
    gw = s2.split("/")[0]
    orig = route_json(lab, "h1", s2)
    with agent_paused(lab, "h1"):
        ip(lab, "h1", "route", "del", s2)   # not "dev flannel.1": a route through a nexthop object matches no device
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["kernel"]) == ("missing", "route", None)
            assert f["expected"] == f"{s2} via {gw} dev flannel.1 onlink"
            assert f["lease"] == lease_of(lab, "h2")
            text = doc.run()
            assert text.returncode == 1
            assert f"missing route: {s2} via {gw} dev flannel.1 onlink — lease {s2} (public IP 198.18.0.2)" \
                in text.stdout
            # doctor is read-only: after two runs the route is still missing
            assert ip(lab, "h1", "route", "show", s2).strip() == ""
        finally:
            ip(lab, "h1", "route", "replace", s2, "via", gw, "dev", "flannel.1", "onlink", "proto", orig["protocol"])
        doc.assert_clean()


def test_vxlan_route_for_a_subnet_no_lease_has_is_stale(vxlan_lab: Lab) -> None:
    lab, doc = vxlan_lab, Doctor(vxlan_lab, "h1")
    proto = route_json(lab, "h1", lab.hosts["h2"].subnet)["protocol"]
    stale = stale_net(lab)
    gw = stale.split("/")[0]
    with agent_paused(lab, "h1"):
        ip(lab, "h1", "route", "add", stale, "via", gw, "dev", "flannel.1", "onlink", "proto", proto)
        # an operator's route outside the flannel network is none of flannel's business
        ip(lab, "h1", "route", "add", "192.0.2.0/24", "via", "198.18.0.3", "dev", "eth0")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["expected"], f["lease"]) == ("stale", "route", None, None)
            assert f["kernel"] == f"{stale} via {gw} dev flannel.1 onlink"
        finally:
            ip(lab, "h1", "route", "del", stale, "dev", "flannel.1")
            ip(lab, "h1", "route", "del", "192.0.2.0/24")
        doc.assert_clean()


def test_vxlan_changed_neighbour_mac_is_wrong_mac(vxlan_lab: Lab) -> None:
    lab, doc = vxlan_lab, Doctor(vxlan_lab, "h1")
    gw = lab.hosts["h2"].subnet.split("/")[0]
    mac = vtep_mac(lab, "h2")
    with agent_paused(lab, "h1"):
        ip(lab, "h1", "neigh", "replace", gw, "lladdr", WRONG_MAC, "dev", "flannel.1", "nud", "permanent")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"]) == ("wrong-mac", "neigh")
            assert f["kernel"] == f"neigh {gw} lladdr {WRONG_MAC} dev flannel.1"
            assert f["expected"] == f"neigh {gw} lladdr {mac} dev flannel.1"
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            ip(lab, "h1", "neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
        doc.assert_clean()


def test_vxlan_deleted_fdb_entry_is_missing(vxlan_lab: Lab) -> None:
    lab, doc = vxlan_lab, Doctor(vxlan_lab, "h1")
    mac, peer = vtep_mac(lab, "h2"), lab.hosts["h2"].ip
    with agent_paused(lab, "h1"):
        bridge(lab, "h1", "fdb", "del", mac, "dev", "flannel.1", "dst", peer, "self")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["kernel"]) == ("missing", "fdb", None)
            assert f["expected"] == f"fdb {mac} dst {peer} dev flannel.1"
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            bridge(lab, "h1", "fdb", "append", mac, "dev", "flannel.1", "dst", peer, "self", "permanent")
        doc.assert_clean()


def test_vxlan_fdb_entry_pointing_at_the_wrong_ip_is_wrong_endpoint(vxlan_lab: Lab) -> None:
    lab, doc = vxlan_lab, Doctor(vxlan_lab, "h1")
    mac, peer = vtep_mac(lab, "h2"), lab.hosts["h2"].ip
    with agent_paused(lab, "h1"):
        bridge(lab, "h1", "fdb", "replace", mac, "dev", "flannel.1", "dst", WRONG_IP, "self", "permanent")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"]) == ("wrong-endpoint", "fdb")
            assert f["kernel"] == f"fdb {mac} dst {WRONG_IP} dev flannel.1"
            assert f["expected"] == f"fdb {mac} dst {peer} dev flannel.1"
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            bridge(lab, "h1", "fdb", "replace", mac, "dev", "flannel.1", "dst", peer, "self", "permanent")
        doc.assert_clean()


def test_vxlan_own_lease_deleted_from_the_store_is_missing(vxlan_lab: Lab) -> None:
    """Runs last in its lab: the agent re-acquires its lease once resumed."""
    lab, doc = vxlan_lab, Doctor(vxlan_lab, "h1")
    s1 = lab.hosts["h1"].subnet
    with agent_paused(lab, "h1"):
        lab.delete_lease("h1")
        f = doc.one_finding()
        assert (f["problem"], f["kind"], f["kernel"]) == ("missing", "lease", None)
        assert f["expected"] == f"lease {s1} of this node (from {lab.subnet_file('h1')})"
        assert f["lease"]["subnet"] == s1
    wait_for(lambda: doc.run().returncode == 0, what="the agent re-acquired its lease and doctor is clean",
             timeout=120, interval=1, on_timeout=lambda: doc.run().stdout + lab.log_file("h1").read_text()[-3000:])


# ---- host-gw (etcd) -----------------------------------------------------------------------------

hostgw_lab = lab_fixture("host-gw")


def test_hostgw_healthy_nodes_are_clean(hostgw_lab: Lab) -> None:
    for host in hostgw_lab.hosts:
        Doctor(hostgw_lab, host).assert_clean()


def test_hostgw_deleted_route_is_missing(hostgw_lab: Lab) -> None:
    lab, doc = hostgw_lab, Doctor(hostgw_lab, "h1")
    s2, via = lab.hosts["h2"].subnet, lab.hosts["h2"].ip
    orig = route_json(lab, "h1", s2)
    with agent_paused(lab, "h1"):
        ip(lab, "h1", "route", "del", s2)
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["expected"]) == ("missing", "route", f"{s2} via {via} dev eth0")
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            ip(lab, "h1", "route", "replace", s2, "via", via, "dev", "eth0", "proto", orig["protocol"])
        doc.assert_clean()


def test_hostgw_route_for_a_subnet_no_lease_has_is_stale(hostgw_lab: Lab) -> None:
    lab, doc = hostgw_lab, Doctor(hostgw_lab, "h1")
    proto = route_json(lab, "h1", lab.hosts["h2"].subnet)["protocol"]
    stale = stale_net(lab)
    with agent_paused(lab, "h1"):
        ip(lab, "h1", "route", "add", stale, "via", "198.18.0.3", "dev", "eth0", "proto", proto)
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["lease"]) == ("stale", "route", None)
            assert f["kernel"] == f"{stale} via 198.18.0.3 dev eth0"
        finally:
            ip(lab, "h1", "route", "del", stale)
        doc.assert_clean()


def test_hostgw_route_via_the_wrong_gateway_is_wrong_gateway(hostgw_lab: Lab) -> None:
    lab, doc = hostgw_lab, Doctor(hostgw_lab, "h1")
    s2, via, wrong = lab.hosts["h2"].subnet, lab.hosts["h2"].ip, lab.hosts["h3"].ip
    proto = route_json(lab, "h1", s2)["protocol"]
    with agent_paused(lab, "h1"):
        ip(lab, "h1", "route", "replace", s2, "via", wrong, "dev", "eth0", "proto", proto)
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"]) == ("wrong-gateway", "route")
            assert (f["kernel"], f["expected"]) == (f"{s2} via {wrong} dev eth0", f"{s2} via {via} dev eth0")
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            ip(lab, "h1", "route", "replace", s2, "via", via, "dev", "eth0", "proto", proto)
        doc.assert_clean()


# ---- wireguard (etcd, wireguard-go) -------------------------------------------------------------

wireguard_lab = lab_fixture("wireguard")
needs_wireguard_go = pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v wireguard-go"],
                                                       capture_output=True).returncode != 0,
                                        reason="wireguard-go not installed (run scripts/setup)")


def uapi(lab: Lab, host: str, request: str) -> str:
    """One raw UAPI request to the host's wireguard-go (what ``wg set`` would send)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(lab.wireguard_dir(host) / "flannel-wg.sock"))
        s.sendall(request.encode())
        out = b""
        while not out.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    text = out.decode()
    assert "errno=0" in text, f"UAPI {request!r} failed: {text!r}"
    return text


def hexkey(b64: str) -> str:
    return base64.b64decode(b64).hex()


def wg_pub(lab: Lab, host: str) -> str:
    net = lab.hosts[host].subnet.replace("/", "-")
    value = lab.etcdctl("get", f"{ETCD_PREFIX}/subnets/{net}", "--print-value-only")
    return str(json.loads(value)["BackendData"]["PublicKey"])


def restore_peer(lab: Lab, host: str, peer: str) -> None:
    uapi(lab, host, f"set=1\npublic_key={hexkey(wg_pub(lab, peer))}\nendpoint={lab.hosts[peer].ip}:51820\n"
                    f"replace_allowed_ips=true\nallowed_ip={lab.hosts[peer].subnet}\n\n")


@needs_wireguard_go
def test_wireguard_healthy_nodes_are_clean(wireguard_lab: Lab) -> None:
    for host in wireguard_lab.hosts:
        Doctor(wireguard_lab, host).assert_clean()
    code, rep = Doctor(wireguard_lab, "h1").json()
    assert code == 0 and rep["checked"] == {"remote leases": 2, "expected peers": 2, "device peers": 2}


@needs_wireguard_go
def test_wireguard_removed_peer_is_missing(wireguard_lab: Lab) -> None:
    lab, doc = wireguard_lab, Doctor(wireguard_lab, "h1")
    key = wg_pub(lab, "h2")
    with agent_paused(lab, "h1"):
        uapi(lab, "h1", f"set=1\npublic_key={hexkey(key)}\nremove=true\n\n")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["kernel"]) == ("missing", "peer", None)
            assert f["expected"] == (f"flannel-wg: peer {key} endpoint {lab.hosts['h2'].ip}:51820 "
                                     f"allowed-ips {lab.hosts['h2'].subnet}")
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            restore_peer(lab, "h1", "h2")
        doc.assert_clean()


@needs_wireguard_go
def test_wireguard_changed_peer_endpoint_is_wrong_endpoint(wireguard_lab: Lab) -> None:
    lab, doc = wireguard_lab, Doctor(wireguard_lab, "h1")
    key = wg_pub(lab, "h2")
    with agent_paused(lab, "h1"):
        uapi(lab, "h1", f"set=1\npublic_key={hexkey(key)}\nupdate_only=true\nendpoint={WRONG_IP}:51999\n\n")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"]) == ("wrong-endpoint", "peer")
            assert f["kernel"] == f"flannel-wg: peer {key} endpoint {WRONG_IP}:51999"
            assert f["expected"] == f"flannel-wg: peer {key} endpoint {lab.hosts['h2'].ip}:51820"
            assert f["lease"] == lease_of(lab, "h2")
        finally:
            restore_peer(lab, "h1", "h2")
        doc.assert_clean()


@needs_wireguard_go
def test_wireguard_peer_no_lease_has_is_stale(wireguard_lab: Lab) -> None:
    lab, doc = wireguard_lab, Doctor(wireguard_lab, "h1")
    stranger = base64.b64encode(bytes(range(1, 33))).decode()
    stale = stale_net(lab)
    with agent_paused(lab, "h1"):
        uapi(lab, "h1", f"set=1\npublic_key={hexkey(stranger)}\nendpoint={WRONG_IP}:51820\n"
                        f"allowed_ip={stale}\n\n")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["expected"], f["lease"]) == ("stale", "peer", None, None)
            assert stranger in f["kernel"] and stale in f["kernel"]
        finally:
            uapi(lab, "h1", f"set=1\npublic_key={hexkey(stranger)}\nremove=true\n\n")
        doc.assert_clean()


# ---- kube mode (vxlan) --------------------------------------------------------------------------

kube_lab = lab_fixture("vxlan", subnet_manager="kube")


def test_kube_healthy_nodes_are_clean_and_named(kube_lab: Lab) -> None:
    for host in kube_lab.hosts:
        Doctor(kube_lab, host).assert_clean()
    code, rep = Doctor(kube_lab, "h1").json()
    assert code == 0 and rep["mode"] == "kube"
    assert rep["node"] == lease_of(kube_lab, "h1")


def test_kube_deleted_fdb_entry_names_the_node(kube_lab: Lab) -> None:
    lab, doc = kube_lab, Doctor(kube_lab, "h1")
    node = lab.kube("GET", "/api/v1/nodes/h2")
    mac = json.loads(node["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"])["VtepMAC"]
    peer = lab.hosts["h2"].ip
    with agent_paused(lab, "h1"):
        bridge(lab, "h1", "fdb", "del", mac, "dev", "flannel.1", "dst", peer, "self")
        try:
            f = doc.one_finding()
            assert (f["problem"], f["kind"], f["expected"]) == ("missing", "fdb", f"fdb {mac} dst {peer} dev flannel.1")
            assert f["lease"] == lease_of(lab, "h2") and f["lease"]["node"] == "h2"
            text = doc.run()
            assert text.returncode == 1 and f"(public IP {peer}, node h2)" in text.stdout
        finally:
            bridge(lab, "h1", "fdb", "append", mac, "dev", "flannel.1", "dst", peer, "self", "permanent")
        doc.assert_clean()
