"""The plugin's inputs and the delegate config it builds from them (pure functions, no I/O but reads).

* ``parse_netconf``: the network config on stdin (flannel CNI keys: ``subnetFile``, ``dataDir``,
  ``delegate``, ``ipam``, ``runtimeConfig``). Keys match case-insensitively, as Go's encoding/json
  does for flannel's Go plugin, so configs written for it keep working.
* ``parse_subnet_env``: subnet.env with the Go plugin's rules (reference §10.4): split each line at
  the first ``=``, CIDRs for the networks/subnets, ``FLANNEL_MTU`` unsigned, ``FLANNEL_IPMASQ`` true
  only for ``true``; at least one network, one subnet, the MTU and IPMASQ must be present.
* ``build_delegate``: the ``bridge``/``host-local`` config for this node's subnet.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flannel.cni import errors as cerr
from flannel.cni.errors import CNIError

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
DEFAULT_DELEGATE = "bridge"
DEFAULT_IPAM = "host-local"


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


@dataclass(frozen=True)
class SubnetEnv:
    """What the agent published for this node. Subnets are in network form (``10.1.17.0/24``)."""

    network: ipaddress.IPv4Network | None
    subnet: ipaddress.IPv4Network | None
    ipv6_network: ipaddress.IPv6Network | None
    ipv6_subnet: ipaddress.IPv6Network | None
    mtu: int
    ipmasq: bool


@dataclass(frozen=True)
class NetConf:
    """The plugin's network config (what the runtime sends on stdin)."""

    cni_version: str
    name: str
    subnet_file: str = DEFAULT_SUBNET_FILE
    data_dir: str = DEFAULT_DATA_DIR
    delegate: Mapping[str, Any] = field(default_factory=dict)
    ipam: Mapping[str, Any] | None = None
    runtime_config: Mapping[str, Any] | None = None
    prev_result: Mapping[str, Any] | None = None


def _invalid(msg: str) -> CNIError:
    return CNIError(cerr.INVALID_NETWORK_CONFIG, msg)


def _get(obj: Mapping[str, Any], key: str) -> Any:
    """Case-insensitive lookup; the last matching key wins (Go encoding/json semantics)."""
    found = None
    for k, v in obj.items():
        if k.lower() == key.lower():
            found = v
    return found


