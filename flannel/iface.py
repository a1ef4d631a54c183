"""External interface selection, public address and MTU (reference §2), in the current namespace.

The order is flannel's: every ``--iface`` (name or IP), then every ``--iface-regex`` (searched in
the interface's addresses, then in its name), then ``--iface-can-reach`` (the kernel's route
lookup); without any of them, the interface holding ``--public-ip`` or the default-route interface.
Address preference follows flannel: global before link-local, permanent before dynamic,
non-temporary before temporary, deprecated addresses never.

Fixed on purpose (reference §14.23/§14.24): a dual-stack ``--iface <IPv6>`` no longer crashes
(the IPv4 address is taken from the same interface); an IPv6 ``--iface`` in an IPv6-only
stack does not leak into the IPv4 address; a regex match on one interface never mixes with
another interface's addresses; ``--public-ip`` without ``--iface`` that is not a local address
(NAT) falls back to the default-route interface instead of failing. Every error lists the
interfaces and their addresses.

The kernel is read through ``flannel.nl`` (raw rtnetlink); the selection logic works on a snapshot
(``Link`` values) so it is the same code whatever the source of the snapshot.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol, cast

from flannel import errors
from flannel.backends.base import ExternalInterface
from flannel.options import AgentOptions

log = logging.getLogger(__name__)

IP = IPv4Address | IPv6Address

IFA_F_SECONDARY = 0x01  # a.k.a. IFA_F_TEMPORARY for IPv6
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80
MAIN_TABLE = 254


@dataclass(frozen=True)
class Addr:
    ip: IP
    flags: int = IFA_F_PERMANENT


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mtu: int
    addrs: tuple[Addr, ...] = ()

    def usable(self, version: int) -> list[IP]:
        """Addresses of one family that flannel would use, most preferred first (§2.1)."""
        cands = [a for a in self.addrs if a.ip.version == version and _usable(a)]
        cands.sort(key=lambda a: (a.ip.is_link_local, not a.flags & IFA_F_PERMANENT,
                                  bool(a.flags & IFA_F_SECONDARY)))
        return [a.ip for a in cands]

    def has(self, ip: IP) -> bool:
        return any(a.ip == ip for a in self.addrs)

    def describe(self) -> str:
        return f"{self.name}:[{', '.join(str(a.ip) for a in self.addrs)}]"


def _usable(a: Addr) -> bool:
    ip = a.ip
    if a.flags & IFA_F_DEPRECATED or ip.is_unspecified or ip.is_loopback or ip.is_multicast:
        return False
    return not (ip.version == 4 and ip == IPv4Address("255.255.255.255"))


class Kernel(Protocol):
    """What selection reads from the kernel."""

    def links(self) -> list[Link]: ...

    def default_route_oif(self, version: int) -> int | None: ...

    def route_get(self, ip: IP) -> tuple[int, IP | None]: ...


class NetlinkKernel:
    """The real kernel, through ``flannel.nl`` (raw rtnetlink: pyroute2 would cost ~22 MB of
    memory for three questions), in the calling thread's network namespace."""

    def links(self) -> list[Link]:
        from flannel import nl

        with nl.Client() as c:
            addrs: dict[int, list[Addr]] = {}
            for a in c.addrs():
                addrs.setdefault(a.index, []).append(Addr(a.address, a.flags))
            return sorted((Link(m.index, m.name, m.mtu, tuple(addrs.get(m.index, ()))) for m in c.links()),
                          key=lambda link: link.index)

    def default_route_oif(self, version: int) -> int | None:
        from flannel import nl

        with nl.Client() as c:
            return c.default_route_oif(socket.AF_INET if version == 4 else socket.AF_INET6)

    def route_get(self, ip: IP) -> tuple[int, IP | None]:
        from flannel import nl

        with nl.Client() as c:
            try:
                return c.route_get(ip)
            except nl.NetlinkError as e:
                raise errors.InterfaceError(f"--iface-can-reach {ip}: no route: {e.strerror}") from e


@dataclass(frozen=True)
class Choice:
    """An interface plus the addresses chosen so far (missing ones are filled from the link)."""

    link: Link
    v4: IPv4Address | None = None
    v6: IPv6Address | None = None


