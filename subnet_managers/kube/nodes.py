"""Node objects → leases (reference §5.4, §5.5), on the plain JSON the API server returns.

Pure functions, so the conversion is table-tested without a cluster and the manager can hand the
raw watch objects straight in (no model deserialisation for thousands of nodes).

Every node object is untrusted: the functions here check the JSON type of everything they read and
raise ``Rejected`` (a ``BadLeaseRecord`` carrying a counter reason) for anything unusable. The one
place that catches *every* exception while reading a node is ``NodeTracker`` (tracker.py).

Two steps, so that an update that changes nothing flannel reads is cheap: ``lease_inputs`` picks the
few raw values a lease depends on (pod CIDRs and flannel's annotations, a handful of dict look-ups,
no parsing), and ``lease_from_inputs`` parses them. The tracker compares the inputs with the last
ones it saw for the node and skips the parse for a kubelet heartbeat.

Differences from flannel (§14.12): our own node and remote nodes pick their pod CIDRs with the same
rule (the first CIDR of each family), so every agent agrees on which subnet a node owns.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannel import errors
from flannel.config import NetworkConfig
from flannel.lease import UNSPECIFIED_V4, Lease, LeaseAttrs
from flannel.subnet_managers.kube import skips
from flannel.subnet_managers.kube.annotations import MAX_VALUE_BYTES, AnnotationNames, backend_data_text
from flannel.subnet_managers.kube.skips import Rejected

Node = Mapping[str, Any]

CONDITION_REASON = "FlannelIsUp"
CONDITION_MESSAGE = "Flannel is running on this node"


def _metadata(node: Any) -> Mapping[str, Any]:
    if not isinstance(node, Mapping):
        raise Rejected(skips.NOT_AN_OBJECT, f"the node is a JSON {type(node).__name__}, not an object")
    meta = node.get("metadata")
    if not isinstance(meta, Mapping):
        raise Rejected(skips.BAD_METADATA, "metadata is missing or not an object")
    return meta


def node_name(node: Any) -> str:
    """``metadata.name``. :raises Rejected: not an object, no metadata, or no usable name."""
    name = _metadata(node).get("name")
    if not isinstance(name, str) or not name:
        raise Rejected(skips.NO_NAME, f"metadata.name is {_shape(name)}, not a non-empty string")
    return name


def display_name(node: Any) -> str:
    """The node's name for a log line, whatever the object looks like."""
    try:
        return node_name(node)
    except Exception:  # only for a log line: any shape gives a placeholder
        return "<unnamed>"


def _shape(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    return f"a JSON {type(value).__name__}"


def annotations_of(node: Node) -> dict[str, str]:
    """The node's string annotations (``{}`` when it has none: §14.11, flannel crashed on that).

    Lenient on purpose: used for our own node, where a strange extra annotation must not stop us
    from publishing ours; non-string values are left out.
    """
    meta = node.get("metadata") if isinstance(node, Mapping) else None
    ann = meta.get("annotations") if isinstance(meta, Mapping) else None
    if not isinstance(ann, Mapping):
        return {}
    return {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)}


def resource_version(obj: Any) -> str | None:
    """``metadata.resourceVersion`` if it is a non-empty string or number, else ``None``."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    if isinstance(rv, bool) or not isinstance(rv, (str, int)):
        return None
    text = str(rv)
    return text if text and len(text) <= 64 else None


@dataclass(frozen=True, slots=True)
class LeaseInputs:
    """The raw values a remote node's lease is computed from (compared to skip unchanged updates)."""

    managed: bool
    pod_cidrs: tuple[str, ...] = ()
    backend_type: str | None = None
    backend_data: str | None = None
    backend_v6_data: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None


_UNMANAGED = LeaseInputs(managed=False)


def lease_inputs(node: Any, names: AnnotationNames) -> LeaseInputs:
    """Pick what the lease depends on, checking JSON types. No parsing of values here.

    :raises Rejected: annotations not a map, a flannel annotation that is not a string or is too
        large, spec or pod CIDRs of the wrong type.
    """
    meta = _metadata(node)
    ann = meta.get("annotations")
    if ann is None:
        return _UNMANAGED
    if not isinstance(ann, Mapping):
        raise Rejected(skips.BAD_ANNOTATIONS, f"metadata.annotations is {_shape(ann)}, not a map of strings")

    def value(key: str) -> str | None:
        v = ann.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise Rejected(skips.BAD_ANNOTATIONS, f"annotation {key} is {_shape(v)}, not a string")
        if len(v) > MAX_VALUE_BYTES:
            raise Rejected(skips.TOO_LARGE, f"annotation {key} is {len(v)} characters long "
                                            f"(more than {MAX_VALUE_BYTES})")
        return v

    if value(names.subnet_manager) != "true":
        return _UNMANAGED
    return LeaseInputs(managed=True, pod_cidrs=_cidr_texts(node), backend_type=value(names.backend_type),
                       backend_data=value(names.backend_data), backend_v6_data=value(names.backend_v6_data),
                       public_ip=value(names.public_ip), public_ipv6=value(names.public_ipv6))


