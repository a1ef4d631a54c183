"""The network config (etcd ``<prefix>/config`` or kube ``net-conf.json``), reference §3.

Parsing follows Go's encoding/json as flannel uses it: keys are case-insensitive, the last duplicate
wins, unknown keys are ignored. Validation and defaulting follow flannel's CheckNetworkConfig, with
messages that name the field and the rule. The ``Backend`` object is passed through untouched: each
backend parses its own options.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

from flannel import errors

DEFAULT_BACKEND = "udp"  # flannel's code (not its docs) uses udp when Backend is absent


@dataclass(frozen=True)
class NetworkConfig:
    """A parsed and validated network config. All defaults are filled in."""

    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    enable_nftables: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    backend: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    backend_type: str = DEFAULT_BACKEND

    @property
    def subnet_count(self) -> int:
        """How many subnets the allocation range holds (IPv4)."""
        if not self.enable_ipv4 or self.subnet_min is None or self.subnet_max is None:
            return 0
        size = 1 << (32 - self.subnet_len)
        return max(0, (int(self.subnet_max) - int(self.subnet_min)) // size + 1)

    def subnet_candidates(self) -> range:
        """Integer addresses of every allocatable IPv4 subnet, ascending."""
        assert self.subnet_min is not None and self.subnet_max is not None
        size = 1 << (32 - self.subnet_len)
        return range(int(self.subnet_min), int(self.subnet_max) + 1, size)

    def ipv6_subnet_candidates(self) -> range:
        assert self.ipv6_subnet_min is not None and self.ipv6_subnet_max is not None
        size = 1 << (128 - self.ipv6_subnet_len)
        return range(int(self.ipv6_subnet_min), int(self.ipv6_subnet_max) + 1, size)

    def is_compatible(self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None) -> bool:
        """Whether an existing lease fits this config (flannel's "config compatible", §4.6)."""
        if self.enable_ipv4:
            if subnet is None or subnet.prefixlen != self.subnet_len:
                return False
            assert self.subnet_min is not None and self.subnet_max is not None
            if not (self.subnet_min <= subnet.network_address <= self.subnet_max):
                return False
        if not self.enable_ipv6:
            return ipv6_subnet is None
        if ipv6_subnet is None or ipv6_subnet.prefixlen != self.ipv6_subnet_len:
            return False
        assert self.ipv6_subnet_min is not None and self.ipv6_subnet_max is not None
        return self.ipv6_subnet_min <= ipv6_subnet.network_address <= self.ipv6_subnet_max

    def to_json(self) -> str:
        """A canonical JSON form (explicit defaults), for `flannelctl config get --effective`."""
        out: dict[str, Any] = {"EnableIPv4": self.enable_ipv4}
        if self.network is not None:
            out.update(Network=str(self.network), SubnetLen=self.subnet_len,
                       SubnetMin=str(self.subnet_min), SubnetMax=str(self.subnet_max))
        out["EnableIPv6"] = self.enable_ipv6
        if self.ipv6_network is not None:
            out.update(IPv6Network=str(self.ipv6_network), IPv6SubnetLen=self.ipv6_subnet_len,
                       IPv6SubnetMin=str(self.ipv6_subnet_min), IPv6SubnetMax=str(self.ipv6_subnet_max))
        out["EnableNFTables"] = self.enable_nftables
        out["Backend"] = dict(self.backend) if self.backend else {"Type": self.backend_type}
        return json.dumps(out, indent=2)


def _fail(field_name: str, rule: str) -> errors.ConfigError:
    return errors.ConfigError(f"invalid network config: {field_name}: {rule}")


def _lower_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k.lower(): v for k, v in obj.items()}


