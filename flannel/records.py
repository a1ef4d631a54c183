"""Skipped store records: counted per reason, logged at a bounded rate.

Every record a store hands us (an etcd key/value, a node object, a line of a watch stream) is
untrusted: the store boundary turns it into a ``Lease`` or skips it. One ``SkippedRecords`` per
store (the etcd registry's, the kube subnet manager's ``skips.SKIPPED``) does the counting and
logging for all of them. Skipping must be visible (an operator needs the
key and the reason) but must not flood the log: the same bad key is re-read on every listing and
relist, and someone may write thousands of them. So:

* each skip is counted under a short reason label (``counts``, a ``collections.Counter``) and fed
  to ``flannel_store_records_skipped_total`` (``metrics.record_skipped``);
* ``count`` counts a skip without a line, for a caller that already logged that record's problem
  (the kube tracker: the same broken node heartbeating);
* one WARNING line per (key, reason) at most every ``interval`` seconds;
* at most ``burst`` lines per ``interval`` in total; what that cap suppresses is summarised in
  one line (how many, which reasons) when the next line may be written.

Thread-safe: the watch thread, the lease keeper and an acquisition may skip records at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from flannel import metrics

#: per-key memory is bounded: beyond this many remembered keys the oldest are forgotten (they
#: may then be logged once more, which is harmless).
MAX_REMEMBERED_KEYS = 10_000


class SkippedRecords:
    """Counts and logs the records one store boundary skipped.

    :param store: what the records are (``"etcd key"``, ``"node"``), the start of each log line
        (a ``skip`` may name another kind of record of the same store).
    :param logger: where the lines go (the boundary module's logger, so ``--vmodule`` works).
    :param metric_store: the ``store`` label of ``flannel_store_records_skipped_total`` (``"etcd"``).
    """

    def __init__(self, store: str, logger: logging.Logger, *, metric_store: str = "", interval: float = 60.0,
                 burst: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.metric_store = metric_store or store
        self.counts: collections.Counter[str] = collections.Counter()
        self._log = logger
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._last: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._window_start = float("-inf")
        self._window_lines = 0
        self._suppressed: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        """The counts per reason, copied under the lock."""
        with self._lock:
            return dict(self.counts)

    def count(self, reason: str) -> None:
        """Count a skip without a log line (the caller already logged this record's problem)."""
        metrics.record_skipped(self.metric_store, reason)
        with self._lock:
            self.counts[reason] += 1

    def skip(self, key: str, reason: str, message: str, *, kind: str = "") -> None:
        """Record that ``key`` was skipped for ``reason`` (a label) because of ``message``;
        ``kind`` names the record in the log line when it is not the store's usual one."""
        now = self._clock()
        metrics.record_skipped(self.metric_store, reason)
        with self._lock:
            self.counts[reason] += 1
            last = self._last.get((key, reason))
            if last is not None and now - last < self._interval:
                return
            if now - self._window_start >= self._interval:
                summary = self._summary()
                self._window_start, self._window_lines = now, 0
            else:
                summary = None
            if self._window_lines >= self._burst:
                self._suppressed[reason] += 1
                return
            self._window_lines += 1
            self._last[(key, reason)] = now
            self._last.move_to_end((key, reason))
            while len(self._last) > MAX_REMEMBERED_KEYS:
                self._last.popitem(last=False)
        if summary:
            self._log.warning("%s", summary)
        self._log.warning("skipping %s %s (%s): %s", kind or self.store, _printable(key), reason, message)

    def _summary(self) -> str | None:
        if not self._suppressed:
            return None
        n = sum(self._suppressed.values())
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self._suppressed.items()))
        self._suppressed.clear()
        return f"skipped {n} more bad {self.store} records without logging each ({reasons})"


def _printable(key: str, limit: int = 200) -> str:
    """A key for a log line: control characters escaped, long keys cut (a key can be 1 MB)."""
    text = key.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(key)} characters)"
