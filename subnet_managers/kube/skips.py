"""Counting and logging node records the kube subnet manager refuses to read.

Why one place: every node object (a list item, a watch event, a line of the watch stream) is
untrusted input, and each one that is skipped must be visible without flooding the log. This module
owns the per-reason counters (``SKIPPED.counts``; a metrics exporter reads them, labels are the
stable reason strings below) and the rate limit on the log lines.

Why rate-limited: a cluster can hold thousands of nodes that all carry the same broken annotation
(a bad rollout of some other tool), and each of them is seen again on every relist. The tracker
already logs a node's problem only when it changes; on top of that at most ``burst`` lines per
``per_seconds`` are written, and the next line written says how many were left out.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from flannel import errors, metrics

log = logging.getLogger(__name__)

#: Reasons (the counter labels). Anything else that goes wrong is ``unexpected-error``.
NOT_AN_OBJECT = "not-an-object"
BAD_METADATA = "bad-metadata"
NO_NAME = "no-name"
BAD_ANNOTATIONS = "bad-annotations"
BAD_SPEC = "bad-spec"
BAD_POD_CIDR = "bad-pod-cidr"
MISSING_POD_CIDR = "missing-pod-cidr"
BAD_PUBLIC_IP = "bad-public-ip"
MISSING_PUBLIC_IP = "missing-public-ip"
BAD_BACKEND_DATA = "bad-backend-data"
TOO_LARGE = "too-large"
TOO_DEEP = "too-deep"
BAD_ENCODING = "bad-encoding"
UNDECODABLE_LINE = "undecodable-line"
MALFORMED_EVENT = "malformed-event"
UNEXPECTED = "unexpected-error"

#: How much of a detail message reaches the log (values can be a megabyte long).
DETAIL_LIMIT = 200


class Rejected(errors.BadLeaseRecord):
    """A node record we refuse to read; ``reason`` is its counter label (one of the above)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def reason_of(exc: BaseException) -> str:
    """The counter label for an exception raised while decoding one record."""
    if isinstance(exc, Rejected):
        return exc.reason
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    if isinstance(exc, MemoryError):
        return TOO_LARGE
    if isinstance(exc, UnicodeError):
        return BAD_ENCODING
    return UNEXPECTED


def describe(exc: BaseException) -> str:
    """A short, single-line description of ``exc`` for the log (never the whole bad value)."""
    if isinstance(exc, RecursionError):
        text = "nested too deeply to decode"
    elif isinstance(exc, MemoryError):
        text = "too large to decode"
    else:
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, (errors.FlannelError, ValueError)):
            text = f"{type(exc).__name__}: {text}"
    text = text.replace("\n", " ")
    return text if len(text) <= DETAIL_LIMIT else text[:DETAIL_LIMIT] + "..."


class Skips:
    """Thread-safe counters per reason plus a token-bucket limit on the log lines."""

    def __init__(self, *, burst: int = 20, per_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._burst = burst
        self._rate = burst / per_seconds
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()
        self._suppressed = 0
        self._lock = threading.Lock()

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def count(self, reason: str) -> None:
        """Count a skip without logging (the caller already logged this record's problem)."""
        metrics.record_skipped("kube", reason)
        with self._lock:
            self.counts[reason] += 1

    def skip(self, what: str, reason: str, detail: str, *, suffix: str = "") -> None:
        """Count one skipped record and log it, unless the rate limit says to stay quiet."""
        metrics.record_skipped("kube", reason)
        with self._lock:
            self.counts[reason] += 1
            now = self._clock()
            self._tokens = min(float(self._burst), self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        more = f" ({suppressed} similar lines suppressed)" if suppressed else ""
        log.warning("skipping %s [%s]: %s%s%s", what, reason, detail, suffix, more)


#: The process-wide counters (what a metrics exporter reads).
SKIPPED = Skips()
