"""The host-gw backend (reference §9.1, §9.2): one plain route per peer via its public IP.

It runs the same reconcile loop as vxlan (``RoutedNetwork``): routes carry the agent's protocol
number (152) and only those (or Go flannel's, adopted for a live peer) are ever removed -- an
operator's route is never touched (docs/ownership.md). A route someone deletes is restored as soon
as the kernel reports it (flannel polled every 10 s; without notifications we poll every 10 s too).
Dual stack: IPv6 routes ``IPv6Subnet via PublicIPv6 dev <ext>`` when EnableIPv6 is set.
"""

from __future__ import annotations

import logging

from flannel import errors
from flannel.backends.base import Backend, Network
from flannel.backends.hostgw.network import TYPE, hostgw_entries
from flannel.backends.routed.model import Context
from flannel.backends.routed.netlink import Netlink
from flannel.backends.routed.reconcile import RoutedNetwork, families
from flannel.config import NetworkConfig
from flannel.lease import LeaseAttrs, LeaseSource

log = logging.getLogger(__name__)


class HostGWNetwork(RoutedNetwork):
    pass


class HostGWBackend(Backend):
    type_name = TYPE

    def register_network(self, *, config: NetworkConfig, leases: LeaseSource) -> Network:
        ext = self.ext_iface
        fams = families(config, ext, TYPE)
        if 4 in fams and ext.iface_addr is not None and ext.ext_addr != ext.iface_addr:
            raise errors.ConfigError(
                f"your PublicIP ({ext.ext_addr}) differs from interface IP ({ext.iface_addr}), meaning that probably "
                "you're on a NAT, which is not supported by host-gw backend")
        if 6 in fams and ext.iface_v6_addr is not None and ext.ext_v6_addr != ext.iface_v6_addr:
            raise errors.ConfigError(
                f"your PublicIPv6 ({ext.ext_v6_addr}) differs from interface IPv6 ({ext.iface_v6_addr}), meaning that "
                "probably you're on a NAT, which is not supported by host-gw backend")
        nl = Netlink()
        try:
            lease = leases.acquire_lease(config, LeaseAttrs(
                public_ip=ext.ext_addr if 4 in fams and ext.ext_addr else LeaseAttrs().public_ip,
                public_ipv6=ext.ext_v6_addr if 6 in fams else None, backend_type=TYPE))
        except BaseException:
            nl.close()
            raise
        ctx = Context(backend_type=TYPE, dev=ext.name if 4 in fams else None, ext_dev=ext.name,
                      dev6=ext.name if 6 in fams else None)
        return HostGWNetwork(lease=lease, mtu=ext.mtu, nl=nl, ctx=ctx, config=config, translate=hostgw_entries,
                             ext_iface=ext)