def _cidr_texts(node: Node) -> tuple[str, ...]:
    """``spec.podCIDRs``, else ``[spec.podCIDR]``, as strings (type-checked, not parsed)."""
    spec = node.get("spec")
    if spec is None:
        return ()
    if not isinstance(spec, Mapping):
        raise Rejected(skips.BAD_SPEC, f"spec is {_shape(spec)}, not an object")
    cidrs = spec.get("podCIDRs")
    if not cidrs:
        single = spec.get("podCIDR")
        if single is None or single == "":
            return ()
        if not isinstance(single, str):
            raise Rejected(skips.BAD_POD_CIDR, f"spec.podCIDR is {_shape(single)}, not a string")
        cidrs = [single]
    if not isinstance(cidrs, list):
        raise Rejected(skips.BAD_POD_CIDR, f"spec.podCIDRs is {_shape(cidrs)}, not a list")
    if len(cidrs) > 2:
        raise Rejected(skips.BAD_POD_CIDR, f"pod cidrs should be IPv4/IPv6 only or dualstack, got {len(cidrs)}")
    for c in cidrs:
        if not isinstance(c, str):
            raise Rejected(skips.BAD_POD_CIDR, f"spec.podCIDRs holds {_shape(c)}, not a string")
    return tuple(cidrs)


def _parse_cidrs(name: str, texts: tuple[str, ...]) -> tuple[IPv4Network | None, IPv6Network | None]:
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for text in texts:
        try:
            net = ipaddress.ip_network(text, strict=False)  # Go ParseCIDR masks host bits
        except ValueError:
            raise Rejected(skips.BAD_POD_CIDR, f"node {name!r}: pod CIDR {text[:64]!r} is not a CIDR") from None
        if isinstance(net, IPv4Network):
            v4 = v4 or net
        else:
            v6 = v6 or net
    return v4, v6


def pod_cidrs(node: Node) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The node's first IPv4 and first IPv6 pod CIDR (``spec.podCIDRs``, else ``spec.podCIDR``).

    :raises errors.BadLeaseRecord: three or more CIDRs, one that does not parse, wrong JSON types.
    """
    name = display_name(node)
    try:
        texts = _cidr_texts(node)
    except Rejected as e:
        raise Rejected(e.reason, f"node {name!r}: {e}") from None
    return _parse_cidrs(name, texts)


def node_to_lease(node: Node, names: AnnotationNames, config: NetworkConfig) -> Lease | None:
    """A remote node → its lease, or ``None`` if flannel does not manage it (§5.4).

    :raises errors.BadLeaseRecord: a managed node whose annotations or CIDRs are unusable.
    """
    name = node_name(node)
    try:
        inputs = lease_inputs(node, names)
    except Rejected as e:
        raise Rejected(e.reason, f"node {name!r}: {e}") from None
    return lease_from_inputs(name, inputs, names, config)


def lease_from_inputs(name: str, inputs: LeaseInputs, names: AnnotationNames,
                      config: NetworkConfig) -> Lease | None:
    """Parse a remote node's inputs into its lease (``None``: not managed by flannel).

    Only the address families enabled in ``config`` are read, so the lease has the same identity
    as the one that node's own agent acquired.

    :raises errors.BadLeaseRecord: (a ``Rejected``) unusable CIDRs, addresses or backend data.
    """
    if not inputs.managed:
        return None
    v4net, v6net = _parse_cidrs(name, inputs.pod_cidrs)
    subnet: IPv4Network | None = None
    ipv6_subnet: IPv6Network | None = None
    public_ip: IPv4Address = UNSPECIFIED_V4
    public_ipv6: IPv6Address | None = None
    bd = v6bd = None
    if config.enable_ipv4:
        if v4net is None:
            raise Rejected(skips.MISSING_POD_CIDR, f"node {name!r}: missing IPv4 address on spec.podCIDRs")
        subnet = v4net
        public_ip = _address(inputs.public_ip, names.public_ip, IPv4Address, name)
        bd = _data(inputs.backend_data, names.backend_data, name)
    if config.enable_ipv6:
        if v6net is None:
            raise Rejected(skips.MISSING_POD_CIDR, f"node {name!r}: missing IPv6 address on spec.podCIDRs")
        ipv6_subnet = v6net
        public_ipv6 = _address(inputs.public_ipv6, names.public_ipv6, IPv6Address, name)
        v6bd = _data(inputs.backend_v6_data, names.backend_v6_data, name)
    attrs = LeaseAttrs(public_ip=public_ip, public_ipv6=public_ipv6, backend_type=inputs.backend_type or "",
                       backend_data=bd, backend_v6_data=v6bd)
    return Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs)


def _data(value: str | None, key: str, name: str) -> str | None:
    try:
        return backend_data_text(value, key)
    except Rejected as e:
        raise Rejected(e.reason, f"node {name!r}: {e}") from None


def _address(text: str | None, key: str, cls: type, name: str) -> Any:
    if not text:
        raise Rejected(skips.MISSING_PUBLIC_IP, f"node {name!r}: annotation {key} is missing")
    try:
        return cls(text)
    except ValueError:
        raise Rejected(skips.BAD_PUBLIC_IP, f"node {name!r}: annotation {key}={text[:64]!r} is not an "
                                            f"IPv{4 if cls is IPv4Address else 6} address") from None


def contains_cidr(outer: IPv4Network | IPv6Network, inner: IPv4Network | IPv6Network) -> bool:
    """flannel's containsCIDR: ``inner`` lies entirely inside ``outer`` (same family)."""
    return outer.version == inner.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def own_lease(node: Node, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
    """Our own node → our lease, checked against the network config (§5.5 steps 2, 3, 8).

    :raises errors.ConfigError: no pod CIDR assigned, a family the config needs is missing, or the
        CIDR lies outside ``Network`` / ``IPv6Network``.
    """
    name = display_name(node)
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
