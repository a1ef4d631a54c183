"""host-gw: lease → route translation as a table, and the refusals that need no kernel."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest

from flannel import errors
from flannel.backends.base import ExternalInterface
from flannel.backends.hostgw import HostGWBackend
from flannel.backends.hostgw.network import hostgw_entries
from flannel.backends.routed import model as rm
from flannel.config import parse_network_config
from flannel.lease import Lease, LeaseAttrs

CTX = rm.Context(backend_type="host-gw", dev="eth0", ext_dev="eth0", local_nets=(N("198.18.0.0/24"),))


def lease(subnet: str, ip: str, typ: str = "host-gw") -> Lease:
    return Lease(N(subnet), LeaseAttrs(public_ip=A(ip), backend_type=typ))


@pytest.mark.parametrize("the_lease, expected", [
    (lease("10.6.2.0/24", "198.18.0.2"), {rm.Route(N("10.6.2.0/24"), A("198.18.0.2"), "eth0")}),
    (lease("10.6.3.0/26", "198.18.0.200"), {rm.Route(N("10.6.3.0/26"), A("198.18.0.200"), "eth0")}),
])
def test_hostgw_entries(the_lease, expected):
    st = hostgw_entries(the_lease, CTX)
    assert st.routes == frozenset(expected) and not st.neighs and not st.fdbs


@pytest.mark.parametrize("the_lease, match", [
    (lease("10.6.2.0/24", "198.19.0.2"), r"not on the same L2 network as eth0 \(198.18.0.0/24\)"),
    (lease("10.6.2.0/24", "198.18.0.2", typ="vxlan"), "ignoring non-host-gw"),
    (Lease(None, LeaseAttrs(public_ip=A("198.18.0.2"), backend_type="host-gw")), "no IPv4 subnet"),
])
def test_hostgw_refused(the_lease, match):
    with pytest.raises(rm.Skip, match=match):
        hostgw_entries(the_lease, CTX)


class NeverCalled:
    def acquire_lease(self, config, attrs):  # pragma: no cover - must not be reached
        raise AssertionError("acquire_lease called although the config is refused")

    def stored_backend_data(self):
        return (None, None)


def test_hostgw_refuses_nat():
    ext = ExternalInterface("eth0", 2, 1500, iface_addr=A("198.18.0.1"), ext_addr=A("203.0.113.1"))
    cfg = parse_network_config('{"Network":"10.6.0.0/16","Backend":{"Type":"host-gw"}}')
    with pytest.raises(errors.ConfigError, match="NAT, which is not supported by host-gw"):
        HostGWBackend(ext).register_network(config=cfg, leases=NeverCalled())


def test_hostgw_dual_stack():
    from ipaddress import IPv6Address as A6
    from ipaddress import IPv6Network as N6

    ctx = rm.Context(backend_type="host-gw", dev="eth0", ext_dev="eth0", dev6="eth0",
                     local_nets=(N("198.18.0.0/24"),), local_nets6=(N6("2001:2::/64"),))
    good = Lease(N("10.6.2.0/24"),
                 LeaseAttrs(public_ip=A("198.18.0.2"), public_ipv6=A6("2001:2::2"), backend_type="host-gw"),
                 ipv6_subnet=N6("fd00:10:6:2::/64"))
    assert hostgw_entries(good, ctx).routes == frozenset({rm.Route(N("10.6.2.0/24"), A("198.18.0.2"), "eth0"),
                                                         rm.Route(N6("fd00:10:6:2::/64"), A6("2001:2::2"), "eth0")})
    off6 = Lease(N("10.6.3.0/24"),
                 LeaseAttrs(public_ip=A("198.18.0.3"), public_ipv6=A6("2001:db8::3"), backend_type="host-gw"),
                 ipv6_subnet=N6("fd00:10:6:3::/64"))
    with pytest.raises(rm.Skip, match="peer 2001:db8::3 is not on the same L2 network"):
        hostgw_entries(off6, ctx)


def test_hostgw_refuses_ipv6_nat():
    from ipaddress import IPv6Address as A6

    ext = ExternalInterface("eth0", 2, 1500, A("198.18.0.1"), A("198.18.0.1"), A6("2001:2::1"), A6("2001:db8::1"))
    cfg = parse_network_config('{"Network":"10.6.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:6::/48",'
                               '"Backend":{"Type":"host-gw"}}')
    with pytest.raises(errors.ConfigError, match=r"PublicIPv6 .* differs"):
        HostGWBackend(ext).register_network(config=cfg, leases=NeverCalled())
