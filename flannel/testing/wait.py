"""Wait for a condition with a deadline — the tests' replacement for ``sleep``."""

from __future__ import annotations

import time
from typing import Any, Callable

DEFAULT_TIMEOUT = 15.0


def wait_for(cond: Callable[[], Any], what: str = "condition", *, timeout: float = DEFAULT_TIMEOUT,
             interval: float = 0.05, on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy (returned) or ``timeout`` passes.

    On timeout raise AssertionError naming ``what``, plus whatever ``on_timeout`` returns (e.g.
    the tails of the agents' logs), so a failing test says what it was waiting for and why.
    """
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= end:
            break
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{extra}" if extra else ""))