def _opt_object(obj: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = _get(obj, key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"network config field {key!r} must be a JSON object, got {json.dumps(value)}")
    return dict(value)


def _opt_str(obj: Mapping[str, Any], key: str, default: str) -> str:
    value = _get(obj, key)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise _invalid(f"network config field {key!r} must be a string, got {json.dumps(value)}")
    return value


def parse_netconf(data: bytes | str) -> NetConf:
    """Decode and check the stdin config. Raises CNIError 6 (not JSON) / 7 (bad field) / 1 (version)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(cerr.DECODE_FAILURE, f"failed to decode the network config on stdin: {e}") from None
    if not isinstance(obj, dict):
        raise CNIError(cerr.DECODE_FAILURE, "the network config on stdin must be a JSON object")
    version = _opt_str(obj, "cniVersion", "")
    if version and version not in SUPPORTED_VERSIONS:
        raise CNIError(cerr.INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}",
                       f"supported versions: {', '.join(SUPPORTED_VERSIONS)}")
    delegate = _opt_object(obj, "delegate") or {}
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise _invalid("'delegate' dictionary, if present, must have (string) 'type' field")
    ipam = _opt_object(obj, "ipam")
    if ipam is not None and "routes" in ipam:
        routes = ipam["routes"]
        if not isinstance(routes, list) or not all(isinstance(r, dict) and isinstance(r.get("dst"), str)
                                                   for r in routes):
            raise _invalid(f"failed to read IPAM routes: ipam.routes must be a list of {{\"dst\": CIDR}}, "
                           f"got {json.dumps(routes)}")
    return NetConf(
        cni_version=version,
        name=_opt_str(obj, "name", ""),
        subnet_file=_opt_str(obj, "subnetFile", DEFAULT_SUBNET_FILE),
        data_dir=_opt_str(obj, "dataDir", DEFAULT_DATA_DIR),
        delegate=delegate,
        ipam=ipam,
        runtime_config=_opt_object(obj, "runtimeConfig"),
        prev_result=_opt_object(obj, "prevResult"),
    )


def parse_subnet_env(text: str, *, source: str) -> SubnetEnv:
    """subnet.env → SubnetEnv with the Go plugin's rules. Raises CNIError 100 naming file and key."""
    values: dict[str, Any] = {}
    nets = {"FLANNEL_NETWORK": 4, "FLANNEL_SUBNET": 4, "FLANNEL_IPV6_NETWORK": 6, "FLANNEL_IPV6_SUBNET": 6}
    for lineno, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        where = f"{source} line {lineno}"
        if key in nets:
            try:
                if "/" not in value:  # Go's ParseCIDR needs the prefix length
                    raise ValueError(value)
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise CNIError(cerr.INVALID_SUBNET_ENV, f"{where}: {key}={value!r} is not a CIDR") from None
            if net.version != nets[key]:
                raise CNIError(cerr.INVALID_SUBNET_ENV, f"{where}: {key}={value!r} is not an IPv{nets[key]} CIDR")
            values[key] = net
        elif key == "FLANNEL_MTU":
            if not value.isdigit() or int(value) >= 1 << 32:
                raise CNIError(cerr.INVALID_SUBNET_ENV, f"{where}: FLANNEL_MTU={value!r} is not an unsigned integer")
            values[key] = int(value)
        elif key == "FLANNEL_IPMASQ":
            values[key] = value == "true"
    missing: list[str] = []
    if "FLANNEL_NETWORK" not in values and "FLANNEL_IPV6_NETWORK" not in values:
        missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
    if "FLANNEL_SUBNET" not in values and "FLANNEL_IPV6_SUBNET" not in values:
        missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
    missing += [k for k in ("FLANNEL_MTU", "FLANNEL_IPMASQ") if k not in values]
    if missing:
        raise CNIError(cerr.INVALID_SUBNET_ENV, f"{source} is missing {', '.join(missing)}")
    return SubnetEnv(network=values.get("FLANNEL_NETWORK"), subnet=values.get("FLANNEL_SUBNET"),
                     ipv6_network=values.get("FLANNEL_IPV6_NETWORK"), ipv6_subnet=values.get("FLANNEL_IPV6_SUBNET"),
                     mtu=values["FLANNEL_MTU"], ipmasq=values["FLANNEL_IPMASQ"])


def load_subnet_env(path: str) -> SubnetEnv:
    """Read subnet.env. Missing → 11 (try again: the agent has not written it yet); unreadable → 5."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CNIError(cerr.TRY_AGAIN_LATER, f"{path} does not exist: is the flannel agent running on this node?",
                       "the agent writes subnet.env once it holds a subnet lease") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CNIError(cerr.IO_FAILURE, f"cannot read {path}: {e}") from None
    return parse_subnet_env(text, source=path)


def build_delegate(conf: NetConf, env: SubnetEnv) -> dict[str, Any]:
    """The delegate's network config (flannel's doCmdAdd + getDelegateIPAM, plus bridge defaults).

    Keys the user set in ``delegate`` win; flannel fills in name, type (bridge), ipMasq (the opposite
    of FLANNEL_IPMASQ: if the agent does not masquerade, the bridge should), mtu and, for bridge,
    isGateway / isDefaultGateway / hairpinMode. The IPAM section is the user's ``ipam`` with type
    (host-local), ranges (this node's subnets) and routes (the cluster networks, via the node's
    gateway address) filled in.
    """
    if "name" in conf.delegate:
        raise _invalid("'delegate' dictionary must not have 'name' field, it'll be set by flannel")
    if "ipam" in conf.delegate:
        raise _invalid("'delegate' dictionary must not have 'ipam' field, it'll be set by flannel")
    d: dict[str, Any] = json.loads(json.dumps(dict(conf.delegate)))  # deep copy
    d["name"] = conf.name
    d.setdefault("type", DEFAULT_DELEGATE)
    d.setdefault("ipMasq", not env.ipmasq)
    d.setdefault("mtu", env.mtu)
    if d["type"] == "bridge":
        d.setdefault("isGateway", True)
        d.setdefault("isDefaultGateway", True)
        d.setdefault("hairpinMode", True)
    if conf.cni_version:
        d["cniVersion"] = conf.cni_version
    if conf.runtime_config is not None:
        d["runtimeConfig"] = json.loads(json.dumps(dict(conf.runtime_config)))
    ipam: dict[str, Any] = json.loads(json.dumps(dict(conf.ipam or {})))
    ipam.setdefault("type", DEFAULT_IPAM)
    ipam["ranges"] = [[{"subnet": str(sn)}] for sn in (env.subnet, env.ipv6_subnet) if sn is not None]
    routes = list(ipam.get("routes") or [])
    for nw, sn in ((env.network, env.subnet), (env.ipv6_network, env.ipv6_subnet)):
        if nw is None:
            continue
        route: dict[str, Any] = {"dst": str(nw)}
        if ipam["type"] == DEFAULT_IPAM and sn is not None:
            # host-local's gateway is the subnet's first address (the bridge, FLANNEL_SUBNET). The
            # kernel route is the same with or without "gw"; naming it makes the result say what
            # is installed, which the bridge plugin's CHECK compares against (v1.1 fails otherwise).
            route["gw"] = str(sn.network_address + 1)
        routes.append(route)
    ipam["routes"] = routes
    d["ipam"] = ipam
    return d
