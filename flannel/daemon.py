"""The daemon lifecycle: startup in flannel's order, the lease pipeline, clean shutdown.

Startup follows reference §0 (kube-only steps live in the kube subnet manager): load the subnet
manager plugin → signal handlers → health server → wait for the network config (retry every
second) → public IPs stored in the store override the flags → external interface → load and
construct the backend → ``register_network`` (acquires the lease) → traffic rules → subnet.env
→ "flannel is ready" → keep the lease alive.

One difference from flannel's order (docs/design-divergences.md): for the built-in backends that
only program the kernel (``EARLY_PIPELINE_BACKENDS``) the event pipeline (watch + network threads)
starts as soon as the lease is acquired, so the first reconcile of every peer (the bulk of a cold
start at thousands of nodes) runs while the traffic rules go in and subnet.env is written.
Readiness keeps its meaning: subnet.env, "flannel is ready", ``/readyz`` and systemd's READY=1
still come only after the rules are in place, and a failure in the rules stops the agent (the
started threads stop and are joined). Other backends (the extension backend runs the operator's
commands per peer, which may read subnet.env; third-party plugins) start the pipeline after
subnet.env, as flannel does.

Concurrency (DESIGN §4): one stop ``threading.Event`` and plain threads. The main thread only
waits: the startup and every loop run on worker threads, so SIGTERM is honoured within a few
seconds even when a worker is stuck in a blocking store call. Threads:

* ``startup``   – the sequence above, then waits for stop and shuts down;
* ``health``    – the HTTP server (flannel.health);
* ``traffic``   – re-checks the masquerade/forward rules and the blackhole route;
* ``watch``     – ``subnet_manager.watch_leases`` → ``LeaseWatcher`` → a queue of ``Batch``;
* ``network``   – ``Network.run(queue, stop)`` (the backend's event loop);
* ``lease``     – ``subnet_manager.complete_lease`` (renewal, re-acquisition).

Metrics (``flannel.metrics``): the daemon owns one ``Metrics`` (its own registry, served at
``/metrics``), binds it to every worker thread so that hooks deep in backends and stores count into
it, counts the lease events and relists its watch thread sees, and lets the scrape-time collector
read its live state (tracked leases, our lease, the network, the workers' restarts).

Failures (``flannel.supervise``): a failure during startup exits 1, as in flannel. After that, a
worker that fails on an operational error (a store or backend error, a tool that timed out or
printed garbage, an OSError) is restarted with backoff and reported by ``/healthz``; only a
configuration error (``ConfigError``, e.g. ``ConfigChanged``) or a bug stops the agent, with exit
1 and a message naming the thread. Our lease coming back with another subnet also exits 1 (see
``_on_lease``). The composed objects (manager, backend, network) are plain dependencies; nothing
here inherits from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from flannel import (
    errors,
    health,
    iface,
    metrics,
    plugins,
    retry,
    stophooks,
    subnet_file,
    supervise,
    threadname,
    traffic,
)
from flannel.backends.base import Backend, ExternalInterface, Network
from flannel.config import NetworkConfig
from flannel.lease import Batch, Lease, StoredNodeAttrs, WatchResult
from flannel.options import AgentOptions
from flannel.subnet_managers.base import SubnetManager
from flannel.watcher import LeaseWatcher

log = logging.getLogger(__name__)

CONFIG_RETRY_SECONDS = 1.0
SHUTDOWN_GRACE_SECONDS = 5.0
#: GIL switch interval (seconds) while the startup thread installs the rules next to the running pipeline
STARTUP_SWITCH_INTERVAL = 0.0002
#: built-in backends whose network only programs the kernel: their pipeline starts before the traffic rules
EARLY_PIPELINE_BACKENDS = frozenset({"vxlan", "host-gw", "udp", "wireguard", "alloc"})


class _Stopped(Exception):
    """Stop was requested while starting up: unwind quietly (exit 0)."""


@contextlib.contextmanager
def signal_handlers(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``; a second one exits at once. Previous handlers are restored.

    Only the main thread may install handlers; elsewhere (tests driving ``run`` from a thread)
    this is a no-op and the caller sets ``stop`` itself.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("second %s: exiting immediately", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def load_subnet_manager(opts: AgentOptions) -> SubnetManager:
    cls = plugins.load(plugins.SUBNET_MANAGERS, opts.subnet_manager)
    manager: SubnetManager = cls(opts)
    return manager


def starts_pipeline_early(backend_cls: type[Backend]) -> bool:
    """Whether the lease pipeline may start before the traffic rules and subnet.env: only for our
    own kernel-programming backends (a plugin of the same name from elsewhere keeps flannel's order)."""
    return (backend_cls.type_name in EARLY_PIPELINE_BACKENDS
            and backend_cls.__module__.startswith("flannel.backends."))


def load_backend(config: NetworkConfig) -> type[Backend]:
    """The backend class named by the config; unknown → PluginError listing the installed ones."""
    return plugins.load(plugins.BACKENDS, config.backend_type)  # type: ignore[no-any-return]


class Daemon:
    """One agent run. ``run()`` returns on a clean stop and raises FlannelError on failure."""

    def __init__(self, opts: AgentOptions, *, manager: SubnetManager | None = None,
                 stop: threading.Event | None = None,
                 select_interface: Callable[..., ExternalInterface] = iface.select,
                 board: health.WorkerBoard | None = None) -> None:
        self.opts = opts
        self.stop = stop or threading.Event()
        self.ready = threading.Event()
        self.manager = manager
        self.select_interface = select_interface
        self.network: Network | None = None
        self.lease: Lease | None = None
        self.config: NetworkConfig | None = None
        self.watcher: LeaseWatcher | None = None
        self.batches: queue.Queue[Batch | None] = queue.Queue()
        self._health: health.HealthServer | None = None
        self.board = board or health.WorkerBoard()
        self.metrics = metrics.Metrics(store=opts.subnet_manager)
        self.metrics.attach(metrics.Sources(
            remote_leases=self._tracked, own_lease=lambda: self.lease, network=lambda: self.network,
            worker_restarts=lambda: {n: s.restarts for n, s in self.board.snapshot().items()},
            ready=self.ready.is_set))
        self._snapshots = 0   # lease snapshots seen; every one after the first is a relist
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._closing = False
        self._lock = threading.Lock()
        #: set by a stop hook or when the startup thread ends: what ``run`` (the main thread) waits for
        self._wake = threading.Event()

    # --- supervision ---------------------------------------------------------------------------
    def run(self) -> None:
        """Start the startup thread, then sleep until stop or until that thread ends.

        Why the main thread waits on its own event (``_wake``), set by a stop hook, and not on
        ``stop`` with a timeout: it used to poll ``stop`` every 2 s — a wake-up every 2 s for the
        life of the agent (issue 9's idle budget). And it must not wait on ``stop`` itself without
        a timeout: the SIGTERM handler runs on this thread and calls ``stop.set()``, which takes
        ``stop``'s internal lock — held by this very thread if the signal lands inside
        ``stop.wait()``'s bookkeeping. ``_wake``'s lock is never taken by the handler.
        """
        unregister = stophooks.on_stop(self.stop, self._wake.set)
        try:
            main = self._spawn("startup", self._main, restart=False)
            self._wake.wait()
        finally:
            unregister()
        main.join(SHUTDOWN_GRACE_SECONDS)
        if main.is_alive():  # most likely startup blocked in a store call: closing the store ends it
            self._closing = True
            _close_quietly("subnet manager", self.manager.close if self.manager else None)
            main.join(SHUTDOWN_GRACE_SECONDS)
        if main.is_alive():
            log.warning("shutdown did not finish within %.0fs; exiting anyway", SHUTDOWN_GRACE_SECONDS * 2)
        if self._failure is not None:
            raise self._failure
        log.info("Exiting cleanly...")

    def _spawn(self, name: str, target: Callable[[], None], *, until_stop: bool = False,
               restart: bool = True) -> threading.Thread:
        """Start a thread. ``restart``: a supervised worker (``flannel.supervise``), else a failure
        stops the agent. ``until_stop``: returning before stop is a failure (the loop must not end)."""
        t = threading.Thread(target=self._guarded, args=(name, target, until_stop, restart), name=name, daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _guarded(self, name: str, target: Callable[[], None], until_stop: bool, restart: bool) -> None:
        threadname.name_this_thread(name)
        with metrics.bound(self.metrics):
            self._run_guarded(name, target, until_stop, restart)

    def _run_guarded(self, name: str, target: Callable[[], None], until_stop: bool, restart: bool) -> None:
        try:
            if restart:
                supervise.run(name, target, stop=self.stop, board=self.board, until_stop=until_stop)
            else:
                target()
        except _Stopped:
            log.info("stopped during startup")
        except BaseException as e:  # a failure in any thread must stop the daemon, never hang it
            if self._closing or (restart and self.stop.is_set() and retry.is_operational(e)):
                log.info("%s ended during shutdown: %s", name, e)
                return
            # a startup failure is reported as it is (exit 1, or 2 for a usage error), as in flannel
            startup_error = not restart and isinstance(e, errors.FlannelError)
            self.fail(e if startup_error else supervise.stop_error(name, e))

    def fail(self, error: BaseException) -> None:
        """Record the first failure and stop everything."""
        with self._lock:
            if self._failure is None:
                self._failure = error
        self.stop.set()

    # --- the startup sequence ------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._startup()
            self.stop.wait()
        finally:
            try:
                self._shutdown()
            finally:
                self._wake.set()   # run() joins this thread next, so a failure recorded after this is seen

    def _startup(self) -> None:
        manager = self.manager = self.manager or load_subnet_manager(self.opts)
        log.info("subnet manager: %s", manager.name)
        self._start_health()
        config = self.config = self._wait_for_config(manager)
        manager.prefetch_leases()   # the store's side of the acquisition overlaps the backend's setup
        ext = self.select_interface(self._with_stored_public_ips(manager), ipv4=config.enable_ipv4,
                                    ipv6=config.enable_ipv6)
        backend_cls = load_backend(config)
        backend = backend_cls(ext, self.opts)
        network = self.network = backend.register_network(config=config, leases=manager)
        self.lease = network.lease
        log.info("acquired lease %s", network.lease.describe())
        self._check_stop()
        early = starts_pipeline_early(backend_cls)
        if early:
            self._start_pipeline(network)
        with _quick_gil_handoffs(early):   # the rules go in next to the first reconcile
            self._setup_traffic_rules(config=config, lease=network.lease, ext_iface=ext)
            self._write_subnet_file(config, network)
        if not early:
            self._start_pipeline(network)
        self._spawn("lease", self._keep_lease)
        sd_notify("READY=1")

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped()

    def _start_health(self) -> None:
        if not self.opts.healthz_port:
            return
        server = self._health = health.HealthServer(self.opts.healthz_ip, self.opts.healthz_port, ready=self.ready,
                                                    debug=self.debug_leases, board=self.board,
                                                    metrics=self.metrics.registry)
        server.bind()
        self._spawn("health", lambda: server.serve(self.stop), until_stop=True)

    def _wait_for_config(self, manager: SubnetManager) -> NetworkConfig:
        """Retry every second while the config is missing or the store is down (ConfigError is fatal)."""
        while True:
            self._check_stop()
            try:
                config: NetworkConfig = manager.get_network_config()
            except (errors.ConfigNotFound, errors.StoreUnavailable) as e:
                log.warning("network config not available yet (%s); retrying in %.0fs", e, CONFIG_RETRY_SECONDS)
                self.stop.wait(CONFIG_RETRY_SECONDS)
                continue
            log.info("network config: %s, backend %s", config.network or config.ipv6_network, config.backend_type)
            return config

    def _with_stored_public_ips(self, manager: SubnetManager) -> AgentOptions:
        """Public IPs the store holds for this node (kube annotations) override the flags."""
        if not isinstance(manager, StoredNodeAttrs):
            return self.opts
        v4, v6 = manager.stored_public_ips()
        return dataclasses.replace(self.opts, public_ip=v4 or self.opts.public_ip,
                                   public_ipv6=v6 or self.opts.public_ipv6)

    def _setup_traffic_rules(self, *, config: NetworkConfig, lease: Lease, ext_iface: ExternalInterface) -> None:
        """Masquerade / forward rules and the blackhole route (reference §11, §0 steps 16–20).

        Runs before subnet.env is written (readiness implies the rules are in place). The previous
        network/subnet come from the *old* subnet.env, so rules for a subnet we no longer hold are
        recycled. A failure is fatal (BackendError → exit 1), as in flannel; the resync loop then
        repairs rules that someone deletes while we run (a supervised worker: see the module doc).
        """
        if not (self.opts.ip_masq or self.opts.iptables_forward_rules or self.opts.ip_blackhole_route):
            log.info("no masquerade, forward or blackhole rules requested; leaving iptables/nftables alone")
            return
        prev = subnet_file.read(self.opts.subnet_file)
        prev_net = _single(subnet_file.parse_networks(prev.get("FLANNEL_NETWORK"), 4))
        prev_sub = _single(subnet_file.parse_networks(prev.get("FLANNEL_SUBNET"), 4))
        prev_net6 = _single(subnet_file.parse_networks(prev.get("FLANNEL_IPV6_NETWORK"), 6))
        prev_sub6 = _single(subnet_file.parse_networks(prev.get("FLANNEL_IPV6_SUBNET"), 6))
        manager = traffic.create(self.opts, config)
        manager.setup(lease, prev_net, prev_sub, prev_ipv6_network=prev_net6, prev_ipv6_subnet=prev_sub6)
        self._spawn("traffic", lambda: manager.run_resync(self.stop), until_stop=True)

    def _write_subnet_file(self, config: NetworkConfig, network: Network) -> None:
        try:
            subnet_file.write(self.opts.subnet_file, config=config, lease=network.lease,
                              mtu=network.mtu, ip_masq=self.opts.ip_masq)
        except OSError as e:
            log.warning("failed to write subnet file %s: %s (not ready)", self.opts.subnet_file, e)
            return
        log.info("Wrote subnet file to %s", self.opts.subnet_file)
        self.ready.set()
        log.info("flannel is ready")

    # --- the running pipeline ------------------------------------------------------------------
    def _start_pipeline(self, network: Network) -> None:
        """The watch and network threads: leases from the store → batches → the backend."""
        with self._lock:
            self.watcher = LeaseWatcher(network.lease)
        self._spawn("network", lambda: network.run(self.batches, self.stop), until_stop=True)
        self._spawn("watch", self._watch, until_stop=True)

    def _watch(self) -> None:
        assert self.manager is not None and self.watcher is not None and self.config is not None
        for result in self.manager.watch_leases(self.config, self.stop):
            self._count(result)
            with self._lock:
                batches = self.watcher.apply(result)
            for batch in batches:
                self.batches.put(batch)
            if self.stop.is_set():
                return

    def _count(self, result: WatchResult) -> None:
        if result.snapshot is None:
            self.metrics.lease_events_received(result.events)
            return
        if self._snapshots:
            self.metrics.store_relisted(self.opts.subnet_manager)
        self._snapshots += 1

    def _tracked(self) -> list[Lease]:
        with self._lock:
            return self.watcher.tracked() if self.watcher else []

    def _keep_lease(self) -> None:
        assert self.manager is not None and self.lease is not None and self.config is not None
        self.manager.complete_lease(self.config, self.lease, self.stop, on_lease=self._on_lease)

    def _on_lease(self, lease: Lease) -> None:
        """A renewal or re-acquisition of our lease.

        Same subnet: tell the backend and the watcher. A *different* subnet means pods on this
        host hold addresses the network no longer routes here, and subnet.env, the rules and the
        backend's devices all describe the old subnet; rather than patch all of that in place we
        exit 1 and let the supervisor restart us: a fresh start converges on the new lease. So
        the backend and the watcher only ever see our lease in the subnet it started with.
        """
        assert self.lease is not None and self.network is not None and self.watcher is not None
        if lease.ident != self.lease.ident:
            self.fail(errors.FlannelError(f"our lease moved from {self.lease.describe()} to {lease.describe()}; "
                                          "exiting so that a restart sets everything up for the new subnet"))
            return
        self.network.on_lease_renewed(lease)
        with self._lock:
            self.lease = lease
            self.watcher.set_own(lease)

    def debug_leases(self) -> dict[str, Any]:
        """State for /debug/leases: our lease and the remote leases we track."""
        remote = self._tracked()
        return {"own": _lease_json(self.lease) if self.lease else None,
                "remote": sorted((_lease_json(le) for le in remote), key=lambda d: str(d["subnet"]))}

    # --- shutdown ------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        self.stop.set()
        self.batches.put(None)
        self._join_workers()
        _close_quietly("network", self.network.close if self.network else None)
        _close_quietly("subnet manager", self.manager.close if self.manager else None)
        _close_quietly("health server", self._health.close if self._health else None)

    def _join_workers(self) -> None:
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("thread %s did not stop within %.0fs", t.name, SHUTDOWN_GRACE_SECONDS)


@contextlib.contextmanager
def _quick_gil_handoffs(active: bool) -> Iterator[None]:
    """While the rules go in next to the first reconcile: a shorter GIL switch interval
    (``STARTUP_SWITCH_INTERVAL``).

    Why: the startup thread mostly waits for ``nft``/``iptables`` subprocesses, and after each
    wait it needs the GIL back from the network thread, busy in Python with the first reconcile of
    every peer, which lets go only every ``sys.getswitchinterval()`` (5 ms by default). Measured:
    8 ``nft`` calls next to a busy thread took 150–200 ms at 5 ms, 45–70 ms at 0.2 ms (27–31 ms
    alone), i.e. readiness at 5000 peers came ~0.15 s later. A holder is asked to let go only
    when another thread waits, so the reconcile pays for this only while the startup thread
    wants the GIL.
    """
    if not active:
        yield
        return
    global _quick_users, _saved_interval
    with _interval_lock:   # several daemons in one process (tests): the first sets, the last restores
        if _quick_users == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, STARTUP_SWITCH_INTERVAL))
        _quick_users += 1
    try:
        yield
    finally:
        with _interval_lock:
            _quick_users -= 1
            if _quick_users == 0:
                sys.setswitchinterval(_saved_interval)


