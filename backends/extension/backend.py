"""The extension backend (reference §9.6): a data plane made of the operator's own commands.

* ``PreStartupCommand`` runs before the lease; its trimmed output becomes our BackendData (a JSON
  string) — e.g. the MAC of a device it created;
* ``PostStartupCommand`` runs after the lease with ``NETWORK``, ``SUBNET``, ``IPV6SUBNET``,
  ``PUBLIC_IP``, ``PUBLIC_IPV6``;
* ``SubnetAddCommand`` / ``SubnetRemoveCommand`` run per remote lease with ``SUBNET``,
  ``PUBLIC_IP``, ``IPV6SUBNET``, ``PUBLIC_IPV6`` and the remote's BackendData text on stdin.

Every command runs through ``sh -c`` (flannel's docs; its code does not use a shell — see
``network.py`` for why we follow the docs). A failing add/remove command is logged with its exit
status and output and the agent carries on (flannel does the same; there is no retry). A failing
pre- or post-startup command is fatal, as in flannel: the node would otherwise hold a lease whose
data plane was never set up, and a supervisor restarting the agent makes the failure visible.

Beyond flannel: a lease re-announced unchanged (a relist, a renewal) does not re-run the add
command; a lease whose attributes changed runs the remove command for the old one, then the add
command for the new one (flannel only ran add again).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from flannel import errors, metrics
from flannel.backends.base import Backend, Network, each_batch
from flannel.backends.extension import command
from flannel.backends.extension import network as ext_net
from flannel.backends.extension.network import TYPE, ExtensionOptions
from flannel.config import NetworkConfig
from flannel.lease import UNSPECIFIED_V4, Batch, EventType, Lease, LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)


def _log_result(what: str, res: command.Result, level_ok: int = logging.INFO) -> None:
    if res.ok:
        log.log(level_ok, "extension: ran %s: %s\n Output: %s", what, res.command, res.output)
    else:
        log.error("extension: %s failed (%s): %s\n Output: %s", what, res.describe(), res.command, res.output)


class ExtensionNetwork(Network):
    """Runs the add/remove commands as remote leases come and go."""

    def __init__(self, lease: Lease, mtu: int, opts: ExtensionOptions,
                 timeout: float = command.DEFAULT_TIMEOUT) -> None:
        super().__init__(lease, mtu)
        self.opts = opts
        self.timeout = timeout
        self.peers: dict[object, Lease] = {}
        self.failures = 0      # commands that failed (for tests and operators)

    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        log.info("extension: watching for new subnet leases")
        for batch in each_batch(batches, stop):
            try:
                self.apply(batch)
            except Exception:
                log.exception("extension: could not apply a lease batch; continuing")

    def apply(self, batch: Batch) -> None:
        for ev in batch.events:
            lease = ev.lease
            if lease.attrs.backend_type != TYPE:
                log.warning("extension: ignoring non-extension subnet %s: type=%s", lease.describe(),
                            lease.attrs.backend_type or "<none>")
                continue
            old = self.peers.get(lease.ident)
            if ev.type is EventType.ADDED:
                if old == lease and old.attrs == lease.attrs:
                    continue
                log.info("extension: subnet added: %s via %s", lease.describe(), lease.attrs.public_ip)
                if old is not None:
                    self._subnet_command("SubnetRemoveCommand", self.opts.subnet_remove, old)
                self.peers[lease.ident] = lease
                self._subnet_command("SubnetAddCommand", self.opts.subnet_add, lease)
            else:
                log.info("extension: subnet removed: %s", lease.describe())
                self.peers.pop(lease.ident, None)
                self._subnet_command("SubnetRemoveCommand", self.opts.subnet_remove, old or lease)
        metrics.lease_events_applied(batch.events)  # metrics

    def _subnet_command(self, what: str, cmd: str, lease: Lease) -> None:
        if not cmd:
            return
        try:
            stdin = ext_net.subnet_stdin(lease)
        except errors.BadLeaseRecord as e:
            log.error("extension: not running %s for %s: %s", what, lease.describe(), e)
            return
        res = command.run(cmd, ext_net.subnet_env(lease), stdin, self.timeout)
        if not res.ok:
            self.failures += 1
        _log_result(what, res)


class ExtensionBackend(Backend):
    """Entry point ``extension``: prototype a data plane with shell commands."""

    type_name = TYPE

    def __init__(self, ext_iface: Any, options: Any = None, *, timeout: float = command.DEFAULT_TIMEOUT) -> None:
        super().__init__(ext_iface, options)
        self.timeout = timeout

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        opts, unknown = ext_net.parse_options(config.backend or {})
        for key in unknown:
            log.warning("extension: ignoring unknown option %s (flannel ignores it too)", key)
        data = None
        if opts.pre_startup:
            res = command.run(opts.pre_startup, {}, "\n", self.timeout)
            if not res.ok:
                raise errors.BackendError(f"extension: PreStartupCommand failed ({res.describe()}): "
                                          f"{opts.pre_startup}\n Output: {res.output}")
            _log_result("PreStartupCommand", res)
            data = ext_net.encode_backend_data(res.output)
        else:
            log.info("extension: no pre startup command configured - skipping")
        ext = self.ext_iface
        # the interface's own addresses, not --public-ip (flannel's extension backend)
        attrs = LeaseAttrs(public_ip=ext.iface_addr or UNSPECIFIED_V4, public_ipv6=ext.iface_v6_addr,
                           backend_type=TYPE, backend_data=data)
        lease = leases.acquire_lease(config, attrs)
        if opts.post_startup:
            res = command.run(opts.post_startup, ext_net.post_startup_env(config, lease), "\n", self.timeout)
            if not res.ok:
                raise errors.BackendError(f"extension: PostStartupCommand failed ({res.describe()}): "
                                          f"{opts.post_startup}\n Output: {res.output}")
            _log_result("PostStartupCommand", res)
        else:
            log.info("extension: no post startup command configured - skipping")
        return ExtensionNetwork(lease, ext.mtu, opts, self.timeout)
