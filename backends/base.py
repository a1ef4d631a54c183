"""Backend and Network ABCs, and the external interface they run on.

A Backend is constructed with the external interface; ``register_network`` parses the backend's
own options from the network config, sets up devices, acquires the lease through the
``LeaseSource`` it is given (it never imports a subnet manager) and returns a Network. The Network's
``run`` consumes batches of lease events and keeps the kernel in step with them until ``stop``.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar

from flannel import stophooks
from flannel.config import NetworkConfig
from flannel.lease import Batch, Lease, LeaseSource
from flannel.options import AgentOptions


@dataclass(frozen=True)
class ExternalInterface:
    """The interface inter-host traffic uses, and the addresses chosen on it (reference §2)."""

    name: str
    index: int
    mtu: int
    iface_addr: IPv4Address | None
    ext_addr: IPv4Address | None
    iface_v6_addr: IPv6Address | None = None
    ext_v6_addr: IPv6Address | None = None


def each_batch(batches: queue.Queue[Batch | None], stop: threading.Event) -> Iterator[Batch]:
    """The batches ``Network.run`` receives, until ``stop`` is set or the daemon's end marker
    (``None``) arrives. For a ``run`` with nothing else to do between batches.

    It blocks on the queue without a timeout, so an idle agent does not wake up for it; a stop
    hook puts the end marker in the queue, so a set ``stop`` still ends the loop at once even
    when nobody else does (a test, a supervisor that only sets the event)."""
    unregister = stophooks.on_stop(stop, lambda: batches.put(None))
    try:
        while not stop.is_set():
            batch = batches.get()
            if batch is None:
                return
            yield batch
    finally:
        unregister()


class Network(abc.ABC):
    """One running overlay network on this host.

    The base keeps our lease and the pod MTU, which every backend has in the same way; a
    subclass calls ``super().__init__(lease, mtu)`` and implements ``run``.
    """

    def __init__(self, lease: Lease, mtu: int) -> None:
        self._lease: Lease = lease
        self._mtu: int = mtu

    @property
    def lease(self) -> Lease:
        """Our own lease, as acquired (updated by ``on_lease_renewed``)."""
        return self._lease

    @property
    def mtu(self) -> int:
        """MTU for pods (FLANNEL_MTU)."""
        return self._mtu

    @abc.abstractmethod
    def run(self, batches: queue.Queue[Batch | None], stop: threading.Event) -> None:
        """Apply event batches until ``stop`` is set or ``None`` is received.

        Batches carry ADDED/REMOVED events. A batch with ``synced=True`` ends a snapshot: every
        remote lease has now been delivered, so the backend reconciles the kernel against its
        desired set (deletes what no lease justifies, leaves correct entries alone). The first
        snapshot arrives first, so a restart converges without flapping. A failing peer is
        logged and retried; it never ends the loop.
        """

    def on_lease_renewed(self, lease: Lease) -> None:
        """Our own lease was renewed or re-acquired (same subnet). Default: remember it."""
        self._lease = lease

    def close(self) -> None:  # noqa: B027 (an optional hook: doing nothing is the right default)
        """Release what must not outlive the process (udp: the TUN). vxlan/host-gw leave their
        kernel state in place so that a restart does not interrupt traffic."""


class Backend(abc.ABC):
    """A data-plane plugin, registered under the ``flannel.backends`` entry-point group."""

    #: the ``Backend.Type`` this plugin implements, and the ``BackendType`` in its leases
    type_name: ClassVar[str] = ""

    def __init__(self, ext_iface: ExternalInterface, options: AgentOptions | None = None) -> None:
        """Store dependencies only; no I/O here (that happens in ``register_network``)."""
        self.ext_iface = ext_iface
        self.options = options or AgentOptions()

    @abc.abstractmethod
    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        """Set up the data plane for ``config`` and acquire our lease.

        :raises errors.ConfigError: bad backend options (message names the option).
        :raises errors.BackendError: devices or sockets could not be set up.
        """
