"""flannel's wire format for etcd: subnet keys and lease values (reference §4.2, §4.3).

Everything that reads or writes ``10.5.34.0-24`` or ``{"PublicIP":...}`` goes through here, and the
golden tests in tests/unit/test_wire.py pin the exact bytes flannel produces.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, cast

from flannel import errors
from flannel.lease import UNSPECIFIED_V4, Lease, LeaseAttrs

# flannel's pattern, applied to the part of the key after "<prefix>/subnets/". flannel anchors it at
# the end only; we require the whole name to match so that "junk10.1.2.0-24" is a stray key.
_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?")

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def parse_subnet_key(name: str) -> tuple[IPv4Network, IPv6Network | None] | None:
    """``10.5.34.0-24[&fc00::-64]`` → networks, or ``None`` if it is not a subnet key.

    Like flannel: the IPv4 length must fit in 5 bits (so /32 is refused) and the IPv6 one in 7 bits
    (so /128 is refused); the address must be the network address (we refuse host bits, which
    flannel would silently mask, because no flannel ever writes such a key).
    """
    m = _KEY_RE.fullmatch(name)
    if m is None:
        return None
    try:
        v4len = int(m.group(2))
        if v4len > 31:
            return None
        # inet_pton: the same dotted-quad rules as IPv4Address (no leading zeros, octets <= 255),
        # a few times faster -- a cold start parses thousands of keys
        v4 = IPv4Network((int.from_bytes(socket.inet_pton(socket.AF_INET, m.group(1)), "big"), v4len), strict=True)
        v6: IPv6Network | None = None
        if m.group(3) is not None:
            v6len = int(m.group(4))
            if v6len > 127:
                return None
            v6 = IPv6Network(f"{IPv6Address(m.group(3))}/{v6len}", strict=True)
    except (ValueError, OSError):
        return None
    return v4, v6


def format_subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def compact_json(obj: Any) -> str:
    """Go's ``json.Marshal`` text for ``obj``: compact, UTF-8, with ``<>&`` escaped."""
    text = _COMPACT.encode(obj)
    for ch, esc in _GO_ESCAPES.items():
        if ch in text:
            text = text.replace(ch, esc)
    return text


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_attrs(attrs: LeaseAttrs) -> str:
    """The lease value flannel writes: field order and omission rules of reference §4.3."""
    parts = [f'"PublicIP":"{attrs.public_ip}"']
    parts.append('"PublicIPv6":' + (f'"{attrs.public_ipv6}"' if attrs.public_ipv6 is not None else "null"))
    if attrs.backend_type:
        parts.append(f'"BackendType":{compact_json(attrs.backend_type)}')
    if attrs.backend_data is not None:
        parts.append(f'"BackendData":{attrs.backend_data}')
    if attrs.backend_v6_data is not None:
        parts.append(f'"BackendV6Data":{attrs.backend_v6_data}')
    return "{" + ",".join(parts) + "}"


def _raw(value: Any) -> str | None:
    """Embedded BackendData: ``null`` / absent → None, anything else re-emitted compacted."""
    return None if value is None else compact_json(value)


def decode_attrs(text: str | bytes) -> LeaseAttrs:
    """Parse a lease value. Keys are case-insensitive (last duplicate wins), unknown keys ignored.

    :raises errors.BadLeaseRecord: not JSON, not an object, or a bad address.
    """
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.BadLeaseRecord(f"lease value is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise errors.BadLeaseRecord(f"lease value is not a JSON object: {str(text)[:80]!r}")
    fields = {k.lower(): v for k, v in obj.items()}
    public_ip = UNSPECIFIED_V4
    if "publicip" in fields:
        public_ip = cast(IPv4Address, _ip(fields["publicip"], 4, "PublicIP"))  # _ip checked the version
    public_ipv6 = None
    if fields.get("publicipv6") is not None:
        public_ipv6 = cast(IPv6Address, _ip(fields["publicipv6"], 6, "PublicIPv6"))
    btype = fields.get("backendtype") or ""
    if not isinstance(btype, str):
        raise errors.BadLeaseRecord(f"BackendType must be a string, got {btype!r}")
    return LeaseAttrs(
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        backend_type=btype,
        backend_data=_raw(fields.get("backenddata")),
        backend_v6_data=_raw(fields.get("backendv6data")),
    )


def _ip(value: Any, version: int, name: str) -> IPv4Address | IPv6Address:
    if not isinstance(value, str):
        raise errors.BadLeaseRecord(f"{name} must be an IPv{version} address string, got {value!r}")
    if version == 4:
        try:   # the common case, a few times faster than ip_address(); same rules (see parse_subnet_key)
            return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, value), "big"))
        except (OSError, ValueError):
            pass   # ip_address() below says what is wrong (or that it is an IPv6 address)
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as e:
        raise errors.BadLeaseRecord(f"{name} {value!r} is not an IP address") from e
    if addr.version != version:
        raise errors.BadLeaseRecord(f"{name} {value!r} is not an IPv{version} address")
    return addr


def decode_lease(name: str, value: str | bytes, *, expiration: float | None = None) -> Lease:
    """A (key name after ``subnets/``, value) pair → Lease.

    :raises errors.BadLeaseRecord: the key is not a subnet key or the value is invalid.
    """
    nets = parse_subnet_key(name)
    if nets is None:
        raise errors.BadLeaseRecord(f"{name!r} is not a subnet key (expected like 10.5.34.0-24)")
    return Lease(subnet=nets[0], ipv6_subnet=nets[1], attrs=decode_attrs(value), expiration=expiration)
