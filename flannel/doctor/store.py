"""The store side of ``flannelctl doctor``: network config, our lease and the remote leases.

Read through the agent's own store code, read-only:

* etcd: ``EtcdRegistry.get_config`` / ``list_leases`` (the same calls the etcd subnet manager
  makes for its snapshot); our lease is the one whose subnets ``subnet.env`` names — the file the
  agent wrote for this node (``--subnet-file``);
* kube: ``KubeClient.list_nodes`` and ``nodes.node_to_lease`` (the conversion the agent's node
  tracker uses); the config is ``net-conf.json`` as the kube subnet manager reads it; our lease is
  our node's (``$NODE_NAME``) pod CIDR as ``nodes.own_lease`` computes it.

An unreachable store is retried with the agent's ``retry.store`` policy for ``store_timeout``
seconds (a loaded node or a restarting etcd should not fail the check at once). A problem that
makes the check impossible (store still unreachable, no config, no subnet.env, our node unknown)
raises a ``FlannelError``; a problem that *is* a difference (our lease is gone from the
store, subnet.env disagrees with the node's pod CIDR) becomes a finding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Protocol, TypeVar

from flannel import errors, retry, subnet_file
from flannel.config import NetworkConfig, parse_network_config
from flannel.doctor.findings import MISSING, WRONG_SUBNET, Finding, LeaseRef
from flannel.lease import Lease, LeaseAttrs
from flannel.subnet_managers.etcd.store import Listing

T = TypeVar("T")
Net = IPv4Network | IPv6Network
Ident = tuple[IPv4Network | None, IPv6Network | None]


class Registry(Protocol):
    """What doctor uses of ``EtcdRegistry`` (read-only calls only)."""

    config_key: str

    def describe(self) -> str: ...

    def get_config(self) -> str: ...

    def list_leases(self, *, ttl: bool = False) -> Listing: ...


class NodeLister(Protocol):
    """What doctor uses of ``KubeClient``."""

    @property
    def host(self) -> str: ...

    def list_nodes(self) -> tuple[list[dict[str, Any]], str]: ...


@dataclass(frozen=True)
class StoreView:
    """Everything doctor needs from the store, for one node."""

    mode: str                                   # etcd | kube
    where: str                                  # the store, for the report header
    config: NetworkConfig
    own_ident: Ident                            # our subnets
    own: Lease | None                           # our lease as the store has it (None: not there)
    remote: tuple[Lease, ...]                   # every other lease
    node_names: Mapping[Ident, str] = field(default_factory=dict)   # kube: lease → node name
    own_node: str | None = None
    kept: tuple[Net, ...] = ()                  # subnets of unreadable records (the agent keeps them)
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()

    def ref(self, lease: Lease) -> LeaseRef:
        return LeaseRef.of(lease, self.node_names.get(lease.ident))

    @property
    def own_ref(self) -> LeaseRef:
        if self.own is not None:
            return LeaseRef.of(self.own, self.own_node)
        v4, v6 = self.own_ident
        return LeaseRef(subnet=str(v4) if v4 else None, ipv6_subnet=str(v6) if v6 else None, node=self.own_node)


STORE_TIMEOUT_SECONDS = 20.0


def _retrying(what: str, timeout: float, fn: Callable[[], T]) -> T:
    """``fn()``, retried while the store is unavailable, for at most ``timeout`` seconds."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.daemon = True
    timer.start()
    try:
        return retry.store(stop, what=what)(fn)
    finally:
        timer.cancel()


# --------------------------------------------------------------------------------------------
# subnet.env
# --------------------------------------------------------------------------------------------

def subnets_from_env(env: Mapping[str, str], config: NetworkConfig, path: str) -> Ident:
    """Our subnets from the agent's subnet.env (``FLANNEL_SUBNET`` = first address/prefix).

    :raises errors.ConfigError: no file, or it lacks a subnet of a family the config enables.
    """
    if not env:
        raise errors.ConfigError(f"no subnet file at {path} (or it is empty): is the flannel agent running on this "
                                 "node, and is this its --subnet-file? (doctor runs on the node, as root)")
    v4 = v6 = None
    if config.enable_ipv4:
        nets4 = subnet_file.parse_networks(env.get("FLANNEL_SUBNET"), 4)
        if len(nets4) != 1:
            raise errors.ConfigError(f"{path}: FLANNEL_SUBNET={env.get('FLANNEL_SUBNET', '')!r} is not one IPv4 "
                                     "subnet; the network config enables IPv4")
        v4 = nets4[0]
    if config.enable_ipv6:
        nets6 = subnet_file.parse_networks(env.get("FLANNEL_IPV6_SUBNET"), 6)
        if len(nets6) != 1:
            raise errors.ConfigError(f"{path}: FLANNEL_IPV6_SUBNET={env.get('FLANNEL_IPV6_SUBNET', '')!r} is not "
                                     "one IPv6 subnet; the network config enables IPv6")
        v6 = nets6[0]
    return (v4, v6)


