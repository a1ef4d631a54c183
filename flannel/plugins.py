"""Entry-point discovery for backends and subnet managers.

Built-ins are registered in setup.cfg exactly like third-party plugins, and only the plugin the
config asks for is imported (the udp backend pulls in pyroute2 and its packet path, the kube
manager the kubernetes client, the etcd manager gRPC: none should be paid for when unused).
docs/architecture.md shows how to write and install a third-party backend.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from flannel import errors

log = logging.getLogger(__name__)

BACKENDS = "flannel.backends"
SUBNET_MANAGERS = "flannel.subnet_managers"


def available(group: str, eps: Iterable[metadata.EntryPoint] | None = None) -> list[str]:
    """Names registered in ``group``."""
    found = metadata.entry_points(group=group) if eps is None else eps
    return sorted({ep.name for ep in found})


def load(group: str, name: str, eps: Iterable[metadata.EntryPoint] | None = None) -> Any:
    """Load the one plugin called ``name`` (case-insensitive) from ``group``.

    :raises errors.PluginError: unknown name (the message lists the installed ones) or import failure.
    """
    found = list(metadata.entry_points(group=group) if eps is None else eps)
    wanted = name.lower()
    for ep in found:
        if ep.name.lower() == wanted:
            try:
                return ep.load()
            except Exception as e:  # a plugin may fail in any way on import; report it, don't crash
                raise errors.PluginError(group, name, available(group, found), f"{type(e).__name__}: {e}") from e
    raise errors.PluginError(group, name, available(group, found))
