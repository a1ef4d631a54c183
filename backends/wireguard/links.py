"""Notice one of our WireGuard devices disappearing without polling for it.

Why: the run loop used to look up every device once a second to re-create one that someone
deleted (or whose wireguard-go died) — a wake-up a second for the life of an idle agent. The
kernel announces a removed link (``RTM_DELLINK``) on the ``RTMGRP_LINK`` group, and a
wireguard-go that exits takes its TUN device with it, so one notification covers both cases. This
thread sleeps on that socket and wakes the run loop only when a device of ours is named in a
deletion, or when notifications were lost (``ENOBUFS``), when it cannot tell.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Collection

from flannel import errors, nl, threadname
from flannel.backends.routed import rtnl

log = logging.getLogger(__name__)


class LinkWatch:
    """A thread that calls ``wake`` when a link named in ``names()`` is deleted (or on lost notifications)."""

    def __init__(self, names: Callable[[], Collection[str]], wake: Callable[[], None]) -> None:
        """Opens the socket in the caller's network namespace. :raises errors.BackendError:."""
        try:
            self._sock, _ = nl.open_socket(rtnl.RTMGRP_LINK, rcvbuf=256 << 10)
        except OSError as e:
            raise errors.BackendError(f"cannot listen for link notifications: {e}") from e
        self._names = names
        self._wake = wake
        self.wakes = 0                  # how often it woke the loop (tests, debugging)
        self._thread = threading.Thread(target=self._run, name="wg-link-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        threadname.name_this_thread()
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError as e:
                if e.errno == errno.ENOBUFS:   # lost notifications: check the devices to be sure
                    self._notify()
                    continue
                return                         # closed
            try:
                if self._names_a_device(data):
                    self._notify()
            except Exception:  # a malformed notification must not end the watch: check instead
                log.exception("wireguard: unreadable link notification; checking the devices")
                self._notify()

    def _names_a_device(self, data: bytes) -> bool:
        ours = self._names()
        for kind, _flags, _seq, off, end in nl.messages(data):
            if kind == rtnl.RTM_DELLINK and rtnl.link_event(data, off, end)[2] in ours:
                return True
        return False

    def _notify(self) -> None:
        self.wakes += 1
        self._wake()

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
