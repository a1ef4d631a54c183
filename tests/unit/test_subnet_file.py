"""subnet.env (reference §10): exact text, atomic write, mode, dotenv read-back, hints."""

from __future__ import annotations

import os
import stat
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from flannel import subnet_file
from flannel.config import parse_network_config
from flannel.lease import Lease, LeaseAttrs

CFG = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
LEASE = Lease(subnet=IPv4Network("10.5.72.0/24"), attrs=LeaseAttrs(public_ip=IPv4Address("192.168.1.2")))


def test_exact_text_ipv4():
    assert subnet_file.render(config=CFG, lease=LEASE, mtu=1450, ip_masq=False) == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")


def test_exact_text_dual_stack():
    cfg = parse_network_config('{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56"}')
    lease = Lease(subnet=IPv4Network("10.42.0.0/24"), ipv6_subnet=IPv6Network("2001:cafe:42::/64"), attrs=LeaseAttrs())
    assert subnet_file.render(config=cfg, lease=lease, mtu=1450, ip_masq=True) == (
        "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\n"
        "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


def test_write_creates_dirs_with_mode_0644_and_reads_back(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old = os.umask(0o077)
    try:
        subnet_file.write(path, config=CFG, lease=LEASE, mtu=1450, ip_masq=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    env = subnet_file.read(path)
    assert env["FLANNEL_SUBNET"] == "10.5.72.1/24" and env["FLANNEL_IPMASQ"] == "true"
    assert [p.name for p in path.parent.iterdir()] == ["subnet.env"]  # no temp file left behind


def test_existing_mode_is_kept(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    subnet_file.write_atomic(path, "new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "new\n"


def test_readers_never_see_partial_file(tmp_path):
    path = tmp_path / "subnet.env"
    texts = ["A=" + "x" * 5000 + "\n", "B=" + "y" * 7000 + "\n"]
    subnet_file.write_atomic(path, texts[0])
    stop = threading.Event()
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            seen.add(path.read_text())

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        subnet_file.write_atomic(path, texts[i % 2])
    stop.set()
    t.join()
    assert seen <= set(texts)


def test_dotenv_read_tolerates_comments_quotes_export(tmp_path):
    path = tmp_path / "env"
    path.write_text('# comment\nexport FLANNEL_SUBNET="10.1.2.1/24"\nFLANNEL_MTU=1450\nnonsense line\n')
    assert subnet_file.read(path) == {"FLANNEL_SUBNET": "10.1.2.1/24", "FLANNEL_MTU": "1450"}
    assert subnet_file.read(tmp_path / "missing") == {}


def test_previous_subnet_hints(tmp_path):
    path = tmp_path / "env"
    path.write_text("FLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_IPV6_SUBNET=fc00::1/64\n")
    assert subnet_file.previous_subnets(path) == (IPv4Network("10.5.72.0/24"), IPv6Network("fc00::/64"))
    # flannel main_test.go: a list with two valid entries is not a single hint; garbage is skipped
    path.write_text("FLANNEL_SUBNET=10.244.1.0/24,not-a-cidr,10.244.2.0/24\n")
    assert subnet_file.parse_networks("10.244.1.0/24,not-a-cidr,10.244.2.0/24", 4) == [
        IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")]
    assert subnet_file.previous_subnets(path) == (None, None)
    path.write_text("FLANNEL_SUBNET=not-a-cidr\n")
    assert subnet_file.previous_subnets(path) == (None, None)
    assert subnet_file.previous_subnets(tmp_path / "missing") == (None, None)
