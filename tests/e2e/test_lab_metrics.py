"""e2e: the data-path metrics of real agents in a lab (2 hosts, 1 pod each), scraped over HTTP from
inside each host's namespace: the udp backend's packet, byte and drop counters move with pings
between pods (and with datagrams from a stranger), and the wireguard backend (wireguard-go) reports
its peer and the handshake age once pods have talked.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel.backends.wireguard import keys
from flannel.lab import podtraffic as pt
from flannel.lab.cluster import HEALTHZ_PORT, Lab
from flannel.lab.netns import in_netns
from tests.support import Samples, build_lab, metrics_of, wait_for

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e, pytest.mark.timeout(600)]

PINGS = 5


def scrape_host(lab: Lab, host: str) -> Samples:
    return metrics_of(HEALTHZ_PORT, netns=lab.hosts[host].ns)


@pytest.fixture
def lab_of(tmp_path: Path) -> Iterator[object]:
    labs: list[Lab] = []

    def make(backend: str) -> Lab:
        lab = build_lab(backend, tmp_path / backend, hosts=2, pods_per_host=1)
        labs.append(lab)
        return lab
    yield make
    for lab in labs:
        lab.teardown(keep_dir=True)


def ping(src: pt.Endpoint, dst: pt.Endpoint) -> None:
    res = pt.ns_exec(src.ns, "ping", "-c", str(PINGS), "-i", "0.2", "-W", "2", dst.ip)
    assert res.returncode == 0, res.stdout + res.stderr


def test_udp_packets_bytes_and_drops_move(lab_of) -> None:  # type: ignore[no-untyped-def]
    lab: Lab = lab_of("udp")
    h1, h2 = list(lab.hosts)
    p1, p2 = lab.pods([h1])[0], lab.pods([h2])[0]
    assert all(pt.wait_full_matrix(lab.pods(), time.monotonic() + 60).values())
    a0, b0 = scrape_host(lab, h1), scrape_host(lab, h2)
    assert a0.value("flannel_remote_leases", backend_type="none") == 1    # udp leases carry no BackendType
    ping(p1, p2)

    def moved() -> tuple[Samples, Samples] | None:
        a, b = scrape_host(lab, h1), scrape_host(lab, h2)
        done = all((s.value(f"flannel_udp_{m}_total") or 0) >= (s0.value(f"flannel_udp_{m}_total") or 0) + PINGS
                   for s, s0 in ((a, a0), (b, b0))
                   for m in ("tun_read_packets", "sent_packets", "received_packets", "tun_written_packets"))
        return (a, b) if done else None
    a, b = wait_for(moved, "the echo requests and replies counted on both hosts", timeout=30)
    for s, s0 in ((a, a0), (b, b0)):
        # an ICMP echo of ping's default 56 bytes is an 84-byte IPv4 packet, the payload of one datagram
        for m in ("sent_bytes", "tun_written_bytes"):
            assert (s.value(f"flannel_udp_{m}_total") or 0) >= (s0.value(f"flannel_udp_{m}_total") or 0) + 84 * PINGS
    unknown0 = b.value("flannel_udp_dropped_packets_total", reason="unknown_peer")
    assert unknown0 is not None

    # datagrams to h2's udp port from the hub, which holds no lease: dropped as from an unknown peer
    with in_netns(lab.config.prefix + "hub"), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(3):
            sock.sendto(b"\x45" + b"\x00" * 39, (lab.hosts[h2].ip, 8285))
    wait_for(lambda: (scrape_host(lab, h2).value("flannel_udp_dropped_packets_total", reason="unknown_peer") or 0)
             >= unknown0 + 3, "the stranger's datagrams counted as drops (unknown_peer)")


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v wireguard-go"], capture_output=True).returncode != 0,
                    reason="wireguard-go not installed (run scripts/setup)")
def test_wireguard_peers_and_handshake_age(lab_of) -> None:  # type: ignore[no-untyped-def]
    lab: Lab = lab_of("wireguard")
    h1, h2 = list(lab.hosts)
    p1, p2 = lab.pods([h1])[0], lab.pods([h2])[0]
    s = scrape_host(lab, h1)
    assert s.value("flannel_wireguard_peers", device="flannel-wg") == 1
    assert s.value("flannel_remote_leases", backend_type="wireguard") == 1
    assert s.total("flannel_lease_events_applied_total", type="added") >= 1
    assert (s.value("flannel_full_reconcile_duration_seconds_count") or 0) >= 1
    ping(p1, p2)
    peer_key = keys.public_key(lab.wireguard_key_file(h2).read_text())

    def handshaken() -> Samples | None:
        s = scrape_host(lab, h1)
        return s if s.matching("flannel_wireguard_peer_last_handshake_age_seconds", public_key=peer_key) else None
    s = wait_for(handshaken, "a handshake age for h2's peer on h1")
    ((labels, age),) = s.matching("flannel_wireguard_peer_last_handshake_age_seconds")
    assert labels == {"device": "flannel-wg", "public_key": peer_key, "allowed_ips": lab.hosts[h2].subnet}
    assert 0 <= age < 180       # the pings above needed a handshake within WireGuard's 2-minute rekey time
    assert s.value("flannel_wireguard_peers_without_handshake", device="flannel-wg") == 0
