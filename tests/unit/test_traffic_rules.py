"""iptables / nftables rule lists and payloads (flannel's §13.1 iptables cases, with a fake iptables)."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Network as N
from ipaddress import IPv6Network as N6
from pathlib import Path

import pytest

from flannel import errors, retry, stophooks, traffic
from flannel.config import parse_network_config
from flannel.lease import Lease, LeaseAttrs
from flannel.options import AgentOptions
from flannel.traffic import changes, command
from flannel.traffic import iptables as ipt
from flannel.traffic import nftables as nft
from tests.support import GOLDEN_NAT_S, wait_for


class FakeIPTables:
    """Records restore payloads; ``exists`` answers from a set of restore lines."""

    def __init__(self, present: set[str] | None = None) -> None:
        self.present = present or set()
        self.payloads: list[str] = []
        self.spelled: dict[str, str] = {}   # how `-S` prints a present line, when not as we do
        self.checks = 0                     # `-C` calls

    def exists(self, rule: ipt.Rule) -> bool:
        self.checks += 1
        return rule.line() in self.present

    def listed(self, table: str) -> set[str]:
        return {self.spelled.get(ln, ln) for ln in self.present}

    def restore(self, payload: str) -> None:
        if payload:
            self.payloads.append(payload)


def test_masq_rules_golden():
    rules = ipt.masq_rules(N("10.42.0.0/16"), N("10.42.1.0/24"))
    assert "".join(r.line() + "\n" for r in rules) == GOLDEN_NAT_S
    assert all(r.table == "nat" for r in rules)


def test_masq_rules_flannel_case_has_seven_rules_and_teardown_deletes_each_in_order():
    rules = ipt.masq_rules(N("10.0.0.0/16"), N("192.168.0.0/16"))
    assert len(rules) == 7
    lines = ipt.teardown_lines(rules, lambda r: True)
    assert lines == {"nat": [r.line("-D") for r in rules]}
    assert all(ln.startswith("-D ") for ln in lines["nat"])


def test_masq_rules_without_random_fully_and_ipv6():
    rules = ipt.masq_rules(N6("fc00::/48"), N6("fc00:0:0:1::/64"), fully_random=False)
    assert rules[5].line() == ('-A FLANNEL-POSTRTG -s fc00::/48 ! -d ff00::/8 '
                               '-m comment --comment "flanneld masq" -j MASQUERADE')


def test_forward_rules():
    assert [r.line() for r in ipt.forward_rules(N("10.42.0.0/16"))] == [
        '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
        '-A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
        '-A FLANNEL-FWD -d 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    ]


def test_bootstrap_on_empty_is_one_restore_with_only_appends_in_order():
    fake = FakeIPTables()
    rules = ipt.masq_rules(N("10.42.0.0/16"), N("10.42.1.0/24"))
    g = ipt.RuleGroup("masq", rules, fake)  # type: ignore[arg-type]
    g.bootstrap()
    assert len(fake.payloads) == 1
    body = fake.payloads[0].splitlines()
    assert body[0] == "*nat" and body[1] == ":FLANNEL-POSTRTG - [0:0]" and body[-1] == "COMMIT"
    assert body[2:-1] == [r.line("-A") for r in rules]


def test_bootstrap_again_moves_the_jump_rule_to_the_end():
    rules = ipt.masq_rules(N("10.42.0.0/16"), N("10.42.1.0/24"))
    fake = FakeIPTables({r.line() for r in rules})
    ipt.RuleGroup("masq", rules, fake).bootstrap()  # type: ignore[arg-type]
    body = fake.payloads[0].splitlines()[2:-1]
    # -D X immediately followed by -A X for the rule in the built-in chain; the flannel chain is
    # declared (flushed) in the same transaction and refilled
    assert body[0] == rules[0].line("-D") and body[1] == rules[0].line("-A")
    assert body[2:] == [r.line("-A") for r in rules[1:]]


def test_ensure_restores_only_when_a_rule_is_missing():
    rules = ipt.forward_rules(N("10.42.0.0/16"))
    fake = FakeIPTables({r.line() for r in rules})
    g = ipt.RuleGroup("fwd", rules, fake)  # type: ignore[arg-type]
    assert g.ensure() is False and fake.payloads == []
    fake.present.discard(rules[2].line())
    assert g.ensure() is True and len(fake.payloads) == 1
    assert fake.payloads[0].startswith("*filter\n:FLANNEL-FWD - [0:0]\n")


def test_ensure_checks_a_listing_and_uses_check_only_when_a_rule_is_not_in_it():
    """All rules in the `-S` listing: no `-C` at all. A rule `-S` spells differently but `-C` finds:
    no repair (never a needless re-install)."""
    rules = ipt.masq_rules(N("10.42.0.0/16"), N("10.42.1.0/24"))
    fake = FakeIPTables({r.line() for r in rules})
    g = ipt.RuleGroup("masq", rules, fake)  # type: ignore[arg-type]
    assert g.ensure() is False and fake.checks == 0 and fake.payloads == []
    fake.spelled[rules[3].line()] = rules[3].line().replace("-s ", "--source ")
    assert g.ensure() is False and fake.checks == len(rules) and fake.payloads == []


def test_restore_payload_text():
    r1 = ipt.Rule("filter", "INPUT", ("-s", "127.0.0.1", "-d", "127.0.0.1", "-j", "RETURN"))
    r2 = ipt.Rule("filter", "INPUT", ("-s", "127.0.0.1", "!", "-d", "224.0.0.0/4", "-m", "comment", "--comment",
                                      "flanneld masq", "-j", "MASQUERADE", "--random-fully"))
    expected = ('*filter\n-A INPUT -s 127.0.0.1 -d 127.0.0.1 -j RETURN\n-A INPUT -s 127.0.0.1 ! -d 224.0.0.0/4 '
                '-m comment --comment "flanneld masq" -j MASQUERADE --random-fully\nCOMMIT\n')
    assert ipt.render_payload({"filter": [r1.line(), r2.line()]}) == expected
    assert ipt.render_payload({"filter": [r1.line()], "nat": [r1.line()], "raw": []}) == (
        "*filter\n-A INPUT -s 127.0.0.1 -d 127.0.0.1 -j RETURN\nCOMMIT\n"
        "*nat\n-A INPUT -s 127.0.0.1 -d 127.0.0.1 -j RETURN\nCOMMIT\n")


def test_random_fully_version_check():
    assert ipt.supports_random_fully("iptables v1.8.9 (nf_tables)")
    assert ipt.supports_random_fully("iptables v1.6.2")
    assert not ipt.supports_random_fully("iptables v1.6.1")
    assert not ipt.supports_random_fully("garbage")


def test_nft_masq_script_uses_iptables_semantics():
    s = nft.masq_script(N("10.42.0.0/16"), N("10.42.1.0/24"))
    rules = [ln.split(" postrtg ", 1)[1] for ln in s.splitlines() if ln.startswith("add rule")]
    assert rules == [
        "meta mark & 0x4000 == 0x4000 return",                       # bit test like --mark 0x4000/0x4000
        "ip saddr 10.42.1.0/24 ip daddr 10.42.0.0/16 return",
        "ip saddr 10.42.0.0/16 ip daddr 10.42.1.0/24 return",
        "ip saddr != 10.42.0.0/16 ip daddr 10.42.1.0/24 return",     # like ! -s CLUSTER -d POD
        "ip saddr 10.42.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.42.0.0/16 ip daddr 10.42.0.0/16 masquerade fully-random",
    ]
    assert "flush chain ip flannel-ipv4 postrtg" in s
    assert "masquerade fully-random" not in nft.masq_script(N("10.42.0.0/16"), N("10.42.1.0/24"), fully_random=False)


def test_nft_forward_script_ipv6():
    s = nft.forward_script(N6("fc00::/48"))
    assert "add table ip6 flannel-ipv6" in s
    assert "add rule ip6 flannel-ipv6 forward ip6 saddr fc00::/48 accept" in s


# ---- the tools failing: fake binaries on PATH --------------------------------------------------

LOCK_MSG = "Another app is currently holding the xtables lock. Stopped waiting after 5s."


def fake_tool(bindir: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``bindir`` that appends its arguments to ``<name>.calls`` first."""
    calls = bindir / f"{name}.calls"
    path = bindir / name
    path.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{body}\n')
    path.chmod(0o755)
    return calls