def _show(ident: Ident) -> str:
    return " & ".join(str(n) for n in ident if n is not None)


# --------------------------------------------------------------------------------------------
# etcd
# --------------------------------------------------------------------------------------------

def from_etcd(registry: Registry, subnet_path: str, *, store_timeout: float = STORE_TIMEOUT_SECONDS) -> StoreView:
    """Config, leases and our lease from etcd; our subnets from subnet.env.

    :raises errors.FlannelError: etcd unreachable or refusing, no/invalid config, no subnet.env.
    """
    text = _retrying("reading the network config", store_timeout, registry.get_config)
    config = parse_network_config(text, source=f"etcd {registry.config_key}")
    own_ident = subnets_from_env(subnet_file.read(subnet_path), config, subnet_path)
    leases = _retrying("listing leases", store_timeout, registry.list_leases).leases
    own = next((lease for lease in leases if lease.ident == own_ident), None)
    remote = tuple(lease for lease in leases if lease.ident != own_ident)
    findings: tuple[Finding, ...] = ()
    if own is None:
        findings = (Finding(MISSING, "lease", None, f"lease {_show(own_ident)} of this node (from {subnet_path})",
                            LeaseRef(subnet=str(own_ident[0]) if own_ident[0] else None,
                                     ipv6_subnet=str(own_ident[1]) if own_ident[1] else None),
                            "expired or deleted: other nodes have no route to this one; the agent acquires it "
                            "again (preferring the same subnet)"),)
    return StoreView(mode="etcd", where=registry.describe(), config=config, own_ident=own_ident, own=own,
                     remote=remote, findings=findings)


# --------------------------------------------------------------------------------------------
# kube
# --------------------------------------------------------------------------------------------

def from_kube(client: NodeLister, names: Any, config: NetworkConfig, node_name: str, subnet_path: str, *,
              store_timeout: float = STORE_TIMEOUT_SECONDS) -> StoreView:
    """Leases from the node list (``names``: the agent's ``AnnotationNames``); our lease is
    ``node_name``'s pod CIDR. subnet.env is optional here; when present it must agree.

    :raises errors.FlannelError: API server unreachable or refusing, our node unknown or without a pod CIDR.
    """
    from flannel.subnet_managers.kube import nodes

    items, _ = _retrying("listing nodes", store_timeout, client.list_nodes)
    mine = next((n for n in items if nodes.node_name(n) == node_name), None)
    if mine is None:
        raise errors.ConfigError(f"node {node_name!r} is not in the API server's node list ({client.host}); "
                                 "set NODE_NAME (or --node-name) to this node's name")
    own_ident: Ident = nodes.own_lease(mine, config, LeaseAttrs()).ident
    findings: list[Finding] = []
    notes: list[str] = []
    own: Lease | None
    try:
        own = nodes.node_to_lease(mine, names, config)
    except errors.BadLeaseRecord as e:
        own = None
        notes.append(f"this node's annotations are unreadable: {e}")
    if own is None:
        findings.append(Finding(MISSING, "lease", None, f"flannel annotations on node {node_name}",
                                LeaseRef(subnet=str(own_ident[0]) if own_ident[0] else None,
                                         ipv6_subnet=str(own_ident[1]) if own_ident[1] else None, node=node_name),
                                "other nodes do not know how to reach this one; the agent publishes them at start"))
    remote: list[Lease] = []
    node_names: dict[Ident, str] = {}
    kept: list[Net] = []
    for node in items:
        name = nodes.node_name(node)
        if name == node_name:
            continue
        try:
            lease = nodes.node_to_lease(node, names, config)
        except errors.BadLeaseRecord as e:
            notes.append(f"node {name}: unreadable flannel record ({e}); the agent keeps its last good lease")
            try:
                kept.extend(n for n in nodes.pod_cidrs(node) if n is not None)
            except errors.BadLeaseRecord:
                pass
            continue
        if lease is not None:
            remote.append(lease)
            node_names[lease.ident] = name
    env = subnet_file.read(subnet_path) if os.path.exists(subnet_path) else {}
    if env:
        try:
            from_env = subnets_from_env(env, config, subnet_path)
        except errors.ConfigError as e:
            notes.append(f"ignoring {subnet_path}: {e}")
        else:
            if from_env != own_ident:
                findings.append(Finding(WRONG_SUBNET, "subnet.env", f"{subnet_path}: {_show(from_env)}",
                                        f"pod CIDR {_show(own_ident)} of node {node_name}",
                                        LeaseRef.of(own, node_name) if own else None,
                                        "pods get addresses the other nodes do not route here; restart the agent"))
    return StoreView(mode="kube", where=f"API server {client.host}", config=config, own_ident=own_ident, own=own,
                     remote=tuple(remote), node_names=node_names, own_node=node_name, kept=tuple(kept),
                     findings=tuple(findings), notes=tuple(notes))
