"""threadname: the kernel sees each agent thread under its own name (top -H, the benchmark's per-thread split)."""

from __future__ import annotations

import threading
from pathlib import Path

from flannel import threadname


def _kernel_name(t: threading.Thread) -> str:
    return Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip()


def test_a_thread_takes_its_threading_name_cut_to_the_kernel_limit() -> None:
    seen: list[str] = []
    release = threading.Event()

    def body() -> None:
        threadname.name_this_thread()
        seen.append("named")
        release.wait(10)

    t = threading.Thread(target=body, name="lease-key-watch-with-a-long-name", daemon=True)
    t.start()
    try:
        for _ in range(1000):
            if seen:
                break
            release.wait(0.01)
        assert _kernel_name(t) == "lease-key-watch"   # 15 bytes, the kernel's limit
    finally:
        release.set()
        t.join(5)


def test_an_explicit_name_wins_and_other_threads_keep_theirs() -> None:
    before = _kernel_name(threading.main_thread())
    named, release = threading.Event(), threading.Event()

    def body() -> None:
        threadname.name_this_thread("network")
        named.set()
        release.wait(10)

    t = threading.Thread(target=body, name="something-else", daemon=True)
    t.start()
    try:
        assert named.wait(10)
        assert _kernel_name(t) == "network"
        assert _kernel_name(threading.main_thread()) == before
    finally:
        release.set()
        t.join(5)
