"""Timed steps: what ``scripts/compose`` did and how long each part took (docs/docker.md quotes it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    note: str = ""


@dataclass
class Steps:
    """An ordered record of steps; ``say`` (if given) is told when each one starts and ends."""

    say: Callable[[str], None] | None = None
    done: list[Step] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        s = Step(name)
        if self.say:
            self.say(f"{name} ...")
        t0 = time.monotonic()
        try:
            yield s
        finally:
            s.seconds = time.monotonic() - t0
            self.done.append(s)
            if self.say:
                self.say(f"{name}: {s.seconds:.1f} s{'  ' + s.note if s.note else ''}")

    def table(self) -> list[str]:
        w = max([len(s.name) for s in self.done] + [4])
        lines = [f"{s.name.ljust(w)}  {s.seconds:7.1f} s  {s.note}".rstrip() for s in self.done]
        lines.append(f"{'total'.ljust(w)}  {sum(s.seconds for s in self.done):7.1f} s")
        return lines
