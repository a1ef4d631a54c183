"""flannelctl doctor against a real etcd and the kube stand-in: what it cannot check exits 2 with
the reason (the checks of a real node's kernel are in tests/e2e/test_doctor.py)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from click.testing import CliRunner

from flannel.ctl import cli
from flannel.lab.kubeapi.server import KubeAPIServer
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from tests.support import make_env

PREFIX = "/coreos.com/network"


@pytest.fixture
def doctor(etcd_server, tmp_path):  # type: ignore[no-untyped-def]
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")

    def run(*args: str):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, "doctor",
                                        "--subnet-file", str(env), *args])
    return run


@pytest.mark.etcd
def test_no_network_config_cannot_check(doctor):
    res = doctor("--store-timeout", "1")
    assert res.exit_code == 2
    assert "cannot check" in res.stderr and "Did you create your config using etcdv3 API" in res.stderr


@pytest.mark.etcd
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


@pytest.mark.etcd
def test_no_subnet_env_cannot_check(etcd_server, tmp_path):
    etcd_server.etcdctl("put", f"{PREFIX}/config", '{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}')
    res = CliRunner().invoke(cli, ["--etcd-endpoints", etcd_server.endpoint, "doctor",
                                   "--subnet-file", str(tmp_path / "missing.env")])
    assert res.exit_code == 2
    assert f"no subnet file at {tmp_path / 'missing.env'}" in res.stderr


# ---- kube mode (the stand-in API server, in process) -----------------------------------------------

@pytest.fixture
def kube(tmp_path):  # type: ignore[no-untyped-def]
    srv = KubeAPIServer(token="t0ken").start()
    env = make_env(srv, str(tmp_path), net_conf={"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}})
    yield srv, env
    srv.stop()


def kube_doctor(env, extra_env: dict[str, str], *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["doctor", "--subnet-manager=kube", "--kubeconfig-file", env.kubeconfig,
                                    "--net-config-path", env.net_conf, "--subnet-file", "/nonexistent", *args],
                              env={"NODE_NAME": "", "POD_NAME": "", "POD_NAMESPACE": "", **extra_env})


def test_kube_node_name_from_the_pod_like_the_daemon(kube):
    """In the DaemonSet only POD_NAME/POD_NAMESPACE are set: the node comes from the pod's spec.
    The network here uses udp, so doctor gets as far as the backend check (exit 2 naming udp)."""
    srv, env = kube
    srv.add_node("n1", ["10.244.1.0/24"])
    srv.add_pod("kube-flannel", "kube-flannel-ds-abcde", "n1")
    res = kube_doctor(env, {"POD_NAME": "kube-flannel-ds-abcde", "POD_NAMESPACE": "kube-flannel"})
    assert res.exit_code == 2 and "this network's backend is 'udp'" in res.stderr, res.output
    res = kube_doctor(env, {"POD_NAME": "no-such-pod", "POD_NAMESPACE": "kube-flannel"})
    assert res.exit_code == 2 and "error retrieving pod spec for 'kube-flannel/no-such-pod'" in res.stderr


def test_kube_unknown_node_and_unreachable_api_server_cannot_check(kube):
    srv, env = kube
    srv.add_node("n1", ["10.244.1.0/24"])
    res = kube_doctor(env, {"NODE_NAME": "n9"})
    assert res.exit_code == 2 and "node 'n9' is not in the API server's node list" in res.stderr
    srv.stop()
    res = kube_doctor(env, {"NODE_NAME": "n1"}, "--store-timeout", "1")
    assert res.exit_code == 2 and "cannot check" in res.stderr
