"""``udp`` backend: TUN + user-space UDP encapsulation, wire-compatible with flannel (reference §8)."""

from __future__ import annotations

from flannel.backends.udp.backend import UDPBackend

__all__ = ["UDPBackend"]
