"""Notifications of netfilter ruleset changes, so the resync checks only after something changed.

Why: flannel re-checks its rules every ``--iptables-resync`` seconds (5 s) for the life of the
agent. Each check spawns ``iptables -S`` (or ``nft``) — ~2–3 ms of CPU with the fork and exec,
measured as a third to a half of an idle agent's whole budget (issue 9: ≤ 1 ms/s). With
nf_tables (``nft``, and ``iptables`` when it is iptables-nft, Debian's and most distributions'
default), the kernel tells every listener on the ``NFNLGRP_NFTABLES`` netlink group about each
change to any table of the namespace (this is what ``nft monitor`` reads). So the loop sleeps on
that socket and checks only once something changed — at once, or ``--iptables-resync`` seconds
after the previous check if that was sooner: a deleted rule still comes back within the resync
period, as in flannel, and a busy ruleset (kube-proxy rewriting its rules) costs at most one
check per period, as before. A full check every ``SAFETY_CHECK_SECONDS`` stays as a safety net.

iptables-legacy keeps its rules in x_tables, which sends no notifications: then (and when the
socket cannot be opened) the loop polls as before. A notification lost to a full socket buffer
(``ENOBUFS``) counts as a change.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
from collections.abc import Callable

from flannel import stophooks

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
#: even without a notification, check this often (a safety net; flannel-like polling is 5 s)
SAFETY_CHECK_SECONDS = 300.0


class RulesetChanges:
    """A netlink socket subscribed to nf_tables changes in the calling thread's network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._unregister: Callable[[], None] = _nothing

    @classmethod
    def open(cls) -> RulesetChanges | None:
        """The subscription, or None (logged) when this kernel or process cannot have one."""
        try:
            return cls()
        except OSError as e:
            log.info("cannot subscribe to netfilter change notifications (%s); checking the rules every "
                     "--iptables-resync seconds instead", e.strerror or e)
            return None

    def wake_on(self, stop: threading.Event) -> None:
        """Make ``wait`` return when ``stop`` is set (a stop hook; no polling)."""
        self._unregister = stophooks.on_stop(stop, self._poke)

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:   # full (already poked) or closed
            pass

    def drain(self) -> bool:
        """Read every pending notification; True if there was any (or some were lost)."""
        seen = False
        while True:
            try:
                if not self._sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                seen = True   # notifications were dropped: something changed

    def wait(self, timeout: float) -> bool:
        """Sleep until a change is notified (True), or ``timeout`` passes or the stop hook fires (False)."""
        return any(key.fileobj is self._sock for key, _ in self._selector.select(timeout))

    def close(self) -> None:
        self._unregister()
        self._selector.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            s.close()


def _nothing() -> None:
    pass