def _get_bool(fields: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
    value = fields.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _fail(name, f"must be true or false, got {json.dumps(value)}")
    return value


def _get_uint(fields: Mapping[str, Any], key: str, name: str) -> int:
    value = fields.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(name, f"must be a non-negative integer, got {json.dumps(value)}")
    return value


def _get_net(fields: Mapping[str, Any], key: str, name: str, version: int) -> Any:
    value = fields.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        example = "10.244.0.0/16" if version == 4 else "fc00::/48"
        raise _fail(name, f"must be a CIDR string like {example}, got {json.dumps(value)}")
    try:
        net = ip_network(value, strict=False)  # Go ParseCIDR masks host bits
    except ValueError:
        raise _fail(name, f"{value!r} is not a valid CIDR") from None
    if net.version != version:
        raise _fail(name, f"{value!r} is not an IPv{version} CIDR")
    if int(net.network_address) == 0 and net.prefixlen == 0:
        return None  # 0.0.0.0/0 and ::/0 mean "not set" in flannel
    return net


def _get_addr(fields: Mapping[str, Any], key: str, name: str, version: int) -> Any:
    value = fields.get(key)
    if value is None or value == "":
        return None
    cls = IPv4Address if version == 4 else IPv6Address
    if not isinstance(value, str):
        raise _fail(name, f"must be an IPv{version} address string, got {json.dumps(value)}")
    try:
        addr = cls(value)
    except ValueError:
        raise _fail(name, f"{value!r} is not an IPv{version} address") from None
    return None if int(addr) == 0 else addr


def parse_network_config(text: str | bytes, *, source: str = "network config") -> NetworkConfig:
    """Parse, default and validate a network config.

    :param source: where the text came from, for error messages (etcd key or file path).
    :raises errors.ConfigError: with a message naming the field and the rule broken.
    """
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.ConfigError(f"invalid network config in {source}: not valid JSON: {e}") from None
    except RecursionError:
        raise errors.ConfigError(f"invalid network config in {source}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise errors.ConfigError(f"invalid network config in {source}: must be a JSON object")
    f = _lower_keys(obj)
    enable_ipv4 = _get_bool(f, "enableipv4", "EnableIPv4", True)
    enable_ipv6 = _get_bool(f, "enableipv6", "EnableIPv6", False)
    enable_nft = _get_bool(f, "enablenftables", "EnableNFTables", False)
    backend = f.get("backend")
    if backend is None or backend == {}:
        backend_type = DEFAULT_BACKEND
        backend = {}
    elif not isinstance(backend, dict):
        raise _fail("Backend", f"must be a JSON object like {{\"Type\": \"vxlan\"}}, got {json.dumps(backend)}")
    else:
        btype = _lower_keys(backend).get("type")
        if btype is None or btype == "":
            raise _fail("Backend.Type", "is missing (set it to vxlan, host-gw, udp, ...)")
        if not isinstance(btype, str):
            raise _fail("Backend.Type", f"must be a string like \"vxlan\", got {json.dumps(btype)}")
        backend_type = btype.lower()
    if not enable_ipv4 and not enable_ipv6:
        raise _fail("EnableIPv4/EnableIPv6", "at least one address family must be enabled")

    v4 = _validate_family(f, 4) if enable_ipv4 else (_get_net(f, "network", "Network", 4), 0, None, None)
    v6 = _validate_family(f, 6) if enable_ipv6 else (_get_net(f, "ipv6network", "IPv6Network", 6), 0, None, None)
    return NetworkConfig(
        network=v4[0], subnet_len=v4[1], subnet_min=v4[2], subnet_max=v4[3],
        enable_ipv4=enable_ipv4, enable_ipv6=enable_ipv6, enable_nftables=enable_nft,
        ipv6_network=v6[0], ipv6_subnet_len=v6[1], ipv6_subnet_min=v6[2], ipv6_subnet_max=v6[3],
        backend=backend, backend_type=backend_type,
    )


def _validate_family(f: Mapping[str, Any], version: int) -> tuple[Any, int, Any, Any]:
    """flannel's CheckNetworkConfig for one address family (reference §3.3)."""
    bits = 32 if version == 4 else 128
    p = "" if version == 4 else "IPv6"
    net_name, len_name, min_name, max_name = f"{p}Network", f"{p}SubnetLen", f"{p}SubnetMin", f"{p}SubnetMax"
    net = _get_net(f, net_name.lower(), net_name, version)
    if net is None:
        raise _fail(net_name, f"is missing; please define a correct {net_name} parameter in the flannel config")
    subnet_len = _get_uint(f, len_name.lower(), len_name)
    max_len, min_net_len = (30, 28) if version == 4 else (126, 124)
    if subnet_len > 0:
        if subnet_len > max_len:
            raise _fail(len_name, f"SubnetLen must be less than /{max_len + 1} (got {subnet_len})")
        if subnet_len < net.prefixlen + 2:
            raise _fail(len_name, f"network must be able to accommodate at least four subnets "
                                  f"({net_name} is /{net.prefixlen}, so {len_name} must be at least "
                                  f"{net.prefixlen + 2}; got {subnet_len})")
    else:
        if net.prefixlen > min_net_len:
            small = "network" if version == 4 else "IPv6Network"
            raise _fail(net_name, f"{small} is too small. Minimum useful network prefix is /{min_net_len} (got {net})")
        default_len = 24 if version == 4 else 64
        subnet_len = default_len if net.prefixlen <= default_len - 2 else net.prefixlen + 2
    size = 1 << (bits - subnet_len)
    cls = IPv4Address if version == 4 else IPv6Address
    smin = _get_addr(f, min_name.lower(), min_name, version)
    smax = _get_addr(f, max_name.lower(), max_name, version)
    if smin is None:
        smin = cls(int(net.network_address) + size)
    elif smin not in net:
        raise _fail(min_name, f"{min_name} is not in the range of the {net_name} ({smin} not in {net})")
    if smax is None:
        smax = cls(int(net.network_address) + net.num_addresses - size)
    elif smax not in net:
        raise _fail(max_name, f"{max_name} is not in the range of the {net_name} ({smax} not in {net})")
    for name, value in ((min_name, smin), (max_name, smax)):
        if int(value) % size:
            raise _fail(name, f"{name} is not on a SubnetLen boundary: {value} (must be a multiple of /{subnet_len})")
    if smin > smax:  # flannel does not check this and later reports "out of subnets"
        raise _fail(min_name, f"{min_name} {smin} is greater than {max_name} {smax}")
    return net, subnet_len, smin, smax


def restart_changes(running: NetworkConfig, stored: NetworkConfig) -> list[str]:
    """What changed between the config an agent runs with and the one now in the store that a
    running agent cannot apply: the networks it allocates from and routes, the subnet sizes, the
    address families and the backend type. Empty if none did. Each item reads ``Network
    10.5.0.0/16 → 10.6.0.0/16`` (for the exit message).
    """
    pairs = [("Network", running.network, stored.network), ("SubnetLen", running.subnet_len, stored.subnet_len),
             ("IPv6Network", running.ipv6_network, stored.ipv6_network),
             ("IPv6SubnetLen", running.ipv6_subnet_len, stored.ipv6_subnet_len),
             ("EnableIPv4", running.enable_ipv4, stored.enable_ipv4),
             ("EnableIPv6", running.enable_ipv6, stored.enable_ipv6),
             ("Backend.Type", running.backend_type, stored.backend_type)]
    return [f"{name} {old} → {new}" for name, old, new in pairs if old != new]


def deferred_changes(running: NetworkConfig, stored: NetworkConfig) -> list[str]:
    """Changes a running agent leaves alone until its next start (the allocation range, the
    backend's options, nftables): they apply to new allocations or need a restart, but they do
    not make the running data path wrong."""
    pairs = [("SubnetMin", running.subnet_min, stored.subnet_min), ("SubnetMax", running.subnet_max, stored.subnet_max),
             ("IPv6SubnetMin", running.ipv6_subnet_min, stored.ipv6_subnet_min),
             ("IPv6SubnetMax", running.ipv6_subnet_max, stored.ipv6_subnet_max),
             ("EnableNFTables", running.enable_nftables, stored.enable_nftables)]
    out = [f"{name} {old} → {new}" for name, old, new in pairs if old != new]
    if _backend_options(running) != _backend_options(stored) and running.backend_type == stored.backend_type:
        out.append("Backend options")
    return out


def _backend_options(config: NetworkConfig) -> dict[str, Any]:
    return {k: v for k, v in _lower_keys(config.backend).items() if k != "type"}
