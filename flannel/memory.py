"""Keep the agent's resident memory to what its state needs: one glibc malloc arena.

Why: glibc gives each thread that calls ``malloc`` an arena of its own (up to 8 per core), and
memory freed in one arena is not reused by another. The agent has a dozen threads (ours, and gRPC's
C threads), but they run Python one at a time under the GIL, so per-thread arenas buy no
concurrency and only keep freed blocks resident in several places: measured ~1 MB of RSS of an
agent at 0 and at 5000 peers (bench/agent_scale.py with MALLOC_ARENA_MAX=1), against issue 9's
60 MB budget. Python's own small-object allocator (pymalloc) is not affected; this only concerns
objects over 512 bytes and C libraries.

An operator's ``MALLOC_ARENA_MAX`` (or any ``MALLOC_*`` tuning) is left alone. Best effort: where
``mallopt`` is missing (musl, another libc) nothing happens.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
#: arenas the agent's threads share (the main one included)
ARENAS = 1


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas, before the agent starts its threads. True if it was set here."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:   # libc is already in the process (no library search: find_library may run a compiler)
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_ARENA_MAX, arenas))
    log.debug("malloc arenas capped at %d: %s", arenas, "yes" if ok else "refused")
    return ok
