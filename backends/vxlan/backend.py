"""The vxlan backend (reference §7): ``VXLANBackend`` (the plugin) and ``VXLANNetwork``.

``VXLANNetwork`` is a ``RoutedNetwork`` (``flannel.backends.routed.reconcile``) whose entries are a
route, a permanent neighbour and an fdb entry per peer (``network.vxlan_entries``) and which also
owns its device: when it is deleted (a netlink notification; without notifications a check every
``DEVICE_CHECK_INTERVAL`` s) it is re-created with the same MAC and address, and every peer is
programmed again (flannel 0.27 did not replay peers, reference §14.15). The re-created device's
tunnel source (``local``) is the external interface's address *now*: if the address changed while
the device was gone, the stale one would make the kernel send from an address it no longer has
(reference §7.8 does the same). Kernel state is left in place on ``close`` so that a restart does
not interrupt traffic (§12.4).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from flannel import errors
from flannel.backends.base import Backend, Network
from flannel.backends.routed.model import Context
from flannel.backends.routed.netlink import Netlink
from flannel.backends.routed.reconcile import MAX_BACKOFF, RoutedNetwork, families
from flannel.backends.vxlan import network as vx
from flannel.backends.vxlan.device import VXLANSpec, configure_device, setup_device
from flannel.config import NetworkConfig
from flannel.lease import LeaseAttrs, LeaseSource, StoredNodeAttrs

log = logging.getLogger(__name__)

VXLAN_POLL_INTERVAL = 60.0      # full resync without netlink notifications (flannel had none)


class VXLANNetwork(RoutedNetwork):
    """vxlan: one device per enabled family (``flannel.<VNI>``, ``flannel-v6.<VNI>``)."""

    def __init__(self, *, specs: dict[int, VXLANSpec], macs: dict[int, str], **kw: Any) -> None:
        super().__init__(**kw)
        self.specs = dict(specs)     # by IP version
        self.macs = dict(macs)
        self._next_check = 0.0
        self._dev_backoff = 1.0

    @property
    def spec(self) -> VXLANSpec:
        """The IPv4 device's spec (or the IPv6 one on an IPv6-only node)."""
        return self.specs.get(4) or self.specs[6]

    @property
    def mac(self) -> str:
        return self.macs.get(4) or self.macs[6]

    def route_devs(self) -> tuple[str, ...]:
        # direct routes (DirectRouting) go via the ext iface; include it even when the option is
        # off so that switching it off removes them
        return (*(s.name for s in self.specs.values()), self.ext_iface.name)

    def overlay_dev(self) -> str | None:
        return self.specs[4].name if 4 in self.specs else None

    def overlay_dev6(self) -> str | None:
        return self.specs[6].name if 6 in self.specs else None

    def check_device(self) -> bool:
        """Re-create a deleted device (backoff 1 s doubling to 30 s while that fails)."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        recreated = False
        for version, spec in list(self.specs.items()):
            if self.nl.link_index(spec.name) is not None:
                continue
            log.warning("Interface %s deleted; re-creating it", spec.name)
            try:
                spec = self._current_spec(spec, version)
                info = setup_device(self.nl, spec, self.macs[version], self._lease, self.config, version)
            except errors.BackendError as e:
                self._next_check = now + self._dev_backoff
                log.warning("re-creating %s failed: %s; next try in %.0f s", spec.name, e, self._dev_backoff)
                self._dev_backoff = min(self._dev_backoff * 2, MAX_BACKOFF)
                raise
            self.specs[version] = spec
            self._dev_backoff = 1.0
            self._cache = None
            recreated = True
            log.info("%s re-created (mac %s, local %s); re-programming %d peers", info.name, info.mac, spec.local,
                     len(self.peers))
        return recreated

    def _current_spec(self, spec: VXLANSpec, version: int) -> VXLANSpec:
        """The spec with the external interface as it is now: its index and, if the address the
        device used is gone from it, its current primary address as the tunnel source."""
        ext_idx = self.nl.link_index(self.ext_iface.name)
        if ext_idx is None:
            raise errors.BackendError(f"external interface {self.ext_iface.name} is gone")
        addrs = self.nl.addresses(ext_idx, version)
        local = spec.local
        if local not in addrs:
            if not addrs:
                raise errors.BackendError(f"external interface {self.ext_iface.name} has no IPv{version} address "
                                          f"(the vxlan device used {spec.local})")
            local = addrs[0]
            published = self._lease.attrs.public_ip if version == 4 else self._lease.attrs.public_ipv6
            log.warning("%s: %s no longer has %s; the re-created %s uses %s as its tunnel source. Our lease "
                        "still advertises PublicIP %s: peers keep sending there until the agent re-publishes it "
                        "(restart it, or use --public-ip, if the address change is permanent)",
                        self.ctx.backend_type, self.ext_iface.name, spec.local, spec.name, local, published)
        return replace(spec, link_index=ext_idx, local=local)


class VXLANBackend(Backend):
    """Entry point ``vxlan``: kernel vxlan device(s) and per-peer route + neighbour + fdb entries."""

    type_name = "vxlan"

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        opts = vx.parse_options(config.backend)
        ext = self.ext_iface
        fams = families(config, ext, self.type_name)
        stored = _stored_macs(leases)
        nl = Netlink()
        specs: dict[int, VXLANSpec] = {}
        infos: dict[int, Any] = {}
        try:
            ext_idx = nl.link_index(ext.name) or ext.index
            for version, local in fams.items():
                # over an IPv6 underlay the outer headers take 70 bytes, not 50 (reference §14.14)
                mtu = vx.device_mtu(opts, ext.mtu, ipv6_underlay=version == 6)
                specs[version] = VXLANSpec(name=vx.device_name(opts.vni, v6=version == 6), vni=opts.vni,
                                           port=opts.port, gbp=opts.gbp, learning=opts.learning, local=local,
                                           link_index=ext_idx, mtu=mtu)
                infos[version] = setup_device(nl, specs[version], stored.get(version), None, config, version)
            attrs = LeaseAttrs(
                public_ip=ext.ext_addr if 4 in fams and ext.ext_addr else LeaseAttrs().public_ip,
                public_ipv6=ext.ext_v6_addr if 6 in fams else None,
                backend_type=self.type_name,
                backend_data=vx.encode_backend_data(opts.vni, infos[4].mac) if 4 in infos else None,
                backend_v6_data=vx.encode_backend_data(opts.vni, infos[6].mac) if 6 in infos else None)
            lease = leases.acquire_lease(config, attrs)
            for version, info in infos.items():
                configure_device(nl, info, lease, config, version)
        except BaseException:
            nl.close()
            raise
        ctx = Context(backend_type=self.type_name, dev=specs[4].name if 4 in specs else None, ext_dev=ext.name,
                         direct_routing=opts.direct_routing, dev6=specs[6].name if 6 in specs else None)
        return VXLANNetwork(specs=specs, macs={v: i.mac for v, i in infos.items()}, lease=lease,
                            mtu=min(i.mtu for i in infos.values()), nl=nl, ctx=ctx, config=config,
                            translate=vx.vxlan_entries, ext_iface=ext, poll_interval=VXLAN_POLL_INTERVAL)


def _stored_macs(leases: LeaseSource) -> dict[int, str]:
    """The VtepMACs we published last time (kube keeps them in annotations; etcd does not)."""
    if not isinstance(leases, StoredNodeAttrs):
        return {}
    v4, v6 = leases.stored_backend_data()
    out: dict[int, str] = {}
    for version, text in ((4, v4), (6, v6)):
        if not text:
            continue
        try:
            out[version] = vx.parse_backend_data(text).mac
        except errors.BadLeaseRecord as e:
            log.warning("ignoring stored BackendData %r: %s", text, e)
    return out


__all__ = ["VXLANBackend", "VXLANNetwork"]
