"""Pure logic of the vxlan backend: options, BackendData, and lease → kernel entries (reference §7).

Nothing here touches the kernel: ``vxlan_entries`` says which route, neighbour and fdb entry one
remote lease justifies, in the value types of ``flannel.backends.routed.model``; the shared
reconcile loop (``flannel.backends.routed.reconcile``) diffs them against the kernel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flannel import errors
from flannel.backends.routed.model import (
    ZERO_MAC,
    Addr,
    Context,
    Fdb,
    Flat,
    KernelState,
    Neigh,
    Net,
    Route,
    Skip,
    on_link,
    register_flat,
)
from flannel.lease import Lease

TYPE = "vxlan"
#: outer IPv4 + UDP + VXLAN + inner Ethernet headers; 70 over an IPv6 underlay (DESIGN §8, ref §14.14)
OVERHEAD_V4 = 50
OVERHEAD_V6 = 70
DEFAULT_VNI = 1
MAX_VNI = (1 << 24) - 1


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VXLANOptions:
    """The ``Backend`` object of a vxlan network config, with flannel's defaults.

    ``port`` 0 means "not sent": the kernel then uses its default 8472 (flannel's behaviour).
    ``mtu`` 0 means "derive from the external interface".
    """

    vni: int = DEFAULT_VNI
    port: int = 0
    gbp: bool = False
    learning: bool = False
    mtu: int = 0
    direct_routing: bool = False


def _opt_int(fields: Mapping[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
    value = fields.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise errors.ConfigError(
            f"invalid vxlan backend option {name}: must be an integer in [{lo}, {hi}], got {json.dumps(value)}")
    return value


def _opt_bool(fields: Mapping[str, Any], key: str, name: str) -> bool:
    value = fields.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise errors.ConfigError(f"invalid vxlan backend option {name}: must be true or false, got {json.dumps(value)}")
    return value


def parse_options(backend: Mapping[str, Any]) -> VXLANOptions:
    """Parse the ``Backend`` JSON object (keys case-insensitive, like Go's encoding/json).

    :raises errors.ConfigError: naming the option and the rule it breaks.
    """
    f = {str(k).lower(): v for k, v in backend.items()}
    return VXLANOptions(
        vni=_opt_int(f, "vni", "VNI", DEFAULT_VNI, 0, MAX_VNI),
        port=_opt_int(f, "port", "Port", 0, 0, 65535),
        gbp=_opt_bool(f, "gbp", "GBP"),
        learning=_opt_bool(f, "learning", "Learning"),
        mtu=_opt_int(f, "mtu", "MTU", 0, 0, 65535),
        direct_routing=_opt_bool(f, "directrouting", "DirectRouting"),
    )


def device_name(vni: int, *, v6: bool = False) -> str:
    return f"flannel-v6.{vni}" if v6 else f"flannel.{vni}"


def device_mtu(opts: VXLANOptions, ext_mtu: int, *, ipv6_underlay: bool = False) -> int:
    """``C − 50`` (``C`` = MTU option or the external MTU); ``C − 70`` over an IPv6 underlay."""
    base = opts.mtu or ext_mtu
    mtu = base - (OVERHEAD_V6 if ipv6_underlay else OVERHEAD_V4)
    if mtu < 68:
        raise errors.ConfigError(f"invalid vxlan backend option MTU: {base} leaves a device MTU of {mtu} (< 68)")
    return mtu


# --------------------------------------------------------------------------------------------
# MAC addresses and BackendData
# --------------------------------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-fA-F]+")


def normalize_mac(text: str) -> str:
    """Colon, hyphen or dot notation → lowercase colon form. :raises ValueError:."""
    if not isinstance(text, str):
        raise ValueError(f"MAC must be a string, got {type(text).__name__}")
    if "." in text:
        groups = text.split(".")
        if len(groups) != 3 or not all(len(g) == 4 and _HEX.fullmatch(g) for g in groups):
            raise ValueError(f"{text!r} is not a MAC address")
        raw = "".join(groups)
    else:
        parts = re.split(r"[:-]", text)
        if len(parts) != 6 or not all(len(p) == 2 and _HEX.fullmatch(p) for p in parts):
            raise ValueError(f"{text!r} is not a MAC address")
        raw = "".join(parts)
    raw = raw.lower()
    return ":".join(raw[i:i + 2] for i in range(0, 12, 2))


def random_mac(rand: bytes) -> str:
    """flannel's random VTEP MAC from 6 CSPRNG bytes: unicast, locally administered."""
    b = bytearray(rand[:6])
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True)
class VtepData:
    vni: int
    mac: str


def encode_backend_data(vni: int, mac: str) -> str:
    """``{"VNI":1,"VtepMAC":"aa:bb:..."}`` exactly as flannel writes it."""
    from flannel.wire import compact_json

    return compact_json({"VNI": vni, "VtepMAC": mac})


#: what every flannel writes (``encode_backend_data``): parsed without the JSON decoder, which is
#: most of the cost of translating a lease at a cold start with thousands of peers
_CANONICAL = re.compile(r'\{"VNI":(\d{1,8}),"VtepMAC":"([0-9a-f]{2}(?::[0-9a-f]{2}){5})"\}')


def parse_backend_data(text: str | None) -> VtepData:
    """Decode a remote lease's BackendData. ``VNI`` is informative only (flannel ignores it).

    :raises errors.BadLeaseRecord: missing/invalid JSON or VtepMAC (also for JSON nested too
        deeply to decode, or too big: a record from the store is untrusted).
    """
    if text is None:
        raise errors.BadLeaseRecord("no BackendData")
    m = _CANONICAL.fullmatch(text)
    if m is not None:
        mac = m.group(2)
        if mac != ZERO_MAC and not int(mac[:2], 16) & 1:
            return VtepData(vni=int(m.group(1)), mac=mac)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError, MemoryError) as e:
        raise errors.BadLeaseRecord(f"BackendData is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise errors.BadLeaseRecord(f"BackendData must be a JSON object, got {text!r}")
    f = {str(k).lower(): v for k, v in obj.items()}
    try:
        mac = normalize_mac(f.get("vtepmac"))  # type: ignore[arg-type]
    except ValueError as e:
        raise errors.BadLeaseRecord(f"BackendData.VtepMAC: {e}") from None
    if mac == ZERO_MAC or int(mac[:2], 16) & 1:
        raise errors.BadLeaseRecord(f"BackendData.VtepMAC {mac} is not a unicast address")
    vni = f.get("vni", 0)
    if isinstance(vni, bool) or not isinstance(vni, int):
        vni = 0
    return VtepData(vni=vni, mac=mac)


# --------------------------------------------------------------------------------------------
# Lease → entries
# --------------------------------------------------------------------------------------------

def vtep_mac(text: str | None) -> str:
    """``parse_backend_data(text).mac``, without building a ``VtepData`` for what every flannel
    writes (the canonical form): the translation of a lease needs only the MAC.

    :raises errors.BadLeaseRecord: as ``parse_backend_data``.
    """
    m = _CANONICAL.fullmatch(text) if text is not None else None
    if m is not None:
        mac = m.group(2)
        if mac != ZERO_MAC and not int(mac[:2], 16) & 1:
            return mac
    return parse_backend_data(text).mac


def _vxlan_family(subnet: Net, peer: Addr, data: str | None, dev: str, ext_dev: str, local_nets: Iterable[Net],
                  direct_routing: bool, routes: list[Route], rest: list[Neigh | Fdb]) -> None:
    """Append one family's entries to the lists (no set or ``KernelState`` per family)."""
    mac = vtep_mac(data)
    if direct_routing and on_link(peer, local_nets):
        routes.append(Route(subnet, peer, ext_dev))
        return
    gw = subnet.network_address
    routes.append(Route(subnet, gw, dev, True))
    rest.append(Neigh(gw, mac, dev))
    rest.append(Fdb(mac, peer, dev))


def vxlan_flat(lease: Lease, ctx: Context) -> Flat:
    """``vxlan_entries`` as the index keeps them (``model.register_flat``): the families' entries
    are distinct (their devices or addresses differ), so none appears twice."""
    attrs = lease.attrs
    if attrs.backend_type != ctx.backend_type:
        raise Skip(f"ignoring non-{ctx.backend_type} subnet {lease.describe()}: "
                   f"type={attrs.backend_type or '<none>'}")
    routes: list[Route] = []
    rest: list[Neigh | Fdb] = []
    if ctx.dev is not None and lease.subnet is not None:
        _vxlan_family(lease.subnet, attrs.public_ip, attrs.backend_data, ctx.dev,
                      ctx.ext_dev, ctx.local_nets, ctx.direct_routing, routes, rest)
    if ctx.dev6 is not None and lease.ipv6_subnet is not None and attrs.public_ipv6 is not None:
        _vxlan_family(lease.ipv6_subnet, attrs.public_ipv6, attrs.backend_v6_data,
                      ctx.dev6, ctx.ext_dev, ctx.local_nets6, ctx.direct_routing, routes, rest)
    if not routes:
        raise Skip(f"lease {lease.describe()} has no subnet of an address family this node runs")
    r = tuple(routes)
    return r, (*r, *rest)


def vxlan_entries(lease: Lease, ctx: Context) -> KernelState:
    """Entries for one remote vxlan lease, reference §7.5: per enabled family, route + neighbour +
    fdb (or a direct route with DirectRouting when the peer is on our L2 network).

    A family the lease does not carry (or we do not run) is simply absent (flannel crashed on a
    dual-stack lease at an IPv4-only node, §14.13).

    :raises Skip: other backend type, no subnet of an enabled family.
    :raises errors.BadLeaseRecord: bad BackendData / BackendV6Data (the whole lease is skipped).
    """
    routes, flat = vxlan_flat(lease, ctx)
    rest = flat[len(routes):]
    return KernelState(frozenset(routes), frozenset(e for e in rest if type(e) is Neigh),
                       frozenset(e for e in rest if type(e) is Fdb))


register_flat(vxlan_entries, vxlan_flat)
