"""External interface selection against the real kernel, in a private network namespace.

The first group mirrors flannel's pkg/ipmatch tests (reference §13.1) with a veth instead of a
dummy link (this kernel has no dummy driver); the rest covers the default route, error messages,
address preference and the §14.23/§14.24 fixes. Addresses are only ever configured inside the
test's namespace.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from flannel import errors, iface
from flannel.backends.base import ExternalInterface
from flannel.lab.netns import NetNS, cleanup_prefix, in_netns, run_prefix
from flannel.options import AgentOptions

pytestmark = pytest.mark.root

V4 = ["1.10.100.1", "192.168.200.128", "172.16.30.18", "172.16.31.200", "172.16.32.100"]


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNS]:
    """veth0 (+ its peer peer0, no addresses) with flannel's test addresses, MTU 1400."""
    prefix = run_prefix()
    ns = NetNS(prefix + "if")
    try:
        ns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "peer0")
        ns.ip("link", "set", "veth0", "mtu", "1400")
        for a in V4:
            ns.ip("addr", "add", f"{a}/24", "dev", "veth0")
        ns.ip("addr", "add", "2001:db8::1/64", "dev", "veth0", "nodad")
        ns.ip("link", "set", "peer0", "up")
        ns.ip("link", "set", "veth0", "up")
        ns.ip("route", "add", "172.16.33.254", "via", "172.16.32.100", "dev", "veth0")
        yield ns
    finally:
        ns.delete()
        cleanup_prefix(prefix)


def pick(ns: NetNS, *, ipv4: bool = True, ipv6: bool = False, **kw: object) -> ExternalInterface:
    with in_netns(ns.name):
        return iface.select(AgentOptions(**kw), ipv4=ipv4, ipv6=ipv6)  # type: ignore[arg-type]


# --- flannel's own cases (pkg/ipmatch/match_test.go) -------------------------------------------

def test_regex_on_address(ns: NetNS) -> None:
    ext = pick(ns, iface_regex=(r"192\.168\.200\.\d+",))
    assert (ext.name, ext.iface_addr, ext.ext_addr) == ("veth0", IPv4Address("192.168.200.128"),
                                                        IPv4Address("192.168.200.128"))


def test_regex_on_name_takes_first_address(ns: NetNS) -> None:
    ext = pick(ns, iface_regex=(r"veth\d+",))
    assert (ext.name, ext.iface_addr) == ("veth0", IPv4Address("1.10.100.1"))


def test_by_name(ns: NetNS) -> None:
    ext = pick(ns, iface=("veth0",))
    assert (ext.name, ext.iface_addr, ext.mtu) == ("veth0", IPv4Address("1.10.100.1"), 1400)
    assert ext.index > 0 and ext.iface_v6_addr is None and ext.ext_v6_addr is None


def test_by_ip(ns: NetNS) -> None:
    ext = pick(ns, iface=("172.16.30.18",))
    assert (ext.name, ext.iface_addr, ext.ext_addr) == ("veth0", IPv4Address("172.16.30.18"),
                                                        IPv4Address("172.16.30.18"))


def test_dual_stack_by_ip(ns: NetNS) -> None:
    ext = pick(ns, ipv6=True, iface=("172.16.30.18",))
    assert (ext.iface_addr, ext.iface_v6_addr) == (IPv4Address("172.16.30.18"), IPv6Address("2001:db8::1"))
    assert ext.ext_v6_addr == IPv6Address("2001:db8::1")


def test_regex_with_public_ip(ns: NetNS) -> None:
    ext = pick(ns, iface_regex=(r"172\.16\.30\.\d+",), public_ip="172.16.31.200")
    assert (ext.iface_addr, ext.ext_addr) == (IPv4Address("172.16.30.18"), IPv4Address("172.16.31.200"))


def test_can_reach(ns: NetNS) -> None:
    ext = pick(ns, iface_can_reach="172.16.32.254")
    assert (ext.name, ext.iface_addr) == ("veth0", IPv4Address("172.16.32.100"))


# --- order, fallbacks and errors -------------------------------------------------------------

def test_iface_list_first_match_wins_and_before_regex(ns: NetNS) -> None:
    ext = pick(ns, iface=("nosuch0", "172.16.31.200", "veth0"), iface_regex=(r"192\.168",))
    assert ext.iface_addr == IPv4Address("172.16.31.200")


def test_regexes_tried_in_order(ns: NetNS) -> None:
    ext = pick(ns, iface_regex=(r"^10\.99\.", r"172\.16\.32\."))
    assert ext.iface_addr == IPv4Address("172.16.32.100")


def test_no_match_lists_the_interfaces(ns: NetNS) -> None:
    with pytest.raises(errors.InterfaceError) as e:
        pick(ns, iface=("eth7",), iface_regex=("^nothing$",))
    msg = str(e.value)
    assert "Failed to find interface" in msg and "veth0:[" in msg and "172.16.30.18" in msg and "lo:[" in msg


def test_interface_without_usable_address(ns: NetNS) -> None:
    with pytest.raises(errors.InterfaceError, match=r"failed to find IPv4 address for interface lo \(it has: 127"):
        pick(ns, iface=("lo",))


