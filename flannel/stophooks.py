"""Run a function when a stop event is set, without polling it.

A thread blocked in a call that cannot time out (a gRPC stream read on the thread itself, an
``Event.wait`` until the renewal is due in 23 hours) still has to end promptly on SIGTERM. Polling
the stop event every half second costs a wake-up of every such thread twice a second for the whole
life of the agent; instead ``on_stop(stop, fn)`` registers ``fn`` (cancel the stream, notify the
condition) to run once when ``stop`` is set. One helper thread per stop event waits on it; it
wakes up once a minute only to leave when nobody is registered any more.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flannel import threadname

log = logging.getLogger(__name__)

#: how often a helper with nothing registered checks whether it can leave
IDLE_SECONDS = 60.0

_lock = threading.Lock()
_helpers: dict[int, _Helper] = {}


class _Helper:
    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.hooks: dict[int, Callable[[], None]] = {}
        self.next_id = 0
        self.thread = threading.Thread(target=self._run, name="stop-hooks", daemon=True)

    def _run(self) -> None:
        threadname.name_this_thread()
        while True:
            fired = self.stop.wait(IDLE_SECONDS)
            with _lock:
                if not fired and self.hooks:
                    continue
                if _helpers.get(id(self.stop)) is self:
                    del _helpers[id(self.stop)]
                hooks, self.hooks = list(self.hooks.values()), {}
            break
        for fn in hooks:
            _call(fn)


def on_stop(stop: threading.Event, fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn`` once, on a helper thread, when ``stop`` is set (at once if it already is).

    Returns a function that unregisters ``fn`` (idempotent); call it when the blocking wait is over.
    ``fn`` must be quick and must not raise (an exception is logged).
    """
    with _lock:
        if not stop.is_set():
            helper = _helpers.get(id(stop))
            if helper is None or helper.stop is not stop:
                helper = _helpers[id(stop)] = _Helper(stop)
                helper.thread.start()
            hid = helper.next_id
            helper.next_id += 1
            helper.hooks[hid] = fn

            def unregister() -> None:
                with _lock:
                    helper.hooks.pop(hid, None)
            return unregister
    _call(fn)
    return lambda: None


def _call(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a hook must not keep the others from running
        log.exception("stop hook %r failed", fn)
