"""The udp data path: worker threads moving packets between the TUN queues and the UDP sockets.

One pair of workers (TUN→UDP, UDP→TUN) per TUN queue, each queue with its own SO_REUSEPORT UDP
socket. The inner loop is the C accelerator (``accel``) when it can be built, else pure Python;
both make the same decisions (``packet``). Workers read ``self.table`` (Python) or
``state.table`` (C) once per packet/batch; ``set_table`` swaps in a new immutable table, so lease
changes never take a lock in the hot path and never disturb traffic to other peers.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from flannel import errors, threadname
from flannel.backends.udp import accel
from flannel.backends.udp.packet import (
    COUNTER_NAMES,
    IPV4_HEADER_LEN,
    RX_OK,
    PeerTable,
    decrement_ttl,
    icmp_net_unreachable,
)

log = logging.getLogger(__name__)

SOCK_BUF = 8 << 20
#: how long a worker blocked on a full socket waits before it looks at ``stop`` again (idle workers
#: do not poll: they sleep on their input and on the stop eventfd until one is readable)
POLL_S = 0.2
_IDX = {name: i for i, name in enumerate(COUNTER_NAMES)}


SOL_UDP = 17
UDP_GRO = 104


def open_socket(addr: IPv4Address, port: int, reuseport: bool, *, gro: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``addr:port`` with large buffers (and UDP_GRO)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if gro:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
            try:
                s.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, plain, SOCK_BUF)
        s.bind((str(addr), port))
    except OSError as e:
        s.close()
        raise errors.BackendError(f"cannot bind UDP socket {addr}:{port}: {e}") from e
    s.setblocking(False)
    return s


class Proxy:
    """Owns the worker threads; the TUN device and sockets are passed in and closed by the owner."""

    def __init__(self, tun_fds: list[int], socks: list[socket.socket], tun_addr: IPv4Address,
                 port: int, mtu: int, *, use_accel: bool | None = None, offload: bool = False,
                 tx_socks: list[socket.socket] | None = None) -> None:
        self.tun_fds = tun_fds
        self.socks = socks
        # sending sockets per queue (default: the receiving ones, i.e. source port = Port)
        self.tx_socks = tx_socks or socks
        self.tun_addr = int(tun_addr)
        self.port = port
        self.mtu = mtu
        self.table = PeerTable.build((), port)
        self._stopped = False
        # readable once the workers must stop: an idle worker sleeps on it and its input, and
        # wakes for nothing else (no periodic look at ``_stopped``)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._py_counters: list[list[int]] = []
        self._lib = accel.load() if use_accel is not False else None
        if (use_accel or offload) and self._lib is None:
            raise errors.BackendError(f"udp: C accelerator requested but unavailable: {accel.load_error()}")
        self.offload = offload
        self._c_counters: list[ctypes.Array[ctypes.c_uint64]] = []
        self._c_state: accel.State | None = None
        self._c_table: ctypes.Array[ctypes.c_char] | None = None
        # replaced C tables, kept until every worker has been seen past the swap: (generation, buffer)
        self._retired: collections.deque[tuple[int, ctypes.Array[ctypes.c_char]]] = collections.deque()
        if len(tun_fds) * 2 > accel.MAX_WORKERS:
            raise errors.BackendError(f"udp: at most {accel.MAX_WORKERS // 2} queues")
        if self._lib is not None:
            self._c_state = accel.State(stop=0, tun_addr=self.tun_addr, port=port, mtu=mtu, stop_fd=self._stop_fd,
                                        table=None, gen=0)
            for w in range(accel.MAX_WORKERS):
                self._c_state.seen[w] = accel.IDLE

    @property
    def accelerated(self) -> bool:
        return self._lib is not None

    def set_table(self, table: PeerTable) -> None:
        """Publish a new peer table (copy-on-write swap; the workers never wait for it).

        The C workers get a copy in ``struct fl_table`` layout; the one it replaces is freed once
        every worker has been seen outside it (``fl_publish`` / ``fl_oldest_seen``: epoch-based
        reclamation, so a descheduled worker can never read a freed table).
        """
        if self._lib is not None and self._c_state is not None:
            buf = ctypes.create_string_buffer(table.c_layout, len(table.c_layout))
            gen = self._lib.fl_publish(ctypes.byref(self._c_state), ctypes.addressof(buf))
            if self._c_table is not None:
                self._retired.append((gen, self._c_table))
            self._c_table = buf
            oldest = self._lib.fl_oldest_seen(ctypes.byref(self._c_state), accel.MAX_WORKERS)
            while self._retired and self._retired[0][0] <= oldest:
                self._retired.popleft()
        self.table = table

    def start(self) -> None:
        """Start the workers; a no-op while they run, and a restart after ``stop`` (the counters
        carry on: each start adds its own counter arrays, ``counters`` sums them all)."""
        if not self._stopped and any(t.is_alive() for t in self._threads):
            return
        for t in self._threads:  # stragglers of a stop() that timed out: they are on their way out
            t.join(2 * POLL_S + 1.0)
        if any(t.is_alive() for t in self._threads):
            raise errors.BackendError("udp: the previous workers did not stop; not starting a second set")
        self._threads = []
        self._stopped = False
        try:
            os.eventfd_read(self._stop_fd)   # consume the previous stop, if any
        except BlockingIOError:
            pass
        if self._c_state is not None:
            self._c_state.stop = 0
        for q, (fd, sock, tx) in enumerate(zip(self.tun_fds, self.socks, self.tx_socks)):
            targets: list[tuple[Callable[..., None], tuple[object, ...]]]
            if self._lib is not None:
                assert self._c_state is not None
                c_out, c_in = accel.Counters(), accel.Counters()
                self._c_counters += [c_out, c_in]
                targets = [(self._c_tun_to_udp, (c_out, fd, tx, 2 * q)),
                           (self._c_udp_to_tun, (c_in, sock, fd, 2 * q + 1))]
            else:
                p_out, p_in = [0] * len(COUNTER_NAMES), [0] * len(COUNTER_NAMES)
                self._py_counters += [p_out, p_in]
                targets = [(self._py_tun_to_udp, (p_out, fd, tx)), (self._py_udp_to_tun, (p_in, sock, fd))]
            for i, (fn, args) in enumerate(targets):
                t = threading.Thread(target=self._guard, args=(fn, args), daemon=True,
                                     name=f"udp-{'out' if i == 0 else 'in'}-{q}")
                t.start()
                self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        self._stopped = True
        if self._c_state is not None:
            self._c_state.stop = 1
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)   # wake every idle worker (it stays readable until start)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:  # kept in _threads, so that start() does not run a second set beside them
            log.warning("udp: workers still running after %.1fs: %s", timeout, alive)

    def close(self) -> None:
        """Stop the workers and release the stop eventfd (the TUN and sockets belong to the owner).
        The eventfd stays open while a worker that did not stop in time may still wait on it."""
        self.stop()
        if self._stop_fd >= 0 and not any(t.is_alive() for t in self._threads):
            os.close(self._stop_fd)
            self._stop_fd = -1
            if self._c_state is not None:
                self._c_state.stop_fd = -1

    def counters(self) -> dict[str, int]:
        tot = [0] * len(COUNTER_NAMES)
        for c in self._py_counters:
            for i, v in enumerate(c):
                tot[i] += v
        for cc in self._c_counters:
            for i in range(len(COUNTER_NAMES)):
                tot[i] += cc[i]
        return dict(zip(COUNTER_NAMES, tot))

    def _guard(self, fn: object, args: tuple[object, ...]) -> None:
        """A worker must never die silently: log and restart on an unexpected error."""
        threadname.name_this_thread()
        while not self._stopped:
            try:
                fn(*args)  # type: ignore[operator]
                return
            except Exception:
                log.exception("udp: worker %s failed; restarting", threading.current_thread().name)
                time.sleep(0.1)

    # --- C workers: the ctypes call releases the GIL for the whole loop ---
    def _c_tun_to_udp(self, c: ctypes.Array[ctypes.c_uint64], fd: int, sock: socket.socket, w: int) -> None:
        assert self._lib is not None and self._c_state is not None
        fn = self._lib.fl_tun_to_udp_gso if self.offload else self._lib.fl_tun_to_udp
        fn(ctypes.byref(self._c_state), c, fd, sock.fileno(), w)

    def _c_udp_to_tun(self, c: ctypes.Array[ctypes.c_uint64], sock: socket.socket, fd: int, w: int) -> None:
        assert self._lib is not None and self._c_state is not None
        fn = self._lib.fl_udp_to_tun_gro if self.offload else self._lib.fl_udp_to_tun
        fn(ctypes.byref(self._c_state), c, sock.fileno(), fd, w)

    # --- pure-Python workers ---
    def _py_tun_to_udp(self, c: list[int], fd: int, sock: socket.socket) -> None:
        read, sendto, mtu = os.read, sock.sendto, self.mtu
        i_rx, i_short, i_ver = _IDX["tun_rx_packets"], _IDX["drop_short"], _IDX["drop_version"]
        i_noroute, i_icmp, i_ttl = _IDX["drop_no_route"], _IDX["icmp_unreachable"], _IDX["drop_ttl"]
        i_tx, i_txb, i_err = _IDX["tx_packets"], _IDX["tx_bytes"], _IDX["send_errors"]
        while not self._stopped:
            try:
                data = read(fd, mtu)
            except BlockingIOError:
                select.select([fd, self._stop_fd], [], [])
                continue
            except OSError as e:
                if e.errno == errno.EBADF:
                    return
                raise
            c[i_rx] += 1
            if len(data) < IPV4_HEADER_LEN:
                c[i_short] += 1
                continue
            if data[0] >> 4 != 4:
                c[i_ver] += 1
                continue
            hit = self.table.lookup(int.from_bytes(data[16:20], "big"))
            if hit is None:
                c[i_noroute] += 1
                reply = icmp_net_unreachable(data, self.tun_addr)
                if reply is not None and self._tun_write(fd, reply, c):
                    c[i_icmp] += 1
                continue
            pkt = bytearray(data)
            if not decrement_ttl(pkt):
                c[i_ttl] += 1
                continue
            try:
                sendto(pkt, hit)
            except BlockingIOError:
                select.select([], [sock], [], POLL_S)
                try:
                    sendto(pkt, hit)
                except OSError:
                    c[i_err] += 1
                    continue
            except OSError:
                c[i_err] += 1
                continue
            c[i_tx] += 1
            c[i_txb] += len(pkt)

    def _py_udp_to_tun(self, c: list[int], sock: socket.socket, fd: int) -> None:
        recvfrom, mtu, inet_aton = sock.recvfrom, self.mtu, socket.inet_aton
        i_rx, i_short, i_ver, i_ttl = _IDX["rx_packets"], _IDX["drop_short"], _IDX["drop_version"], _IDX["drop_ttl"]
        i_unk, i_spoof = _IDX["drop_unknown_peer"], _IDX["drop_spoofed"]
        i_tx, i_txb = _IDX["tun_tx_packets"], _IDX["tun_tx_bytes"]
        while not self._stopped:
            try:
                data, src = recvfrom(mtu)
            except BlockingIOError:
                select.select([sock.fileno(), self._stop_fd], [], [])
                continue
            except OSError as e:
                if e.errno == errno.EBADF:
                    return
                continue  # e.g. ECONNREFUSED reported by an earlier ICMP; keep going
            c[i_rx] += 1
            table = self.table
            outer = int.from_bytes(inet_aton(src[0]), "big")
            if not table.known_sender(outer):
                c[i_unk] += 1
                continue
            if len(data) < IPV4_HEADER_LEN:
                c[i_short] += 1
                continue
            if data[0] >> 4 != 4:
                c[i_ver] += 1
                continue
            if table.source_allowed(outer, int.from_bytes(data[12:16], "big")) != RX_OK:
                c[i_spoof] += 1
                continue
            pkt = bytearray(data)
            if not decrement_ttl(pkt):
                c[i_ttl] += 1
                continue
            if self._tun_write(fd, pkt, c):
                c[i_tx] += 1
                c[i_txb] += len(pkt)

    @staticmethod
    def _tun_write(fd: int, pkt: bytes | bytearray, c: list[int]) -> bool:
        for _ in range(100):
            try:
                os.write(fd, pkt)
                return True
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                break
        c[_IDX["tun_write_errors"]] += 1
        return False
