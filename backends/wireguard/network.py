"""Pure logic of the wireguard backend (reference §9.4): options, BackendData, lease → peers, plans.

Nothing here touches a device. ``peers_of`` says which peer (per device) one remote lease justifies;
``PeerTable`` keeps those for all leases and answers, for a batch of k events, which k peers
changed (so an event costs the same in a 10- and a 5000-node cluster); ``plan`` diffs a desired
peer set against what a device reports (the full resync).

Fixed flannel bugs (documented in docs/wireguard.md):

* single-device modes (``auto``/``ipv4``/``ipv6``) with an IPv4-only (or IPv6-only) config add
  no route for the missing family (flannel routes the zero ``IPv6Network`` and fails, §14.17);
* in single-device modes our ``BackendV6Data.Port`` is the port the one device really listens on
  (``ListenPort``); flannel publishes ``ListenPortV6`` there, which nothing listens on. When a
  remote lease has IPv4 data, its ``Port`` is used for the v6 endpoint too (it is the same
  device), which also reaches Go flannel nodes;
* two leases that carry the same public key (a node that re-registered with a new subnet before
  its old lease expired) are one WireGuard peer with both subnets as allowed IPs; removing the
  old lease removes only its subnet (flannel removed the peer and cut the node off).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannel import errors
from flannel.backends.wireguard import keys
from flannel.backends.wireguard.model import Endpoint, Net, PeerConfig, PeerStatus, SetRequest
from flannel.lease import UNSPECIFIED_V4, EventType, Lease, LeaseEvent

TYPE = "wireguard"
#: outer IPv4/IPv6 header (20/40) + UDP 8 + type 4 + key index 4 + nonce 8 + tag 16, rounded as flannel does
OVERHEAD = 80
DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821
DEV = "flannel-wg"
DEV_V6 = "flannel-wg-v6"

_RFC1918 = (IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"))
_ULA = IPv6Network("fc00::/7")


class Mode(enum.Enum):
    SEPARATE = "separate"
    AUTO = "auto"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WGOptions:
    """The ``Backend`` object of a wireguard network config, with flannel's defaults.

    ``mtu`` 0 = the external interface's MTU (the device gets ``C − 80``).
    """

    listen_port: int = DEFAULT_PORT
    listen_port_v6: int = DEFAULT_PORT_V6
    mtu: int = 0
    psk: str | None = None
    keepalive: int = 0
    mode: Mode = Mode.SEPARATE


def _int_opt(f: Mapping[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
    value = f.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise errors.ConfigError(
            f"invalid wireguard backend option {name}: must be an integer in [{lo}, {hi}], got {json.dumps(value)}")
    return value


def parse_options(backend: Mapping[str, Any]) -> WGOptions:
    """Parse the ``Backend`` JSON object (keys case-insensitive, like Go's encoding/json).

    ``PersistentKeepaliveInterval`` is in seconds (flannel multiplies the number by a second);
    ``PSK`` is a base64 key like ``wg genpsk`` prints; ``Mode`` is one of separate/auto/ipv4/ipv6
    (case-sensitive in flannel; we accept any case).

    :raises errors.ConfigError: naming the option and the rule it breaks.
    """
    f = {str(k).lower(): v for k, v in backend.items()}
    psk = f.get("psk")
    if psk in (None, ""):
        psk = None
    else:
        try:
            keys.parse_key(psk, "PSK")
        except ValueError as e:
            raise errors.ConfigError(f"invalid wireguard backend option PSK: {e} (generate one with `wg genpsk`)") \
                from None
    mode_text = f.get("mode")
    if mode_text in (None, ""):
        mode = Mode.SEPARATE
    else:
        try:
            mode = Mode(str(mode_text).lower()) if isinstance(mode_text, str) else Mode("?")
        except ValueError:
            raise errors.ConfigError(
                f"invalid wireguard backend option Mode: {json.dumps(mode_text)}; "
                "must be one of separate, auto, ipv4, ipv6") from None
    return WGOptions(
        listen_port=_int_opt(f, "listenport", "ListenPort", DEFAULT_PORT, 1, 65535),
        listen_port_v6=_int_opt(f, "listenportv6", "ListenPortV6", DEFAULT_PORT_V6, 1, 65535),
        mtu=_int_opt(f, "mtu", "MTU", 0, 0, 65535),
        psk=psk,
        keepalive=_int_opt(f, "persistentkeepaliveinterval", "PersistentKeepaliveInterval", 0, 0, 65535),
        mode=mode,
    )


def device_mtu(opts: WGOptions, ext_mtu: int) -> int:
    """``C − 80`` with ``C`` = the MTU option or the external MTU (also the MTU pods get)."""
    base = opts.mtu or ext_mtu
    mtu = base - OVERHEAD
    if mtu < 68:
        raise errors.ConfigError(f"invalid wireguard backend option MTU: {base} leaves a device MTU of {mtu} (< 68)")
    return mtu


# --------------------------------------------------------------------------------------------
# BackendData
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WGData:
    public_key: str
    port: int   # 0 = not published (flannel before it published ports): use our own listen port


def encode_backend_data(public_key: str, port: int) -> str:
    """``{"PublicKey":"<base64>","Port":51820}`` byte for byte as flannel writes it."""
    from flannel.wire import compact_json

    return compact_json({"PublicKey": public_key, "Port": port})


def parse_backend_data(text: str | None, what: str = "BackendData") -> WGData:
    """Decode a remote lease's BackendData / BackendV6Data.

    :raises errors.BadLeaseRecord: missing, not a JSON object, bad key or port.
    """
    if text is None:
        raise errors.BadLeaseRecord(f"no {what}")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise errors.BadLeaseRecord(f"{what} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise errors.BadLeaseRecord(f"{what} must be a JSON object, got {text[:80]!r}")
    f = {str(k).lower(): v for k, v in obj.items()}
    try:
        key = f.get("publickey")
        keys.parse_key(key, f"{what}.PublicKey")  # type: ignore[arg-type]
    except ValueError as e:
        raise errors.BadLeaseRecord(str(e)) from None
    port = f.get("port", 0)
    if port is None:
        port = 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise errors.BadLeaseRecord(f"{what}.Port must be an integer in [0, 65535], got {json.dumps(port)}")
    assert isinstance(key, str)
    return WGData(public_key=key, port=port)


# --------------------------------------------------------------------------------------------
# Lease → peers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What the translation needs to know about this node.

    ``dev4``/``dev6``: the device carrying each enabled family (``None`` = family disabled); in
    single-device modes both are ``flannel-wg``. ``port4``/``port6`` are our listen ports on them.
    """

    mode: Mode
    dev4: str | None
    dev6: str | None
    port4: int = DEFAULT_PORT
    port6: int = DEFAULT_PORT_V6
    psk: str | None = None
    keepalive: int = 0
    ext_addr: IPv4Address | None = None
    ext_v6_addr: IPv6Address | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for d in (self.dev4, self.dev6) if d is not None))


