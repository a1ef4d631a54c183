"""CLI parsing: flannel's flags and defaults, the FLANNELD_* overlay, --help/--version, the password.

Parsing tests replace ``cli.run_agent`` (the daemon) with a recorder: they check what the command
line turns into. ``FakeManager`` is an in-memory SubnetManager used to drive the real daemon
without a store (also imported by test_bad_input).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from click.testing import CliRunner

from flannel import __version__, cli, logsetup
from flannel.options import AgentOptions
from tests.support import FakeManager, fake_iface


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[AgentOptions]:
    seen: list[AgentOptions] = []

    def record(opts: AgentOptions, **kw: Any) -> int:
        seen.append(opts)
        return 0
    monkeypatch.setattr(cli, "run_agent", record)
    for var in [v for v in __import__("os").environ if v.startswith("FLANNELD_")]:
        monkeypatch.delenv(var)
    return seen


def invoke(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> Any:
    return CliRunner().invoke(cli.command, cli.normalize_argv(args), env=env, catch_exceptions=False, **kw)


def test_defaults_are_flannels(parsed: list[AgentOptions]) -> None:
    res = invoke([])
    assert res.exit_code == 0, res.output
    assert parsed == [AgentOptions()]
    o = parsed[0]
    assert o.etcd_endpoints == ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    assert (o.etcd_prefix, o.subnet_file, o.subnet_lease_renew_margin) == ("/coreos.com/network",
                                                                          "/run/flannel/subnet.env", 60)
    assert (o.iptables_forward_rules, o.ip_masq, o.healthz_port, o.subnet_manager) == (True, False, 0, "etcd")


def test_every_flag_reaches_the_options(parsed: list[AgentOptions], tmp_path: Any) -> None:
    key, cert, ca = (tmp_path / n for n in ("k.pem", "c.pem", "ca.pem"))
    for f in (key, cert, ca):
        f.write_text("x")
    res = invoke(["--etcd-endpoints=http://10.0.0.1:2379,https://10.0.0.2:2379", "--etcd-prefix", "/x/net",
                  "--etcd-keyfile", str(key), "--etcd-certfile", str(cert), "--etcd-cafile", str(ca),
                  "--etcd-username", "u", "--etcd-password", "p", "--iface", "eth0", "--iface", "10.0.0.5",
                  "--iface-regex", "^eth", "--iface-regex", "10\\.0", "--iface-can-reach", "10.0.0.9",
                  "--subnet-file", "/tmp/s.env", "--public-ip", "1.2.3.4", "--public-ipv6", "fc00::1",
                  "--subnet-lease-renew-margin", "5", "--subnet-lease-ttl", "30", "--ip-masq",
                  "--ip-masq-fully-random-disable=true", "--kube-api-url", "https://k:6443",
                  "--kube-annotation-prefix", "ex.com", "--kubeconfig-file", "/k.conf", "--healthz-ip", "127.0.0.1",
                  "--healthz-port", "8471", "--iptables-resync", "9", "--iptables-forward-rules=false",
                  "--ip-blackhole-route", "--net-config-path", "/n.json", "--set-node-network-unavailable=false",
                  "-v", "2"])
    assert res.exit_code == 0, res.output
    assert parsed[0] == AgentOptions(
        etcd_endpoints=("http://10.0.0.1:2379", "https://10.0.0.2:2379"), etcd_prefix="/x/net",
        etcd_keyfile=str(key), etcd_certfile=str(cert), etcd_cafile=str(ca), etcd_username="u", etcd_password="p",
        iface=("eth0", "10.0.0.5"), iface_regex=("^eth", "10\\.0"), iface_can_reach="10.0.0.9",
        subnet_file="/tmp/s.env", public_ip="1.2.3.4", public_ipv6="fc00::1", subnet_lease_renew_margin=5,
        subnet_lease_ttl=30, ip_masq=True, ip_masq_fully_random_disable=True, kube_api_url="https://k:6443",
        kube_annotation_prefix="ex.com", kubeconfig_file="/k.conf", healthz_ip="127.0.0.1", healthz_port=8471,
        iptables_resync=9, iptables_forward_rules=False, ip_blackhole_route=True, net_config_path="/n.json",
        set_node_network_unavailable=False, verbosity=2)


def test_env_overlay_and_command_line_wins(parsed: list[AgentOptions]) -> None:
    env = {"FLANNELD_ETCD_PREFIX": "/from/env", "FLANNELD_HEALTHZ_PORT": "8472", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_IFACE": "eth1 with space,comma", "FLANNELD_SUBNET_FILE": "/env.env",
           "FLANNELD_IPTABLES_FORWARD_RULES": "false", "FLANNELD_V": "3", "FLANNELD_PUBLIC_IP": ""}
    res = invoke(["--subnet-file", "/cli.env"], env=env)
    assert res.exit_code == 0, res.output
    o = parsed[0]
    assert (o.etcd_prefix, o.healthz_port, o.ip_masq, o.iptables_forward_rules, o.verbosity) == \
        ("/from/env", 8472, True, False, 3)
    assert o.iface == ("eth1 with space,comma",)  # one element, never split
    assert o.subnet_file == "/cli.env"
    assert o.public_ip == ""  # an empty variable counts as unset


def test_repeatable_iface_keeps_order_and_cli_beats_env(parsed: list[AgentOptions]) -> None:
    res = invoke(["--iface", "b", "--iface", "a", "--iface-regex", "x"], env={"FLANNELD_IFACE": "c"})
    assert res.exit_code == 0, res.output
    assert (parsed[0].iface, parsed[0].iface_regex) == (("b", "a"), ("x",))


@pytest.mark.parametrize("args,env", [
    (["--kube-subnet-mgr"], {}),
    (["--kube-subnet-mgr=true"], {}),
    (["--subnet-manager", "kube"], {}),
    (["-kube-subnet-mgr"], {}),  # Go single-dash spelling
    ([], {"FLANNELD_KUBE_SUBNET_MGR": "1"}),
    ([], {"FLANNELD_SUBNET_MANAGER": "KUBE"}),
])
def test_kube_alias(parsed: list[AgentOptions], args: list[str], env: dict[str, str]) -> None:
    res = invoke(args, env=env)
    assert res.exit_code == 0, res.output
    assert parsed[0].subnet_manager == "kube"


def test_go_style_single_dash_flags(parsed: list[AgentOptions]) -> None:
    res = invoke(["-iface", "eth3", "-etcd-prefix=/p", "-v=4", "-ip-masq"])
    assert res.exit_code == 0, res.output
    got = (parsed[0].iface, parsed[0].etcd_prefix, parsed[0].verbosity, parsed[0].ip_masq)
    assert got == (("eth3",), "/p", 4, True)


def test_help_lists_every_option_with_default() -> None:
    res = invoke(["--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for flag in ("--etcd-endpoints", "--etcd-prefix", "--iface", "--iface-regex", "--iface-can-reach",
                 "--subnet-file", "--public-ip", "--public-ipv6", "--subnet-lease-renew-margin", "--ip-masq",
                 "--kube-subnet-mgr", "--subnet-manager", "--healthz-port", "--iptables-forward-rules",
                 "--net-config-path", "--subnet-lease-ttl", "--kubeconfig-file", "--version"):
        assert flag in text, flag
    for default in ("http://127.0.0.1:4001,http://127.0.0.1:2379", "/coreos.com/network", "/run/flannel/subnet.env",
                    "default: 60", "default: 86400", "flannel.alpha.coreos.com", "/etc/kube-flannel/net-conf.json",
                    "FLANNELD_IFACE_REGEX"):
        assert default in text, default
    assert text.count("default:") >= 30


def test_version() -> None:
    res = invoke(["--version"])
    assert res.exit_code == 0
    assert __version__ in res.output


def test_password_never_logged(tmp_path: Any) -> None:
    """The startup line lists every option; the password is masked there and everywhere else."""
    secret = "s3cr3t-Pa55"
    res = invoke(["--etcd-password", secret, "--subnet-file", str(tmp_path / "s.env"), "-v", "5"],
                 obj={"manager": FakeManager('{"Network": "10.9.0.0/16", "SubnetLen": 33}'),
                      "select_interface": fake_iface})
    assert res.exit_code == 1, res.output
    assert "CLI flags config" in res.output and "'etcd_password': '***'" in res.output
    assert "SubnetLen" in res.output
    assert secret not in res.output
    assert secret not in repr(AgentOptions(etcd_password=secret))


def test_logging_format_and_verbosity() -> None:
    import io
    buf = io.StringIO()
    logsetup.setup(0, stream=buf)
    logging.getLogger("flannel.x").debug("hidden")
    logging.getLogger("flannel.x").info("shown %s", 1)
    logsetup.setup(1, vmodule="flannel.quiet=0", stream=buf)
    logging.getLogger("flannel.x").debug("now visible")
    logging.getLogger("flannel.quiet").debug("still hidden")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert "INFO" in lines[0] and "flannel.x: shown 1" in lines[0]
    assert "DEBUG" in lines[1] and "now visible" in lines[1]
