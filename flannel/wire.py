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
# re.ASCII: ``\d`` must not match other scripts' digits ("10.5.1.0-٢٤" is not 10.5.1.0-24).
_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?", re.ASCII)

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}

#: A lease value longer than this is refused before it is parsed. flannel's values are ~100–300
#: bytes (vxlan: public IPs, type, VNI and MAC); 64 KiB leaves room for any backend's data (an
#: extension backend's command output, keys, certificates) while a 1 MB value costs nothing.
MAX_VALUE_BYTES = 64 * 1024
#: Nesting deeper than this is refused (a lease value is 2 deep: the object and BackendData).
#: Checked after parsing, so a value nested deeper than Python's recursion limit is refused too
#: (``json.loads`` raises RecursionError, reported as the same reason).
MAX_DEPTH = 32
#: A subnet key name longer than this is not one (the longest real one is ~60 characters).
MAX_KEY_CHARS = 256


def parse_subnet_key(name: str) -> tuple[IPv4Network, IPv6Network | None] | None:
    """``10.5.34.0-24[&fc00::-64]`` → networks, or ``None`` if it is not a subnet key.

    Like flannel: the IPv4 length must fit in 5 bits (so /32 is refused) and the IPv6 one in 7 bits
    (so /128 is refused); the address must be the network address (we refuse host bits, which
    flannel would silently mask, because no flannel ever writes such a key).
    """
    if len(name) > MAX_KEY_CHARS:
        return None
    m = _KEY_RE.fullmatch(name)
    if m is None:
        return None
    addr, prefixlen, addr6, prefixlen6 = m.groups()
    try:
        v4len = int(prefixlen)
        if v4len > 31:
            return None
        # inet_pton: the same dotted-quad rules as IPv4Address (no leading zeros, octets <= 255),
        # a few times faster -- a cold start parses thousands of keys
        v4 = IPv4Network((socket.inet_pton(socket.AF_INET, addr), v4len), strict=True)
        v6: IPv6Network | None = None
        if addr6 is not None:
            v6len = int(prefixlen6)
            if v6len > 127:
                return None
            v6 = IPv6Network(f"{IPv6Address(addr6)}/{v6len}", strict=True)
    except (ValueError, OSError):
        return None
    return v4, v6


def _network_from_int(n: int, prefixlen: int) -> IPv4Network:
    """``IPv4Network((n, prefixlen), strict=True)`` for a network address ``n`` (no host bits) and a
    prefix length 0–30, built without the general constructor: ~3 µs instead of ~8 µs, and a cold
    start builds one per lease in the cluster (10 000 keys: 50 ms). It sets exactly the attributes
    the constructor sets for such a network (checked at import: ``_NETWORK_FROM_INT``)."""
    net: Any = object.__new__(IPv4Network)
    net.network_address = IPv4Address(n)
    net.netmask, net._prefixlen = _make_netmask(prefixlen)
    return cast(IPv4Network, net)


_make_netmask: Any = getattr(IPv4Network, "_make_netmask", None)


def _same_as_constructor() -> bool:
    """Whether ``_network_from_int`` builds what the constructor builds (this Python's ipaddress)."""
    try:
        for text in ("10.5.34.0/24", "0.0.0.0/0", "192.168.0.0/30", "10.0.0.0/8"):
            want = IPv4Network(text)
            got = _network_from_int(int(want.network_address), want.prefixlen)
            if vars(got) != vars(want) or got != want or hash(got) != hash(want) or str(got) != text:
                return False
    except Exception:  # another ipaddress: use its constructor
        return False
    return True


#: whether ``parse_subnet_key_bytes`` may use ``_network_from_int``
_NETWORK_FROM_INT = _same_as_constructor()

#: the common keys as bytes (what etcd hands us); see ``parse_subnet_key_bytes``
_KEY_BYTES = re.compile(rb"([0-9.]{7,15})-([0-9]{1,2})(?:&([0-9a-f:]{2,39})-([0-9]{1,3}))?")


