"""Bad input table: broken flags, environment values and network configs.

Each row gives the input, the exit status and a fragment the one-line reason must contain.
Flags and environment values exit 2 (usage); a broken network config exits 1 with the field named,
before anything is written (the daemon runs for real against an in-memory store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flannel import cli
from tests.support import FakeManager, fake_iface

FLAG_CASES = [
    # (args, env, message fragment)
    (["--subnet-lease-renew-margin", "0"], {}, "1<=x<=1439"),
    (["--subnet-lease-renew-margin", "1440"], {}, "--subnet-lease-renew-margin"),
    (["--healthz-port", "70000"], {}, "--healthz-port"),
    (["--healthz-port", "abc"], {}, "'abc' is not a valid integer"),
    (["--public-ip", "1.2.3"], {}, "'1.2.3' is not an IPv4 address"),
    (["--public-ip", "fc00::1"], {}, "'fc00::1' is not an IPv4 address"),
    (["--public-ipv6", "1.2.3.4"], {}, "'1.2.3.4' is not an IPv6 address"),
    (["--iface-regex", "eth(0"], {}, "not a valid regular expression"),
    (["--iface-can-reach", "gateway"], {}, "'gateway' is not an IP address"),
    (["--healthz-ip", "localhost"], {}, "--healthz-ip"),
    (["--subnet-manager", "consul"], {}, "'consul' is not one of"),
    (["--etcd-endpoints", "http://10.0.0.1:2379,http://bad host"], {}, "'http://bad host' is not an etcd endpoint"),
    (["--etcd-cafile", "/nonexistent/ca.pem"], {}, "does not exist"),
    (["--kube-subnet-mgr", "--subnet-manager=etcd"], {}, "contradicts"),
    (["--ip-masq=maybe"], {}, "'maybe' is not a boolean"),
    (["--iptables-resync", "0"], {}, "--iptables-resync"),
    (["--vmodule", "flannel.daemon"], {}, "logger=N"),
    (["--no-such-flag"], {}, "No such option"),
    (["extra-positional"], {}, "unexpected extra argument"),
    ([], {"FLANNELD_HEALTHZ_PORT": "abc"}, "FLANNELD_HEALTHZ_PORT"),
    ([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "0"}, "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"),
    ([], {"FLANNELD_IP_MASQ": "yes-please"}, "FLANNELD_IP_MASQ"),
    ([], {"FLANNELD_PUBLIC_IP": "999.1.1.1"}, "FLANNELD_PUBLIC_IP"),
]


@pytest.mark.parametrize("args,env,fragment", FLAG_CASES, ids=[" ".join(c[0]) or next(iter(c[1])) for c in FLAG_CASES])
def test_bad_flag_exits_2_with_reason(args: list[str], env: dict[str, str], fragment: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Any] = []
    monkeypatch.setattr(cli, "run_agent", lambda opts, **kw: ran.append(opts) or 0)
    res = CliRunner().invoke(cli.command, cli.normalize_argv(args), env=env, terminal_width=200)
    assert res.exit_code == 2, res.output
    assert fragment in res.output
    assert ran == []  # the daemon never started
    error_lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1  # one line that says why


def test_env_value_is_ignored_when_the_flag_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad FLANNELD_ value for a flag given on the command line is irrelevant (the flag wins)."""
    ran: list[Any] = []
    monkeypatch.setattr(cli, "run_agent", lambda opts, **kw: ran.append(opts) or 0)
    res = CliRunner().invoke(cli.command, ["--healthz-port", "1"], env={"FLANNELD_HEALTHZ_PORT": "abc"})
    assert res.exit_code == 0, res.output
    assert ran[0].healthz_port == 1


CONFIG_CASES = [
    # (config text, message fragment naming the field/rule)
    ('{"Network": "10.9.0.0/16"', "not valid JSON"),
    ('["10.9.0.0/16"]', "must be a JSON object"),
    ('{"Backend": {"Type": "alloc"}}', "Network: is missing"),
    ('{"Network": "10.9.0.0/16", "SubnetLen": 31}', "SubnetLen"),
    ('{"Network": "10.9.0.0/16", "SubnetLen": 17}', "at least four subnets"),
    ('{"Network": "10.9.0.0/16", "SubnetLen": "24"}', "SubnetLen: must be a non-negative integer"),
    ('{"Network": "10.9.0.0/33"}', "Network: '10.9.0.0/33' is not a valid CIDR"),
    ('{"Network": "fc00::/48"}', "is not an IPv4 CIDR"),
    ('{"Network": "10.9.0.0/29"}', "network is too small"),
    ('{"Network": "10.9.0.0/16", "SubnetMin": "10.10.0.0"}', "SubnetMin is not in the range"),
    ('{"Network": "10.9.0.0/16", "SubnetMax": "10.9.5.7"}', "SubnetMax is not on a SubnetLen boundary"),
    ('{"Network": "10.9.0.0/16", "SubnetMin": "10.9.9.0", "SubnetMax": "10.9.2.0"}', "greater than SubnetMax"),
    ('{"Network": "10.9.0.0/16", "Backend": "vxlan"}', "Backend: must be a JSON object"),
    ('{"Network": "10.9.0.0/16", "Backend": {"VNI": 1}}', "Backend.Type: is missing"),
    ('{"Network": "10.9.0.0/16", "EnableIPv4": false}', "EnableIPv4/EnableIPv6"),
    ('{"Network": "10.9.0.0/16", "EnableIPv4": "yes"}', "EnableIPv4: must be true or false"),
    ('{"Network": "10.9.0.0/16", "EnableIPv6": true}', "IPv6Network: is missing"),
    ('{"Network": "10.9.0.0/16", "Backend": {"Type": "nosuch"}}', "unknown flannel.backends 'nosuch' (installed: "),
]


@pytest.mark.parametrize("text,fragment", CONFIG_CASES, ids=[c[1] for c in CONFIG_CASES])
def test_bad_network_config_exits_1_naming_the_field(text: str, fragment: str, tmp_path: Path) -> None:
    subnet_env = tmp_path / "subnet.env"
    manager = FakeManager(text)
    res = CliRunner().invoke(cli.command, ["--subnet-file", str(subnet_env)],
                             obj={"manager": manager, "select_interface": fake_iface})
    assert res.exit_code == 1, res.output
    assert fragment in res.output
    assert manager.acquired == []  # no lease was taken
    assert not subnet_env.exists()  # nothing written
    assert manager.closed
