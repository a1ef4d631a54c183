"""flannelctl doctor against a real etcd: what it cannot check exits 2 with the reason (the checks
of a real node's kernel are in tests/e2e/test_doctor.py)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from click.testing import CliRunner

from flannel.ctl import cli
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.etcd.registry import EtcdRegistry

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"


@pytest.fixture
def doctor(etcd_server, tmp_path):  # type: ignore[no-untyped-def]
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")

    def run(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, "doctor",
                                        "--subnet-file", str(env), *args])
    return run


def test_no_network_config_cannot_check(doctor):
    res = doctor("--store-timeout", "1")
    assert res.exit_code == 2
    assert "cannot check" in res.stderr and "Did you create your config using etcdv3 API" in res.stderr


def test_unsupported_backend_cannot_check(doctor, etcd_server):
    etcd_server.etcdctl("put", f"{PREFIX}/config", '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}')
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        reg.create_lease(IPv4Network("10.5.3.0/24"), None,
                         LeaseAttrs(public_ip=IPv4Address("198.18.0.3"), backend_type="udp"), 3600)
    finally:
        reg.close()
    res = doctor("--json")
    assert res.exit_code == 2
    assert "doctor checks vxlan, host-gw and wireguard networks; this network's backend is 'udp'" in res.stderr
    assert json.loads(res.stdout)["ok"] is None


def test_no_subnet_env_cannot_check(etcd_server, tmp_path):
    etcd_server.etcdctl("put", f"{PREFIX}/config", '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    res = CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, "doctor",
                                   "--subnet-file", str(tmp_path / "missing.env")])
    assert res.exit_code == 2
    assert f"no subnet file at {tmp_path / 'missing.env'}" in res.stderr