def parse_subnet_key_bytes(name: bytes) -> tuple[IPv4Network, IPv6Network | None] | None:
    """``parse_subnet_key`` for the common keys (``10.5.34.0-24``, ``10.5.34.0-24&fd00:5:22::-64``
    as bytes), without decoding the name first — or None: "not that shape, or not valid: ask
    ``parse_subnet_key``", which alone decides what is refused. Never raises. (Equal results:
    tests/unit/test_wire_fast.py.)"""
    m = _KEY_BYTES.fullmatch(name)
    if m is None:
        return None
    addr, prefixlen, addr6, prefixlen6 = m.groups()
    v4len = int(prefixlen)
    if v4len > 31:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, addr.decode("ascii"))
        n = int.from_bytes(packed, "big")
        if _NETWORK_FROM_INT and v4len <= 30 and n & (0xFFFFFFFF ^ (0xFFFFFFFF >> v4len)) == n:
            v4 = _network_from_int(n, v4len)
        else:   # host bits (refused), /31 (the constructor adds ``hosts``), or another ipaddress
            v4 = IPv4Network((packed, v4len), strict=True)
        if addr6 is None:
            return v4, None
        v6len = int(prefixlen6)
        if v6len > 127:
            return None
        return v4, IPv6Network(f"{IPv6Address(addr6.decode('ascii'))}/{v6len}", strict=True)   # as parse_subnet_key
    except (OSError, ValueError):
        return None


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




def _raw(value: Any, name: str) -> str | None:
    """Embedded BackendData: ``null`` / absent → None; an object (vxlan, wireguard) or a string
    (flannel's extension backend publishes its command output as a JSON string) → compact text.
    Numbers, booleans and arrays are written by no flannel backend: the record is refused."""
    if value is None:
        return None
    if not isinstance(value, dict | str):
        raise errors.BadLeaseRecord(f"{name} must be a JSON object (or a string), got {_type(value)}", "type")
    return compact_json(value)


def _type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (the value is untrusted)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in item)
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_value(text: str | bytes, what: str = "lease value", *, limit: int = MAX_VALUE_BYTES) -> Any:
    """Parse an untrusted JSON value: bounded size and depth, UTF-8 only, no NaN/Infinity.

    :raises errors.BadLeaseRecord: with ``reason`` ``size``, ``encoding``, ``json`` or ``depth``.
    """
    size = len(text) if isinstance(text, bytes) or len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise errors.BadLeaseRecord(f"{what} is {size} bytes or more, more than the {limit} allowed", "size")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.BadLeaseRecord(f"{what} is not UTF-8: {e}", "encoding") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise errors.BadLeaseRecord(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)", "depth") from None
    except ValueError as e:  # JSONDecodeError, an integer of more than 4300 digits
        raise errors.BadLeaseRecord(f"{what} is not JSON: {_short(str(e))}", "json") from None
    if _depth(obj) > MAX_DEPTH:
        raise errors.BadLeaseRecord(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)", "depth")
    return obj


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def decode_attrs(text: str | bytes) -> LeaseAttrs:
    """Parse a lease value. Keys are case-insensitive (last duplicate wins), unknown keys ignored.

    The value is untrusted: every way it can be wrong raises BadLeaseRecord (never another
    exception), with a ``reason`` label for the skipped-record counters.

    A value of the shape flannel writes takes a fast path (``_decode_common``: a cold start decodes
    every lease in the cluster, and the general decoder cost ~20 µs a value); anything else,
    including every bad value, goes through the general decoder, which alone decides what is
    refused and why. Both give the same result for every input (tests/unit/test_wire_fast.py).

    :raises errors.BadLeaseRecord: too large, not UTF-8, not JSON, too deep, not an object, a field
        of the wrong JSON type, or a bad address.
    """
    if type(text) is bytes:
        attrs = _decode_common(text)
        if attrs is not None:
            return attrs
    return decode_attrs_general(text)


