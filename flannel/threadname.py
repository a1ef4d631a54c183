"""Give the calling thread its name in the kernel, so ``top -H``, ``ps -L`` and ``/proc/<pid>/task/*/comm``
tell the agent's threads apart.

Why: Python (before 3.14) leaves every thread named after the process ("python"), so an operator
looking at a busy agent, or the benchmark splitting CPU per thread (``bench/agent_scale.py``), cannot
see whether the watch, the netlink loop or gRPC's own threads spend it. The kernel keeps at most 15
bytes; longer names are cut. Naming is best effort: where ``prctl`` is missing nothing happens.
"""

from __future__ import annotations

import ctypes
import threading

_PR_SET_NAME = 15
_KERNEL_NAME_BYTES = 15

try:   # libc is already in the process (no library search: find_library may run a compiler)
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def name_this_thread(name: str | None = None) -> None:
    """Set the kernel name of the calling thread to ``name`` (default: its ``threading`` name)."""
    if _libc is None or not hasattr(_libc, "prctl"):
        return
    text = (name or threading.current_thread().name).encode("utf-8", "replace")[:_KERNEL_NAME_BYTES]
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
