"""Pure logic of the udp backend: options, and lease → peer-table translation (the analogue of
vxlan's ``parse_options`` and ``vxlan_entries``).

A remote lease becomes one ``Peer``: its subnet is reached by sending flannel-format datagrams to
its public IP. The workers' lookup and anti-spoof rules over the resulting ``PeerTable`` live in
``packet.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from flannel import errors
from flannel.backends.udp.packet import Peer
from flannel.lease import Lease

DEFAULT_PORT = 8285
MAX_QUEUES = 16
DATA_PATHS = ("auto", "c", "python")


@dataclass(frozen=True)
class UDPOptions:
    """The ``Backend`` object of a udp network config (docs/udp.md). Only ``Port`` is flannel's;
    the rest are our tuning knobs, none of which changes the wire format (Go flannel ignores them).

    ``queues`` 0: automatic (one per CPU, at most 8). ``data_path`` "auto": the C fast path if it
    was built at install time, else pure Python; "c" fails registration without it. ``offload``
    None: on whenever the C path runs. ``trusted_sources``: outer source networks accepted from
    nodes whose datagrams do not come from their PublicIP (the anti-spoof rule, docs/udp.md).
    """

    port: int = DEFAULT_PORT
    queues: int = 0
    data_path: str = "auto"
    offload: bool | None = None
    spread_ports: bool = False
    trusted_sources: tuple[IPv4Network, ...] = ()


def _bad(name: str, rule: str, value: Any) -> errors.ConfigError:
    return errors.ConfigError(f"invalid udp backend option {name}: {rule}, got {json.dumps(value)}")


def _int(f: Mapping[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
    value = f.get(key)
    if value is None:
        return default
    # JSON has one number type; 9000.0 is 9000 (Go decodes it into an int field too)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not lo <= int(value) <= hi:
        raise _bad(name, f"must be an integer in [{lo}, {hi}]", value)
    return int(value)


def _bool(f: Mapping[str, Any], key: str, name: str) -> bool | None:
    value = f.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, "must be true or false", value)
    return value


def _networks(f: Mapping[str, Any], key: str, name: str) -> tuple[IPv4Network, ...]:
    value = f.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(name, 'must be a list of IPv4 networks such as ["192.168.0.0/24"]', value)
    out = []
    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError
            out.append(IPv4Network(item))
        except ValueError:
            raise _bad(name, "every element must be an IPv4 network in CIDR form with no host bits set",
                       item) from None
    return tuple(out)


def parse_options(backend: Mapping[str, Any]) -> UDPOptions:
    """Parse the ``Backend`` JSON object (keys case-insensitive, like Go's encoding/json; the last
    spelling of a key wins).

    :raises errors.ConfigError: naming the option and the rule it breaks.
    """
    f = {str(k).lower(): v for k, v in backend.items()}
    data_path = f.get("datapath", "auto")
    if data_path not in DATA_PATHS:
        raise _bad("DataPath", f"must be one of {', '.join(map(json.dumps, DATA_PATHS))}", data_path)
    offload = _bool(f, "offload", "Offload")
    if offload and data_path == "python":
        raise errors.ConfigError('invalid udp backend options: Offload needs the C data path, but DataPath is "python"')
    return UDPOptions(
        port=_int(f, "port", "Port", DEFAULT_PORT, 1, 65535),
        queues=_int(f, "queues", "Queues", 0, 0, MAX_QUEUES),
        data_path=data_path,
        offload=offload,
        spread_ports=bool(_bool(f, "spreadports", "SpreadPorts")),
        trusted_sources=_networks(f, "trustedsources", "TrustedSources"),
    )


def parse_port(backend: Mapping[str, Any]) -> int:
    """The ``Port`` option alone."""
    return parse_options(backend).port


def peer_of(lease: Lease) -> Peer | None:
    """The peer-table entry for a remote lease, or ``None`` if it has no IPv4 subnet (udp is IPv4 only)."""
    if lease.subnet is None:
        return None
    return Peer(subnet=lease.subnet, public_ip=lease.attrs.public_ip)
