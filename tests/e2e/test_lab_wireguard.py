"""e2e: the lab with the wireguard backend (wireguard-go: this kernel has no WireGuard).

One lab (etcd, 3 hosts, 1 pod each, real agents as processes); the tests run in file order and the
last one removes a host. Every host's wireguard-go has its own UAPI directory
(``Lab.wireguard_dir``), read here with the backend's own device port.
"""

from __future__ import annotations

import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel.backends.wireguard import device as wgdev
from flannel.backends.wireguard import keys
from flannel.lab import podtraffic as pt
from flannel.lab.cluster import ETCD_PREFIX, Lab
from tests.support import build_lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e, pytest.mark.timeout(600),
              pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v wireguard-go && command -v tcpdump"],
                                                capture_output=True).returncode != 0,
                                 reason="wireguard-go / tcpdump not installed (run scripts/setup)")]

MARKER = "c0ffee5eed"       # ping -p pattern: must never appear on the underlay in clear


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = build_lab("wireguard", tmp_path_factory.mktemp("lab-wireguard"), pods_per_host=1)
    yield lab
    lab.teardown(keep_dir=True)


def status(lab: Lab, host: str):  # type: ignore[no-untyped-def]
    return wgdev.read_status("flannel-wg", uapi_dir=str(lab.wireguard_dir(host)))


def pubkey(lab: Lab, host: str) -> str:
    return keys.public_key(lab.wireguard_key_file(host).read_text())


def _full(lab: Lab) -> None:
    pods = lab.pods()
    m = pt.wait_full_matrix(pods, time.monotonic() + 60)
    assert all(m.values()), "pods that cannot reach each other:\n" + pt.format_matrix(pods, m)


def test_every_pod_reaches_every_other_pod_and_leases_are_flannels(lab: Lab) -> None:
    _full(lab)
    with pt.TcpServers(lab.pods()):
        res = pt.tcp_matrix(lab.pods())
    assert all(v == "ok" for v in res.values()), res
    for name, h in lab.hosts.items():
        net = h.subnet.replace("/", "-")
        value = lab.etcdctl("get", f"{ETCD_PREFIX}/subnets/{net}", "--print-value-only").strip()
        pub = pubkey(lab, name)
        assert value == (f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"wireguard",'
                         f'"BackendData":{{"PublicKey":"{pub}","Port":51820}}}}')
        log = lab.log_file(name).read_text()
        assert "flannel-wg is wireguard-go" in log
        others = {n for n in lab.hosts if n != name}
        assert {p.public_key for p in status(lab, name).peers} == {pubkey(lab, o) for o in others}


def test_underlay_carries_only_wireguard_datagrams(lab: Lab, tmp_path: Path) -> None:
    hub = lab.config.prefix + "hub"
    pcap = tmp_path / "underlay.pcap"
    cap = subprocess.Popen(["ip", "netns", "exec", hub, "tcpdump", "-i", "br0", "-n", "-U", "-s", "0", "-w", str(pcap)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert cap.stderr is not None
        ready, _, _ = select.select([cap.stderr], [], [], 30)
        first = cap.stderr.readline().decode() if ready else ""
        assert "listening on br0" in first, f"tcpdump did not start: {first!r}"
        pods = lab.pods()
        for src in pods:
            for dst in pods:
                if src is not dst:
                    res = pt.ns_exec(src.ns, "ping", "-c", "3", "-i", "0.2", "-p", MARKER, dst.ip)
                    assert res.returncode == 0, res.stdout + res.stderr
        with pt.TcpServers(pods):
            assert all(v == "ok" for v in pt.tcp_matrix(pods).values())
    finally:
        cap.send_signal(signal.SIGTERM)
        cap.wait(10)

    def count(expr: str) -> int:
        out = subprocess.run(["tcpdump", "-r", str(pcap), "-n", expr], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return len(out.stdout.splitlines())

    assert count("udp port 51820") > 50                                  # the traffic did cross the underlay
    assert count(f"net {lab.config.network}") == 0                      # no pod address in clear
    # between hosts there is nothing but WireGuard (etcd and the health checks talk to the hub)
    assert count("ip and not host 198.18.0.254 and not udp port 51820") == 0
    assert bytes.fromhex(MARKER) * 2 not in pcap.read_bytes()


def test_restart_keeps_the_key_and_peers_need_no_change(lab: Lab) -> None:
    h1, h2, _ = list(lab.hosts)[:3]
    key_before = lab.wireguard_key_file(h2).read_text()
    net = lab.hosts[h2].subnet.replace("/", "-")
    value_before = lab.etcdctl("get", f"{ETCD_PREFIX}/subnets/{net}", "--print-value-only")
    peer_before = status(lab, h1).peer(pubkey(lab, h2))
    assert peer_before is not None
    lab.restart_agent(h2)
    assert lab.wireguard_key_file(h2).read_text() == key_before
    assert lab.etcdctl("get", f"{ETCD_PREFIX}/subnets/{net}", "--print-value-only") == value_before
    _full(lab)
    after = status(lab, h1).peer(pubkey(lab, h2))
    assert after is not None and after.config() == peer_before.config()


def test_a_peer_removed_from_the_store_leaves_every_device(lab: Lab) -> None:
    h1, h2, h3 = list(lab.hosts)[:3]
    gone = pubkey(lab, h3)
    lab.stop_agent(h3)
    ns3 = lab.hosts[h3].ns
    links = subprocess.run(["ip", "-n", ns3, "link", "show"], capture_output=True, text=True).stdout
    assert "flannel-wg" not in links, "the device must be deleted on shutdown"
    assert not (lab.wireguard_dir(h3) / "flannel-wg.sock").exists()
    lab.delete_lease(h3)
    for h in (h1, h2):
        wait_for(lambda h=h: status(lab, h).peer(gone) is None, what=f"{h3}'s peer removed from {h}", timeout=60)
    lab.remove_host(h3, delete_lease=False)
    _full(lab)
