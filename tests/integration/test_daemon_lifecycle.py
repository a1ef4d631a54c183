"""The daemon's lifecycle with an in-memory store and the real ``alloc`` backend plugin.

No root needed: the external interface is given (interface selection has its own tests), the
health server listens on loopback. What is checked: startup order (config wait, readiness only
after subnet.env), the health endpoints, clean stop, the supervision of the worker threads (an
operational error restarts the thread and shows in /healthz; a config change or a bug stops the
agent naming the thread), our own lease moving, and the signal handlers.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel import cli, daemon, errors, health, retry
from flannel.backends.alloc import AllocBackend
from flannel.lab.etcd import free_port
from flannel.lease import Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from tests.support import FakeManager, fake_iface, thread_named, wait_for, wakeups

DEADLINE = 10.0


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker restarts after 0.2 s, 0.4 s, ... (the real 1 s → 30 s schedule is a unit test)."""
    monkeypatch.setattr(retry, "WORKER_BACKOFF_MIN", 0.2)


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Running:
    """The daemon on a thread; ``result`` is None (clean) or the exception ``run`` raised."""

    def __init__(self, opts: AgentOptions, manager: Any, **kw: Any) -> None:
        self.stop = threading.Event()
        self.result: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(opts, manager, kw), daemon=True)
        self.thread.start()

    def _run(self, opts: AgentOptions, manager: Any, kw: dict[str, Any]) -> None:
        try:
            daemon.run(opts, manager=manager, stop=self.stop, select_interface=fake_iface, **kw)
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


#: an idle stretch long enough for the old polls to show: health every 0.2 s, supervision every 2 s
IDLE_WINDOW = 2.5


def test_an_idle_agent_health_and_supervision_threads_do_not_wake_up(opts: AgentOptions) -> None:
    """Issue 9 (idle CPU): the health server and the daemon's supervision loop sleep until a
    request or stop comes, instead of polling ``stop``; stop and /healthz still work."""
    d = Running(opts, FakeManager(remote=(REMOTE,)))
    wait_for(Path(opts.subnet_file).exists, "subnet.env")
    assert http(opts.healthz_port, "/readyz") == (200, "flanneld is ready")
    server = thread_named("health")
    seen: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def quiet() -> bool:
        """No wake-up of either thread over one window. The first window may still see the tail of
        the /readyz request or of startup (a thread waiting for the GIL counts a switch); a thread
        that polls is never quiet."""
        before = wakeups(server), wakeups(d.thread)
        time.sleep(IDLE_WINDOW)   # the measuring window
        after = wakeups(server), wakeups(d.thread)
        seen.append((before, after))
        return after == before

    wait_for(quiet, "an idle window without wake-ups of the health and supervision threads", timeout=20,
             on_timeout=lambda: f"(health, supervision) wake-ups per window: {seen}")
    idle = wakeups(server)
    assert http(opts.healthz_port, "/healthz") == (200, "flanneld is running")
    assert wakeups(server) > idle   # the request woke it
    assert d.end() is None
    assert not server.is_alive()


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


def test_a_bug_in_a_thread_stops_the_daemon_naming_the_thread(opts: AgentOptions) -> None:
    d = Running(opts, CrashingWatch())
    assert d.finished.wait(DEADLINE), "daemon hung after a thread died"
    assert isinstance(d.result, errors.FlannelError)
    assert str(d.result).startswith("internal error (a bug) in the watch thread: RuntimeError: boom in the watch")
    assert isinstance(d.result.__cause__, RuntimeError)


def verbose(port: int) -> tuple[int, dict[str, Any]]:
    """(status, JSON) of /healthz?verbose=1; (0, no workers) while the server is not up (yet)."""
    got = http_or_none(port, "/healthz?verbose=1")
    return (got[0], json.loads(got[1])) if got else (0, {"workers": {}})


