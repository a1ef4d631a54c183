"""The daemon's lifecycle with an in-memory store and the real ``alloc`` backend plugin.

No root needed: the external interface is given (interface selection has its own tests), the
health server listens on loopback. What is checked: startup order (config wait, readiness only
after subnet.env), the health endpoints, clean stop, failures of worker threads and of our own
lease, and the signal handlers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel import daemon, errors
from flannel.lab.etcd import free_port
from flannel.lease import Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from tests.support import FakeManager, fake_iface, wait_for

DEADLINE = 10.0





def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Running:
    """The daemon on a thread; ``result`` is None (clean) or the exception ``run`` raised."""

    def __init__(self, opts: AgentOptions, manager: Any) -> None:
        self.stop = threading.Event()
        self.result: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(opts, manager), daemon=True)
        self.thread.start()

    def _run(self, opts: AgentOptions, manager: Any) -> None:
        try:
            daemon.run(opts, manager=manager, stop=self.stop, select_interface=fake_iface)
        except BaseException as e:
            self.result = e
        finally:
            self.finished.set()

    def end(self) -> BaseException | None:
        self.stop.set()
        assert self.finished.wait(DEADLINE), "daemon did not stop"
        return self.result


REMOTE = Lease(subnet=IPv4Network("10.9.3.0/24"), attrs=LeaseAttrs(public_ip=IPv4Address("198.18.0.3"),
                                                                    backend_type="alloc"))


@pytest.fixture
def opts(tmp_path: Path) -> AgentOptions:
    # These tests run the daemon in-process, in the root namespace: no forward rules, so no
    # traffic manager touches the machine's own iptables/nft (that is tested in namespaces).
    return AgentOptions(subnet_file=str(tmp_path / "run" / "subnet.env"), healthz_ip="127.0.0.1",
                        healthz_port=free_port(), iptables_forward_rules=False)


def test_startup_health_and_clean_stop(opts: AgentOptions) -> None:
    manager = FakeManager(remote=(REMOTE,))
    d = Running(opts, manager)
    path = Path(opts.subnet_file)
    wait_for(path.exists, "subnet.env")
    assert path.read_text() == ("FLANNEL_NETWORK=10.9.0.0/16\nFLANNEL_SUBNET=10.9.7.1/24\n"
                                "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")
    assert path.stat().st_mode & 0o777 == 0o644
    assert http(opts.healthz_port, "/healthz") == (200, "flanneld is running")
    assert http(opts.healthz_port, "/readyz") == (200, "flanneld is ready")
    assert http(opts.healthz_port, "/healthz/")[0] == 404
    assert http(opts.healthz_port, "/")[0] == 404
    state = wait_for(lambda: json.loads(http(opts.healthz_port, "/debug/leases")[1])["remote"] or None,
                     "remote lease in /debug/leases")
    assert [r["subnet"] for r in state] == ["10.9.3.0/24"]
    assert manager.acquired[0].public_ip == IPv4Address("198.18.0.1")
    started = time.monotonic()
    assert d.end() is None
    assert time.monotonic() - started < DEADLINE
    assert manager.closed
    with pytest.raises(OSError):  # the health server is gone
        http(opts.healthz_port, "/healthz")


class LateConfig(FakeManager):
    """The config is missing for the first few reads, and readiness must wait for it."""

    def __init__(self, misses: int) -> None:
        super().__init__()
        self.misses = misses
        self.reads = 0

    def get_network_config(self) -> Any:
        self.reads += 1
        if self.reads <= self.misses:
            raise (errors.ConfigNotFound if self.reads % 2 else errors.StoreUnavailable)("not yet")
        return super().get_network_config()


def test_waits_for_config_not_ready_meanwhile(opts: AgentOptions) -> None:
    manager = LateConfig(misses=2)
    d = Running(opts, manager)
    wait_for(lambda: manager.reads >= 1, "first config read")
    assert http(opts.healthz_port, "/healthz") == (200, "flanneld is running")
    if not Path(opts.subnet_file).exists():
        assert http(opts.healthz_port, "/readyz") == (503, "flanneld is not ready yet")
    wait_for(Path(opts.subnet_file).exists, "subnet.env after the config appeared")
    assert manager.reads == 3
    assert d.end() is None


def test_stop_while_waiting_for_config_is_clean(opts: AgentOptions) -> None:
    manager = LateConfig(misses=10**6)
    d = Running(opts, manager)
    wait_for(lambda: manager.reads >= 1, "first config read")
    assert d.end() is None
    assert manager.acquired == [] and not Path(opts.subnet_file).exists()


def test_unwritable_subnet_file_stays_not_ready(opts: AgentOptions, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = AgentOptions(subnet_file=str(blocker / "subnet.env"), healthz_ip="127.0.0.1", healthz_port=opts.healthz_port,
                       iptables_forward_rules=False)
    manager = FakeManager()
    d = Running(bad, manager)
    wait_for(lambda: manager.acquired, "lease acquired")
    wait_for(lambda: http(bad.healthz_port, "/healthz")[0] == 200, "health server")
    time.sleep(0.3)  # give a (wrong) readiness flip a chance to happen
    assert http(bad.healthz_port, "/readyz") == (503, "flanneld is not ready yet")
    assert d.end() is None


class CrashingWatch(FakeManager):
    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        yield WatchResult.of_snapshot(())
        raise RuntimeError("boom in the watch")


def test_a_dying_thread_stops_the_daemon_with_an_error(opts: AgentOptions) -> None:
    d = Running(opts, CrashingWatch())
    assert d.finished.wait(DEADLINE), "daemon hung after a thread died"
    assert isinstance(d.result, errors.FlannelError)
    assert "thread watch" in str(d.result) and "boom in the watch" in str(d.result)


class MovingLease(FakeManager):
    """complete_lease reports a renewal (same subnet), then a re-acquisition elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed = threading.Event()

    def complete_lease(self, config: Any, lease: Lease, stop: threading.Event, on_lease: Any = None) -> None:
        on_lease(Lease(subnet=lease.subnet, attrs=lease.attrs, expiration=time.time() + 60))
        self.renewed.set()
        stop.wait(0.2)
        on_lease(Lease(subnet=IPv4Network("10.9.99.0/24"), attrs=lease.attrs))
        stop.wait()