class Selector:
    """The algorithm of reference §2.2 over one snapshot of the kernel."""

    def __init__(self, kernel: Kernel, *, ipv4: bool, ipv6: bool) -> None:
        self.kernel = kernel
        self.ipv4, self.ipv6 = ipv4, ipv6
        self.links = kernel.links()

    # --- lookups -------------------------------------------------------------------------------
    def listing(self) -> str:
        return "; ".join(link.describe() for link in self.links) or "none"

    def by_index(self, index: int | None, what: str) -> Link:
        for link in self.links:
            if link.index == index:
                return link
        raise errors.InterfaceError(f"{what}: no interface with index {index} (interfaces: {self.listing()})")

    def by_ip(self, ip: IP) -> Link:
        for link in self.links:
            if link.has(ip):
                return link
        raise errors.InterfaceError(f"no interface has the address {ip} (interfaces: {self.listing()})")

    def by_name(self, name: str) -> Link:
        for link in self.links:
            if link.name == name:
                return link
        raise errors.InterfaceError(f"no interface named {name!r} (interfaces: {self.listing()})")

    def by_name_or_ip(self, value: str, public_v6: IPv6Address | None = None) -> Choice:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return Choice(self.by_name(value))
        link = self.by_ip(ip)
        choice = _choice(link, ip)
        return self._with_public_v6(choice, public_v6) if self.ipv6 and ip.version == 4 else choice

    def _with_public_v6(self, choice: Choice, public_v6: IPv6Address | None) -> Choice:
        """Dual stack: a local --public-ipv6 must be on the same interface (flannel's rule)."""
        if public_v6 is None:
            return choice
        for link in self.links:
            if link.has(public_v6):
                if link.name != choice.link.name:
                    raise errors.InterfaceError(f"v6 interface {link.name} must be the same with "
                                                f"v4 interface {choice.link.name}")
                return replace(choice, v6=public_v6)
        return choice  # not local (NAT): only advertised, see ExternalInterface.ext_v6_addr

    def by_regex(self, pattern: str) -> Choice | None:
        rx = re.compile(pattern)
        for link in self.links:
            choice = self._regex_addrs(link, rx)
            if choice is not None:
                return choice
        for link in self.links:
            if rx.search(link.name):
                return Choice(link)
        return None

    def _regex_addrs(self, link: Link, rx: re.Pattern[str]) -> Choice | None:
        v4s, v6s = link.usable(4), link.usable(6)
        if (self.ipv4 and not v4s) or (self.ipv6 and not v6s):
            return None
        v4 = next((a for a in v4s if rx.search(str(a))), None) if self.ipv4 else None
        v6 = next((a for a in v6s if rx.search(str(a))), None) if self.ipv6 else None
        if (self.ipv4 and v4 is None) or (self.ipv6 and v6 is None):
            return None
        return Choice(link, v4=v4, v6=v6)  # type: ignore[arg-type]

    def can_reach(self, value: str) -> Choice:
        ip = ipaddress.ip_address(value)
        oif, src = self.kernel.route_get(ip)
        link = self.by_index(oif, f"--iface-can-reach {ip}")
        if src is None:
            return Choice(link)
        return _choice(link, src)

    def default_route(self) -> Choice:
        v4_link = self._default_link(4) if self.ipv4 else None
        v6_link = self._default_link(6) if self.ipv6 else None
        if v4_link and v6_link and v4_link.name != v6_link.name:
            raise errors.InterfaceError(f"v6 default route interface {v6_link.name} must be the same "
                                        f"with v4 default route interface {v4_link.name}")
        link = v4_link or v6_link
        assert link is not None
        return Choice(link)

    def _default_link(self, version: int) -> Link:
        oif = self.kernel.default_route_oif(version)
        if not oif or oif <= 0:
            raise errors.InterfaceError(f"no IPv{version} default route to pick an interface from; "
                                        f"use --iface (interfaces: {self.listing()})")
        return self.by_index(oif, f"IPv{version} default route")

    # --- completion ----------------------------------------------------------------------------
    def complete(self, choice: Choice) -> Choice:
        """Fill the missing addresses of the enabled families from the chosen interface."""
        link = choice.link
        if link.mtu <= 0:
            raise errors.InterfaceError(f"interface {link.name} has MTU {link.mtu}")
        v4, v6 = choice.v4 if self.ipv4 else None, choice.v6 if self.ipv6 else None
        if self.ipv4 and v4 is None:
            v4 = _first(link, 4)  # type: ignore[assignment]
        if self.ipv6 and v6 is None:
            v6 = _first(link, 6)  # type: ignore[assignment]
        return Choice(link, v4=v4, v6=v6)


