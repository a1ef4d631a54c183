"""The two configuration languages of a WireGuard device, as pure text codecs (no I/O).

* The cross-platform **UAPI** text protocol (https://www.wireguard.com/xplatform/) that
  ``wireguard-go`` serves on ``/var/run/wireguard/<dev>.sock``: ``set=1`` / ``get=1`` requests of
  ``key=value`` lines ending with a blank line, answered with ``errno=N``. Keys are lowercase hex.
* The ``wg`` tool (wireguard-tools), which configures the kernel's WireGuard over generic netlink:
  ``wg set`` arguments for a ``SetRequest`` and the parser of ``wg show <dev> dump``.

Both map to the same model (``model.SetRequest`` in, ``model.DeviceStatus`` out), so the device
port can hide which implementation runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from flannel.backends.wireguard import keys
from flannel.backends.wireguard.model import DeviceStatus, Endpoint, Net, PeerStatus, SetRequest

ZERO_HEX = "0" * 64


class ProtocolError(ValueError):
    """A device answered something this codec cannot read."""


# --------------------------------------------------------------------------------------------
# UAPI
# --------------------------------------------------------------------------------------------

GET_REQUEST = b"get=1\n\n"


def encode_set(req: SetRequest) -> bytes:
    """The ``set=1`` request for ``req``.

    An upserted peer is written completely (PSK zeroed when none, keepalive 0 when off, allowed
    IPs replaced), so whatever state the device had, it ends up exactly as ``PeerConfig`` says.
    """
    lines = ["set=1"]
    if req.private_key is not None:
        lines.append(f"private_key={keys.b64_to_hex(req.private_key)}")
    if req.listen_port is not None:
        lines.append(f"listen_port={req.listen_port}")
    if req.replace_peers:
        lines.append("replace_peers=true")
    for key in req.remove:
        lines += [f"public_key={keys.b64_to_hex(key)}", "remove=true"]
    for p in req.upsert:
        lines.append(f"public_key={keys.b64_to_hex(p.public_key)}")
        lines.append(f"preshared_key={keys.b64_to_hex(p.preshared_key) if p.preshared_key else ZERO_HEX}")
        if p.endpoint is not None:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={n}" for n in _sorted_nets(p.allowed_ips)]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def parse_errno(text: str) -> int:
    """The ``errno=N`` of an answer (0 = success). :raises ProtocolError: none found."""
    for line in text.splitlines():
        if line.startswith("errno="):
            try:
                return int(line[6:])
            except ValueError:
                break
    raise ProtocolError(f"no errno in UAPI answer {text[:200]!r}")


def parse_get(text: str, name: str) -> DeviceStatus:
    """Parse a ``get=1`` answer into a ``DeviceStatus`` (the private key is read only to derive
    our public key, then dropped).

    :raises ProtocolError: errno ≠ 0 or an unreadable value.
    """
    err = parse_errno(text)
    if err != 0:
        raise ProtocolError(f"get=1 on {name} failed with errno {err}")
    listen_port = 0
    our_key: str | None = None
    peers: list[PeerStatus] = []
    cur: dict[str, object] | None = None
    try:
        for line in text.splitlines():
            if not line or line.startswith("errno="):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ProtocolError(f"line without '=': {line!r}")
            if key == "public_key":
                if cur is not None:
                    peers.append(_peer(cur))
                cur = {"public_key": keys.hex_to_b64(value), "allowed_ips": set()}
            elif cur is None:
                if key == "private_key" and value != ZERO_HEX:
                    our_key = keys.public_key(keys.hex_to_b64(value))
                elif key == "listen_port":
                    listen_port = int(value)
            else:
                _peer_field(cur, key, value)
        if cur is not None:
            peers.append(_peer(cur))
    except (ValueError, KeyError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"unreadable UAPI answer from {name}: {e}") from e
    return DeviceStatus(name=name, listen_port=listen_port, public_key=our_key, peers=tuple(peers))


def _peer_field(cur: dict[str, object], key: str, value: str) -> None:
    if key == "preshared_key":
        cur["psk"] = None if value == ZERO_HEX else keys.hex_to_b64(value)
    elif key == "endpoint":
        cur["endpoint"] = parse_endpoint(value)
    elif key == "last_handshake_time_sec":
        cur["hs_sec"] = int(value)
    elif key == "last_handshake_time_nsec":
        cur["hs_nsec"] = int(value)
    elif key == "tx_bytes":
        cur["tx"] = int(value)
    elif key == "rx_bytes":
        cur["rx"] = int(value)
    elif key == "persistent_keepalive_interval":
        cur["keepalive"] = int(value)
    elif key == "allowed_ip":
        allowed = cur["allowed_ips"]
        assert isinstance(allowed, set)
        allowed.add(ipaddress.ip_network(value, strict=False))
    # protocol_version and future keys: ignored


def _peer(cur: dict[str, object]) -> PeerStatus:
    sec = int(cur.get("hs_sec", 0))  # type: ignore[call-overload]
    nsec = int(cur.get("hs_nsec", 0))  # type: ignore[call-overload]
    return PeerStatus(
        public_key=str(cur["public_key"]),
        endpoint=cur.get("endpoint"),  # type: ignore[arg-type]
        allowed_ips=frozenset(cur["allowed_ips"]),  # type: ignore[call-overload]
        preshared_key=cur.get("psk"),  # type: ignore[arg-type]
        keepalive=int(cur.get("keepalive", 0)),  # type: ignore[call-overload]
        last_handshake=None if sec == 0 and nsec == 0 else sec + nsec / 1e9,
        rx_bytes=int(cur.get("rx", 0)),  # type: ignore[call-overload]
        tx_bytes=int(cur.get("tx", 0)),  # type: ignore[call-overload]
    )


def parse_endpoint(text: str) -> Endpoint | None:
    """``1.2.3.4:51820`` / ``[fd00::1]:51821`` → Endpoint; ``(none)`` or empty → None."""
    if text in ("", "(none)"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"endpoint {text!r} has no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:  # IPv6 zone (link-local endpoints): not something flannel configures
        host = host.split("%", 1)[0]
    return Endpoint(ipaddress.ip_address(host), int(port))


def _sorted_nets(nets: Iterable[Net]) -> list[Net]:
    return sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


# --------------------------------------------------------------------------------------------
# The wg tool (kernel devices)
# --------------------------------------------------------------------------------------------

def wg_set_args(dev: str, req: SetRequest, *, psk_path: str | None, key_path: str | None) -> list[str]:
    """Arguments of ``wg set`` for ``req`` (after the program name).

    ``wg`` reads keys from files only; the caller passes paths of files holding the private key
    (``key_path``) and the (one, network-wide) PSK (``psk_path``). ``replace_peers`` has no
    ``wg set`` form: the caller removes the extra peers itself (``device.KernelDevice``).
    """
    args = ["set", dev]
    if req.listen_port is not None:
        args += ["listen-port", str(req.listen_port)]
    if req.private_key is not None:
        if key_path is None:
            raise ValueError("a private key needs key_path")
        args += ["private-key", key_path]
    for key in req.remove:
        args += ["peer", key, "remove"]
    for p in req.upsert:
        args += ["peer", p.public_key]
        if p.preshared_key:
            if psk_path is None:
                raise ValueError("a preshared key needs psk_path")
            args += ["preshared-key", psk_path]
        else:
            args += ["preshared-key", "/dev/null"]   # an empty file clears it
        if p.endpoint is not None:
            args += ["endpoint", str(p.endpoint)]
        args += ["persistent-keepalive", str(p.keepalive) if p.keepalive else "off"]
        args += ["allowed-ips", ",".join(str(n) for n in _sorted_nets(p.allowed_ips))]
    return args


def parse_wg_dump(text: str, name: str) -> DeviceStatus:
    """Parse ``wg show <dev> dump`` (tab-separated: one interface line, then one line per peer).

    :raises ProtocolError: a line with the wrong number of fields or an unreadable value.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ProtocolError(f"empty `wg show {name} dump`")
    try:
        head = lines[0].split("\t")
        if len(head) != 4:
            raise ProtocolError(f"interface line of `wg show {name} dump` has {len(head)} fields, want 4")
        our_key = None if head[1] == "(none)" else head[1]
        listen_port = int(head[2])
        peers = []
        for ln in lines[1:]:
            f = ln.split("\t")
            if len(f) != 8:
                raise ProtocolError(f"peer line of `wg show {name} dump` has {len(f)} fields, want 8")
            allowed = frozenset() if f[3] == "(none)" else frozenset(
                ipaddress.ip_network(x, strict=False) for x in f[3].split(","))
            hs = int(f[4])
            peers.append(PeerStatus(
                public_key=f[0], preshared_key=None if f[1] == "(none)" else f[1], endpoint=parse_endpoint(f[2]),
                allowed_ips=allowed, last_handshake=float(hs) if hs else None, rx_bytes=int(f[5]),
                tx_bytes=int(f[6]), keepalive=0 if f[7] == "off" else int(f[7])))
    except ValueError as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"unreadable `wg show {name} dump`: {e}") from e
    return DeviceStatus(name=name, listen_port=listen_port, public_key=our_key, peers=tuple(peers))
