"""Logging for the daemon: stderr, one line per event, with time, level and logger.

flannel logs through klog to stderr; we keep stderr (systemd/journald and container runtimes
collect it) but use Python's logging with a plain, greppable line format. ``-v`` maps klog
verbosity onto logging levels: 0 → INFO, ≥1 → DEBUG for the agent's own loggers, ≥4 → DEBUG for
the libraries too (pyroute2, grpc). ``--vmodule name=N,...`` sets per-logger verbosity.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"
OWN_LOGGERS = ("flannel",)
LIBRARY_DEBUG_VERBOSITY = 4


def level_for(verbosity: int) -> int:
    return logging.DEBUG if verbosity >= 1 else logging.INFO


def setup(verbosity: int = 0, *, vmodule: str = "", stream: IO[str] | None = None) -> None:
    """Configure the root logger once (idempotent: replaces our previous handler)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_flannel", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    handler._flannel = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= LIBRARY_DEBUG_VERBOSITY else logging.INFO)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level_for(verbosity))
    for name, n in parse_vmodule(vmodule):
        logging.getLogger(name).setLevel(level_for(n))


def parse_vmodule(text: str) -> list[tuple[str, int]]:
    """``flannel.daemon=2,flannel.backends.vxlan=1`` → [(name, n), ...].

    :raises ValueError: an element is not ``name=N``.
    """
    out: list[tuple[str, int]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, num = item.partition("=")
        if not sep or not name or not num.strip().isdigit():
            raise ValueError(f"{item!r} is not of the form logger=N")
        out.append((name.strip(), int(num)))
    return out
