"""Node objects → leases (reference §5.4, §5.5), on the plain JSON the API server returns.

Pure functions, so the conversion is table-tested without a cluster and the manager can hand the
raw watch objects straight in (no model deserialisation for thousands of nodes).

Differences from flannel (§14.12): our own node and remote nodes pick their pod CIDRs with the same
rule (the first CIDR of each family), so every agent agrees on which subnet a node owns.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannel import errors
from flannel.config import NetworkConfig
from flannel.lease import UNSPECIFIED_V4, Lease, LeaseAttrs
from flannel.subnet_managers.kube.annotations import AnnotationNames, backend_data_text

Node = Mapping[str, Any]

CONDITION_REASON = "FlannelIsUp"
CONDITION_MESSAGE = "Flannel is running on this node"


def node_name(node: Node) -> str:
    return str((node.get("metadata") or {}).get("name") or "<unnamed>")


def annotations_of(node: Node) -> dict[str, str]:
    """The node's annotations (``{}`` when it has none: §14.11, flannel crashed on that)."""
    ann = (node.get("metadata") or {}).get("annotations") or {}
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, Mapping) else {}


def resource_version(obj: Mapping[str, Any]) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def is_managed(node: Node, names: AnnotationNames) -> bool:
    """Only nodes marked ``kube-subnet-manager: "true"`` become leases (§5.2)."""
    return annotations_of(node).get(names.subnet_manager) == "true"


def pod_cidrs(node: Node) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The node's first IPv4 and first IPv6 pod CIDR (``spec.podCIDRs``, else ``spec.podCIDR``).

    :raises errors.BadLeaseRecord: three or more CIDRs, or one that does not parse.
    """
    spec = node.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if not isinstance(cidrs, list):
        raise errors.BadLeaseRecord(f"node {node_name(node)!r}: spec.podCIDRs is not a list: {cidrs!r}")
    if len(cidrs) > 2:
        raise errors.BadLeaseRecord(f"node {node_name(node)!r}: pod cidrs should be IPv4/IPv6 only or dualstack, "
                                    f"got {cidrs}")
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for text in cidrs:
        try:
            net = ipaddress.ip_network(str(text), strict=False)  # Go ParseCIDR masks host bits
        except ValueError:
            raise errors.BadLeaseRecord(f"node {node_name(node)!r}: pod CIDR {text!r} is not a CIDR") from None
        if isinstance(net, IPv4Network):
            v4 = v4 or net
        else:
            v6 = v6 or net
    return v4, v6


def node_to_lease(node: Node, names: AnnotationNames, config: NetworkConfig) -> Lease | None:
    """A remote node → its lease, or ``None`` if flannel does not manage it (§5.4).

    Only the address families enabled in ``config`` are read, so the lease has the same identity
    as the one that node's own agent acquired.

    :raises errors.BadLeaseRecord: a managed node whose annotations or CIDRs are unusable.
    """
    if not is_managed(node, names):
        return None
    ann = annotations_of(node)
    name = node_name(node)
    v4net, v6net = pod_cidrs(node)
    subnet: IPv4Network | None = None
    ipv6_subnet: IPv6Network | None = None
    public_ip: IPv4Address = UNSPECIFIED_V4
    public_ipv6: IPv6Address | None = None
    bd = v6bd = None
    if config.enable_ipv4:
        if v4net is None:
            raise errors.BadLeaseRecord(f"node {name!r}: missing IPv4 address on spec.podCIDRs")
        subnet = v4net
        public_ip = _address(ann, names.public_ip, IPv4Address, name)
        bd = _data(ann, names.backend_data, name)
    if config.enable_ipv6:
        if v6net is None:
            raise errors.BadLeaseRecord(f"node {name!r}: missing IPv6 address on spec.podCIDRs")
        ipv6_subnet = v6net
        public_ipv6 = _address(ann, names.public_ipv6, IPv6Address, name)
        v6bd = _data(ann, names.backend_v6_data, name)
    attrs = LeaseAttrs(public_ip=public_ip, public_ipv6=public_ipv6,
                       backend_type=ann.get(names.backend_type, ""),
                       backend_data=bd, backend_v6_data=v6bd)
    return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs)


def _data(ann: Mapping[str, str], key: str, name: str) -> str | None:
    try:
        return backend_data_text(ann.get(key), key)
    except errors.BadLeaseRecord as e:
        raise errors.BadLeaseRecord(f"node {name!r}: {e}") from None


def _address(ann: Mapping[str, str], key: str, cls: type, name: str) -> Any:
    text = ann.get(key)
    if not text:
        raise errors.BadLeaseRecord(f"node {name!r}: annotation {key} is missing")
    try:
        return cls(text)
    except ValueError:
        raise errors.BadLeaseRecord(f"node {name!r}: annotation {key}={text!r} is not an "
                                    f"IPv{4 if cls is IPv4Address else 6} address") from None


def contains_cidr(outer: IPv4Network | IPv6Network, inner: IPv4Network | IPv6Network) -> bool:
    """flannel's containsCIDR: ``inner`` lies entirely inside ``outer`` (same family)."""
    return outer.version == inner.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def own_lease(node: Node, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
    """Our own node → our lease, checked against the network config (§5.5 steps 2, 3, 8).

    :raises errors.ConfigError: no pod CIDR assigned, a family the config needs is missing, or the
        CIDR lies outside ``Network`` / ``IPv6Network``.
    """
    name = node_name(node)
    try:
        v4net, v6net = pod_cidrs(node)
    except errors.BadLeaseRecord as e:
        raise errors.ConfigError(str(e)) from None
    if v4net is None and v6net is None:
        raise errors.ConfigError(f"node {name!r} pod cidr not assigned (spec.podCIDR is empty; the cluster must "
                                 "allocate node CIDRs, e.g. kube-controller-manager --allocate-node-cidrs)")
    subnet = _own_family(name, v4net, config.network, "Network") if config.enable_ipv4 else None
    ipv6_subnet = _own_family(name, v6net, config.ipv6_network, "IPv6Network") if config.enable_ipv6 else None
    return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs)


def _own_family(name: str, cidr: Any, network: Any, field: str) -> Any:
    fam = "IPv4" if field == "Network" else "IPv6"
    if cidr is None:
        raise errors.ConfigError(f"node {name!r} has no {fam} pod CIDR in spec.podCIDRs, but the flannel "
                                 f"net config enables {fam}")
    if network is None:
        raise errors.ConfigError(f"the flannel net config enables {fam} but has no {field}")
    if not contains_cidr(network, cidr):
        raise errors.ConfigError(f'subnet "{network}" specified in the flannel net config doesn\'t contain '
                                 f'"{cidr}" PodCIDR of the "{name}" node ({field} must contain every node\'s podCIDR)')
    return cidr


def network_available_patch(now: datetime.datetime | None = None) -> dict[str, Any]:
    """The status patch that sets ``NetworkUnavailable=False`` (§5.8); conditions merge by type."""
    ts = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False",
        "lastHeartbeatTime": ts, "lastTransitionTime": ts,
        "reason": CONDITION_REASON, "message": CONDITION_MESSAGE,
    }]}}
