"""The lease keeper: keeps our etcd lease alive (flannel's CompleteLease, reference §4.7, minus its bugs).

A small state machine with one method per state, driven by ``run``:

* ``sync``  – read our key and watch it from there. What we find decides (``judge``): still ours →
  adopt its expiration and mod revision; gone (deleted, expired) → re-acquire the same subnet;
  held by another node, or overwritten with a value we cannot read → re-acquire another one.
* ``wait``  – until the renewal is due or something happens to our key (any event → ``sync``:
  re-reading is simpler and surer than interpreting events, and events on our key are rare).
* ``renew`` – a *conditional* put: only if the key's mod revision is still the one we read, so a
  renewal never resurrects a key an operator deleted or overwrites someone else's value. A failed
  compare means "re-read" (``sync``). An error is ambiguous (a timeout may hide a put that
  happened): we never revoke or delete anything then, we re-read and retry after
  ``retry.renewal_backoff``.
* ``lost``  – re-acquire (``retry.reacquire``) and report the new lease through ``on_lease``
  instead of exiting as flannel does (§14.8).

When to renew (``renew_at``): ``--subnet-lease-renew-margin`` before expiry, or half-way if the
margin is longer than the time left (so short test TTLs work). Reservations are never renewed.
The decisions (``judge``, ``renew_at``) are pure functions, unit-tested on their own.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable

from flannel import errors, retry
from flannel.lease import Lease
from flannel.subnet_managers.etcd.store import Hints, KeyChanged, Registry, Stored, WatchHandle

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class Verdict(enum.Enum):
    OURS = "ours"
    GONE = "gone"              # deleted or expired: the subnet is free again, take it back
    TAKEN = "taken"            # another node's value now: find another subnet
    UNREADABLE = "unreadable"  # a value we cannot decode occupies the key: find another subnet


def judge(ours: Lease, stored: Stored) -> Verdict:
    """What the key of our lease, as read now, means for us."""
    if not stored.exists:
        return Verdict.GONE
    if stored.lease is None:
        return Verdict.UNREADABLE
    mine, theirs = ours.attrs, stored.lease.attrs
    if int(mine.public_ip) != 0:
        return Verdict.OURS if theirs.public_ip == mine.public_ip else Verdict.TAKEN
    return Verdict.OURS if theirs.public_ipv6 == mine.public_ipv6 else Verdict.TAKEN


def renew_at(expiration: float | None, now: float, margin: float) -> float | None:
    """When to renew a lease expiring at ``expiration`` (None: a reservation, never)."""
    if expiration is None:
        return None
    remaining = expiration - now
    wait = remaining / 2 if margin >= remaining else remaining - margin
    return now + max(0.0, wait)


class LeaseKeeper:
    """Keeps ``lease`` alive until ``stop`` is set.

    :param reacquire: acquires a lease again, preferring the given subnets (the manager's policy).
    :param on_lease: called with every new version of our lease (renewal or re-acquisition).
    """

    def __init__(self, reg: Registry, lease: Lease, *, stop: threading.Event, ttl: int, margin: float,
                 reacquire: Callable[[Hints], Lease], on_lease: Callable[[Lease], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.reg, self.lease, self.stop = reg, lease, stop
        self.ttl, self.margin = ttl, margin
        self._reacquire, self._on_lease, self._clock = reacquire, on_lease, clock
        self.mod_revision = 0
        self.handle: WatchHandle | None = None
        self.next_renew = renew_at(lease.expiration, clock(), margin)
        self.not_before = 0.0  # after a failed renewal: no new attempt before this

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.handle is None:
                    self.sync()
                elif self.renewal_due():
                    self.renew()
                else:
                    self.wait()
        finally:
            self._drop_watch()

    # -- states ----------------------------------------------------------------------------------

    def sync(self) -> None:
        """Read our key, then watch it from the revision of that read (retried until stop)."""
        try:
            stored, verdict = retry.keep_lease(self.stop, what=f"reading our lease {self.lease.describe()}")(
                self._read_and_watch)
        except errors.FlannelError:
            return  # only once stop is set
        if verdict is Verdict.OURS:
            self._adopt(stored)
        else:
            self._drop_watch()
            self.lost(verdict, stored)

    def _read_and_watch(self) -> tuple[Stored, Verdict]:
        subnet = self.lease.subnet
        assert subnet is not None
        stored = self.reg.get_lease(subnet, self.lease.ipv6_subnet, ttl=True)
        verdict = judge(self.lease, stored)
        if verdict is Verdict.OURS:
            self.handle = self.reg.watch_lease(subnet, self.lease.ipv6_subnet, stored.revision + 1)
        return stored, verdict

    def _adopt(self, stored: Stored) -> None:
        assert stored.lease is not None
        self.lease = dataclasses.replace(self.lease, expiration=stored.lease.expiration)
        self.mod_revision = stored.mod_revision
        self.next_renew = renew_at(self.lease.expiration, self._clock(), self.margin)
        if self.next_renew is not None:
            log.debug("Waiting for %.0fs to renew lease", max(self.next_renew, self.not_before) - self._clock())

    def renewal_due(self) -> bool:
        return self.next_renew is not None and self._clock() >= max(self.next_renew, self.not_before)

    def wait(self) -> None:
        """Wait for the renewal time or an event on our key (then re-read it)."""
        assert self.handle is not None
        due = None if self.next_renew is None else max(self.next_renew, self.not_before)
        timeout = POLL_SECONDS if due is None else min(POLL_SECONDS, max(0.0, due - self._clock()))
        try:
            chunk = self.handle.get(timeout)
        except errors.FlannelError as e:  # Compacted, StoreUnavailable, ...
            log.info("watch on our lease %s interrupted (%s); re-reading it", self.lease.describe(), e)
            self._drop_watch()
            return
        if chunk is not None:  # something happened to our key (even a write we cannot decode): re-read it
            self._drop_watch()

    def renew(self) -> None:
        """Conditional renewal; any doubt → re-read (``sync``), never a delete."""
        subnet = self.lease.subnet
        assert subnet is not None
        try:
            new = self.reg.renew_lease(subnet, self.lease.ipv6_subnet, self.lease.attrs, self.ttl,
                                       mod_revision=self.mod_revision)
        except KeyChanged as e:
            log.info("renewing our lease: %s; re-reading it", e)
            self._drop_watch()
            return
        except errors.FlannelError as e:  # unavailable, timed out (maybe applied), refused
            delay = retry.renewal_backoff((self.lease.expiration or 0.0) - self._clock())
            self.not_before = self._clock() + delay
            log.warning("Error renewing lease %s (re-reading it; trying again in %.1fs): %s", self.lease.describe(),
                        delay, e)
            self._drop_watch()
            return
        self.lease, self.not_before = new, 0.0
        log.info("Lease renewed, new expiration: %s",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(new.expiration or 0)))
        self._publish(new)
        self._drop_watch()  # re-read: our put gave the key a new mod revision

    def lost(self, verdict: Verdict, stored: Stored) -> None:
        """We no longer hold our lease: acquire one again and report it."""
        why = {Verdict.GONE: "is gone from etcd (deleted or expired)",
               Verdict.UNREADABLE: "was overwritten with a value we cannot read",
               Verdict.TAKEN: f"is now held by {stored.lease.attrs.public_ip if stored.lease else '?'}"}[verdict]
        same = verdict is Verdict.GONE
        log.warning("Our lease %s %s; acquiring a lease again%s", self.lease.describe(), why,
                    " (same subnet if still free)" if same else "")
        prefer: Hints = (self.lease.subnet, self.lease.ipv6_subnet) if same else (None, None)
        try:
            new = retry.reacquire(self.stop)(self._reacquire, prefer)
        except errors.FlannelError:
            return  # only once stop is set
        log.info("Re-acquired lease %s", new.describe())
        self.lease, self.mod_revision, self.not_before = new, 0, 0.0
        self.next_renew = renew_at(new.expiration, self._clock(), self.margin)
        self._publish(new)

    # -- helpers ---------------------------------------------------------------------------------

    def _drop_watch(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _publish(self, lease: Lease) -> None:
        """Hand a new or renewed lease to the daemon (whose callback must not stop the renewals)."""
        if self._on_lease is None:
            return
        try:
            self._on_lease(lease)
        except Exception:  # a callback bug must not stop the renewals
            log.exception("on_lease callback failed for %s", lease.describe())
