"""The lease keeper: keeps our etcd lease alive (flannel's CompleteLease, reference §4.7, minus its bugs).

A small state machine with one method per state, driven by ``run``:

* ``sync``  – read our key and follow it from there. What we find decides (``judge``): still ours →
  adopt its expiration and mod revision; gone (deleted, expired) → re-acquire the same subnet;
  held by another node, or overwritten with a value we cannot read → re-acquire another one.
* ``wait``  – until the renewal is due or something happens to our key (any write or delete after
  the revision we read → ``sync``: re-reading is simpler and surer than interpreting events, and
  events on our key are rare).
* ``renew`` – a *conditional* put: only if the key's mod revision is still the one we read, so a
  renewal never resurrects a key an operator deleted or overwrites someone else's value. A failed
  compare means "re-read" (``sync``). An error is ambiguous (a timeout may hide a put that
  happened): we never revoke or delete anything then, we re-read and retry after
  ``retry.renewal_backoff``.
* ``lost``  – re-acquire (``retry.reacquire``) and report the new lease through ``on_lease``
  instead of exiting as flannel does (§14.8).

How we learn about our key: our key is under ``<prefix>/subnets/``, which the agent's one lease
watch (the manager's ``watch_leases``) follows anyway; the watch reports what it sees of our key
into a ``KeyFeed`` and the keeper waits on that, so an agent holds **one** etcd watch, not two as
flannel does (its WatchLease is a second watch of the same key). While no lease watch runs (an
instant at startup, tests of the keeper alone) the keeper watches its key itself, on a thread of
its own that feeds the same ``KeyFeed``; when the lease watch starts it drops that watch.

When to renew (``renew_at``): ``--subnet-lease-renew-margin`` before expiry, or half-way if the
margin is longer than the time left (so short test TTLs work). Reservations are never renewed.
The decisions (``judge``, ``renew_at``) are pure functions, unit-tested on their own. Nothing here
polls: waits end on an event on our key, on the renewal time, or on ``stop`` (``flannel.stophooks``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable

from flannel import errors, retry, stophooks, threadname
from flannel.lease import Lease
from flannel.subnet_managers.etcd.store import Hints, KeyChanged, Registry, Stored, Subnets, WatchHandle

log = logging.getLogger(__name__)


class KeyFeed:
    """What is known of writes to our key after some revision, from whichever watch sees them.

    Sources: the lease watch (``opened``/``closed`` around its run, ``snapshot`` for every listing,
    ``touched`` for every response) and, while none runs, the keeper's own watch of its key
    (``touched``, ``broken``). The keeper ``wait``s for a write of its key after the revision it
    read, a snapshot after it (a relist may hide such a write), a change of source (``epoch``),
    ``stop``, or a timeout. Thread-safe; cheap when nobody follows a key.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches = 0   # lease watches running
        self.epoch = 0      # bumped whenever the source changes or breaks: the keeper re-syncs
        self._key: Subnets | None = None
        self._key_rev = 0   # latest mod revision seen of a write or delete of _key
        self._snap_rev = 0  # revision of the latest snapshot

    # -- the sources -------------------------------------------------------------------------------

    def opened(self) -> None:
        with self._cond:
            self._watches += 1
            self.epoch += 1
            self._cond.notify_all()

    def closed(self) -> None:
        with self._cond:
            self._watches -= 1
            self.epoch += 1
            self._cond.notify_all()

    def broken(self) -> None:
        """The keeper's own watch ended."""
        with self._cond:
            self.epoch += 1
            self._cond.notify_all()

    def snapshot(self, revision: int) -> None:
        with self._cond:
            self._snap_rev = max(self._snap_rev, revision)
            self._cond.notify_all()

    def touched(self, items: Iterable[tuple[Subnets, int]]) -> None:
        key = self._key
        if key is None:
            return
        revs = [rev for nets, rev in items if nets == key]
        if revs:
            with self._cond:
                self._key_rev = max(self._key_rev, *revs)
                self._cond.notify_all()

    # -- the keeper --------------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether a lease watch runs (and reports our key)."""
        with self._cond:
            return self._watches > 0

    def follow(self, key: Subnets) -> None:
        with self._cond:
            if key != self._key:
                self._key, self._key_rev = key, 0

    def kick(self) -> None:
        """Wake the waiter (it looks at its stop event)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, since: int, epoch: int, stop: threading.Event, timeout: float | None) -> bool:
        """Wait until our key was written after ``since`` (or a snapshot after it may hide such a
        write, or the source changed): True; or until ``timeout`` / ``stop``: False."""
        def news() -> bool:
            return self._key_rev > since or self._snap_rev > since or self.epoch != epoch
        with self._cond:
            self._cond.wait_for(lambda: news() or stop.is_set(), timeout)
            return news()


class _OwnWatch:
    """The keeper's own watch of its key (while no lease watch runs), read on a thread of its own
    into the ``KeyFeed``."""

    #: after the watch failed (rather than being cancelled), wait this long before the keeper re-reads
    #: and watches again (a watch etcd refuses must not become a loop of reads)
    RETRY_SECONDS = 1.0

    def __init__(self, handle: WatchHandle, feed: KeyFeed, what: str, stop: threading.Event) -> None:
        self.handle, self.feed, self.what, self.stop = handle, feed, what, stop
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="lease-key-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        threadname.name_this_thread()
        try:
            while True:
                self.feed.touched(self.handle.next().touched)
        except errors.FlannelError as e:  # Compacted, StoreUnavailable, cancelled, ...
            if not self.cancelled:
                log.info("watch on our lease %s interrupted (%s); re-reading it", self.what, e)
                self.stop.wait(self.RETRY_SECONDS)
        finally:
            self.feed.broken()

    def cancel(self) -> None:
        self.cancelled = True
        self.handle.cancel()


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
                 clock: Callable[[], float] = time.time, feed: KeyFeed | None = None) -> None:
        self.reg, self.lease, self.stop = reg, lease, stop
        self.ttl, self.margin = ttl, margin
        self._reacquire, self._on_lease, self._clock = reacquire, on_lease, clock
        self.feed = feed or KeyFeed()
        self.mod_revision = 0
        self.read_revision = 0   # the revision our key was read at (``sync``)
        self.epoch: int | None = None   # the feed's epoch at that read; None: re-read needed
        self.own_watch: _OwnWatch | None = None
        self.next_renew = renew_at(lease.expiration, clock(), margin)
        self.not_before = 0.0  # after a failed renewal: no new attempt before this

    def run(self) -> None:
        unhook = stophooks.on_stop(self.stop, self.feed.kick)
        try:
            while not self.stop.is_set():
                if self.epoch is None:
                    self.sync()
                elif self.renewal_due():
                    self.renew()
                else:
                    self.wait()
        finally:
            unhook()
            self._drop_watch()

    # -- states ----------------------------------------------------------------------------------

    def sync(self) -> None:
        """Read our key, then follow it from the revision of that read (retried until stop)."""
        self._drop_watch()
        try:
            stored, verdict = retry.keep_lease(self.stop, what=f"reading our lease {self.lease.describe()}")(
                self._read_and_follow)
        except errors.FlannelError:
            return  # only once stop is set
        if verdict is Verdict.OURS:
            self._adopt(stored)
        else:
            self._drop_watch()
            self.lost(verdict, stored)

    def _read_and_follow(self) -> tuple[Stored, Verdict]:
        subnet = self.lease.subnet
        assert subnet is not None
        self.feed.follow((subnet, self.lease.ipv6_subnet))
        epoch = self.feed.epoch  # before looking: a lease watch that opens meanwhile wakes us at once
        watching = self.feed.watching
        stored = self.reg.get_lease(subnet, self.lease.ipv6_subnet, ttl=True)
        verdict = judge(self.lease, stored)
        if verdict is Verdict.OURS:
            if not watching:
                handle = self.reg.watch_lease(subnet, self.lease.ipv6_subnet, stored.revision + 1)
                self.own_watch = _OwnWatch(handle, self.feed, self.lease.describe(), self.stop)
            self.read_revision, self.epoch = stored.revision, epoch
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
        """Wait for the renewal time or news of our key (then re-read it)."""
        assert self.epoch is not None
        due = None if self.next_renew is None else max(self.next_renew, self.not_before)
        timeout = None if due is None else max(0.0, due - self._clock())
        if self.feed.wait(self.read_revision, self.epoch, self.stop, timeout):
            self._drop_watch()  # something happened to our key (even a write we cannot decode), or
            #                     the watch that reports it changed: re-read it

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
        """Forget what we read (the next loop re-reads), and stop our own watch if we have one."""
        self.epoch = None
        if self.own_watch is not None:
            self.own_watch.cancel()
            self.own_watch = None

    def _publish(self, lease: Lease) -> None:
        """Hand a new or renewed lease to the daemon (whose callback must not stop the renewals)."""
        if self._on_lease is None:
            return
        try:
            self._on_lease(lease)
        except Exception:  # a callback bug must not stop the renewals
            log.exception("on_lease callback failed for %s", lease.describe())