_interval_lock = threading.Lock()
_quick_users = 0
_saved_interval = 0.005


def sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify`` units) our state; a no-op without ``$NOTIFY_SOCKET``."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.warning("sd_notify(%s) to %s failed: %s", state, path, e)


def _close_quietly(what: str, close: Callable[[], None] | None) -> None:
    if close is None:
        return
    try:
        close()
    except Exception:  # shutting down: report and carry on closing the rest
        log.exception("closing the %s failed", what)


def _single(nets: list[Any]) -> Any:
    """The one network of a subnet.env value, or None when there are zero or several."""
    return nets[0] if len(nets) == 1 else None


def _lease_json(lease: Lease) -> dict[str, Any]:
    return {"subnet": str(lease.subnet) if lease.subnet else None,
            "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet else None,
            "public_ip": str(lease.attrs.public_ip), "backend_type": lease.attrs.backend_type,
            "expiration": lease.expiration}


def run(opts: AgentOptions, *, manager: SubnetManager | None = None, stop: threading.Event | None = None,
        select_interface: Callable[..., ExternalInterface] = iface.select,
        board: health.WorkerBoard | None = None) -> None:
    """Run the agent until SIGINT/SIGTERM (or ``stop``). Raises FlannelError on failure.

    ``board`` (tests): the record of the workers behind /healthz, e.g. with a short threshold.
    """
    d = Daemon(opts, manager=manager, stop=stop, select_interface=select_interface, board=board)
    with signal_handlers(d.stop):
        d.run()
