"""flannelctl (click's CliRunner) against a real etcd: config get/set, leases list, reservations."""

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
GOOD = '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}'


@pytest.fixture
def ctl(etcd_server):  # type: ignore[no-untyped-def]
    runner = CliRunner()

    def run(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, *args], input=input)
    return run


def test_config_set_refuses_invalid_and_writes_nothing(ctl, etcd_server, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"Network": "10.5.0.0/16", "SubnetLen": 31}')
    res = ctl("config", "set", str(bad))
    assert res.exit_code == 1
    assert "SubnetLen" in res.output and "less than /31" in res.output
    assert etcd_server.etcdctl("get", f"{PREFIX}/config") == ""
    res = ctl("config", "set", "-", input="not json")
    assert res.exit_code == 1 and "not valid JSON" in res.output
    assert etcd_server.etcdctl("get", f"{PREFIX}/config") == ""


def test_config_set_and_get(ctl, etcd_server, tmp_path):
    good = tmp_path / "net.json"
    good.write_text(GOOD)
    res = ctl("config", "set", str(good))
    assert res.exit_code == 0, res.output
    assert etcd_server.etcdctl("get", "--print-value-only", f"{PREFIX}/config") == GOOD + "\n"
    res = ctl("config", "get")
    assert res.exit_code == 0 and res.output == GOOD + "\n"
    res = ctl("config", "get", "--effective")
    assert res.exit_code == 0 and json.loads(res.output)["SubnetMin"] == "10.5.1.0"
    res = ctl("--etcd-prefix", "/other/net", "config", "get")
    assert res.exit_code == 1 and "Did you create your config using etcdv3 API" in res.output


def test_leases_list_and_reservations(ctl, etcd_server):
    etcd_server.etcdctl("put", f"{PREFIX}/config", GOOD)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        reg.create_lease(IPv4Network("10.5.3.0/24"), None,
                         LeaseAttrs(public_ip=IPv4Address("198.18.0.3"), backend_type="vxlan"), 3600)
    finally:
        reg.close()

    res = ctl("reservations", "add", "10.5.9.0/24", "--public-ip", "198.18.0.9", "--backend-type", "host-gw")
    assert res.exit_code == 0, res.output
    kv = json.loads(etcd_server.etcdctl("get", "-w", "json", f"{PREFIX}/subnets/10.5.9.0-24"))["kvs"][0]
    assert kv.get("lease", 0) == 0
    assert etcd_server.etcdctl("get", "--print-value-only", f"{PREFIX}/subnets/10.5.9.0-24") == \
        '{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"host-gw"}\n'

    res = ctl("leases", "list")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "TTL"]
    row3 = next(line.split() for line in lines if line.startswith("10.5.3.0/24"))
    assert row3[1:3] == ["198.18.0.3", "vxlan"] and row3[3].startswith(("59m", "1h00m"))
    row9 = next(line.split() for line in lines if line.startswith("10.5.9.0/24"))
    assert row9[1:] == ["198.18.0.9", "host-gw", "reservation"]

    # a leased subnet is neither reservable for another node nor removable as a reservation
    res = ctl("reservations", "add", "10.5.3.0/24", "--public-ip", "198.18.0.99")
    assert res.exit_code == 1 and "held by 198.18.0.3" in res.output
    res = ctl("reservations", "remove", "10.5.3.0/24")
    assert res.exit_code == 1 and "not a reservation" in res.output
    assert etcd_server.etcdctl("get", "--keys-only", f"{PREFIX}/subnets/10.5.3.0-24").strip()

    res = ctl("reservations", "add", "10.5.9.1/24", "--public-ip", "198.18.0.9")
    assert res.exit_code == 2 and "not an IPv4 subnet" in res.output

    res = ctl("reservations", "remove", "10.5.9.0/24")
    assert res.exit_code == 0, res.output
    assert etcd_server.etcdctl("get", f"{PREFIX}/subnets/10.5.9.0-24") == ""
    res = ctl("reservations", "remove", "10.5.9.0/24")
    assert res.exit_code == 1 and "no reservation" in res.output


def test_env_vars_select_the_endpoint(etcd_server):
    etcd_server.etcdctl("put", "/env/net/config", GOOD)
    res = CliRunner().invoke(cli, ["config", "get"], env={"FLANNELD_ETCD_ENDPOINTS": etcd_server.endpoint,
                                                          "FLANNELD_ETCD_PREFIX": "/env/net"})
    assert res.exit_code == 0 and res.output == GOOD + "\n"


def test_leases_list_and_reservations_survive_garbage(ctl, etcd_server):
    """flannelctl decodes through the same boundary: garbage is skipped (and said so), a subnet held
    by an unreadable key cannot be reserved, and a deeply nested --backend-data is refused."""
    etcd_server.etcdctl("put", f"{PREFIX}/config", GOOD)
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.5.3.0-24", '{"PublicIP":"198.18.0.3","PublicIPv6":null}')
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.5.4.0-24", "[" * 5000 + "]" * 5000)
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.5.5.0-24", '{"PublicIP":7}')
    res = ctl("leases", "list")
    assert res.exit_code == 0, res.output
    assert "10.5.3.0/24" in res.output and "10.5.4.0/24" not in res.output
    assert "2 unreadable keys skipped" in res.output
    res = ctl("reservations", "add", "10.5.4.0/24", "--public-ip", "198.18.0.4")
    assert res.exit_code == 1 and "overlaps the unreadable key" in res.output
    res = ctl("reservations", "add", "10.5.6.0/24", "--public-ip", "198.18.0.6", "--backend-data",
              '{"a":' * 5000 + "1" + "}" * 5000)
    assert res.exit_code == 2 and "nested too deeply" in res.output
