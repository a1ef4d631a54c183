"""Make a thread blocked in a gRPC stream read sleep, instead of waking 5 times a second.

Why: gRPC Python's blocking calls wait in the C completion queue in slices of
``g_interrupt_check_period_ms`` (200 ms), waking between slices only to run
``PyErr_CheckSignals()`` — so that Ctrl-C reaches a *main* thread blocked in a call. The etcd
watch (``registry._Stream``) blocks in such a read for the whole life of the agent, on the
daemon's ``watch`` thread (and the keeper's lease watch): 5 wake-ups a second, measured as the
largest Python source of idle wake-ups left in issue 9. On any other thread than the main one the
check does nothing at all (Python runs signal handlers on the main thread only), and a read is
ended at stop by ``cancel()`` from a stop hook, which completes the wait at once whatever the slice.

gRPC has no public setting for the slice (gevent mode sets it to 2 s); the variable is exported
by the Cython module as a C-API capsule (``cygrpc.__pyx_capi__``, type ``int``), and that is
what ``lengthen_signal_checks`` writes (``registry`` passes the module in: it is the one module
that imports gRPC). It is process-wide, so the slice stays short enough
(``SIGNAL_CHECK_MS``, 5 s) that a program blocked in a gRPC call on its main thread still
notices Ctrl-C within seconds. If the capsule is missing (another grpcio build), nothing
changes: the watch keeps working, with the wake-ups.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from types import ModuleType

log = logging.getLogger(__name__)

#: the longest a blocked gRPC call waits before looking at signals (gRPC's own default: 200 ms)
SIGNAL_CHECK_MS = 5000
_CAPSULE = "g_interrupt_check_period_ms"

_lock = threading.Lock()
_done = False


def _period_slot(cygrpc: ModuleType) -> ctypes.c_int | None:
    """gRPC's check period as a writable C int, or None when this grpcio does not export it."""
    try:
        capsule = getattr(cygrpc, "__pyx_capi__", {})[_CAPSULE]
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype = ctypes.c_void_p
        get.argtypes = [ctypes.py_object, ctypes.c_char_p]
        addr = get(capsule, b"int")
    except (KeyError, TypeError, ValueError) as e:   # ValueError: a capsule of another type
        log.debug("gRPC's signal-check period is not reachable (%s: %s); blocked reads wake 5 times a second",
                  type(e).__name__, e)
        return None
    return ctypes.c_int.from_address(addr) if addr else None


def signal_check_ms(cygrpc: ModuleType) -> int | None:
    """The current period (ms), or None when it cannot be read. ``cygrpc``: ``grpc._cython.cygrpc``."""
    slot = _period_slot(cygrpc)
    return None if slot is None else int(slot.value)


def lengthen_signal_checks(cygrpc: ModuleType, ms: int = SIGNAL_CHECK_MS) -> bool:
    """Raise gRPC's signal-check period to ``ms`` (never lower it). Idempotent; True if it is set.
    ``cygrpc``: the module ``grpc._cython.cygrpc``."""
    global _done
    with _lock:
        if _done:
            return True
        slot = _period_slot(cygrpc)
        if slot is None:
            return False
        if slot.value < ms:
            log.debug("gRPC signal-check period %d ms -> %d ms (no idle wake-ups of a blocked watch)",
                      slot.value, ms)
            slot.value = ms
        _done = True
        return True