class Skip(Exception):
    """A lease that justifies no peer here (another backend type, no family we run)."""


def select_v6(ctx: Context, peer_ip: IPv4Address, peer_ipv6: IPv6Address | None) -> bool:
    """flannel's ``auto`` mode choice: True to reach the peer over IPv6.

    IPv4 if the peer has no public IPv6; else IPv4 if its public IPv4 is not RFC 1918 and we have
    an IPv4 address; else IPv6 if its IPv6 is not ULA (fc00::/7) and ours exists and is not ULA;
    else IPv4 (and hope).
    """
    if peer_ipv6 is None:
        return False
    if not any(peer_ip in n for n in _RFC1918) and ctx.ext_addr is not None:
        return False
    return peer_ipv6 not in _ULA and ctx.ext_v6_addr is not None and ctx.ext_v6_addr not in _ULA


def _endpoint(ip: IPv4Address | IPv6Address | None, port: int, lease: Lease) -> Endpoint:
    if ip is None or ip == UNSPECIFIED_V4:
        fam = "PublicIPv6" if isinstance(ip, IPv6Address) or ip is None else "PublicIP"
        raise errors.BadLeaseRecord(f"lease {lease.describe()} has no {fam} to reach it at")
    return Endpoint(ip, port)


def peers_of(lease: Lease, ctx: Context) -> dict[str, PeerConfig]:
    """The peer(s) one remote lease justifies, by device (reference §9.4 "Added event").

    :raises Skip: other backend type, or no subnet of a family we run.
    :raises errors.BadLeaseRecord: bad BackendData / BackendV6Data / missing public address (the
        whole lease is skipped, other peers are not affected).
    """
    if lease.attrs.backend_type != TYPE:
        raise Skip(f"ignoring non-wireguard subnet {lease.describe()}: type={lease.attrs.backend_type or '<none>'}")
    use4 = ctx.dev4 is not None and lease.subnet is not None
    use6 = ctx.dev6 is not None and lease.ipv6_subnet is not None
    if not use4 and not use6:
        raise Skip(f"lease {lease.describe()} has no subnet of an address family this node runs")
    d4 = parse_backend_data(lease.attrs.backend_data, "BackendData") if use4 else None
    d6 = parse_backend_data(lease.attrs.backend_v6_data, "BackendV6Data") if use6 else None
    common = {"preshared_key": ctx.psk, "keepalive": ctx.keepalive}
    if ctx.mode is Mode.SEPARATE:
        out = {}
        if d4 is not None and ctx.dev4 is not None and lease.subnet is not None:
            ep = _endpoint(lease.attrs.public_ip, d4.port or ctx.port4, lease)
            out[ctx.dev4] = PeerConfig(d4.public_key, ep, frozenset({lease.subnet}), **common)  # type: ignore[arg-type]
        if d6 is not None and ctx.dev6 is not None and lease.ipv6_subnet is not None:
            ep = _endpoint(lease.attrs.public_ipv6, d6.port or ctx.port6, lease)
            out[ctx.dev6] = PeerConfig(d6.public_key, ep, frozenset({lease.ipv6_subnet}), **common)  # type: ignore[arg-type]
        return out
    # single device: one peer with every family's subnet
    dev = ctx.dev4 or ctx.dev6
    assert dev is not None
    data = d6 if d6 is not None else d4
    assert data is not None
    nets: set[Net] = set()
    if use4 and lease.subnet is not None:
        nets.add(lease.subnet)
    if use6 and lease.ipv6_subnet is not None:
        nets.add(lease.ipv6_subnet)
    if ctx.mode is Mode.IPV6:
        via_v6 = True
    elif ctx.mode is Mode.IPV4:
        via_v6 = False
    else:
        via_v6 = select_v6(ctx, lease.attrs.public_ip, lease.attrs.public_ipv6)
    # the remote's one device listens on its v4 data's port when it publishes one (also for Go
    # flannel, whose v6 Port is ListenPortV6 even in these modes); else on its v6 data's port
    port = (d4.port if d4 is not None and d4.port else 0) or (d6.port if d6 is not None else 0) or ctx.port4
    if via_v6:
        ep = _endpoint(lease.attrs.public_ipv6, port, lease)
    else:
        ep = _endpoint(lease.attrs.public_ip, port, lease)
    return {dev: PeerConfig(data.public_key, ep, frozenset(nets), **common)}  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The peer table: incremental, by public key