def worker(port: int, name: str) -> dict[str, Any]:
    return verbose(port)[1]["workers"].get(name, {})


def restarted(port: int, name: str, times: int) -> dict[str, Any] | None:
    """The worker's verbose entry once it has been restarted ``times`` times and runs again."""
    w = worker(port, name)
    return w if w.get("restarts", 0) >= times and w.get("state") == "running" else None


class FlakyWatch(FakeManager):
    """watch_leases fails with each of ``errs`` in turn (after a snapshot), then follows normally."""

    def __init__(self, *errs: BaseException) -> None:
        super().__init__(remote=(REMOTE,))
        self.errs = list(errs)
        self.calls = 0

    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        self.calls += 1
        yield WatchResult.of_snapshot(self.remote)
        if self.errs:
            raise self.errs.pop(0)
        stop.wait()


OPERATIONAL = [errors.StoreError("etcd: connection lost"), OSError(errno.ECONNRESET, "Connection reset by peer"),
               subprocess.TimeoutExpired(["some-tool"], 30), ValueError("Expecting value: line 1 column 1"),
               errors.BackendError("route add failed")]


@pytest.mark.parametrize("exc", OPERATIONAL, ids=lambda e: type(e).__name__)
def test_an_operational_error_restarts_the_thread_not_the_agent(opts: AgentOptions, exc: BaseException) -> None:
    """Before: any exception in a worker stopped the agent (exit 1)."""
    manager = FlakyWatch(exc, exc)
    d = Running(opts, manager)
    port = opts.healthz_port
    w = wait_for(lambda: d.finished.is_set() or restarted(port, "watch", 2), "the watch thread restarted twice",
                 on_timeout=lambda: f"daemon result: {d.result!r}")
    assert not d.finished.is_set(), f"the agent stopped: {d.result!r}"
    assert w["last_error"].startswith(type(exc).__name__) and manager.calls == 3
    assert http(port, "/healthz") == (200, "flanneld is running")      # retrying is not unhealthy
    assert verbose(port)[0] == 200
    assert [r["subnet"] for r in json.loads(http(port, "/debug/leases")[1])["remote"]] == ["10.9.3.0/24"]
    assert {"watch", "network", "lease", "health"} <= set(verbose(port)[1]["workers"])
    assert d.end() is None


