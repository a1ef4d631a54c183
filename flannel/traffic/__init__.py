"""Masquerade and forward rules (reference §11): iptables (default) or nftables (``EnableNFTables``).

API for the daemon::

    from flannel import traffic
    tm = traffic.create(opts, config)            # AgentOptions, NetworkConfig → TrafficManager
    tm.setup(lease, prev_network, prev_subnet)   # after the lease is acquired (prev_* from the old
                                                 # subnet.env, None if there was none)
    threading.Thread(target=tm.run_resync, args=(stop,), daemon=True).start()

* ``setup`` first removes the *other* mode's artefacts (iptables mode deletes the nft tables
  ``ip flannel-ipv4`` / ``ip6 flannel-ipv6``; nft mode deletes the jump rules and the chains
  ``nat/FLANNEL-POSTRTG`` and ``filter/FLANNEL-FWD`` — flannel targeted ``nat/FLANNEL-FWD`` and could
  not delete a referenced chain, reference §14.19). Then it installs masquerade rules if
  ``opts.ip_masq`` and forward rules if ``opts.iptables_forward_rules``, for IPv4 when the config
  has a ``Network`` and for IPv6 when ``EnableIPv6`` is set and the lease has an IPv6 subnet (flannel
  also installed IPv6 rules with a ``::/0`` pod subnet when IPv6 was disabled, §14.22).
  iptables mode: if the network or our subnet changed since the previous run, the old masquerade
  rules are deleted first ("recycle"); a failure there raises ``errors.BackendError``.
* ``run_resync(stop)`` checks at once and then every ``opts.iptables_resync`` seconds that every
  rule exists (one ``iptables -S`` per table) and re-installs a group that lost one (one
  ``iptables-restore --noflush``). With nf_tables (iptables-nft, or nft mode) and no blackhole
  route it checks only after the kernel notified a ruleset change, at most once per period
  (``flannel.traffic.changes``): the same repair promise without a process spawned every 5 s.
  In nft mode it re-applies a chain that vanished or lost rules (flannel had no nft
  resync). It returns when ``stop`` is set and raises ``errors.BackendError`` when a pass could not
  repair everything (a group failed, the xtables lock stayed busy through ``retry.firewall``,
  a tool timed out or printed garbage): the daemon runs it as a supervised worker, which logs the
  error, restarts the loop with backoff and reports it in ``/healthz?verbose``. Every failure of a
  tool names the command (``flannel.traffic.command``).
* ``--ip-blackhole-route``: a ``blackhole`` route for our own subnet(s) in the main table (so
  traffic to pod IPs that do not exist is dropped here instead of following the default route),
  added by ``setup`` and re-checked by ``run_resync`` (reference §11.6). Uses ``ip route``. A
  failure during ``setup`` is a warning (the resync retries it), as the route is an extra.
* Rules are left in place at exit (zero-downtime restarts, §12.4).

The semantics chosen for the iptables/nftables difference (§14.20) are documented in
``flannel.traffic.nftables``: both modes masquerade the same packets (the iptables meaning).
"""

from __future__ import annotations

import abc
import json
import logging
import shutil
import threading
import time
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from flannel import errors
from flannel.config import NetworkConfig
from flannel.lease import Lease
from flannel.options import AgentOptions
from flannel.traffic import changes, command
from flannel.traffic import iptables as ipt
from flannel.traffic import nftables as nft

log = logging.getLogger(__name__)

__all__ = ["IPTablesManager", "NFTablesManager", "TrafficManager", "create"]

ANY_V4 = IPv4Network("0.0.0.0/0")
ANY_V6 = IPv6Network("::/0")


