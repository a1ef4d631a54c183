"""Keep the agent's resident memory to what its state needs (one glibc malloc arena), and keep
Python's cyclic collector off the state the agent holds for a long time (``gc_paused``).

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

import contextlib
import ctypes
import gc
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
#: arenas the agent's threads share (the main one included)
ARENAS = 1


def _libc() -> ctypes.CDLL | None:
    """libc, already in the process (no library search: find_library may run a compiler)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas, before the agent starts its threads. True if it was set here."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_ARENA_MAX, arenas))
    log.debug("malloc arenas capped at %d: %s", arenas, "yes" if ok else "refused")
    return ok


def trim_heap() -> None:
    """Give the memory a big burst of work used (a full reconcile's dump, desired state and plan)
    back to the system: glibc keeps freed heap pages otherwise, and RSS at 5000 peers would carry
    the cold start's peak. Best effort: nothing happens without glibc's ``malloc_trim``."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:   # (not glibc: nothing to do)
        trim(0)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while a burst of long-lived objects is made (a lease listing, a
    full reconcile), then freeze what is alive.

    Why the pause: the collector runs a full collection whenever the objects that survived grow
    by a quarter, and each one walks every object of the process. Listing 5000 leases at a cold
    start triggered one that walked the ~60 000 objects of the imports: 30-40 ms of a 150 ms
    listing; a full reconcile allocates ~100 000 objects, and its collections cost ~1/4 of its
    Python time. None of these objects is a cycle: reference counting frees them.

    Why the freeze (process-wide, ``gc.freeze``): after a full reconcile the process holds the
    cluster's state for a long time -- every lease, the index, the programmed cache: ~100 000
    objects at 5000 peers. Each later collection of the oldest generation walked all of them, and
    one lease event's few allocations trigger such collections often enough that the CPU of an
    event at 5000 peers was 1.4-1.6 ms against 0.8 at 0 peers, most of the difference in the
    collector (measured: 0.91 ms with the freeze, the same as at 0 peers; docs/benchmarks.md).
    Frozen objects are still freed by reference counting as usual; only a reference cycle among
    them would outlive its last use, so the young generations are collected first (cheap), and
    the state we keep holds no cycles. The next pause freezes what was added since.

    Nested or concurrent pauses (the watch thread relisting during a reconcile) are harmless: the
    collector is re-enabled by the pause that disabled it, perhaps a little early for the other."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
            gc.collect(1)
            gc.freeze()
