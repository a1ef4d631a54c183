"""Pure logic of the extension backend (reference §9.6): options, BackendData, and what each
command gets (environment and stdin) for a lease. Running the commands is ``command.py``'s job.

**Shell or not (reference §14.3).** flannel's docs say the commands run through ``sh``; its code
splits the string on whitespace, expands ``$VAR`` itself and executes the words directly. We follow
the **docs**: every command is ``sh -c '<command>'``. Reasons: every example flannel ships
(``Documentation/extension.md``, ``dist/extension-*``) quotes variables (``"$SUBNET"``), chains
with ``&&`` or reads stdin with ``read`` — none of that works without a shell, while a command
written for the code's semantics (``ip route add $SUBNET via $PUBLIC_IP``) means the same under
``sh``. Lease data never becomes command text: it reaches the command only as environment
variables (addresses printed by us) and on stdin, so a hostile lease cannot inject shell code.
Likewise we give the add/remove commands the four variables the docs list (``SUBNET``,
``IPV6SUBNET``, ``PUBLIC_IP``, ``PUBLIC_IPV6``; flannel's code only sets the first and third).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flannel import errors
from flannel.config import NetworkConfig
from flannel.lease import UNSPECIFIED_V4, Lease

TYPE = "extension"
_KEYS = {"prestartupcommand": "PreStartupCommand", "poststartupcommand": "PostStartupCommand",
         "subnetaddcommand": "SubnetAddCommand", "subnetremovecommand": "SubnetRemoveCommand"}


@dataclass(frozen=True)
class ExtensionOptions:
    """The four commands ("" = not configured)."""

    pre_startup: str = ""
    post_startup: str = ""
    subnet_add: str = ""
    subnet_remove: str = ""


def parse_options(backend: Mapping[str, Any]) -> tuple[ExtensionOptions, list[str]]:
    """Parse the ``Backend`` object (keys case-insensitive). Returns the options and the names of
    keys that look like commands but are not recognised (e.g. ``ShutdownCommand`` from flannel's
    dist/ examples, which flannel ignores too) so the caller can warn about them.

    :raises errors.ConfigError: a command that is not a string.
    """
    f: dict[str, Any] = {}
    unknown = []
    for k, v in backend.items():
        lk = str(k).lower()
        if lk in _KEYS:
            if v is not None and not isinstance(v, str):
                raise errors.ConfigError(f"invalid extension backend option {_KEYS[lk]}: must be a string, "
                                         f"got {json.dumps(v)}")
            f[lk] = (v or "").strip()
        elif lk.endswith("command"):
            unknown.append(str(k))
    return ExtensionOptions(pre_startup=f.get("prestartupcommand", ""), post_startup=f.get("poststartupcommand", ""),
                            subnet_add=f.get("subnetaddcommand", ""), subnet_remove=f.get("subnetremovecommand", "")
                            ), unknown


def encode_backend_data(output: str) -> str | None:
    """The PreStartupCommand's trimmed output as the lease's BackendData: a JSON *string*
    (``"aa:bb:cc:dd:ee:ff"``), like flannel. No pre-startup command → no BackendData."""
    from flannel.wire import compact_json

    return compact_json(output)


def decode_backend_data(text: str | None) -> str:
    """A remote lease's BackendData back to the text its PreStartupCommand printed ("" if none).

    :raises errors.BadLeaseRecord: BackendData that is not a JSON string.
    """
    if text is None:
        return ""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise errors.BadLeaseRecord(f"BackendData is not JSON: {e}") from None
    if not isinstance(value, str):
        raise errors.BadLeaseRecord(f"BackendData must be a JSON string for the extension backend, got {text[:80]}")
    return value


def _s(value: object | None) -> str:
    return "" if value is None else str(value)


def post_startup_env(config: NetworkConfig, lease: Lease) -> dict[str, str]:
    """``NETWORK``, ``SUBNET``, ``IPV6SUBNET``, ``PUBLIC_IP``, ``PUBLIC_IPV6`` of our own lease
    (absent values are empty strings)."""
    pub = lease.attrs.public_ip
    return {"NETWORK": _s(config.network), "SUBNET": _s(lease.subnet), "IPV6SUBNET": _s(lease.ipv6_subnet),
            "PUBLIC_IP": "" if pub == UNSPECIFIED_V4 else str(pub), "PUBLIC_IPV6": _s(lease.attrs.public_ipv6)}


def subnet_env(lease: Lease) -> dict[str, str]:
    """``SUBNET``, ``PUBLIC_IP`` (flannel's code) and ``IPV6SUBNET``, ``PUBLIC_IPV6`` (its docs) of a
    remote lease."""
    pub = lease.attrs.public_ip
    return {"SUBNET": _s(lease.subnet), "PUBLIC_IP": "" if pub == UNSPECIFIED_V4 else str(pub),
            "IPV6SUBNET": _s(lease.ipv6_subnet), "PUBLIC_IPV6": _s(lease.attrs.public_ipv6)}


def subnet_stdin(lease: Lease) -> str:
    """What a subnet add/remove command reads on stdin: the remote's BackendData text + newline.

    :raises errors.BadLeaseRecord: see ``decode_backend_data``.
    """
    return decode_backend_data(lease.attrs.backend_data) + "\n"
