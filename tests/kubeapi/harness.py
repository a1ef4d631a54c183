"""Test helpers around the stand-in: a kube env on disk, and a follower that runs a manager's
``watch_leases`` through the real ``LeaseWatcher`` (what a backend would be told)."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from flannel.lease import Batch, EventType, Lease
from flannel.options import AgentOptions
from flannel.watcher import LeaseWatcher
from tests.kubeapi.kubeconfig import write_kubeconfig
from tests.kubeapi.server import KubeAPIServer


def wait_until(pred: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``pred`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


@dataclass
class KubeEnv:
    """A net-conf.json and a kubeconfig for one stand-in server."""

    server: KubeAPIServer
    dir: str
    net_conf: str
    kubeconfig: str

    def options(self, **kw: Any) -> AgentOptions:
        base = AgentOptions(subnet_manager="kube", kubeconfig_file=self.kubeconfig, net_config_path=self.net_conf)
        return replace(base, **kw)

    def write_net_conf(self, conf: dict[str, Any]) -> None:
        with open(self.net_conf, "w") as f:
            json.dump(conf, f)


def make_env(server: KubeAPIServer, directory: str, *, net_conf: dict[str, Any] | None = None) -> KubeEnv:
    env = KubeEnv(server, directory, os.path.join(directory, "net-conf.json"), os.path.join(directory, "kubeconfig"))
    env.write_net_conf(net_conf or {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
    write_kubeconfig(env.kubeconfig, server.url, server.token)
    return env


class Follower:
    """Runs ``manager.watch_leases`` on a thread and applies it to a LeaseWatcher, recording
    every batch. ``peers()`` is what a backend would currently have programmed."""

    def __init__(self, manager: Any, own: Lease) -> None:
        self.manager = manager
        self.watcher = LeaseWatcher(own)
        self.batches: list[Batch] = []
        self.snapshots = 0
        self.error: BaseException | None = None
        self._peers: dict[object, Lease] = {}
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="follower", daemon=True)

    def start(self) -> "Follower":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for result in self.manager.watch_leases(self.stop):
                with self._lock:
                    if result.snapshot is not None:
                        self.snapshots += 1
                    for batch in self.watcher.apply(result):
                        self.batches.append(batch)
                        for ev in batch.events:
                            if ev.type is EventType.ADDED:
                                self._peers[ev.lease.ident] = ev.lease
                            else:
                                self._peers.pop(ev.lease.ident, None)
        except BaseException as e:  # surfaced by close(); a watch must never raise
            self.error = e

    def peers(self) -> dict[str, Lease]:
        """Current peers keyed by IPv4 subnet text (or IPv6 if IPv6-only)."""
        with self._lock:
            return {str(l.subnet or l.ipv6_subnet): l for l in self._peers.values()}

    def events(self) -> list[tuple[EventType, Lease]]:
        with self._lock:
            return [(e.type, e.lease) for b in self.batches for e in b.events]

    def wait_peers(self, expected: Callable[[dict[str, Lease]], bool], what: str, timeout: float = 15.0) -> dict[str, Lease]:
        def check() -> tuple[dict[str, Lease]] | None:
            peers = self.peers()
            return (peers,) if expected(peers) else None
        return wait_until(check, timeout=timeout, what=what)[0]

    def close(self, timeout: float = 5.0) -> bool:
        """Stop; returns whether the thread ended within ``timeout``."""
        self.stop.set()
        self.thread.join(timeout)
        if self.error is not None:
            raise AssertionError(f"watch_leases raised: {self.error!r}") from self.error
        return not self.thread.is_alive()
