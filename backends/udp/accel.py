"""Loader of the udp fast path (``_accel/fastpath.c``), via ctypes.

The C file is built at install time (setup.py, a setuptools ``Extension`` with ``optional=True``)
into ``flannel/backends/udp/_fastpath.<abi>.so`` inside the installed package, and loaded from
there only: the daemon never runs a compiler, never reads ``$CC`` and never loads code from a cache
or any other place a non-root user could write to. If the install had no compiler the file is
absent and the backend runs the pure-Python data path, saying so once at start
(``udp: data path: pure Python (...)``) and in ``flannel --version``.

A ctypes call releases the GIL, so one Python thread per direction and queue runs the C loop in
parallel with the others.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import stat
from pathlib import Path

from flannel.backends.udp.packet import COUNTER_NAMES, TABLE_ABI, TableBuilder

log = logging.getLogger(__name__)

MODULE = "flannel.backends.udp._fastpath"
MAX_WORKERS = 64  # FL_MAX_WORKERS in fastpath.c


class State(ctypes.Structure):
    """Mirror of ``struct fl_state``."""

    _fields_ = [("stop", ctypes.c_int32), ("tun_addr", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("mtu", ctypes.c_int32), ("stop_fd", ctypes.c_int32),
                ("table", ctypes.c_void_p),
                ("gen", ctypes.c_uint64), ("seen", ctypes.c_uint64 * MAX_WORKERS)]


IDLE = (1 << 64) - 1  # FL_IDLE: a worker that holds no table
Counters = ctypes.c_uint64 * len(COUNTER_NAMES)

_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def library_path() -> Path:
    """Where the installed extension is (found like an import would, without importing it).

    :raises RuntimeError: it was not built at install time.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise RuntimeError("the C fast path was not built at install time (no C compiler?); "
                           "reinstall with gcc and libc headers to get it")
    return Path(spec.origin)


def _check_not_writable_by_others(path: Path) -> None:
    """Refuse a library (or its folder) that a user other than root or us could have replaced."""
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(f"refusing to load {path}: {p} is writable by other users "
                               f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})")


def load() -> ctypes.CDLL | None:
    """The loaded library, or None (the reason in ``load_error()``). Loaded once per process."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    try:
        path = library_path()
        _check_not_writable_by_others(path)
        lib = ctypes.CDLL(str(path))
        if lib.fl_abi() != TABLE_ABI or lib.fl_ncounters() != len(COUNTER_NAMES) \
                or lib.fl_max_workers() != MAX_WORKERS:
            raise RuntimeError(f"{path.name} does not match this version of the package (stale build?)")
    except (OSError, RuntimeError, AttributeError) as e:
        _load_error = str(e)
        return None
    ptr, u32, i32, u64 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint64
    lib.fl_decrement_ttl.argtypes = [ctypes.c_char_p]
    lib.fl_icmp_unreach.argtypes = [ctypes.c_char_p, i32, u32, ctypes.c_char_p]
    lib.fl_lookup.argtypes = [ptr, u32]
    lib.fl_lookup.restype = u32
    lib.fl_known_sender.argtypes = [ptr, u32]
    lib.fl_source_allowed.argtypes = [ptr, u32, u32]
    lib.fl_publish.argtypes = [ptr, ptr]
    lib.fl_publish.restype = u64
    lib.fl_oldest_seen.argtypes = [ptr, i32]
    lib.fl_oldest_seen.restype = u64
    for worker in (lib.fl_tun_to_udp, lib.fl_udp_to_tun, lib.fl_tun_to_udp_gso, lib.fl_udp_to_tun_gro):
        worker.argtypes = [ptr, ptr, i32, i32, i32]
    lib.fl_tso_segment.argtypes = [ctypes.c_char_p, i32, i32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.fl_complete_csum.argtypes = [ctypes.c_char_p, i32, i32, i32]
    _lib = lib
    return lib


def load_error() -> str | None:
    return _load_error


def status() -> str:
    """``available`` or ``not available (<reason>)``: for ``flannel --version``."""
    return "available" if load() is not None else f"not available ({load_error()})"


def pack(builder: TableBuilder) -> ctypes.Array[ctypes.c_char]:
    """The builder's current state as a ``struct fl_table`` buffer for the C workers."""
    blob = builder.c_layout()
    return ctypes.create_string_buffer(blob, len(blob))