#: the field names flannel writes, spelled as it spells them
_CANONICAL_FIELDS = frozenset({"PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"})
#: JSON values a flat BackendData object may hold on the fast path (floats are left to the general
#: path: ``1e400`` parses as infinity)
_FLAT_SCALARS = frozenset({str, int, bool, type(None)})
#: parses one JSON value (the C scanner behind ``json.loads``, without a decoder built per call),
#: NaN/Infinity refused
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: compact JSON of a flat object that holds no character Go escapes (what ``compact_json`` gives
#: for it), without building an encoder per call; no circular-reference markers: a freshly parsed
#: value cannot be circular; ``default`` (for a value JSON cannot encode) is never reached with
#: parsed JSON
try:   # CPython's C encoder (what json.dumps uses); without it the general path decodes these values
    import _json
    _FLAT_ENCODER: Any = _json.make_encoder(None, _reject_constant, _json.encode_basestring, None, ":", ",", False,
                                            False, False)
except (ImportError, AttributeError, TypeError):
    _FLAT_ENCODER = None
#: bytes that send a value to the general path: escapes (a lone surrogate, an escaped quote), and
#: the characters Go escapes in embedded JSON
_GENERAL_ONLY = re.compile(rb'[\\<>&]')


#: The exact bytes flannel's vxlan (and host-gw, udp: no BackendData) agents write, single or dual
#: stack, as ``encode_attrs`` writes them. Every group is text that needs no JSON unescaping and
#: that ``compact_json`` reproduces byte for byte (a canonical integer, a MAC-like string), so a
#: match is decoded without parsing JSON; BackendData is the matched text itself.
_VXLAN_DATA = rb'(\{"VNI":(?:0|[1-9][0-9]{0,17}),"VtepMAC":"[0-9A-Fa-f:]{0,64}"\})'
_VXLAN_VALUE = re.compile(
    rb'\{"PublicIP":"([0-9.]{7,15})","PublicIPv6":(?:null|"([0-9A-Fa-f:.]{2,45})")'
    rb'(?:,"BackendType":"([A-Za-z0-9-]{0,32})")?(?:,"BackendData":' + _VXLAN_DATA + rb')?'
    rb'(?:,"BackendV6Data":' + _VXLAN_DATA + rb')?\}')


def _decode_common(raw: bytes) -> LeaseAttrs | None:
    """The value flannel writes, decoded quickly — or None: "not that shape, ask the general path"."""
    if len(raw) > MAX_VALUE_BYTES:
        return None
    m = _VXLAN_VALUE.fullmatch(raw)
    if m is None:
        return _decode_flat(raw)
    ip, ip6, btype, data, data6 = m.groups()
    try:
        public_ip = IPv4Address(socket.inet_pton(socket.AF_INET, ip.decode("ascii")))
        public_ipv6 = None if ip6 is None else cast(IPv6Address, _ip(ip6.decode("ascii"), 6, "PublicIPv6"))
    except (OSError, errors.BadLeaseRecord):
        return None
    return LeaseAttrs(public_ip=public_ip, public_ipv6=public_ipv6, backend_type=btype.decode("ascii") if btype else "",
                      backend_data=None if data is None else data.decode("ascii"),
                      backend_v6_data=None if data6 is None else data6.decode("ascii"))


def _decode_flat(raw: bytes) -> LeaseAttrs | None:
    """A value of the shape flannel writes, with any backend's flat BackendData, decoded with one
    JSON scan — or None: "not that shape, ask the general path".

    Taken only when the value is ASCII without backslashes or ``<>&`` (so no escape, no lone
    surrogate, nothing ``compact_json`` would rewrite), one JSON object with nothing around it,
    whose keys are flannel's exact field names, PublicIP a dotted quad, no PublicIPv6 or
    BackendV6Data, BackendType a string and BackendData absent, null or a flat object of strings,
    integers, booleans and nulls (depth 2, far within MAX_DEPTH). Never raises.
    """
    if not raw.isascii() or _GENERAL_ONLY.search(raw) is not None:
        return None
    text = raw.decode("ascii")
    try:
        obj, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None
    if end != len(text) or type(obj) is not dict or not _CANONICAL_FIELDS.issuperset(obj):
        return None
    get = obj.get
    ip = get("PublicIP")
    btype = get("BackendType", "")
    data = get("BackendData")
    if (type(ip) is not str or type(btype) is not str or get("PublicIPv6") is not None
            or get("BackendV6Data") is not None):
        return None
    try:
        public_ip = IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big"))
    except (OSError, ValueError):
        return None
    if data is not None:
        if type(data) is not dict or not _FLAT_SCALARS.issuperset(map(type, data.values())) or _FLAT_ENCODER is None:
            return None
        data = "".join(_FLAT_ENCODER(data, 0))
    return LeaseAttrs(public_ip=public_ip, backend_type=btype, backend_data=data)


def decode_attrs_general(text: str | bytes) -> LeaseAttrs:
    """``decode_attrs`` for any input: the reference the fast path must agree with.

    :raises errors.BadLeaseRecord: as ``decode_attrs``.
    """
    obj = parse_json_value(text)
    if not isinstance(obj, dict):
        raise errors.BadLeaseRecord(f"lease value must be a JSON object, got {_type(obj)}", "type")
    fields = {k.lower(): v for k, v in obj.items()}
    public_ip = UNSPECIFIED_V4
    if "publicip" in fields:
        public_ip = cast(IPv4Address, _ip(fields["publicip"], 4, "PublicIP"))  # _ip checked the version
    public_ipv6 = None
    if fields.get("publicipv6") is not None:
        public_ipv6 = cast(IPv6Address, _ip(fields["publicipv6"], 6, "PublicIPv6"))
    btype = fields.get("backendtype")
    if btype is None:
        btype = ""
    if not isinstance(btype, str):
        raise errors.BadLeaseRecord(f"BackendType must be a string, got {_type(btype)}", "type")
    attrs = LeaseAttrs(
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        backend_type=btype,
        backend_data=_raw(fields.get("backenddata"), "BackendData"),
        backend_v6_data=_raw(fields.get("backendv6data"), "BackendV6Data"),
    )
    try:  # a lone surrogate ("\ud800") parses, but could not be logged or written back
        encode_attrs(attrs).encode("utf-8")
    except UnicodeEncodeError:
        raise errors.BadLeaseRecord("lease value holds a string that is not valid Unicode (a lone surrogate)",
                                    "encoding") from None
    return attrs


def _ip(value: Any, version: int, name: str) -> IPv4Address | IPv6Address:
    if not isinstance(value, str):
        raise errors.BadLeaseRecord(f"{name} must be an IPv{version} address string, got {_type(value)}", "type")
    if version == 4:
        try:   # the common case, a few times faster than ip_address(); same rules (see parse_subnet_key)
            return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, value), "big"))
        except (OSError, ValueError):
            pass   # ip_address() below says what is wrong (or that it is an IPv6 address)
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise errors.BadLeaseRecord(f"{name} {_short(value)!r} is not an IP address", "address") from None
    if addr.version != version:
        raise errors.BadLeaseRecord(f"{name} {value!r} is not an IPv{version} address", "address")
    return addr


def decode_lease(name: str, value: str | bytes, *, expiration: float | None = None) -> Lease:
    """A (key name after ``subnets/``, value) pair → Lease.

    :raises errors.BadLeaseRecord: the key is not a subnet key or the value is invalid (and
        nothing else, whatever the input).
    """
    nets = parse_subnet_key(name)
    if nets is None:
        raise errors.BadLeaseRecord(f"{_short(name)!r} is not a subnet key (expected like 10.5.34.0-24)", "key")
    return Lease(subnet=nets[0], ipv6_subnet=nets[1], attrs=decode_attrs(value), expiration=expiration)
