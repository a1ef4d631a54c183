"""iptables masquerade and forward rules (reference §11.2, §11.3), applied with ``iptables-restore``.

The rule lists are pure functions (``masq_rules``, ``forward_rules``), and so is the restore payload
(``render_payload``); ``IPTablesManager`` runs the binaries. Like flannel, a bootstrap moves our
rules to the end of their chains in one ``iptables-restore --noflush`` transaction per table. One
difference: the flannel chain is *declared* in that same transaction (``:FLANNEL-POSTRTG - [0:0]``,
which creates it or flushes it), so create-or-flush and refill are atomic; only the jump rule in
the built-in chain gets a ``-D`` before its ``-A`` when it already exists.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from flannel import errors

log = logging.getLogger(__name__)

POSTRTG = "FLANNEL-POSTRTG"
FWD = "FLANNEL-FWD"
FLANNEL_CHAINS = (POSTRTG, FWD)
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_MARK = "0x4000/0x4000"

Net = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Rule:
    """One iptables rule: ``-t table -A chain *spec``."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def line(self, op: str = "-A") -> str:
        """The iptables-restore line: tokens joined by one space, the comment in double quotes."""
        out = [op, self.chain]
        quote_next = False
        for tok in self.spec:
            out.append(f'"{tok}"' if quote_next else tok)
            quote_next = tok == "--comment"
        return " ".join(out)


def _mcast(version: int) -> str:
    return "224.0.0.0/4" if version == 4 else "ff00::/8"


def masq_rules(cluster: Net, pod: Net, *, fully_random: bool = True) -> list[Rule]:
    """flannel's 7 masquerade rules for ``cluster`` (config Network) and ``pod`` (our lease), §11.2."""
    c, p = str(cluster), str(pod)
    masq = ("-j", "MASQUERADE", "--random-fully") if fully_random else ("-j", "MASQUERADE")
    cm = ("-m", "comment", "--comment", MASQ_COMMENT)

    def r(chain: str, *spec: str) -> Rule:
        return Rule("nat", chain, tuple(spec))

    return [
        r("POSTROUTING", *cm, "-j", POSTRTG),
        r(POSTRTG, "-m", "mark", "--mark", KUBE_MARK, *cm, "-j", "RETURN"),
        r(POSTRTG, "-s", p, "-d", c, *cm, "-j", "RETURN"),
        r(POSTRTG, "-s", c, "-d", p, *cm, "-j", "RETURN"),
        r(POSTRTG, "!", "-s", c, "-d", p, *cm, "-j", "RETURN"),
        r(POSTRTG, "-s", c, "!", "-d", _mcast(cluster.version), *cm, *masq),
        r(POSTRTG, "!", "-s", c, "-d", c, *cm, *masq),
    ]


def forward_rules(cluster: Net) -> list[Rule]:
    """flannel's 3 forward rules (table filter), §11.3."""
    c = str(cluster)
    cm = ("-m", "comment", "--comment", FWD_COMMENT)
    return [
        Rule("filter", "FORWARD", (*cm, "-j", FWD)),
        Rule("filter", FWD, ("-s", c, *cm, "-j", "ACCEPT")),
        Rule("filter", FWD, ("-d", c, *cm, "-j", "ACCEPT")),
    ]


def render_payload(lines_by_table: dict[str, list[str]]) -> str:
    """``*table`` / lines / ``COMMIT`` blocks, tables in the order given."""
    out = []
    for table, lines in lines_by_table.items():
        if lines:
            out.append(f"*{table}\n" + "".join(f"{ln}\n" for ln in lines) + "COMMIT\n")
    return "".join(out)


