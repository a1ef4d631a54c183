"""nftables masquerade and forward rules (``EnableNFTables: true``, reference §11.5), via ``nft -f``.

Semantics (reference §14.20): we keep the **iptables semantics** in both modes, so switching
``EnableNFTables`` never changes which packets are masqueraded:

* the kube-proxy mark is a bit test, ``meta mark & 0x4000 == 0x4000 return`` (flannel's nft text,
  ``meta mark 0x4000``, is an exact match that misses marks with other bits set);
* the 4th rule is ``ip saddr != CLUSTER ip daddr POD return`` like iptables' ``! -s CLUSTER -d POD``
  (flannel's nft text, ``ip saddr != POD ip daddr CLUSTER``, returned early for all traffic towards
  the cluster that is not from the local pods, so host-originated traffic to remote pods was never
  masqueraded in nft mode).

Each family is one atomic ``nft -f -`` transaction: add table and chain (idempotent), flush the
chain, add the rules. nft takes no lock; a call that does not finish within its timeout is
``errors.ResourceBusy`` and ``apply`` retries it (``retry.firewall``).
"""

from __future__ import annotations

import logging
import shutil
from ipaddress import IPv4Network, IPv6Network

from flannel import retry
from flannel.traffic import command

log = logging.getLogger(__name__)

Net = IPv4Network | IPv6Network

MASQ_CHAIN = "postrtg"
FWD_CHAIN = "forward"
APPLY_TIMEOUT_SECONDS = 60.0


def table_of(version: int) -> tuple[str, str]:
    """(nft family, table name)."""
    return ("ip", "flannel-ipv4") if version == 4 else ("ip6", "flannel-ipv6")


def table_cmd(version: int) -> str:
    fam, table = table_of(version)
    return f'add table {fam} {table} {{ comment "rules for {table}" ; }}'


def masq_script(cluster: Net, pod: Net, *, fully_random: bool = True) -> str:
    fam, table = table_of(cluster.version)
    c, p = str(cluster), str(pod)
    mcast = "224.0.0.0/4" if cluster.version == 4 else "ff00::/8"
    masq = "masquerade fully-random" if fully_random else "masquerade"
    rules = [
        "meta mark & 0x4000 == 0x4000 return",
        f"{fam} saddr {p} {fam} daddr {c} return",
        f"{fam} saddr {c} {fam} daddr {p} return",
        f"{fam} saddr != {c} {fam} daddr {p} return",
        f"{fam} saddr {c} {fam} daddr != {mcast} {masq}",
        f"{fam} saddr != {c} {fam} daddr {c} {masq}",
    ]
    head = [
        table_cmd(cluster.version),
        f"add chain {fam} {table} {MASQ_CHAIN} {{ type nat hook postrouting priority srcnat ; policy accept ; "
        f'comment "chain to manage traffic masquerading by flannel" ; }}',
        f"flush chain {fam} {table} {MASQ_CHAIN}",
    ]
    return "\n".join(head + [f"add rule {fam} {table} {MASQ_CHAIN} {r}" for r in rules]) + "\n"


def forward_script(cluster: Net) -> str:
    fam, table = table_of(cluster.version)
    c = str(cluster)
    return "\n".join([
        table_cmd(cluster.version),
        f"add chain {fam} {table} {FWD_CHAIN} {{ type filter hook forward priority filter ; policy accept ; "
        f'comment "chain to accept flannel traffic" ; }}',
        f"flush chain {fam} {table} {FWD_CHAIN}",
        f"add rule {fam} {table} {FWD_CHAIN} {fam} saddr {c} accept",
        f"add rule {fam} {table} {FWD_CHAIN} {fam} daddr {c} accept",
    ]) + "\n"


class Nft:
    """Runs the ``nft`` CLI."""

    def available(self) -> bool:
        return shutil.which("nft") is not None

    def apply(self, script: str) -> None:
        argv = ["nft", "-f", "-"]
        res = retry.firewall("`nft -f -`")(command.run, argv, input=script, timeout=APPLY_TIMEOUT_SECONDS)
        if res.returncode != 0:
            raise command.failed(argv, res, f"the script flannel tried to apply:\n{script}")

    def check(self, script: str) -> bool:
        res = command.run(["nft", "--check", "-f", "-"], input=script, timeout=APPLY_TIMEOUT_SECONDS)
        return res.returncode == 0

    def chain_rule_count(self, version: int, chain: str) -> int | None:
        """Rules in our chain, or None if the table/chain does not exist."""
        fam, table = table_of(version)
        res = command.run(["nft", "list", "chain", fam, table, chain])
        if res.returncode != 0:
            return None
        body = [ln.strip() for ln in res.stdout.splitlines()]
        return sum(1 for ln in body if ln.endswith(("return", "accept", "masquerade", "fully-random")))

    def delete_table(self, version: int) -> None:
        fam, table = table_of(version)
        res = command.run(["nft", "delete", "table", fam, table])
        if res.returncode != 0:
            log.debug("nft delete table %s %s: %s", fam, table, res.stderr.strip())
