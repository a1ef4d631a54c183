"""iptables / nftables rule lists and payloads (flannel's §13.1 iptables cases, with a fake iptables)."""

from __future__ import annotations

from ipaddress import IPv4Network as N
from ipaddress import IPv6Network as N6

from flannel.traffic import iptables as ipt
from flannel.traffic import nftables as nft
from tests.support import GOLDEN_NAT_S


class FakeIPTables:
    """Records restore payloads; ``exists`` answers from a set of restore lines."""

    def __init__(self, present: set[str] | None = None) -> None:
        self.present = present or set()
        self.payloads: list[str] = []

    def exists(self, rule: ipt.Rule) -> bool:
        return rule.line() in self.present

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