def test_lease_moved_to_another_subnet_exits_with_error(opts: AgentOptions) -> None:
    manager = MovingLease()
    d = Running(opts, manager)
    assert d.finished.wait(DEADLINE)
    assert manager.renewed.is_set()
    assert isinstance(d.result, errors.FlannelError)
    assert "10.9.7.0/24" in str(d.result) and "10.9.99.0/24" in str(d.result)


def test_unknown_subnet_manager_lists_installed() -> None:
    with pytest.raises(errors.PluginError, match=r"unknown flannel.subnet_managers 'zookeeper' \(installed: .*etcd"):
        daemon.load_subnet_manager(AgentOptions(subnet_manager="zookeeper"))


def test_health_port_in_use_is_a_clear_error(opts: AgentOptions) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = AgentOptions(subnet_file=opts.subnet_file, healthz_ip="127.0.0.1", healthz_port=s.getsockname()[1],
                            iptables_forward_rules=False)
        d = Running(busy, FakeManager())
        assert d.finished.wait(DEADLINE)
    assert isinstance(d.result, errors.FlannelError) and "cannot serve /healthz" in str(d.result)


def test_sigterm_stops_and_handlers_are_restored(opts: AgentOptions) -> None:
    """Run in the main thread (where handlers live) and deliver a real SIGTERM."""
    before = signal.getsignal(signal.SIGTERM)
    path = Path(opts.subnet_file)

    def kill_when_ready() -> None:
        wait_for(path.exists, "subnet.env")
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=kill_when_ready, daemon=True).start()
    daemon.run(opts, manager=FakeManager(), select_interface=fake_iface)  # returns = clean exit
    assert path.exists()
    assert signal.getsignal(signal.SIGTERM) is before


class EndingWatch(FakeManager):
    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        yield WatchResult.of_snapshot(())


def test_a_loop_that_returns_early_is_a_failure(opts: AgentOptions) -> None:
    d = Running(opts, EndingWatch())
    assert d.finished.wait(DEADLINE)
    assert isinstance(d.result, errors.FlannelError) and "the watch loop ended unexpectedly" in str(d.result)


def test_systemd_is_notified_when_ready(opts: AgentOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(DEADLINE)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        d = Running(opts, FakeManager())
        assert s.recv(100) == b"READY=1"
        assert Path(opts.subnet_file).exists()  # only after subnet.env
        assert d.end() is None


class StoredIP(FakeManager):
    """A store with the StoredNodeAttrs capability (as kube)."""

    def stored_public_ips(self) -> tuple[str | None, str | None]:
        return "198.18.0.77", None

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        return None, None


def test_public_ip_stored_in_the_store_overrides_the_flag(opts: AgentOptions) -> None:
    import dataclasses
    manager = StoredIP()
    d = Running(dataclasses.replace(opts, public_ip="198.18.0.5"), manager)
    wait_for(lambda: manager.acquired, "lease acquired")
    assert manager.acquired[0].public_ip == IPv4Address("198.18.0.77")
    assert d.end() is None
