"""The TUN device of the udp backend (reference §8.1 steps 3-4); the only module here that talks
to the kernel's netlink (pyroute2).

The device is non-persistent, like flannel's: it (and its route) vanish when the last queue fd is
closed, so a crashed agent leaves nothing behind. With ``queues > 1`` the device is opened with
IFF_MULTI_QUEUE and the kernel spreads flows over the queues (one worker per queue).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel import errors

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02


def _attach(name: bytes, flags: int) -> tuple[int, str]:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name, flags))
    except OSError:
        os.close(fd)
        raise
    return fd, ifr[:16].rstrip(b"\0").decode()


class TunDevice:
    """An open TUN device: ``fds`` holds one fd per queue (non-blocking)."""

    def __init__(self, fds: list[int], name: str, vnet_hdr: bool = False) -> None:
        self.fds = fds
        self.name = name
        self.vnet_hdr = vnet_hdr

    @classmethod
    def open(cls, template: str = "flannel%d", queues: int = 1, *, offload: bool = False) -> TunDevice:
        """Create the device (IFF_TUN|IFF_NO_PI, name template like flannel's); falls back to one
        queue if the kernel refuses IFF_MULTI_QUEUE.

        ``offload``: also IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4), so the kernel hands us TCP
        super-packets with a virtio-net header (only the C data path understands that framing).
        """
        dev = cls._open(template, queues, IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0))
        dev.vnet_hdr = offload
        if offload:
            try:
                fcntl.ioctl(dev.fds[0], TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
            except OSError as e:
                dev.close()
                raise errors.BackendError(f"TUNSETOFFLOAD on {dev.name} failed: {e}") from e
        return dev

    @classmethod
    def _open(cls, template: str, queues: int, flags: int) -> TunDevice:
        try:
            if queues > 1:
                try:
                    fd, name = _attach(template.encode(), flags | IFF_MULTI_QUEUE)
                except OSError as e:
                    log.warning("udp: multi-queue TUN refused (%s); using one queue", e)
                    queues = 1
                    fd, name = _attach(template.encode(), flags)
                else:
                    fds = [fd]
                    for _ in range(queues - 1):
                        fds.append(_attach(name.encode(), flags | IFF_MULTI_QUEUE)[0])
                    for f in fds:
                        os.set_blocking(f, False)
                    return cls(fds, name)
            else:
                fd, name = _attach(template.encode(), flags)
        except OSError as e:
            raise errors.BackendError(f"cannot create TUN device {template!r}: {e}") from e
        os.set_blocking(fd, False)
        return cls([fd], name)

    def configure(self, addr: IPv4Address, mtu: int, network: IPv4Network) -> None:
        """Address ``addr/32``, MTU, up, route for the whole ``network`` via the device (§8.1.4).

        An already present address is an error (as in flannel); an existing route is accepted.
        """
        _disable_ipv6(self.name)
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.name)[0]
                ipr.link("set", index=idx, mtu=mtu)
                try:
                    ipr.addr("add", index=idx, address=str(addr), prefixlen=32)
                except NetlinkError as e:
                    raise errors.BackendError(
                        f"cannot add address {addr}/32 to {self.name}: {e} (already present?)") from e
                ipr.link("set", index=idx, state="up")
                try:
                    ipr.route("add", dst=str(network), oif=idx, scope=0)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
        except NetlinkError as e:
            raise errors.BackendError(f"cannot configure {self.name}: {e}") from e

    def close(self) -> None:
        """Close every queue; the kernel then removes the device and its route."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    @staticmethod
    def exists(name: str) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=name))


def _sysctl(path: str, value: str) -> None:
    """Set a sysctl unless it already has the value: a container sees /proc/sys read-only, where the
    namespace's default (inherited by the new device) may already be what we want."""
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
    except OSError:
        pass
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.warning("udp: cannot set %s=%s: %s", path, value, e)


def _disable_ipv6(name: str) -> None:
    """IPv6 RS/MLD packets would otherwise show up on the fd as soon as the device is up.

    Also accept_local: the ICMP net-unreachable we write into the TUN has the TUN's own address
    as source (flannel's format, §8.5), which the kernel drops as a martian unless accept_local
    is set on the device (flannel's ICMP is silently lost for that reason).
    """
    _sysctl(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")
    _sysctl(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "1")


def iface_mtu_and_addr(ifname: str) -> tuple[int, int, IPv4Address | None]:
    """(index, mtu, first IPv4 address) of an interface; used by the test/bench harness."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise errors.InterfaceError(f"interface {ifname!r} not found")
        idx = links[0]
        link = ipr.get_links(idx)[0]
        mtu = link.get_attr("IFLA_MTU")
        addrs = ipr.get_addr(index=idx, family=2)
        addr = IPv4Address(addrs[0].get_attr("IFA_ADDRESS")) if addrs else None
    return idx, mtu, addr
