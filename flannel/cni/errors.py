"""CNI error codes (spec 1.0 "Error" section) and the error the plugin reports as JSON on stdout.

Codes 1-99 are the spec's well-known codes; 100 and up are this plugin's own (the spec reserves that
range for plugins). A delegate's own error keeps the delegate's code, so the runtime sees, e.g., the
bridge plugin's code and message, prefixed with the delegate's name.
"""

from __future__ import annotations

from typing import Any

from flannel.errors import FlannelError

# well-known (CNI spec 1.0)
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
# plugin specific
INVALID_SUBNET_ENV = 100  # subnet.env exists but is incomplete or malformed
DELEGATE_FAILED = 101  # the delegate could not be run or returned something that is not CNI JSON
CHECK_MISMATCH = 102  # CHECK: the container's addresses no longer fit this node's flannel subnet


class CNIError(FlannelError):
    """An error the plugin reports to the runtime as ``{"cniVersion","code","msg","details"}``."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out
