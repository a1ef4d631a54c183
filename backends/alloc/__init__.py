"""``alloc``: lease a subnet and do nothing else (flannel's alloc backend, reference §9.5).

Useful when another component programs the data plane from subnet.env, and as the smallest real
backend plugin: it goes through the same registration and event pipeline as the others.
"""

from __future__ import annotations

import logging
import queue
import threading

from flannel.backends.base import Backend, Network, each_batch
from flannel.config import NetworkConfig
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)


class AllocNetwork(Network):
    def __init__(self, lease: Lease, mtu: int) -> None:
        super().__init__(lease, mtu)
        self.peers: dict[object, Lease] = {}

    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        """No data plane: just keep a peer table (for logs and tests)."""
        for batch in each_batch(batches, stop):
            for ev in batch.events:
                if ev.type is EventType.ADDED:
                    self.peers[ev.lease.ident] = ev.lease
                else:
                    self.peers.pop(ev.lease.ident, None)
            log.debug("alloc: %d peers known", len(self.peers))


class AllocBackend(Backend):
    type_name = "alloc"

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        attrs = LeaseAttrs(public_ip=self.ext_iface.ext_addr or LeaseAttrs().public_ip,
                           public_ipv6=self.ext_iface.ext_v6_addr if config.enable_ipv6 else None)
        lease = leases.acquire_lease(config, attrs)
        return AllocNetwork(lease, self.ext_iface.mtu)
