"""The vxlan device (reference §7.2, §7.4): create or reuse ``flannel.<VNI>``, give it its address.

Decisions only; every kernel call goes through the netlink port (``flannel.backends.routed.netlink``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from flannel import errors
from flannel.backends.routed.model import Addr
from flannel.backends.routed.netlink import LinkInfo, Netlink
from flannel.backends.vxlan.network import random_mac
from flannel.config import NetworkConfig
from flannel.lease import Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VXLANSpec:
    """The desired vxlan link (reference §7.2)."""

    name: str
    vni: int
    port: int          # 0 = kernel default (8472), attribute not sent
    gbp: bool
    learning: bool
    local: Addr           # an IPv6 address makes the IPv6 device (flannel-v6.<VNI>)
    link_index: int
    mtu: int


def ensure_vxlan(nl: Netlink, spec: VXLANSpec, mac: str | None) -> tuple[LinkInfo, bool]:
    """Create the vxlan link, or reuse a compatible existing one (keeping its MAC).

    An existing link whose VNI/local/lower device/port/GBP (or type) differ is replaced, keeping
    its MAC when no ``mac`` is given. MTU and learning differences are fixed in place (flannel
    ignores them, reference §14.16). Returns ``(link, created)``.
    """
    cur = nl.link(spec.name)
    if cur is not None:
        reason = incompatibility(cur, spec)
        if reason is None:
            _update_in_place(nl, cur, spec)
            return nl.link(spec.name) or cur, False
        log.warning('"%s" already exists with incompatible configuration: %s; recreating device', spec.name, reason)
        mac = mac or cur.mac
        nl.delete_link(cur.index)
    try:
        nl.add_vxlan(name=spec.name, vni=spec.vni, local=spec.local, link_index=spec.link_index, port=spec.port,
                     gbp=spec.gbp, learning=spec.learning, mtu=spec.mtu, mac=mac or random_mac(os.urandom(6)))
    except errors.BackendError as e:
        raise errors.BackendError(f"cannot create vxlan device {spec.name}: {e}") from e
    info = nl.link(spec.name)
    if info is None:
        raise errors.BackendError(f"vxlan device {spec.name} vanished right after creation")
    return info, True


def _update_in_place(nl: Netlink, cur: LinkInfo, spec: VXLANSpec) -> None:
    if cur.mtu != spec.mtu:
        log.info("%s: updating MTU %d -> %d", spec.name, cur.mtu, spec.mtu)
        nl.set_mtu(cur.index, spec.mtu)
    if bool(cur.vxlan.get("IFLA_VXLAN_LEARNING")) != spec.learning:
        log.info("%s: updating learning -> %s", spec.name, spec.learning)
        nl.set_vxlan_learning(cur.index, spec.learning)


def incompatibility(cur: LinkInfo, spec: VXLANSpec) -> str | None:
    """Why an existing link cannot be reused as ``spec`` (flannel's rules, §7.2), or ``None``."""
    if cur.kind != "vxlan":
        return f"link type {cur.kind or 'unknown'} != vxlan"
    vx = cur.vxlan
    if vx.get("IFLA_VXLAN_ID") != spec.vni:
        return f"vni {vx.get('IFLA_VXLAN_ID')} != {spec.vni}"
    link = vx.get("IFLA_VXLAN_LINK") or 0
    if link > 0 and spec.link_index > 0 and link != spec.link_index:
        return f"lower device index {link} != {spec.link_index}"
    local = vx.get("IFLA_VXLAN_LOCAL6" if spec.local.version == 6 else "IFLA_VXLAN_LOCAL")
    if local and ip_address(local) != spec.local:
        return f"local {local} != {spec.local}"
    port = vx.get("IFLA_VXLAN_PORT") or 0
    want_port = spec.port or 8472
    if port > 0 and port != want_port:
        return f"port {port} != {want_port}"
    if bool(vx.get("IFLA_VXLAN_L2MISS")):
        return "l2miss is on"
    has_gbp = "IFLA_VXLAN_GBP" in vx
    if has_gbp != spec.gbp:
        return f"gbp {has_gbp} != {spec.gbp}"
    return None


def setup_device(nl: Netlink, spec: VXLANSpec, mac: str | None, lease: Lease | None,
                 config: NetworkConfig, version: int = 4) -> Any:
    """Create/reuse the device and, once the lease is known, give it its address and bring it up."""
    info, created = ensure_vxlan(nl, spec, mac)
    log.info("%s vxlan device %s (vni %d, mac %s, mtu %d)", "created" if created else "reusing", info.name,
             spec.vni, info.mac, info.mtu)
    if lease is not None:
        configure_device(nl, info, lease, config, version)
    return info


def configure_device(nl: Netlink, info: Any, lease: Lease, config: NetworkConfig, version: int = 4) -> None:
    """Address ``<subnet>.0/32`` (IPv6: ``<subnet>::/128``), link up, and the MAC check of §7.4."""
    subnet = lease.subnet if version == 4 else lease.ipv6_subnet
    if subnet is None:
        raise errors.BackendError(f"the vxlan backend needs an IPv{version} subnet in our lease ({lease.describe()})")
    nl.ensure_address(info.index, subnet.network_address, config.network if version == 4 else config.ipv6_network)
    nl.set_up(info.index)
    now = nl.link(info.name)
    if now is None or now.mac != info.mac:
        raise errors.BackendError(f"{info.name}'s mac address wanted: {info.mac}, but got: {now.mac if now else None}")