class FlakyLease(FakeManager):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def complete_lease(self, config: Any, lease: Lease, stop: threading.Event, on_lease: Any = None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise errors.StoreError("renewal: etcd said no")
        stop.wait()


def test_the_lease_thread_is_restarted(opts: AgentOptions) -> None:
    manager = FlakyLease()
    d = Running(opts, manager)
    w = wait_for(lambda: d.finished.is_set() or restarted(opts.healthz_port, "lease", 1), "the lease thread restarted")
    assert not d.finished.is_set(), f"the agent stopped: {d.result!r}"
    assert w["last_error"] == "StoreError: renewal: etcd said no" and manager.calls == 2
    assert d.end() is None


def test_the_network_and_health_threads_are_restarted(opts: AgentOptions, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend loop without its own guard, and the health server loop, fail once each."""
    class FlakyNetworkBackend(AllocBackend):
        def register_network(self, **kw: Any) -> Any:
            net = super().register_network(**kw)
            run, fails = net.run, [OSError(errno.ENOBUFS, "No buffer space available")]

            def flaky_run(batches: Any, stop: threading.Event) -> None:
                if fails:
                    raise fails.pop()
                run(batches, stop)
            net.run = flaky_run  # type: ignore[method-assign]
            return net
    monkeypatch.setattr(daemon, "load_backend", lambda config: FlakyNetworkBackend)
    serve, health_fails = health.HealthServer.serve, [OSError(errno.EBADF, "Bad file descriptor")]

    def flaky_serve(self: health.HealthServer, stop: threading.Event) -> None:
        if health_fails:
            raise health_fails.pop()
        serve(self, stop)
    monkeypatch.setattr(health.HealthServer, "serve", flaky_serve)
    d = Running(opts, FakeManager(remote=(REMOTE,)))
    port = opts.healthz_port
    wait_for(lambda: http_or_none(port, "/healthz") == (200, "flanneld is running"), "the health server back")
    net = wait_for(lambda: d.finished.is_set() or restarted(port, "network", 1), "the network thread restarted")
    assert not d.finished.is_set(), f"the agent stopped: {d.result!r}"
    assert net["last_error"] == "OSError: [Errno 105] No buffer space available"
    assert worker(port, "health")["restarts"] == 1
    assert d.end() is None


def http_or_none(port: int, path: str) -> tuple[int, str] | None:
    try:
        return http(port, path)
    except OSError:
        return None


class BrokenWatch(FakeManager):
    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        raise errors.StoreError("watch: permission denied by the API server")
        yield  # a generator


def test_healthz_turns_503_once_a_thread_fails_longer_than_the_threshold(opts: AgentOptions) -> None:
    board = health.WorkerBoard(unhealthy_after=1.0)
    d = Running(opts, BrokenWatch(), board=board)
    port = opts.healthz_port
    wait_for(lambda: d.finished.is_set() or worker(port, "watch").get("last_error"), "the first watch failure")
    body = wait_for(lambda: d.finished.is_set() or ((r := http(port, "/healthz"))[0] == 503 and r[1]),
                    "/healthz to turn 503")
    assert not d.finished.is_set()
    assert body.startswith("flanneld is unhealthy: watch failing for ")
    assert body.endswith("StoreError: watch: permission denied by the API server")
    code, report = verbose(port)
    assert code == 503 and report["status"] == "unhealthy" and report["unhealthy_after_s"] == 1.0
    assert report["workers"]["watch"]["failures_in_a_row"] >= 2
    assert report["workers"]["watch"]["state"] in ("backoff", "running", "failed")
    assert report["workers"]["network"]["state"] == "running"
    assert http(port, "/readyz") == (200, "flanneld is ready")       # readiness is about the lease
    assert d.end() is None


FAKE_IP = """#!/bin/sh
echo "$@" >> {dir}/ip.calls
case "$(/bin/cat {dir}/ip.mode)" in
    garbage) printf 'Error: this is not JSON'; exit 0 ;;
    hang) exec /bin/sleep 60 ;;
esac
case "$*" in *"route show"*) printf '[]' ;; esac
exit 0
"""


def test_the_traffic_thread_survives_bad_ip_output_and_a_hung_tool(opts: AgentOptions, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``ip -j`` printing garbage (ValueError before) and ``ip`` hanging (TimeoutExpired before)
    restart the traffic thread; once ``ip`` works again the blackhole route is added. PATH holds
    only the fake ``ip``: no real tool touches this (root) namespace."""
    from flannel.traffic import command
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ip").write_text(FAKE_IP.format(dir=bindir))
    (bindir / "ip").chmod(0o755)
    mode, calls = bindir / "ip.mode", bindir / "ip.calls"
    mode.write_text("garbage")
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(command, "COMMAND_TIMEOUT_SECONDS", 0.5)
    import dataclasses
    d = Running(dataclasses.replace(opts, ip_blackhole_route=True, iptables_resync=1), FakeManager())
    port = opts.healthz_port

    def traffic_error(text: str) -> bool:
        return d.finished.is_set() or text in (worker(port, "traffic").get("last_error") or "")
    wait_for(lambda: traffic_error("`ip -j -4 route show table main type blackhole` printed output flannel cannot "
                                   "read (not JSON"), "the traffic thread to fail on garbage",
             on_timeout=lambda: f"daemon result: {d.result!r}")
    assert not d.finished.is_set(), f"the agent stopped: {d.result!r}"
    assert http(port, "/readyz") == (200, "flanneld is ready")     # the blackhole route is an extra
    mode.write_text("hang")
    wait_for(lambda: traffic_error("did not finish within 0.5s and was killed"), "the traffic thread to time out")
    mode.write_text("good")
    wait_for(lambda: d.finished.is_set() or "-4 route add blackhole 10.9.7.0/24" in calls.read_text(),
             "the blackhole route to be added")
    w = wait_for(lambda: d.finished.is_set() or restarted(port, "traffic", 2), "the traffic thread running again")
    assert not d.finished.is_set(), f"the agent stopped: {d.result!r}"
    assert w["state"] == "running" and http(port, "/healthz") == (200, "flanneld is running")
    assert d.end() is None


