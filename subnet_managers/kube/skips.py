"""The reasons the kube subnet manager refuses to read a node record, and its counter.

Every node object (a list item, a watch event, a line of the watch stream) is untrusted input,
and each one that is skipped must be visible without flooding the log. The counting and the rate
limit are ``flannel.records.SkippedRecords`` (the etcd registry uses the same class); this module
owns the kube side: the stable reason labels below (the ``reason`` label of
``flannel_store_records_skipped_total{store="kube"}``), how an exception maps to one, and the
process-wide counter ``SKIPPED``.

Why rate-limited: a cluster can hold thousands of nodes that all carry the same broken annotation
(a bad rollout of some other tool), and each of them is seen again on every relist. The tracker
already logs a node's problem only when it changes (``SkippedRecords.count`` for the repeats); on
top of that ``SkippedRecords`` writes one line per node and reason a minute at most, and at most
``burst`` lines a minute, summarising what it left out.
"""

from __future__ import annotations

import logging
from typing import Any

from flannel import errors
from flannel.records import SkippedRecords

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


def counter(**kw: Any) -> SkippedRecords:
    """A counter of skipped node records: this module's logger, metric label ``store="kube"``;
    ``kw`` are ``SkippedRecords``' rate-limit knobs (tests count in a counter of their own)."""
    return SkippedRecords("node", log, metric_store="kube", **kw)


#: The process-wide counter (the kube manager's tracker and watch reader use it by default).
SKIPPED = counter()