class TrafficManager(abc.ABC):
    def __init__(self, opts: AgentOptions, config: NetworkConfig) -> None:
        self.opts = opts
        self.config = config
        self._lease: Lease | None = None

    def families(self, lease: Lease) -> list[tuple[int, IPv4Network | IPv6Network, IPv4Network | IPv6Network]]:
        """(version, cluster network, our pod subnet) for every family that gets rules."""
        out: list[tuple[int, IPv4Network | IPv6Network, IPv4Network | IPv6Network]] = []
        if self.config.network is not None and lease.subnet is not None:
            out.append((4, self.config.network, lease.subnet))
        if self.config.enable_ipv6 and self.config.ipv6_network is not None and lease.ipv6_subnet is not None:
            out.append((6, self.config.ipv6_network, lease.ipv6_subnet))
        return out

    def ensure_blackhole(self, lease: Lease) -> None:
        """Add ``blackhole <our subnet>`` (IPv4 and IPv6) when ``--ip-blackhole-route`` and it is missing.

        The kernel refusing the route (e.g. another route for the same prefix) is a warning, as in
        flannel: the route is an extra and the next resync tries again.

        :raises errors.BackendError: ``ip route show`` failed, timed out or printed something unreadable.
        """
        if not self.opts.ip_blackhole_route:
            return
        self._lease = lease
        if shutil.which("ip") is None:
            return      # said once by setup
        for fam, subnet in (("-4", lease.subnet), ("-6", lease.ipv6_subnet)):
            if subnet is None:
                continue
            if str(subnet) in _blackhole_dsts(fam):
                continue
            argv = ["ip", fam, "route", "add", "blackhole", str(subnet)]
            add = command.run(argv)
            if add.returncode != 0:
                log.warning("%s", command.failed(argv, add, "another route for our subnet may be in the way"))
            else:
                log.info("added blackhole route %s", subnet)

    def _ensure_blackhole_at_setup(self, lease: Lease) -> None:
        if self.opts.ip_blackhole_route and shutil.which("ip") is None:
            log.error("--ip-blackhole-route needs the `ip` command (iproute2), which is not on PATH: "
                      "no blackhole route")
        try:
            self.ensure_blackhole(lease)
        except errors.BackendError as e:
            log.warning("blackhole route for %s: %s (the resync will try again)", lease.describe(), e)

    @abc.abstractmethod
    def setup(self, lease: Lease, prev_network: IPv4Network | None = None, prev_subnet: IPv4Network | None = None,
              *, prev_ipv6_network: IPv6Network | None = None, prev_ipv6_subnet: IPv6Network | None = None) -> None:
        """Install the rules for our lease (see the module docstring)."""

    @abc.abstractmethod
    def resync_once(self) -> None:
        """Check the installed rules once and repair what is missing."""

    def change_driven(self) -> bool:
        """Whether every check can wait for a netfilter change notification (``flannel.traffic.changes``):
        the rules are in nf_tables, and no blackhole route (the routing table sends no such notice
        here) needs the periodic check."""
        return False

    def _check(self) -> None:
        self.resync_once()
        if self._lease is not None:
            self.ensure_blackhole(self._lease)

    def run_resync(self, stop: threading.Event) -> None:
        """Check and repair now, then every ``--iptables-resync`` seconds until ``stop`` — or, with
        nf_tables, only once a change was notified, at most once per ``--iptables-resync``
        seconds (see ``flannel.traffic.changes``: a deleted rule comes back just as soon).

        :raises errors.BackendError: a pass could not repair everything (see the module doc).
        """
        interval = max(1, int(self.opts.iptables_resync))
        watch = changes.RulesetChanges.open() if self.change_driven() else None
        if watch is None:
            while not stop.is_set():
                self._check()
                stop.wait(interval)
            return
        log.info("re-checking the rules when netfilter reports a change (at most every %ds)", interval)
        watch.wake_on(stop)
        try:
            while not stop.is_set():
                watch.drain()   # a change from here on is seen by this check or wakes the wait below
                checked = time.monotonic()
                self._check()
                if not watch.wait(changes.SAFETY_CHECK_SECONDS) or stop.is_set():
                    continue
                delay = checked + interval - time.monotonic()
                if delay > 0:
                    stop.wait(delay)   # at most one check per --iptables-resync, as when polling
        finally:
            watch.close()


class IPTablesManager(TrafficManager):
    def __init__(self, opts: AgentOptions, config: NetworkConfig) -> None:
        super().__init__(opts, config)
        self.groups: list[ipt.RuleGroup] = []
        self._lock = threading.Lock()

    def setup(self, lease: Lease, prev_network: IPv4Network | None = None, prev_subnet: IPv4Network | None = None,
              *, prev_ipv6_network: IPv6Network | None = None, prev_ipv6_subnet: IPv6Network | None = None) -> None:
        n = nft.Nft()
        if n.available():
            for version in (4, 6):
                n.delete_table(version)
        groups: list[ipt.RuleGroup] = []
        wanted = self.opts.ip_masq or self.opts.iptables_forward_rules
        for version, cluster, pod in self.families(lease) if wanted else []:
            tool = ipt.IPTables(version)
            if not tool.available():
                log.error("%s / %s not found: no %s rules installed", tool.cmd, tool.restore_cmd,
                          "masquerade/forward")
                continue
            if self.opts.ip_masq:
                fully = not self.opts.ip_masq_fully_random_disable and ipt.supports_random_fully(tool.version_text())
                prev_net = prev_network if version == 4 else prev_ipv6_network
                prev_sub = prev_subnet if version == 4 else prev_ipv6_subnet
                anyn = ANY_V4 if version == 4 else ANY_V6
                if prev_net != cluster or prev_sub != pod:
                    old = ipt.masq_rules(prev_net or anyn, prev_sub or anyn, fully_random=fully)
                    log.info("recycling masquerade rules of network %s / subnet %s", prev_net, prev_sub)
                    tool.restore(ipt.render_payload(ipt.teardown_lines(old, tool.exists)))
                groups.append(ipt.RuleGroup(f"masq v{version}", ipt.masq_rules(cluster, pod, fully_random=fully), tool))
            if self.opts.iptables_forward_rules:
                groups.append(ipt.RuleGroup(f"forward v{version}", ipt.forward_rules(cluster), tool))
        for g in groups:
            log.info("installing %s rules (%d)", g.name, len(g.rules))
            g.bootstrap()
        with self._lock:
            self.groups = groups
        self._ensure_blackhole_at_setup(lease)

    def change_driven(self) -> bool:
        with self._lock:
            tools = {id(g.ipt): g.ipt for g in self.groups}
        return not self.opts.ip_blackhole_route and all(t.uses_nf_tables() for t in tools.values())

    def resync_once(self) -> None:
        """Repair every group that lost a rule. A failing group does not keep the others from
        being repaired; then the first failure is raised. A busy lock ends the pass at once (every
        group would wait for the same lock)."""
        with self._lock:
            groups = list(self.groups)
        failures: list[errors.BackendError] = []
        for g in groups:
            try:
                g.ensure()
            except errors.ResourceBusy:
                raise
            except errors.BackendError as e:
                log.warning("repairing %s rules failed: %s", g.name, e)
                failures.append(e)
        if failures:
            raise failures[0]