# --------------------------------------------------------------------------------------------

PeerKey = tuple[str, str]   # (device, public key)


@dataclass
class PeerTable:
    """Every remote lease's peers, indexed by (device, public key).

    ``update`` folds a batch in and returns the (device, key) pairs whose desired config may have
    changed — only those of the leases in the batch. ``desired`` merges the leases sharing a key:
    the union of their allowed IPs, endpoint/PSK/keepalive from the one added last.
    """

    ctx: Context
    leases: dict[object, Lease] = field(default_factory=dict)
    configs: dict[object, dict[str, PeerConfig]] = field(default_factory=dict)
    owners: dict[PeerKey, list[object]] = field(default_factory=dict)
    skipped: dict[object, str] = field(default_factory=dict)

    def update(self, events: Iterable[LeaseEvent]) -> set[PeerKey]:
        touched: set[PeerKey] = set()
        for ev in events:
            ident = ev.lease.ident
            touched |= self._drop(ident)
            if ev.type is EventType.ADDED:
                touched |= self._add(ev.lease)
        return touched

    def reset(self, leases: Iterable[Lease]) -> None:
        """Replace the whole table (tests, and a context change)."""
        self.leases.clear()
        self.configs.clear()
        self.owners.clear()
        self.skipped.clear()
        for lease in leases:
            self._add(lease)

    def rebuild(self, ctx: Context) -> None:
        """Re-translate every lease under a new context (e.g. our addresses changed)."""
        self.ctx = ctx
        self.reset(list(self.leases.values()))

    def _drop(self, ident: object) -> set[PeerKey]:
        self.leases.pop(ident, None)
        self.skipped.pop(ident, None)
        old = self.configs.pop(ident, {})
        out = set()
        for dev, cfg in old.items():
            pk = (dev, cfg.public_key)
            owners = self.owners.get(pk, [])
            if ident in owners:
                owners.remove(ident)
            if not owners:
                self.owners.pop(pk, None)
            out.add(pk)
        return out

    def _add(self, lease: Lease) -> set[PeerKey]:
        ident = lease.ident
        self.leases[ident] = lease
        try:
            peers = peers_of(lease, self.ctx)
        except (Skip, errors.BadLeaseRecord) as e:
            self.skipped[ident] = str(e)
            return set()
        self.configs[ident] = peers
        out = set()
        for dev, cfg in peers.items():
            pk = (dev, cfg.public_key)
            self.owners.setdefault(pk, []).append(ident)
            out.add(pk)
        return out

    def desired(self, pk: PeerKey) -> PeerConfig | None:
        owners = self.owners.get(pk)
        if not owners:
            return None
        dev = pk[0]
        cfgs = [self.configs[i][dev] for i in owners]
        last = cfgs[-1]
        if len(cfgs) == 1:
            return last
        allowed: frozenset[Net] = frozenset().union(*(c.allowed_ips for c in cfgs))
        return PeerConfig(last.public_key, last.endpoint, allowed, last.preshared_key, last.keepalive)

    def shared_keys(self) -> dict[PeerKey, list[Lease]]:
        """Keys carried by more than one lease (for a warning: usually a re-registered node)."""
        return {pk: [self.leases[i] for i in o] for pk, o in self.owners.items() if len(o) > 1}

    def all_desired(self) -> dict[str, dict[str, PeerConfig]]:
        out: dict[str, dict[str, PeerConfig]] = {d: {} for d in self.ctx.devices}
        for pk in self.owners:
            cfg = self.desired(pk)
            if cfg is not None:
                out.setdefault(pk[0], {})[pk[1]] = cfg
        return out


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

def plan(desired: Mapping[str, PeerConfig], actual: Iterable[PeerStatus | PeerConfig]) -> SetRequest:
    """The one transaction that makes a device's peers equal ``desired`` (by public key).

    Peers that already match are not touched (no handshake is reset on a restart or resync).
    """
    have: dict[str, PeerConfig] = {}
    for p in actual:
        have[p.public_key] = p.config() if isinstance(p, PeerStatus) else p
    remove = tuple(sorted(k for k in have if k not in desired))
    upsert = tuple(desired[k] for k in sorted(desired) if have.get(k) != desired[k])
    return SetRequest(remove=remove, upsert=upsert)


def plan_keys(table: PeerTable, dev: str, touched: Iterable[str], applied: Mapping[str, PeerConfig]) -> SetRequest:
    """The incremental transaction for the keys a batch touched on ``dev``, against what we applied."""
    remove: list[str] = []
    upsert: list[PeerConfig] = []
    for key in sorted(set(touched)):
        want = table.desired((dev, key))
        have = applied.get(key)
        if want is None:
            if have is not None:
                remove.append(key)
        elif want != have:
            upsert.append(want)
    return SetRequest(remove=tuple(remove), upsert=tuple(upsert))
