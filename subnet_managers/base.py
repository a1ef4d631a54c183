"""The SubnetManager ABC: what both stores (etcd, the Kubernetes API) really do.

Store-specific state (etcd revisions, kube resourceVersions, node objects) never leaves the
implementation. Every method may block; the daemon calls them from its own threads.

The daemon reads and validates the network config once (``get_network_config``) and passes it to
the other methods. Optional capabilities are small protocols checked with ``isinstance``, not
stubs on this class: ``flannel.lease.StoredNodeAttrs`` (a store that remembers this node's public
IPs and backend data: kube).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator

from flannel.config import NetworkConfig
from flannel.lease import Lease, LeaseAttrs, WatchResult


class SubnetManager(abc.ABC):
    """A lease store. Constructed by the daemon from the CLI options; no I/O in ``__init__``."""

    #: entry-point name ("etcd", "kube")
    kind: str = ""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A human description for the startup log (e.g. ``etcd at http://...:2379 (prefix ...)``)."""

    @abc.abstractmethod
    def get_network_config(self) -> NetworkConfig:
        """Read and validate the network config.

        :raises errors.ConfigNotFound: not there yet (the daemon waits and retries).
        :raises errors.ConfigError: present but invalid (fatal).
        :raises errors.StoreUnavailable: the store cannot be reached (retried).
        """

    def prefetch_leases(self) -> None:  # noqa: B027 (an optional hook: doing nothing is the right default)
        """The daemon has the network config and goes on to set up the backend (its interface,
        devices) before it asks for a lease: a store may start reading what the acquisition will
        need now, so that the store's side of it overlaps that setup (etcd: the lease listing)."""

    @abc.abstractmethod
    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        """Get this node's lease in ``config``'s network, publishing ``attrs``. Retries transient
        failures itself. ``config`` is the validated config the daemon read with
        ``get_network_config`` (managers do not read it again).

        :raises errors.NetworkFull: no free subnet (fatal).
        :raises errors.ConfigError: e.g. kube podCIDR outside the network.
        """

    @abc.abstractmethod
    def watch_leases(self, config: NetworkConfig, stop: threading.Event) -> Iterator[WatchResult]:
        """Yield a snapshot of all leases, then events, forever (until ``stop`` is set).

        Reconnects and relists internally; never raises for transient store problems. A record
        that cannot be decoded is logged, counted and skipped; it never ends the watch.

        :raises errors.ConfigChanged: the store's network config no longer matches ``config`` in a
            way a running agent cannot apply (a store that follows its config; etcd does). Fatal:
            the daemon exits 1 so that the supervisor restarts it with the new config.
        """

    @abc.abstractmethod
    def complete_lease(self, config: NetworkConfig, lease: Lease, stop: threading.Event,
                       on_lease: Callable[[Lease], None] | None = None) -> None:
        """Keep our own lease alive until ``stop`` is set (etcd: renew, re-acquire if lost;
        kube: mark the node network available). ``on_lease`` is called with each new version of
        our lease (renewal or re-acquisition)."""

    def close(self) -> None:  # noqa: B027 (an optional hook: doing nothing is the right default)
        """Release connections. Idempotent."""