class NFTablesManager(TrafficManager):
    def __init__(self, opts: AgentOptions, config: NetworkConfig) -> None:
        super().__init__(opts, config)
        self.nft = nft.Nft()
        self.scripts: list[tuple[int, str, int, str]] = []   # (version, chain, rule count, script)
        self._lock = threading.Lock()

    def setup(self, lease: Lease, prev_network: IPv4Network | None = None, prev_subnet: IPv4Network | None = None,
              *, prev_ipv6_network: IPv6Network | None = None, prev_ipv6_subnet: IPv6Network | None = None) -> None:
        if not self.nft.available():
            raise errors.BackendError("no nftables support: the nft binary is not installed")
        cleanup_iptables()
        scripts: list[tuple[int, str, int, str]] = []
        for version, cluster, pod in self.families(lease):
            if self.opts.iptables_forward_rules:
                scripts.append((version, nft.FWD_CHAIN, 2, nft.forward_script(cluster)))
            if self.opts.ip_masq:
                fully = not self.opts.ip_masq_fully_random_disable
                script = nft.masq_script(cluster, pod, fully_random=fully)
                if fully and not self.nft.check(script):
                    log.info("nft: masquerade fully-random not supported; using plain masquerade")
                    script = nft.masq_script(cluster, pod, fully_random=False)
                scripts.append((version, nft.MASQ_CHAIN, 6, script))
        for version, chain, _count, script in scripts:
            log.info("installing nftables chain %s (IPv%d)", chain, version)
            self.nft.apply(script)
        with self._lock:
            self.scripts = scripts
        self._ensure_blackhole_at_setup(lease)

    def change_driven(self) -> bool:
        return not self.opts.ip_blackhole_route

    def resync_once(self) -> None:
        with self._lock:
            scripts = list(self.scripts)
        for version, chain, count, script in scripts:
            have = self.nft.chain_rule_count(version, chain)
            if have != count:
                log.warning("nftables chain %s (IPv%d) has %s of %d rules; re-applying", chain, version, have, count)
                self.nft.apply(script)


def cleanup_iptables() -> None:
    """Remove flannel's iptables artefacts (nft mode): jump rules, then the chains, in the right tables."""
    for version in (4, 6):
        tool = ipt.IPTables(version)
        if not tool.available():
            continue
        for table, builtin, chain in (("nat", "POSTROUTING", ipt.POSTRTG), ("filter", "FORWARD", ipt.FWD)):
            try:
                lines = [ln.replace("-A ", "-D ", 1) for ln in tool.save(table).splitlines()
                         if ln.startswith(f"-A {builtin} ") and ln.rstrip().endswith(f"-j {chain}")]
                if tool.chain_exists(table, chain):
                    lines += [f"-F {chain}", f"-X {chain}"]
                if lines:
                    tool.restore(ipt.render_payload({table: lines}))
                    log.info("removed iptables chain %s/%s (switching to nftables)", table, chain)
            except errors.BackendError as e:
                log.warning("cleaning up iptables %s/%s: %s", table, chain, e)


def create(opts: AgentOptions, config: NetworkConfig) -> TrafficManager:
    """The manager for ``config.enable_nftables``."""
    return NFTablesManager(opts, config) if config.enable_nftables else IPTablesManager(opts, config)


def _blackhole_dsts(fam: str) -> set[str]:
    """Destinations of the blackhole routes in the main table (``ip -j`` output, checked)."""
    argv = ["ip", "-j", fam, "route", "show", "table", "main", "type", "blackhole"]
    res = command.run(argv)
    if res.returncode != 0:
        raise command.failed(argv, res)
    try:
        routes: Any = json.loads(res.stdout or "[]")
    except ValueError as e:   # JSONDecodeError, or bytes that are not text
        raise command.bad_output(argv, f"not JSON: {e}", res.stdout) from e
    if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
        raise command.bad_output(argv, "not a JSON list of routes", res.stdout)
    return {str(r.get("dst")) for r in routes}
