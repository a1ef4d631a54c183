"""Loader of the optional C inner loop (``_accel/fastpath.c``), via ctypes.

Compiled on first use with the machine's ``gcc`` into a cache directory (``$FLANNEL_ACCEL_CACHE``,
else ``$XDG_CACHE_HOME/pyflannel``, else ``~/.cache/pyflannel``), keyed by the source's hash, so
no build step or Python headers are needed. ``FLANNEL_UDP_ACCEL=0`` disables it; when gcc is
missing or the build fails the backend logs why and uses the pure-Python workers instead.

A ctypes call releases the GIL, so one Python thread per direction and queue runs the C loop in
parallel with the others.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from flannel.backends.udp.packet import COUNTER_NAMES, PeerTable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_accel") / "fastpath.c"
CFLAGS = ("-O3", "-shared", "-fPIC")


class State(ctypes.Structure):
    """Mirror of ``struct fl_state``."""

    _fields_ = [("stop", ctypes.c_int32), ("tun_addr", ctypes.c_uint32), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("mtu", ctypes.c_int32), ("table", ctypes.c_void_p)]


Counters = ctypes.c_uint64 * len(COUNTER_NAMES)

_lib: ctypes.CDLL | None = None
_load_error: str | None = None


def _cache_dir() -> Path:
    if os.environ.get("FLANNEL_ACCEL_CACHE"):
        return Path(os.environ["FLANNEL_ACCEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyflannel"


def build() -> Path:
    """Compile the accelerator if the cached build is missing; returns the .so path."""
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join(CFLAGS).encode() + os.uname().machine.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out = out_dir / f"fastpath-{digest}.so"
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise RuntimeError("no C compiler (gcc) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so")
    os.close(fd)
    try:
        res = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"gcc failed: {res.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The loaded library, or None (reason in ``load_error()``)."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    if os.environ.get("FLANNEL_UDP_ACCEL", "1") in ("0", "no", "false", "off"):
        _load_error = "disabled by FLANNEL_UDP_ACCEL"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        if lib.fl_ncounters() != len(COUNTER_NAMES):
            raise RuntimeError("counter layout mismatch between fastpath.c and packet.py")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _load_error = str(e)
        log.warning("udp: C accelerator unavailable (%s); using the pure-Python data path", e)
        return None
    ptr, u32, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    lib.fl_decrement_ttl.argtypes = [ctypes.c_char_p]
    lib.fl_icmp_unreach.argtypes = [ctypes.c_char_p, i32, u32, ctypes.c_char_p]
    lib.fl_lookup.argtypes = [ptr, u32]
    lib.fl_lookup.restype = u32
    lib.fl_source_allowed.argtypes = [ptr, u32, u32]
    lib.fl_tun_to_udp.argtypes = [ptr, ptr, i32, i32]
    lib.fl_udp_to_tun.argtypes = [ptr, ptr, i32, i32]
    lib.fl_tun_to_udp_gso.argtypes = [ptr, ptr, i32, i32]
    lib.fl_udp_to_tun_gro.argtypes = [ptr, ptr, i32, i32]
    lib.fl_tso_segment.argtypes = [ctypes.c_char_p, i32, i32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.fl_complete_csum.argtypes = [ctypes.c_char_p, i32, i32, i32]
    _lib = lib
    return lib


def load_error() -> str | None:
    return _load_error


def pack_table(table: PeerTable) -> ctypes.Array[ctypes.c_char]:
    """Serialize a PeerTable into ``struct fl_table`` layout (longest prefix first, nets sorted)."""
    by_len: dict[int, list[tuple[int, int]]] = {}
    for p in table.peers:
        by_len.setdefault(p.subnet.prefixlen, []).append((int(p.subnet.network_address), int(p.public_ip)))
    groups: list[tuple[int, int, int]] = []
    routes: list[tuple[int, int]] = []
    for plen in sorted(by_len, reverse=True):
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
        entries = sorted(by_len[plen])
        groups.append((mask, len(routes), len(entries)))
        routes.extend(entries)
    sources = sorted((int(p.public_ip), int(p.subnet.network_address), int(p.subnet.netmask)) for p in table.peers)
    blob = struct.pack("=4I", len(groups), len(routes), len(sources), 0)
    blob += b"".join(struct.pack("=3I", *g) for g in groups)
    blob += b"".join(struct.pack("=2I", *r) for r in routes)
    blob += b"".join(struct.pack("=3I", *s) for s in sources)
    return ctypes.create_string_buffer(blob, len(blob))
