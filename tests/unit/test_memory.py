"""flannel.memory: the malloc arena cap holds in a fresh process, and an operator's setting wins.

glibc's ``malloc_stats()`` prints one "Arena N:" block per arena to stderr: a thread that allocates
large blocks (over pymalloc's 512 bytes, so through malloc) gets an arena of its own unless capped."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import ctypes, sys, threading
from flannel import memory
capped = memory.limit_malloc_arenas() if sys.argv[1] == "cap" else None
def work():
    blocks = [bytearray(4096) for _ in range(256)]
    ctypes.CDLL(None).malloc_stats()   # while the thread's blocks are alive
    del blocks
t = threading.Thread(target=work); t.start(); t.join()
print(capped)
"""


def run(mode: str, env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    arenas = sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))
    return out.stdout.strip(), arenas


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def test_without_the_cap_a_thread_gets_an_arena_of_its_own() -> None:
    assert run("plain", clean_env()) == ("None", 2)   # the baseline the next test is compared with


def test_with_the_cap_every_thread_shares_one_arena() -> None:
    assert run("cap", clean_env()) == ("True", 1)


def test_an_operators_malloc_arena_max_is_left_alone() -> None:
    capped, arenas = run("cap", dict(clean_env(), MALLOC_ARENA_MAX="4"))
    assert capped == "False" and arenas == 2


def test_gc_paused_stops_the_collector_inside_and_freezes_what_lives_after():
    import gc

    from flannel import memory

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with memory.gc_paused():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]          # long-lived objects made meanwhile
            with memory.gc_paused():                   # a nested pause leaves the collector to the outer one
                pass
            assert not gc.isenabled()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(kept)
    finally:
        gc.unfreeze()
        gc.enable()


def test_gc_paused_enables_the_collector_again_when_its_body_raises():
    import gc

    import pytest

    from flannel import memory

    with pytest.raises(RuntimeError), memory.gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.unfreeze()