def test_ipv6_only_iface_by_ipv6_does_not_leak_into_ipv4(ns: NetNS) -> None:
    ext = pick(ns, ipv4=False, ipv6=True, iface=("2001:db8::1",))
    assert (ext.iface_addr, ext.ext_addr, ext.iface_v6_addr) == (None, None, IPv6Address("2001:db8::1"))


def test_dual_stack_iface_by_ipv6_without_public_ipv6_does_not_crash(ns: NetNS) -> None:
    ext = pick(ns, ipv6=True, iface=("2001:db8::1",))
    assert (ext.iface_addr, ext.iface_v6_addr) == (IPv4Address("1.10.100.1"), IPv6Address("2001:db8::1"))


def test_can_reach_not_routable(ns: NetNS) -> None:
    with pytest.raises(errors.InterfaceError, match="no route"):
        pick(ns, iface_can_reach="203.0.113.9")


def test_no_default_route_is_a_clear_error(ns: NetNS) -> None:
    with pytest.raises(errors.InterfaceError, match=r"no IPv4 default route.*veth0"):
        pick(ns)


@pytest.fixture
def small(ns_prefix: str) -> Iterator[NetNS]:
    """Two veth pairs: va (10.1.1.1, 2001:db8:a::1) and vb (10.2.2.2, 2001:db8:b::1), default via vb."""
    ns = NetNS(ns_prefix + "sm")
    try:
        for name, v4, v6 in (("va", "10.1.1.1", "2001:db8:a::1"), ("vb", "10.2.2.2", "2001:db8:b::1")):
            ns.ip("link", "add", name, "type", "veth", "peer", "name", name + "p")
            ns.ip("addr", "add", f"{v4}/24", "dev", name)
            ns.ip("addr", "add", f"{v6}/64", "dev", name, "nodad")
            ns.ip("link", "set", name + "p", "up")
            ns.ip("link", "set", name, "up")
        ns.ip("route", "add", "default", "via", "10.2.2.254", "dev", "vb")
        yield ns
    finally:
        ns.delete()


@pytest.mark.usefixtures("ns_prefix")
def test_default_route_interface(small: NetNS) -> None:
    ext = pick(small)
    assert (ext.name, ext.iface_addr, ext.ext_addr) == ("vb", IPv4Address("10.2.2.2"), IPv4Address("10.2.2.2"))


def test_dual_stack_default_routes_must_agree(small: NetNS) -> None:
    small.ip("-6", "route", "add", "default", "via", "2001:db8:a::fe", "dev", "va")
    with pytest.raises(errors.InterfaceError, match="v6 default route interface va must be the same with v4 "
                                                    "default route interface vb"):
        pick(small, ipv6=True)


def test_dual_stack_regex_does_not_mix_interfaces(small: NetNS) -> None:
    """§14.23: va's IPv4 matches but its IPv6 doesn't; the name match on vb must not inherit 10.1.1.1."""
    ext = pick(small, ipv6=True, iface_regex=(r"10\.1\.1\.1|^vb$",))
    assert (ext.name, ext.iface_addr, ext.iface_v6_addr) == ("vb", IPv4Address("10.2.2.2"),
                                                             IPv6Address("2001:db8:b::1"))


def test_public_ip_on_a_local_interface_selects_it(small: NetNS) -> None:
    ext = pick(small, public_ip="10.1.1.1")
    assert (ext.name, ext.iface_addr, ext.ext_addr) == ("va", IPv4Address("10.1.1.1"), IPv4Address("10.1.1.1"))


def test_non_local_public_ip_falls_back_to_default_route(small: NetNS) -> None:
    ext = pick(small, public_ip="198.18.5.5")
    assert (ext.name, ext.iface_addr, ext.ext_addr) == ("vb", IPv4Address("10.2.2.2"), IPv4Address("198.18.5.5"))


def test_dual_stack_public_ipv6_on_other_interface_is_rejected(small: NetNS) -> None:
    with pytest.raises(errors.InterfaceError, match="v6 interface vb must be the same with v4 interface va"):
        pick(small, ipv6=True, iface=("10.1.1.1",), public_ipv6="2001:db8:b::1")


def test_deprecated_address_is_never_chosen(small: NetNS) -> None:
    small.ip("addr", "flush", "dev", "va")
    small.ip("addr", "add", "10.7.0.1/24", "dev", "va", "preferred_lft", "0")
    small.ip("addr", "add", "10.8.0.1/24", "dev", "va")
    small.ip("addr", "add", "169.254.3.3/16", "dev", "va")
    ext = pick(small, iface=("va",))
    assert ext.iface_addr == IPv4Address("10.8.0.1")
    link = next(x for x in iface.Selector(_Snapshot(small), ipv4=True, ipv6=False).links if x.name == "va")
    assert [str(a) for a in link.usable(4)] == ["10.8.0.1", "169.254.3.3"]


class _Snapshot:
    """The real kernel read from inside ``ns`` (for looking at the preference order directly)."""

    def __init__(self, ns: NetNS) -> None:
        self.ns = ns

    def links(self) -> list[iface.Link]:
        with in_netns(self.ns.name):
            return iface.NetlinkKernel().links()

    def default_route_oif(self, version: int) -> int | None:
        return None

    def route_get(self, ip: object) -> tuple[int, None]:
        return 0, None
