"""iptables masquerade and forward rules (reference §11.2, §11.3), applied with ``iptables-restore``.

The rule lists are pure functions (``masq_rules``, ``forward_rules``), and so is the restore payload
(``render_payload``); ``IPTablesManager`` runs the binaries. Like flannel, a bootstrap moves our
rules to the end of their chains in one ``iptables-restore --noflush`` transaction per table. One
difference: the flannel chain is *declared* in that same transaction (``:FLANNEL-POSTRTG - [0:0]``,
which creates it or flushes it), so create-or-flush and refill are atomic; only the jump rule in
the built-in chain gets a ``-D`` before its ``-A`` when it already exists.

The xtables lock: every call passes ``-w LOCK_WAIT_SECONDS``, so legacy iptables waits that long for
a lock another program (kube-proxy, firewalld) holds and then exits 4 instead of hanging until our
subprocess timeout (iptables-nft accepts ``-w`` and needs no lock). Exit 4 becomes
``errors.ResourceBusy``, retried by ``retry.firewall``; a lock held longer fails the caller (the
resync worker, which the daemon restarts with backoff). The resync lists a table with ``-S`` (one
call) and falls back to ``-C`` per rule only when a rule is not listed. ``-C`` exit 1 means "no such rule" —
anything else is an error, never "missing": a busy ``-C`` read as "missing" would append a second
copy of the jump rule.
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

from flannel import errors, retry
from flannel.traffic import command

log = logging.getLogger(__name__)

POSTRTG = "FLANNEL-POSTRTG"
FWD = "FLANNEL-FWD"
FLANNEL_CHAINS = (POSTRTG, FWD)
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_MARK = "0x4000/0x4000"

LOCK_WAIT_SECONDS = 5            # iptables -w: one call waits this long for the xtables lock
RESTORE_TIMEOUT_SECONDS = 60.0   # iptables-restore of our few lines; generous for a huge table
EXIT_NO_RULE = 1                 # -C: the rule (or its chain) does not exist
EXIT_PARAMETER_PROBLEM = 2       # -C with a match this kernel/binary lacks: treated as "missing"
EXIT_RESOURCE_PROBLEM = 4        # the xtables lock (or the kernel) was busy

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


def _busy(argv: Sequence[str], res: subprocess.CompletedProcess[str]) -> errors.ResourceBusy:
    return errors.ResourceBusy(
        f"`{command.cmdline(argv)}` could not take the xtables lock within {LOCK_WAIT_SECONDS}s "
        f"(exit 4: {command.output_of(res)}): another program holds it (kube-proxy, firewalld, an "
        "iptables-restore; `fuser -v /run/xtables.lock` shows which)")


class IPTables:
    """Runs one family's binaries (``iptables`` or ``ip6tables``). Restores are serialised."""

    def __init__(self, version: int = 4) -> None:
        self.cmd = "iptables" if version == 4 else "ip6tables"
        self.restore_cmd = f"{self.cmd}-restore"
        self._lock = threading.Lock()
        self._nf_tables: bool | None = None

    def available(self) -> bool:
        return shutil.which(self.cmd) is not None and shutil.which(self.restore_cmd) is not None

    def _call(self, argv: list[str], *, input: str | None = None,
              timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run with the ``retry.firewall`` policy: a busy lock (exit 4) or a timeout is retried.
        ``timeout``: ``command.COMMAND_TIMEOUT_SECONDS`` unless given."""
        def once() -> subprocess.CompletedProcess[str]:
            res = command.run(argv, input=input, timeout=timeout)
            if res.returncode == EXIT_RESOURCE_PROBLEM:
                raise _busy(argv, res)
            return res
        return retry.firewall(f"`{command.cmdline(argv[:6])} ...`")(once)

    def version_text(self) -> str:
        return self._call([self.cmd, "--version"]).stdout

    def uses_nf_tables(self) -> bool:
        """Whether this binary is iptables-nft (``iptables v1.8.9 (nf_tables)``): its rules live in
        nf_tables, whose changes the kernel notifies (``flannel.traffic.changes``). Asked once."""
        if self._nf_tables is None:
            self._nf_tables = "nf_tables" in self.version_text()
        return self._nf_tables

    def exists(self, rule: Rule) -> bool:
        """Whether ``rule`` is installed. Raises (never answers False) when iptables could not tell."""
        argv = [self.cmd, "-w", str(LOCK_WAIT_SECONDS), "-t", rule.table, "-C", rule.chain, *rule.spec]
        res = self._call(argv)
        if res.returncode == 0:
            return True
        if res.returncode in (EXIT_NO_RULE, EXIT_PARAMETER_PROBLEM):
            return False
        raise command.failed(argv, res)

    def listed(self, table: str) -> set[str]:
        """The rules of ``table`` as ``iptables -S`` prints them (``-A chain spec`` lines, the same
        spelling as ``Rule.line()`` for our rules): one call for a whole table."""
        argv = [self.cmd, "-w", str(LOCK_WAIT_SECONDS), "-t", table, "-S"]
        res = self._call(argv)
        if res.returncode != 0:
            raise command.failed(argv, res)
        return {ln for ln in res.stdout.splitlines() if ln.startswith("-A ")}

    def chain_exists(self, table: str, chain: str) -> bool:
        argv = [self.cmd, "-w", str(LOCK_WAIT_SECONDS), "-t", table, "-S", chain]
        res = self._call(argv)
        if res.returncode in (0, EXIT_NO_RULE):
            return res.returncode == 0
        raise command.failed(argv, res)

    def restore(self, payload: str) -> None:
        if not payload:
            return
        argv = [self.restore_cmd, "--noflush", "-w", str(LOCK_WAIT_SECONDS)]
        with self._lock:
            res = self._call(argv, input=payload, timeout=RESTORE_TIMEOUT_SECONDS)
        if res.returncode != 0:
            raise command.failed(argv, res, f"the rules flannel tried to apply:\n{payload}")

    def save(self, table: str) -> str:
        argv = [f"{self.cmd}-save", "-t", table]
        res = self._call(argv)
        if res.returncode != 0:
            raise command.failed(argv, res)
        return res.stdout


@dataclass
class RuleGroup:
    """A named list of rules kept in place together (masq or forward, for one family)."""

    name: str
    rules: list[Rule]
    ipt: IPTables

    def bootstrap(self) -> None:
        self.ipt.restore(render_payload(bootstrap_lines(self.rules, self.ipt.exists)))

    def ensure(self) -> bool:
        """Re-install the group if any rule is missing. Returns True if it had to repair.

        Checked with one ``iptables -S`` per table (the resync runs every few seconds for the
        life of the agent: ten ``-C`` processes a pass cost more than the rest of an idle agent).
        Only when a rule is not in that listing does ``-C`` decide, rule by rule, so a binary that
        spells a rule differently from us costs the old checks, never a needless re-install."""
        tables = {r.table for r in self.rules}
        listed = {t: self.ipt.listed(t) for t in sorted(tables)}
        if all(r.line() in listed[r.table] for r in self.rules):
            return False
        if all(self.ipt.exists(r) for r in self.rules):
            log.debug("%s rules: `-S` spells one differently from us; `-C` finds them all", self.name)
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
