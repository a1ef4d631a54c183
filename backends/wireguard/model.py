"""Value types of the wireguard backend: peers as we want them, peers as a device reports them.

Pure data, shared by the translation (``network.py``), the protocol codecs (``uapi.py``) and the
device port (``device.py``). Keys are base64 text (the form leases and ``wg`` use).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

Net = IPv4Network | IPv6Network
Addr = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Endpoint:
    """A peer's UDP endpoint, printed like WireGuard does: ``1.2.3.4:51820``, ``[fd00::1]:51821``."""

    ip: Addr
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class PeerConfig:
    """One peer as this agent wants it on a device.

    ``allowed_ips`` is a frozenset: order means nothing to WireGuard, so a reordered dump is no
    change. ``keepalive`` 0 = off.
    """

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: frozenset[Net]
    preshared_key: str | None = None
    keepalive: int = 0

    def describe(self) -> str:
        ips = ",".join(sorted(str(n) for n in self.allowed_ips))
        return f"peer {self.public_key} endpoint {self.endpoint} allowed-ips {ips}"


@dataclass(frozen=True)
class PeerStatus:
    """One peer as a device reports it (UAPI ``get=1`` or ``wg show <dev> dump``).

    ``last_handshake`` is a POSIX time, ``None`` when there has never been a handshake.
    """

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: frozenset[Net]
    preshared_key: str | None = None
    keepalive: int = 0
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0

    def config(self) -> PeerConfig:
        """The configurable part, comparable with a desired ``PeerConfig``."""
        return PeerConfig(self.public_key, self.endpoint, self.allowed_ips, self.preshared_key, self.keepalive)

    def handshake_age(self, now: float) -> float | None:
        """Seconds since the last handshake (``None``: never). WireGuard re-handshakes every 2
        minutes while traffic flows, so an age well above that means the peer is not talking."""
        return None if self.last_handshake is None else max(0.0, now - self.last_handshake)


@dataclass(frozen=True)
class DeviceStatus:
    """A device's state: listen port, our public key (derived; the private key is never kept) and peers."""

    name: str
    listen_port: int
    public_key: str | None
    peers: tuple[PeerStatus, ...] = ()

    def peer(self, public_key: str) -> PeerStatus | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


@dataclass(frozen=True)
class SetRequest:
    """One configuration transaction on a device (both UAPI ``set=1`` and ``wg`` speak this).

    ``remove`` are public keys to delete; ``upsert`` peers are created or updated with their
    allowed IPs *replaced*. ``replace_peers`` drops every peer not in ``upsert`` first.
    """

    private_key: str | None = None
    listen_port: int | None = None
    replace_peers: bool = False
    remove: tuple[str, ...] = ()
    upsert: tuple[PeerConfig, ...] = ()

    @property
    def empty(self) -> bool:
        return (self.private_key is None and self.listen_port is None and not self.replace_peers
                and not self.remove and not self.upsert)