def bootstrap_lines(rules: Sequence[Rule], exists: Callable[[Rule], bool]) -> dict[str, list[str]]:
    """The restore lines that (re)install ``rules`` at the end of their chains, per table.

    Flannel chains are declared (created or flushed) first; a rule in a built-in chain that already
    exists is deleted before it is appended, so it moves to the end and is never duplicated.
    """
    out: dict[str, list[str]] = {}
    declared: set[tuple[str, str]] = set()
    for rule in rules:
        lines = out.setdefault(rule.table, [])
        for chain in (rule.chain, _jump_target(rule)):
            if chain in FLANNEL_CHAINS and (rule.table, chain) not in declared:
                declared.add((rule.table, chain))
                lines.insert(0, f":{chain} - [0:0]")
    for rule in rules:
        lines = out[rule.table]
        if rule.chain not in FLANNEL_CHAINS and exists(rule):
            lines.append(rule.line("-D"))
        lines.append(rule.line("-A"))
    return out


def teardown_lines(rules: Sequence[Rule], exists: Callable[[Rule], bool]) -> dict[str, list[str]]:
    """``-D`` lines for every rule that exists, in order, per table."""
    out: dict[str, list[str]] = {}
    for rule in rules:
        if exists(rule):
            out.setdefault(rule.table, []).append(rule.line("-D"))
    return out


def _jump_target(rule: Rule) -> str:
    spec = rule.spec
    for i, tok in enumerate(spec[:-1]):
        if tok == "-j":
            return spec[i + 1]
    return ""


def supports_random_fully(version_text: str) -> bool:
    """``iptables v1.8.9 (nf_tables)`` → True (``--random-fully`` needs iptables ≥ 1.6.2)."""
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", version_text)
    return bool(m) and tuple(int(x) for x in m.groups()) >= (1, 6, 2)  # type: ignore[union-attr]


class IPTables:
    """Runs one family's binaries (``iptables`` or ``ip6tables``). Calls are serialised."""

    def __init__(self, version: int = 4) -> None:
        self.cmd = "iptables" if version == 4 else "ip6tables"
        self.restore_cmd = f"{self.cmd}-restore"
        self._lock = threading.Lock()

    def available(self) -> bool:
        return shutil.which(self.cmd) is not None and shutil.which(self.restore_cmd) is not None

    def version_text(self) -> str:
        return subprocess.run([self.cmd, "--version"], capture_output=True, text=True, timeout=30).stdout

    def exists(self, rule: Rule) -> bool:
        res = subprocess.run([self.cmd, "-w", "-t", rule.table, "-C", rule.chain, *rule.spec],
                             capture_output=True, text=True, timeout=30)
        return res.returncode == 0

    def chain_exists(self, table: str, chain: str) -> bool:
        res = subprocess.run([self.cmd, "-w", "-t", table, "-S", chain], capture_output=True, text=True, timeout=30)
        return res.returncode == 0

    def restore(self, payload: str) -> None:
        if not payload:
            return
        with self._lock:
            res = subprocess.run([self.restore_cmd, "--noflush", "-w"], input=payload, capture_output=True,
                                 text=True, timeout=60)
        if res.returncode != 0:
            raise errors.BackendError(f"{self.restore_cmd} failed: {res.stderr.strip()}\npayload:\n{payload}")

    def save(self, table: str) -> str:
        res = subprocess.run([f"{self.cmd}-save", "-t", table], capture_output=True, text=True, timeout=30)
        return res.stdout if res.returncode == 0 else ""


@dataclass
class RuleGroup:
    """A named list of rules kept in place together (masq or forward, for one family)."""

    name: str
    rules: list[Rule]
    ipt: IPTables

    def bootstrap(self) -> None:
        self.ipt.restore(render_payload(bootstrap_lines(self.rules, self.ipt.exists)))

    def ensure(self) -> bool:
        """Re-install the group if any rule is missing. Returns True if it had to repair."""
        if all(self.ipt.exists(r) for r in self.rules):
            return False
        log.warning("Some iptables rules are missing (%s); deleting and recreating rules", self.name)
        self.bootstrap()
        return True


def network_of(text: str | None, version: int) -> Net | None:
    if not text:
        return None
    try:
        net = ip_network(text, strict=False)
    except ValueError:
        return None
    return net if net.version == version else None