class ChangedConfig(FakeManager):
    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        yield WatchResult.of_snapshot(())
        raise errors.ConfigChanged("the network config in the store changed: Network 10.9.0.0/16 → 10.10.0.0/16")


def test_a_config_change_exits_1_saying_why(opts: AgentOptions, caplog: pytest.LogCaptureFixture) -> None:
    stop = threading.Event()
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(cli.run_agent(opts, manager=ChangedConfig(), stop=stop,
                                                                 select_interface=fake_iface)), daemon=True)
    t.start()
    t.join(DEADLINE)
    stop.set()
    assert out == [1]
    msg = [r.getMessage() for r in caplog.records if r.name == "flannel.cli"][-1]
    assert msg.startswith("the network config in the store changed: Network 10.9.0.0/16 → 10.10.0.0/16 "
                          "(noticed by the watch thread); exiting with status 1 so that the supervisor")


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
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        self.calls += 1
        yield WatchResult.of_snapshot(())


def test_a_loop_that_returns_early_is_a_failure_and_restarted(opts: AgentOptions) -> None:
    manager = EndingWatch()
    d = Running(opts, manager)
    w = wait_for(lambda: d.finished.is_set() or (worker(opts.healthz_port, "watch").get("restarts", 0) >= 2 and
                                                 worker(opts.healthz_port, "watch")), "the watch restarted")
    assert not d.finished.is_set(), f"the agent stopped: {d.result!r}"
    assert w["last_error"] == "FlannelError: the watch loop ended unexpectedly" and manager.calls >= 3
    assert d.end() is None


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


def test_only_built_in_kernel_backends_start_the_pipeline_before_the_rules() -> None:
    from flannel import plugins
    for name in ("vxlan", "host-gw", "udp", "wireguard", "alloc"):
        assert daemon.starts_pipeline_early(plugins.load(plugins.BACKENDS, name)), name
    assert not daemon.starts_pipeline_early(plugins.load(plugins.BACKENDS, "extension"))

    class NotOurs(AllocBackend):   # same type name, another module: a third-party plugin
        pass
    assert not daemon.starts_pipeline_early(NotOurs)


class SeesSubnetFile(FakeManager):
    """Records whether subnet.env existed when the watch started."""

    def __init__(self, path: Path) -> None:
        super().__init__(remote=(REMOTE,))
        self.path = path
        self.seen: list[bool] = []

    def watch_leases(self, config: Any, stop: threading.Event) -> Iterator[WatchResult]:
        self.seen.append(self.path.exists())
        yield from super().watch_leases(config, stop)


def test_other_backends_start_the_pipeline_after_subnet_env_as_flannel(opts: AgentOptions,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend outside EARLY_PIPELINE_BACKENDS (the extension backend runs the operator's
    commands per peer, which may read subnet.env) sees its first peers only after subnet.env."""
    class ThirdParty(AllocBackend):
        pass
    monkeypatch.setattr(daemon, "load_backend", lambda config: ThirdParty)
    manager = SeesSubnetFile(Path(opts.subnet_file))
    d = Running(opts, manager)
    wait_for(lambda: manager.seen, "the watch to start")
    assert manager.seen == [True]
    assert d.end() is None