def _choice(link: Link, ip: IP) -> Choice:
    return Choice(link, v4=ip) if isinstance(ip, IPv4Address) else Choice(link, v6=ip)


def _first(link: Link, version: int) -> IP:
    addrs = link.usable(version)
    if not addrs:
        raise errors.InterfaceError(f"failed to find IPv{version} address for interface {link.name} "
                                    f"(it has: {', '.join(str(a.ip) for a in link.addrs) or 'no addresses'})")
    return addrs[0]


def _parse(value: str, version: int, flag: str) -> IP | None:
    if not value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise errors.UsageError(f"{flag}: {value!r} is not an IPv{version} address") from None
    if ip.version != version:
        raise errors.UsageError(f"{flag}: {value!r} is not an IPv{version} address")
    return ip


def _explicit(sel: Selector, opts: AgentOptions, public_v6: IPv6Address | None) -> Choice:
    reasons: list[str] = []
    for value in opts.iface:
        try:
            return sel.by_name_or_ip(value, public_v6)
        except errors.InterfaceError as e:
            log.warning("Could not find valid interface matching %s: %s", value, e)
            reasons.append(f"--iface {value}: {str(e).split(' (interfaces:')[0]}")
    for pattern in opts.iface_regex:
        choice = sel.by_regex(pattern)
        if choice is not None:
            return choice
        log.warning("no interface address or name matches --iface-regex %r", pattern)
        reasons.append(f"--iface-regex {pattern}: no match")
    if opts.iface_can_reach:
        return sel.can_reach(opts.iface_can_reach)
    raise errors.InterfaceError("Failed to find interface to use that matches the interfaces and/or regexes "
                                f"provided ({'; '.join(reasons)}; interfaces: {sel.listing()})")


def _implicit(sel: Selector, public_v4: IP | None, public_v6: IPv6Address | None) -> Choice:
    public = public_v4 or (public_v6 if sel.ipv6 else None)
    if public is not None:
        try:
            return sel.by_name_or_ip(str(public), public_v6)
        except errors.InterfaceError:
            log.info("public IP %s is not a local address; using the default-route interface", public)
    return sel.default_route()


def select(opts: AgentOptions, *, ipv4: bool = True, ipv6: bool = False,
           kernel: Kernel | None = None) -> ExternalInterface:
    """Pick the external interface and addresses for the enabled address families.

    :raises errors.InterfaceError: nothing matches; the message lists the interfaces.
    """
    public_v4 = _parse(opts.public_ip, 4, "--public-ip")
    public_v6 = cast("IPv6Address | None", _parse(opts.public_ipv6, 6, "--public-ipv6"))
    sel = Selector(kernel or NetlinkKernel(), ipv4=ipv4, ipv6=ipv6)
    explicit = opts.iface or opts.iface_regex or opts.iface_can_reach
    choice = sel.complete(_explicit(sel, opts, public_v6) if explicit else _implicit(sel, public_v4, public_v6))
    ext = ExternalInterface(
        name=choice.link.name, index=choice.link.index, mtu=choice.link.mtu,
        iface_addr=choice.v4, ext_addr=cast("IPv4Address | None", public_v4 or choice.v4) if ipv4 else None,
        iface_v6_addr=choice.v6, ext_v6_addr=public_v6 or choice.v6)
    _log_choice(ext)
    return ext


def _log_choice(ext: ExternalInterface) -> None:
    if ext.iface_addr is not None:
        log.info("Using interface with name %s and address %s", ext.name, ext.iface_addr)
    if ext.iface_v6_addr is not None:
        log.info("Using interface with name %s and v6 address %s", ext.name, ext.iface_v6_addr)
    for ext_ip, iface_ip in ((ext.ext_addr, ext.iface_addr), (ext.ext_v6_addr, ext.iface_v6_addr)):
        if ext_ip is not None and ext_ip != iface_ip:
            log.info("Using %s as external address", ext_ip)