@pytest.fixture
def bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", str(d))      # only our fakes: no real iptables/ip can run
    return d


RULE = ipt.masq_rules(N("10.42.0.0/16"), N("10.42.1.0/24"))[0]


def test_a_busy_xtables_lock_is_an_error_never_a_missing_rule(bindir: Path) -> None:
    """Before: ``-C`` exiting 4 (lock busy) read as "rule missing", so the bootstrap appended a
    second jump rule; and ``iptables -w`` without seconds hung until the subprocess timeout."""
    calls = fake_tool(bindir, "iptables", f'echo "{LOCK_MSG}" >&2\nexit 4')
    restores = fake_tool(bindir, "iptables-restore", "exit 0")
    tool = ipt.IPTables(4)
    with pytest.raises(errors.ResourceBusy) as e:
        tool.exists(RULE)
    msg = str(e.value)
    assert "`iptables -w 5 -t nat -C POSTROUTING" in msg and "xtables lock" in msg and "fuser" in msg
    assert len(calls.read_text().splitlines()) == retry.FIREWALL_ATTEMPTS
    assert calls.read_text().splitlines()[0].startswith(f"-w {ipt.LOCK_WAIT_SECONDS} -t nat -C POSTROUTING")
    with pytest.raises(errors.ResourceBusy):
        ipt.RuleGroup("masq v4", [RULE], tool).ensure()
    assert not restores.exists()        # nothing was re-installed on a guess


