"""flannel's node annotations: prefix normalisation, names, and the annotation set we publish.

Reference §5.3 (names), §5.5 steps 4-7 (what is written and when a patch is needed). Pure
functions over plain ``dict``/``str`` values so they are table-tested without a cluster.

Differences from flannel (§14.10, §14.11): the names used to read back our previous backend data
are the same normalised names we write (flannel built ``<raw prefix>/backend-data`` and so lost
the vxlan MAC with prefixes that contain a slash), and a node without any annotations is fine.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flannel import errors, wire
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.kube import skips
from flannel.subnet_managers.kube.skips import Rejected

log = logging.getLogger(__name__)

#: Longest flannel annotation value we read. flannel's backend data is ~50 bytes; the API server
#: allows 256 KiB of annotations in total. A larger value is refused before it is parsed.
MAX_VALUE_BYTES = 64 * 1024
#: Deepest JSON nesting accepted in backend data (flannel's is one flat object). Deeper values are
#: refused here, so no backend ever parses something that could exhaust its stack.
MAX_DATA_DEPTH = 32

# flannel's regex, unanchored at the start (Go regexp MatchString = re.search semantics).
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")

#: Backend types whose IPv6 data is published only when they have v6 backend data / a v6 address.
_V6_NEEDS_DATA = {"vxlan"}


def normalize_prefix(prefix: str) -> str:
    """``--kube-annotation-prefix`` → the string every annotation name starts with (§5.3).

    >>> normalize_prefix("flannel.alpha.coreos.com")
    'flannel.alpha.coreos.com/'
    >>> normalize_prefix("example.com/pfx")
    'example.com/pfx-'

    :raises errors.ConfigError: more than one slash, or not ``fqdn/[0-9a-z-_]*``.
    """
    if prefix.count("/") > 1:
        raise errors.ConfigError(f"invalid --kube-annotation-prefix {prefix!r}: "
                                 "prefix can contain at most single slash")
    if "/" not in prefix:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_RE.search(prefix):
        raise errors.ConfigError(f"invalid --kube-annotation-prefix {prefix!r}: "
                                 "prefix must be in a format: fqdn/[0-9a-z-_]*")
    return prefix


@dataclass(frozen=True)
class AnnotationNames:
    """The full annotation names for one prefix."""

    subnet_manager: str
    backend_type: str
    backend_data: str
    backend_v6_data: str
    public_ip: str
    public_ipv6: str
    public_ip_overwrite: str
    public_ipv6_overwrite: str
    node_public_ip: str
    node_public_ipv6: str

    @classmethod
    def for_prefix(cls, prefix: str) -> AnnotationNames:
        """:raises errors.ConfigError: for a prefix §5.3 refuses."""
        p = normalize_prefix(prefix)
        return cls(
            subnet_manager=p + "kube-subnet-manager",
            backend_type=p + "backend-type",
            backend_data=p + "backend-data",
            backend_v6_data=p + "backend-v6-data",
            public_ip=p + "public-ip",
            public_ipv6=p + "public-ipv6",
            public_ip_overwrite=p + "public-ip-overwrite",
            public_ipv6_overwrite=p + "public-ipv6-overwrite",
            node_public_ip=p + "node-public-ip",
            node_public_ipv6=p + "node-public-ipv6",
        )


def desired_annotations(names: AnnotationNames, attrs: LeaseAttrs,
                        current: Mapping[str, str]) -> dict[str, str]:
    """The annotations our node should carry to advertise ``attrs`` (§5.5 step 6).

    ``public-ip-overwrite`` (set by an administrator, e.g. behind NAT) replaces the detected address
    in ``public-ip``; the lease we return keeps the detected one, as flannel does.
    """
    bd = attrs.backend_data if attrs.backend_data is not None else "null"
    v6bd = attrs.backend_v6_data if attrs.backend_v6_data is not None else "null"
    btype = attrs.backend_type
    out = {names.backend_type: btype}
    if not (btype in _V6_NEEDS_DATA and attrs.backend_data is None):
        out[names.backend_data] = bd
        out[names.public_ip] = current.get(names.public_ip_overwrite) or str(attrs.public_ip)
    if _publish_v6(attrs):
        out[names.backend_v6_data] = v6bd
        out[names.public_ipv6] = current.get(names.public_ipv6_overwrite) or str(attrs.public_ipv6)
    out[names.subnet_manager] = "true"
    return out


def _publish_v6(attrs: LeaseAttrs) -> bool:
    if attrs.backend_type in _V6_NEEDS_DATA:
        return attrs.backend_v6_data is not None
    if attrs.backend_type == "wireguard":   # §5.5 step 6: v6 data and a public IPv6 (wireguard backend)
        return attrs.backend_v6_data is not None and attrs.public_ipv6 is not None
    return attrs.public_ipv6 is not None


def annotation_patch(current: Mapping[str, str], desired: Mapping[str, str]) -> dict[str, str]:
    """Only the keys whose value differs (the two-way diff flannel sends); empty = no PATCH."""
    return {k: v for k, v in desired.items() if current.get(k) != v}


def stored_backend_data(names: AnnotationNames, annotations: Mapping[str, str]) -> tuple[str | None, str | None]:
    """Our previously published BackendData / BackendV6Data, as compact JSON text (or None).

    Used so vxlan keeps its VTEP MAC across restarts (§5.7 GetStoredMacAddresses, fixed §14.10).
    Unparsable or ``null`` values count as absent.
    """
    out: list[str | None] = []
    for key in (names.backend_data, names.backend_v6_data):
        try:
            out.append(backend_data_text(annotations.get(key), key))
        except errors.BadLeaseRecord as e:
            log.warning("ignoring stored backend data: %s", e)
            out.append(None)
    return out[0], out[1]


def backend_data_text(value: str | None, key: str) -> str | None:
    """A backend-data annotation → compact JSON text for ``LeaseAttrs`` (``None`` when absent,
    empty or ``null``).

    :raises Rejected: the value is not JSON, not an object or string, too large, or nested too
        deeply (``RecursionError`` from the decoder is caught here and in the tracker, whichever sees
        it first).
    """
    if value is None or value.strip() in ("", "null"):
        return None
    if len(value) > MAX_VALUE_BYTES:
        raise Rejected(skips.TOO_LARGE, f"annotation {key} is {len(value)} characters long "
                                        f"(more than {MAX_VALUE_BYTES})")
    try:
        obj = json.loads(value)
    except RecursionError:
        raise Rejected(skips.TOO_DEEP, f"annotation {key} is nested too deeply to decode") from None
    except ValueError as e:
        raise Rejected(skips.BAD_BACKEND_DATA, f"annotation {key} is not JSON ({e}): {value[:80]!r}") from None
    if _depth(obj) > MAX_DATA_DEPTH:
        raise Rejected(skips.TOO_DEEP, f"annotation {key} is nested more than {MAX_DATA_DEPTH} levels deep")
    if not isinstance(obj, dict | str):
        # as the etcd side (wire._raw): no flannel backend publishes a number, boolean or array
        raise Rejected(skips.BAD_BACKEND_DATA, f"annotation {key} must be a JSON object (or a string), "
                                               f"got {type(obj).__name__}: {value[:80]!r}")
    return wire.compact_json(obj)


def _depth(obj: object) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DATA_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest
