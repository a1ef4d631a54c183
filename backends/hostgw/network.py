"""Pure lease → route translation for host-gw (reference §9.2).

A peer's subnet is routed via its public IP on the external interface (IPv4: ``Subnet via
PublicIP``, IPv6: ``IPv6Subnet via PublicIPv6``). That only works when the peer is on the same L2
network (its IP inside one of the ext iface's connected subnets); otherwise the lease is refused
with a clear reason instead of installing a route the kernel would reject or send to the default
gateway.
"""

from __future__ import annotations

from flannel.backends.routed.model import Addr, Context, KernelState, Net, Route, Skip, on_link
from flannel.lease import Lease

TYPE = "host-gw"


def _route(subnet: Net, peer: Addr, ctx: Context, nets: tuple[Net, ...]) -> Route:
    if not on_link(peer, nets):
        shown = ", ".join(str(n) for n in nets) or f"no IPv{peer.version} subnet"
        raise Skip(f"refusing host-gw route to {subnet}: peer {peer} is not on the same L2 network as "
                   f"{ctx.ext_dev} ({shown}); host-gw needs all hosts on one L2 segment (use vxlan otherwise)")
    return Route(subnet, peer, ctx.ext_dev)


def hostgw_entries(lease: Lease, ctx: Context) -> KernelState:
    """``S via PublicIP dev <ext>`` (and the IPv6 analogue) for one remote host-gw lease.

    :raises Skip: other backend type, no subnet of an enabled family, or the peer is not on our
        L2 network (for dual stack: if either family's gateway is off-link, the lease is refused).
    """
    if lease.attrs.backend_type != ctx.backend_type:
        raise Skip(f"ignoring non-{ctx.backend_type} subnet {lease.describe()}: "
                   f"type={lease.attrs.backend_type or '<none>'}")
    routes = set()
    if ctx.dev is not None and lease.subnet is not None:
        routes.add(_route(lease.subnet, lease.attrs.public_ip, ctx, ctx.local_nets))
    if ctx.dev6 is not None and lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None:
        routes.add(_route(lease.ipv6_subnet, lease.attrs.public_ipv6, ctx, ctx.local_nets6))
    if not routes:
        raise Skip(f"lease {lease.describe()} has no subnet of an address family this node runs (no IPv4 subnet)")
    return KernelState(routes=frozenset(routes))