def test_a_lock_busy_for_a_moment_is_retried_within_the_call(bindir: Path) -> None:
    flag = bindir / "busy-once"
    flag.write_text("")
    calls = fake_tool(bindir, "iptables", f'if [ -e {flag} ]; then /bin/rm {flag}; echo "{LOCK_MSG}" >&2; exit 4; fi\n'
                                          "exit 0")
    assert ipt.IPTables(4).exists(RULE) is True
    assert len(calls.read_text().splitlines()) == 2


def test_iptables_restore_busy_and_failing(bindir: Path) -> None:
    fake_tool(bindir, "iptables-restore", f'echo "{LOCK_MSG}" >&2\nexit 4')
    with pytest.raises(errors.ResourceBusy, match=r"`iptables-restore --noflush -w 5` could not take the xtables"):
        ipt.IPTables(4).restore("*nat\nCOMMIT\n")
    fake_tool(bindir, "iptables-restore", 'echo "iptables-restore: line 2 failed" >&2\nexit 1')
    with pytest.raises(errors.BackendError, match=r"`iptables-restore --noflush -w 5` failed \(exit 1\): "
                                                  r"iptables-restore: line 2 failed; the rules flannel tried"):
        ipt.IPTables(4).restore("*nat\nCOMMIT\n")


def test_a_hung_tool_is_busy_and_named(bindir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "COMMAND_TIMEOUT_SECONDS", 0.3)
    fake_tool(bindir, "iptables", "exec /bin/sleep 30")
    with pytest.raises(errors.ResourceBusy, match=r"`iptables -w 5 -t nat -C POSTROUTING .*` did not finish within "
                                                  r"0.3s and was killed"):
        ipt.IPTables(4).exists(RULE)


def test_a_missing_binary_is_named(bindir: Path) -> None:
    with pytest.raises(errors.BackendError, match=r"cannot run `iptables --version`: .*is iptables installed"):
        ipt.IPTables(4).version_text()


@pytest.mark.parametrize("output", ["this is not json", '{"dst": "10.42.1.0/24"}', "[1, 2]", "[\\377]"])
def test_unreadable_ip_output_is_a_backend_error_naming_the_command(bindir: Path, output: str) -> None:
    """Before: ``json.loads`` raised ValueError (or ``.get`` on an int AttributeError) out of the
    resync loop, which ended the traffic thread and the agent."""
    fake_tool(bindir, "ip", f"printf '{output}'")
    tm = traffic.create(AgentOptions(ip_blackhole_route=True, ip_masq=False, iptables_forward_rules=False),
                        parse_network_config('{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"}}'))
    with pytest.raises(errors.BackendError, match=r"`ip -j -4 route show table main type blackhole` printed output "
                                                  r"flannel cannot read"):
        tm.ensure_blackhole(Lease(N("10.42.1.0/24"), LeaseAttrs()))


# ---- the resync loop driven by netfilter change notifications (flannel.traffic.changes) ----------

class FakeChanges:
    """Stands in for ``RulesetChanges``: ``notify()`` is a ruleset change; ``wait`` blocks until one
    or the stop hook."""

    def __init__(self) -> None:
        self.pending = threading.Event()
        self.signal = threading.Event()
        self.waiting = threading.Event()
        self.closed = False

    def notify(self) -> None:
        self.pending.set()
        self.signal.set()

    def wake_on(self, stop: threading.Event) -> None:
        stophooks.on_stop(stop, self.signal.set)

    def drain(self) -> bool:
        had = self.pending.is_set()
        self.pending.clear()
        self.signal.clear()
        return had

    def wait(self, timeout: float) -> bool:
        self.waiting.set()
        self.signal.wait(timeout)
        self.waiting.clear()
        return self.pending.is_set()

    def close(self) -> None:
        self.closed = True


class CountingManager(traffic.TrafficManager):
    """Records when each check ran."""

    def __init__(self) -> None:
        super().__init__(AgentOptions(iptables_resync=1),
                         parse_network_config('{"Network":"10.42.0.0/16","Backend":{"Type":"vxlan"}}'))
        self.checks: list[float] = []

    def setup(self, lease: Lease, prev_network: N | None = None, prev_subnet: N | None = None, **kw: object) -> None:
        pass

    def change_driven(self) -> bool:
        return True

    def resync_once(self) -> None:
        self.checks.append(time.monotonic())


def test_the_resync_checks_once_then_only_after_a_change_at_most_once_per_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeChanges()
    monkeypatch.setattr(changes.RulesetChanges, "open", classmethod(lambda cls: fake))
    tm, stop = CountingManager(), threading.Event()
    t = threading.Thread(target=tm.run_resync, args=(stop,), daemon=True)
    t.start()
    try:
        wait_for(fake.waiting.is_set, "the loop waiting for a change")
        assert len(tm.checks) == 1, "one check at start, then none without a change"
        fake.notify()          # right after the first check: the next one waits for the period
        wait_for(lambda: len(tm.checks) == 2, "a check after the change")
        assert tm.checks[1] - tm.checks[0] >= 1.0, "two checks within one --iptables-resync period"
        wait_for(fake.waiting.is_set, "the loop waiting again")
        assert len(tm.checks) == 2
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive(), "stop did not end the loop"
    assert fake.closed and len(tm.checks) == 2
