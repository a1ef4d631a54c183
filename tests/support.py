"""The one module the tests share: in-memory fakes, small rigs around real kernel objects, packet
builders, golden payloads and ``wait_for``.

Test modules import from here and never from each other. Nothing installed imports this module
(the lab, which is a product feature, lives in ``flannel.lab``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from pathlib import Path
from typing import Any

from flannel import errors
from flannel.backends.base import Backend, ExternalInterface
from flannel.backends.udp.packet import Peer, PeerTable
from flannel.backends.udp.proxy import Proxy, open_socket
from flannel.config import NetworkConfig, parse_network_config
from flannel.lab import podtraffic as pt
from flannel.lab.cluster import ETCD_PREFIX, Lab, LabConfig
from flannel.lab.etcd import EtcdServer, b64
from flannel.lab.kubeapi.kubeconfig import write_kubeconfig
from flannel.lab.kubeapi.server import KubeAPIServer
from flannel.lab.netns import NetNS, cleanup_prefix, in_netns, run_prefix
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent, WatchResult
from flannel.options import AgentOptions
from flannel.records import SkippedRecords
from flannel.subnet_managers.base import SubnetManager
from flannel.subnet_managers.etcd.store import TTL_NOT_LOOKED_UP, KeyChanged, Listing, Stored
from flannel.watcher import LeaseWatcher

UNDERLAY_LOCAL = "198.18.0.1"
UDP_LOCAL, UDP_PEER = "127.0.0.1", "127.0.0.2"
UDP_TUN_ADDR = IPv4Address("10.244.1.0")
UDP_MTU = 1472


# ---- from tests/wait_tmp.py
DEFAULT_TIMEOUT = 15.0


def wait_for(cond: Callable[[], Any], what: str = "condition", *, timeout: float = DEFAULT_TIMEOUT,
             interval: float = 0.05, on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy (returned) or ``timeout`` passes.

    On timeout raise AssertionError naming ``what``, plus whatever ``on_timeout`` returns (e.g.
    the tails of the agents' logs), so a failing test says what it was waiting for and why.
    """
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= end:
            break
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{extra}" if extra else ""))



def wakeups(thread: threading.Thread) -> int:
    """How many times ``thread`` (of this process) has woken from sleep: its voluntary context switches.

    A thread blocked without a timeout does not wake; one that polls every 0.2 s gains ~5 a
    second. Tests of "no periodic wake-up" compare two readings over an idle stretch.
    """
    for line in Path(f"/proc/self/task/{thread.native_id}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for thread {thread.name}")


def thread_named(name: str) -> threading.Thread:
    """The one live thread of this process called ``name`` (the daemon names its workers)."""
    found = [t for t in threading.enumerate() if t.name == name]
    assert len(found) == 1, f"threads named {name!r}: {found}"
    return found[0]


# ---- from tests/unit/test_cli.py
GOOD_CONFIG = '{"Network": "10.9.0.0/16", "Backend": {"Type": "alloc"}}'


class FakeManager(SubnetManager):
    """An in-memory store: one config text, a fixed lease, a snapshot of remote leases."""

    kind = "fake"

    def __init__(self, config_text: str = GOOD_CONFIG, *, remote: tuple[Lease, ...] = ()) -> None:
        self.config_text = config_text
        self.remote = remote
        self.closed = False
        self.acquired: list[LeaseAttrs] = []

    @property
    def name(self) -> str:
        return "in-memory fake"

    def get_network_config(self) -> NetworkConfig:
        return parse_network_config(self.config_text, source="fake store")

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        self.acquired.append(attrs)
        return Lease(subnet=IPv4Network("10.9.7.0/24"), attrs=attrs)

    def watch_leases(self, config: NetworkConfig, stop: threading.Event) -> Iterator[WatchResult]:
        yield WatchResult.of_snapshot(self.remote)
        stop.wait()

    def complete_lease(self, config: NetworkConfig, lease: Lease, stop: threading.Event,
                       on_lease: Callable[[Lease], None] | None = None) -> None:
        stop.wait()

    def close(self) -> None:
        self.closed = True


def fake_iface(opts: AgentOptions, *, ipv4: bool = True, ipv6: bool = False) -> ExternalInterface:
    ip = IPv4Address(opts.public_ip or "198.18.0.1")
    return ExternalInterface("eth0", 2, 1500, ip, ip)


def acquire(manager: Any, attrs: LeaseAttrs) -> Lease:
    """What the daemon does: read and validate the network config once, then acquire with it."""
    return manager.acquire_lease(manager.get_network_config(), attrs)  # type: ignore[no-any-return]


def read_watch(handle: Any, enough: Callable[[list[Any]], bool], *, timeout: float = DEFAULT_TIMEOUT) -> list[Any]:
    """Chunks from a registry watch handle (``next()`` blocks) until ``enough(chunks)`` or
    ``timeout`` (then the handle is cancelled: the chunks read so far are returned)."""
    chunks: list[Any] = []
    timer = threading.Timer(timeout, handle.cancel)
    timer.start()
    try:
        while not enough(chunks):
            try:
                chunks.append(handle.next())
            except errors.StoreUnavailable:
                break
    finally:
        timer.cancel()
    return chunks


# ---- from tests/unit/test_etcd_allocation.py
Key = tuple[IPv4Network, "IPv6Network | None"]


class FakeRegistry:
    """In-memory ``store.Registry``: keys are subnets, values leases (expiration None = reservation).

    ``unreadable`` holds keys that exist but whose value the real registry would skip as
    undecodable: listings report them as ``occupied``, creates over them conflict.
    """

    def __init__(self, config: str | None, leases: list[Lease] = ()) -> None:  # type: ignore[assignment]
        self.config = config
        self.kv: dict[Key, Lease] = {(lease.subnet, lease.ipv6_subnet): lease for lease in leases}  # type: ignore[misc]
        self.mods: dict[Key, int] = dict.fromkeys(self.kv, 1)
        self.unreadable: set[Key] = set()
        self.revision = 1
        self.before_create: Callable[[IPv4Network, IPv6Network | None], None] | None = None
        self.creates: list[Key] = []
        self.updates: list[tuple[Key, int | None]] = []
        self.renewals: list[tuple[Key, int]] = []
        self.deletes: list[Key] = []
        self.skipped = SkippedRecords("fake key", logging.getLogger("tests.fake_registry"))

    def get_config(self) -> str:
        if self.config is None:
            raise errors.ConfigNotFound("flannel config not found in etcd store")
        return self.config

    def put_config(self, text: str) -> None:
        self.config = text

    def list_leases(self, *, ttl: bool = False) -> Listing:
        """As etcd: without ``ttl`` a leased key's expiration is not looked up."""
        leases = [lease if ttl or lease.expiration is None else replace(lease, expiration=TTL_NOT_LOOKED_UP)
                  for lease in self.kv.values()]
        return Listing(leases, self.revision, tuple(sorted(self.unreadable, key=str)))

    def get_lease(self, subnet, ipv6_subnet, *, ttl=True):  # type: ignore[no-untyped-def]
        key = (subnet, ipv6_subnet)
        exists = key in self.kv or key in self.unreadable
        return Stored(self.kv.get(key), exists, self.mods.get(key, 0), self.revision)

    def create_lease(self, subnet, ipv6_subnet, attrs, ttl):  # type: ignore[no-untyped-def]
        if self.before_create is not None:
            self.before_create(subnet, ipv6_subnet)
        self.creates.append((subnet, ipv6_subnet))
        if (subnet, ipv6_subnet) in self.kv or (subnet, ipv6_subnet) in self.unreadable:
            raise errors.LeaseConflict(f"subnet {subnet} is already taken")
        return self._put(subnet, ipv6_subnet, attrs, time.time() + ttl)

    def update_lease(self, subnet, ipv6_subnet, attrs, ttl):  # type: ignore[no-untyped-def]
        self.updates.append(((subnet, ipv6_subnet), ttl))
        return self._put(subnet, ipv6_subnet, attrs, None if ttl is None else time.time() + ttl)

    def renew_lease(self, subnet, ipv6_subnet, attrs, ttl, *, mod_revision):  # type: ignore[no-untyped-def]
        key = (subnet, ipv6_subnet)
        self.renewals.append((key, mod_revision))
        if key not in self.kv or self.mods.get(key) != mod_revision:
            raise KeyChanged(f"{subnet} changed since revision {mod_revision}")
        return self._put(subnet, ipv6_subnet, attrs, time.time() + ttl)

    def _put(self, subnet, ipv6_subnet, attrs, expiration):  # type: ignore[no-untyped-def]
        self.revision += 1
        lease = Lease(subnet=subnet, ipv6_subnet=ipv6_subnet, attrs=attrs, expiration=expiration)
        self.kv[(subnet, ipv6_subnet)] = lease
        self.mods[(subnet, ipv6_subnet)] = self.revision
        return lease

    def delete_lease(self, subnet, ipv6_subnet):  # type: ignore[no-untyped-def]
        self.revision += 1
        self.deletes.append((subnet, ipv6_subnet))
        self.kv.pop((subnet, ipv6_subnet), None)
        self.mods.pop((subnet, ipv6_subnet), None)

    def watch_leases(self, start_revision):  # type: ignore[no-untyped-def]
        raise NotImplementedError("not used by the allocation tests")

    watch_lease = watch_leases

    def describe(self) -> str:
        return "fake registry"

    def close(self) -> None:
        pass


# ---- from tests/integration/test_vxlan_backend.py
class FakeLeases:
    """A LeaseSource that hands out a fixed subnet and remembers what we published."""

    def __init__(self, subnet: str, stored: str | None = None) -> None:
        self.subnet = N(subnet)
        self.stored = stored
        self.attrs: LeaseAttrs | None = None

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        self.attrs = attrs
        return Lease(self.subnet, attrs)

    def stored_public_ips(self) -> tuple[str | None, str | None]:
        return (None, None)

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        return (self.stored, None)


class Agent:
    """One backend instance running ``Network.run`` on a thread inside ``ns``."""

    def __init__(self, ns: NetNS, backend: Backend, config_json: str, leases: FakeLeases,
                 tweak: Callable[[Any], None] | None = None) -> None:
        self.ns, self.backend, self.leases, self.tweak = ns, backend, leases, tweak
        self.config = parse_network_config(config_json)
        self.q: queue.Queue[Batch | None] = queue.Queue()
        self.stop_ev = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.net: Any = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        with in_netns(self.ns.name):
            try:
                self.net = self.backend.register_network(config=self.config, leases=self.leases)
                if self.tweak:
                    self.tweak(self.net)
            except BaseException as e:  # handed to the test thread
                self.error = e
                self.ready.set()
                return
            self.ready.set()
            self.net.run(self.q, self.stop_ev)

    def start(self) -> Agent:
        self.thread.start()
        assert self.ready.wait(20), "backend did not register in time"
        if self.error:
            raise self.error
        return self

    def send(self, *events: LeaseEvent, synced: bool = False) -> None:
        self.q.put(Batch(tuple(events), synced=synced))

    def stop(self) -> None:
        self.stop_ev.set()
        self.q.put(None)
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.net is not None:
            self.net.close()


def in_ns(ns: NetNS, fn: Callable[[], Any], *, timeout: float = 60.0) -> Any:
    """Run ``fn`` on a fresh thread inside ``ns`` and hand back its result, or raise its exception.

    A thread of its own because entering a namespace (``setns``) changes the calling thread for
    good; children it spawns (iptables, nft, ``ip -batch``) inherit the namespace. A ``fn`` still
    running after ``timeout`` fails the test instead of hanging it."""
    out: dict[str, Any] = {}

    def main() -> None:
        with in_netns(ns.name):
            try:
                out["value"] = fn()
            except BaseException as e:  # handed to the test thread
                out["error"] = e
    t = threading.Thread(target=main, name=f"in-{ns.name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)!r} still running in {ns.name} after {timeout:.0f}s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def make_ns(prefix: str) -> NetNS:
    ns = NetNS(prefix + "v")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", f"{UNDERLAY_LOCAL}/24", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    return ns


def ext_of(ns: NetNS, mtu: int = 1500) -> ExternalInterface:
    idx = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
    return ExternalInterface("eth0", idx, mtu, A(UNDERLAY_LOCAL), A(UNDERLAY_LOCAL))


def added(*leases: Lease) -> tuple[LeaseEvent, ...]:
    return tuple(LeaseEvent(EventType.ADDED, lz) for lz in leases)


def removed(*leases: Lease) -> tuple[LeaseEvent, ...]:
    return tuple(LeaseEvent(EventType.REMOVED, lz) for lz in leases)


def routes(ns: NetNS) -> set[str]:
    out = set()
    for r in json.loads(ns.ip("-j", "route", "show", "table", "main") or "[]"):
        if r.get("gateway"):
            onlink = " onlink" if "onlink" in r.get("flags", []) else ""
            out.add(f"{r['dst']} via {r['gateway']} dev {r['dev']}{onlink}")
    return out


# ---- from tests/unit/test_udp_packet.py
def csum(data: bytes) -> int:
    """Independent reference: RFC 1071 by the book, byte pairs, folded at the end."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] * 256 + data[i + 1]
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return 0xFFFF - s


def ip_packet(src: str, dst: str, *, proto: int = 17, ttl: int = 64, payload: bytes = b"hello-flannel",
              ihl: int = 5, frag: int = 0, ident: int = 0x1234, tos: int = 0) -> bytes:
    opts = b"\x01" * (ihl * 4 - 20)  # NOP options
    total = ihl * 4 + len(payload)
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, frag, ttl, proto, 0,
                                IPv4Address(src).packed, IPv4Address(dst).packed) + opts)
    c = csum(bytes(hdr))
    hdr[10:12] = c.to_bytes(2, "big")
    return bytes(hdr) + payload


# ---- from tests/integration/test_udp_wire.py
class Rig:
    """A udp Proxy on loopback: a socketpair stands in for the TUN, 127.0.0.2 for the peer.

    ``offload``: the GSO/GRO path (UDP_GRO on the socket); the offload tests start the proxy
    themselves (``start=False``) after queueing input.
    """

    def __init__(self, use_accel: bool, *, offload: bool = False, start: bool = True) -> None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((UDP_LOCAL, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.tun_ours, self.tun_test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun_ours.setblocking(False)
        self.tun_test.settimeout(3)
        self.sock = open_socket(IPv4Address(UDP_LOCAL), self.port, reuseport=False, gro=offload)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((UDP_PEER, self.port))
        self.peer.settimeout(3)
        self.proxy = Proxy([self.tun_ours.fileno()], [self.sock], UDP_TUN_ADDR, self.port, UDP_MTU, use_accel=use_accel,
                           offload=offload)
        self.proxy.set_table(PeerTable.build([Peer(IPv4Network("10.244.2.0/24"), IPv4Address(UDP_PEER))], self.port))
        if start:
            self.proxy.start()

    def close(self) -> None:
        self.proxy.stop()
        for s in (self.sock, self.peer, self.tun_ours, self.tun_test):
            s.close()


# ---- from tests/unit/test_traffic_rules.py
GOLDEN_NAT_S = """\
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.1.0/24 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
"""


# ---- from flannel/lab/kubeapi/harness.py
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

    def __init__(self, manager: Any, own: Lease, config: NetworkConfig | None = None) -> None:
        self.manager = manager
        self.config = config
        self.watcher = LeaseWatcher(own)
        self.batches: list[Batch] = []
        self.snapshots = 0
        self.error: BaseException | None = None
        self._peers: dict[object, Lease] = {}
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="follower", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            config = self.config or self.manager.get_network_config()
            for result in self.manager.watch_leases(config, self.stop):
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
            return {str(lease.subnet or lease.ipv6_subnet): lease for lease in self._peers.values()}

    def events(self) -> list[tuple[EventType, Lease]]:
        with self._lock:
            return [(e.type, e.lease) for b in self.batches for e in b.events]

    def wait_peers(self, expected: Callable[[dict[str, Lease]], bool], what: str,
                   timeout: float = 15.0) -> dict[str, Lease]:
        def check() -> tuple[dict[str, Lease]] | None:
            peers = self.peers()
            return (peers,) if expected(peers) else None
        return wait_for(check, timeout=timeout, what=what)[0]

    def close(self, timeout: float = 5.0) -> bool:
        """Stop; returns whether the thread ended within ``timeout``."""
        self.stop.set()
        self.thread.join(timeout)
        if self.error is not None:
            raise AssertionError(f"watch_leases raised: {self.error!r}") from self.error
        return not self.thread.is_alive()


# ---- the lab for e2e tests ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def build_lab(backend: str, tmp: Path, *, hosts: int = 3, pods_per_host: int = 2, **kw: Any) -> Lab:
    """One lab (hub + store + hosts + pods + real agents), torn down by the caller.

    A lab that cannot be built fails the test with the lab's own message (what is missing, the
    agents' log tails); it is never skipped: the lab is the project's main job.
    """
    cfg = LabConfig(hosts=hosts, pods_per_host=pods_per_host, backend=backend, dir=str(tmp),
                    prefix=run_prefix(), **kw)
    lab = Lab(cfg)
    try:
        lab.up()
    except BaseException:
        lab.teardown(keep_dir=True)
        cleanup_prefix(cfg.prefix)
        raise
    return lab


def running_lab(backend: str, tmp: Path, **kw: Any) -> Iterator[Lab]:
    """``build_lab`` for a fixture (``yield from running_lab(...)``): torn down after the last use."""
    lab = build_lab(backend, tmp, **kw)
    try:
        yield lab
    finally:
        lab.teardown(keep_dir=True)


# ---- the chaos suite (tests/faults): observing a lab while faults are injected -----------------

LAB_VXLAN_DEV = "flannel.1"

#: the ``figure`` fixture of tests/faults/conftest.py: ``figure(name, value, unit="")``
Figure = Callable[..., None]


def lab_logs(lab: Lab, lines: int = 12) -> str:
    """The tails of every agent's log (for assertion messages)."""
    out = []
    for name in lab.hosts:
        try:
            tail = lab.log_file(name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(no log)"]
        out.append(f"\n--- {lab.log_file(name)} (tail)\n" + "\n".join(tail))
    return "".join(out)


def dead_agents(lab: Lab) -> list[str]:
    return [name for name in lab.hosts if not lab.agent_alive(name)]


def agents_alive(lab: Lab) -> bool:
    """True while every agent runs; fails the scenario at once (with the logs) when one exited.
    For ``wait_for`` conditions: ``lambda: agents_alive(lab) and ...``."""
    dead = dead_agents(lab)
    assert not dead, f"agents exited: {dead}" + lab_logs(lab, 25)
    return True


def fake_routes(lab: Lab, fake: IPv4Network) -> dict[str, list[str]]:
    """Routes into ``fake`` (where a scenario's store-only peers live) per host that has any."""
    out = {h: [d for d in kernel_routes(lab, h) if IPv4Network(d).subnet_of(fake)] for h in lab.hosts}
    return {h: r for h, r in out.items() if r}


def ensure_healthy(lab: Lab, fake: IPv4Network | None = None) -> None:
    """Start of every chaos scenario: an agent an earlier scenario killed is started again (that
    scenario has already failed for it), every pod reaches every other pod, and (with ``fake``) no
    earlier scenario's store-only peer is still routed."""
    for host in dead_agents(lab):
        lab.start_agent(host)
        lab.wait_subnet(host)
    m = pt.wait_full_matrix(lab.pods(), time.monotonic() + 60)
    assert all(m.values()), "the lab does not work before the scenario:\n" + pt.format_matrix(lab.pods(), m)
    if fake is not None:
        wait_for(lambda: not fake_routes(lab, fake), "earlier scenarios' fake peers to be removed", timeout=60,
                 on_timeout=lambda: f"{fake_routes(lab, fake)}" + lab_logs(lab))


def wait_routed(lab: Lab, subnet: str, what: str, *, hosts: list[str] | None = None, timeout: float = 60.0,
                present: bool = True) -> float:
    """Seconds until every host (or ``hosts``) routes ``subnet`` (``present=False``: no longer routes
    it); fails at once when an agent exited."""
    t0 = time.monotonic()
    wait_for(lambda: agents_alive(lab) and all((subnet in kernel_routes(lab, h)) == present
                                               for h in (hosts or list(lab.hosts))),
             what, timeout=timeout, interval=0.2, on_timeout=lambda: lab_logs(lab))
    return time.monotonic() - t0


def etcd_key(subnet: str) -> str:
    """The lab store's key of a lease: ``<prefix>/subnets/10.244.5.0-24``."""
    net = IPv4Network(subnet)
    return f"{ETCD_PREFIX}/subnets/{net.network_address}-{net.prefixlen}"


def ring_pingers(lab: Lab, interval: float = 0.05) -> list[pt.ContinuousPing]:
    """Pod of h1 → pod of h2 → ... → pod of h1, continuously (one pod per host)."""
    pods = [lab.pods([h])[0] for h in lab.hosts]
    return [pt.ContinuousPing(a, b.ip, interval=interval) for a, b in zip(pods, pods[1:] + pods[:1])]


def stop_pingers(ps: list[pt.ContinuousPing]) -> list[tuple[str, pt.PingResult]]:
    """Stop every pinger (killing the rest if one fails); ``(src→dst, result)`` each."""
    out = []
    for i, p in enumerate(ps):
        try:
            out.append((f"{p.src.name}→{p.dst}", p.stop()))
        except Exception:
            for rest in ps[i:]:
                rest.kill()
            raise
    return out


def report_echoes(figure: Figure, results: list[tuple[str, pt.PingResult]]) -> int:
    """Report echoes sent and lost as figures; returns how many were lost."""
    lost = sum(len(r.lost) for _, r in results)
    figure("pod echoes sent", sum(r.sent for _, r in results))
    figure("pod echoes lost", lost)
    return lost


def kernel_routes(lab: Lab, host: str) -> dict[str, str]:
    """``ip route`` in the host: destination → gateway, for every gateway route (what the vxlan and
    host-gw backends program for peers), read with iproute2, not through the agent."""
    out = lab_ns(lab, host).ip("-j", "route", "show", "table", "main")
    return {r["dst"]: r["gateway"] for r in json.loads(out or "[]") if r.get("gateway") and r.get("dst") != "default"}


def lab_ns(lab: Lab, host: str) -> NetNS:
    """A handle on a lab host's existing namespace (``NetNS()`` would create one)."""
    ns = NetNS.__new__(NetNS)
    ns.name = lab.hosts[host].ns
    return ns


@dataclass(frozen=True)
class VxlanState:
    """What the vxlan backend programmed on ``flannel.1``: routes {dst: gateway}, neigh {ip: mac},
    fdb {mac: underlay dst}."""

    routes: dict[str, str]
    neigh: dict[str, str]
    fdb: dict[str, str]

    def diff(self, want: VxlanState) -> str:
        parts = []
        for what in ("routes", "neigh", "fdb"):
            have, exp = getattr(self, what), getattr(want, what)
            extra = {k: v for k, v in have.items() if exp.get(k) != v}
            missing = {k: v for k, v in exp.items() if have.get(k) != v}
            if extra or missing:
                parts.append(f"{what}: unexpected {extra} missing {missing}")
        return "; ".join(parts)


def vxlan_state(lab: Lab, host: str) -> VxlanState:
    ns = lab_ns(lab, host)
    dev = LAB_VXLAN_DEV
    routes = {r["dst"]: r["gateway"] for r in json.loads(ns.ip("-j", "route", "show", "dev", dev) or "[]")
              if r.get("gateway")}
    neigh = {n["dst"]: n["lladdr"].lower() for n in json.loads(ns.ip("-j", "neigh", "show", "dev", dev) or "[]")
             if n.get("lladdr")}
    fdb = {e["mac"].lower(): e["dst"] for e in json.loads(ns.exec("bridge", "-j", "fdb", "show", "dev", dev) or "[]")
           if e.get("dst")}
    return VxlanState(routes, neigh, fdb)


def expected_vxlan_state(leases: dict[str, dict[str, Any]], own_subnet: str) -> VxlanState:
    """The vxlan entries flannel programs for ``leases`` ({subnet text: lease value}) seen from the
    host that holds ``own_subnet``: route via the peer's network address, onlink; neigh that
    address → VtepMAC; fdb VtepMAC → PublicIP."""
    routes, neigh, fdb = {}, {}, {}
    for subnet, value in leases.items():
        if subnet == own_subnet:
            continue
        gw = str(IPv4Network(subnet).network_address)
        mac = str(value["BackendData"]["VtepMAC"]).lower()
        routes[subnet], neigh[gw], fdb[mac] = gw, mac, str(value["PublicIP"])
    return VxlanState(routes, neigh, fdb)


def fake_vxlan_lease(public_ip: str, mac: str, **extra: Any) -> dict[str, Any]:
    """A lease value as a vxlan flannel writes it (for a peer that exists only in the store)."""
    return {"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": mac}, **extra}


def etcd_leases(lab: Lab) -> dict[str, dict[str, Any]]:
    """Every lease under the lab's prefix that decodes as JSON: {subnet text: value}."""
    assert lab.etcd is not None
    start = f"{ETCD_PREFIX}/subnets/"
    resp = lab.etcd.v3("/v3/kv/range", {"key": b64(start), "range_end": b64(start[:-1] + "0")})
    out = {}
    for kv in resp.get("kvs", []):
        name = base64.b64decode(kv["key"]).decode("utf-8", "replace")[len(start):]
        try:
            out[name.replace("-", "/")] = json.loads(base64.b64decode(kv.get("value", "")))
        except ValueError:
            continue
    return out
# ---- a scripted kube client (the kube manager's list/watch loop without a server) ------------------

class ScriptedWatch:
    """Hands out the scripted items of one watch (tuples, END, or exceptions to raise)."""

    def __init__(self, script: list[Any], on_empty: threading.Event) -> None:
        self.script, self.on_empty, self.closed = list(script), on_empty, False

    def get(self, timeout: float | None) -> Any:
        if not self.script:
            if timeout is None or timeout > 0:
                self.on_empty.set()  # nothing more will happen: end the test run
            return None
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.closed = True

    def wake(self) -> None:
        """A stop hook (NodeWatch.wake): nothing to do, ``get`` never blocks here."""

    def __enter__(self) -> ScriptedWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScriptedClient:
    """Stands in for ``KubeClient``: each list is (items, rv), each watch a script; when the last
    watch's script is used up, ``stop`` is set (``watch_leases`` then returns)."""

    host = "scripted"

    def __init__(self, lists: list[tuple[list[Any], str]], watches: list[list[Any]], stop: threading.Event):
        self.lists, self.watches, self.stop = list(lists), list(watches), stop
        self.list_calls = 0
        self.watch_from: list[str] = []

    def list_node_pages(self, *, limit: int = 500) -> Iterator[tuple[list[Any], str]]:
        self.list_calls += 1
        items, rv = self.lists.pop(0)
        for i in range(0, max(len(items), 1), limit):  # pages of ``limit`` items (one empty page)
            yield items[i:i + limit], rv

    def watch_nodes(self, rv: str, *, timeout_seconds: int, read_timeout: float = 90.0) -> ScriptedWatch:
        self.watch_from.append(rv)
        return ScriptedWatch(self.watches.pop(0) if self.watches else [], self.stop)


# ---- metrics (tests/unit/test_metrics.py, tests/integration/test_metrics.py, tests/e2e/test_lab_metrics.py)

class Samples:
    """A parsed Prometheus text exposition: ``value(name, **labels)`` for one sample (None if
    absent), ``total(name, **labels)`` for the sum over samples matching the given labels.
    Parsed with prometheus_client's own parser, so a malformed exposition fails the test."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]

    def matching(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(lbl, v) for n, lbl, v in self.samples
                if n == name and all(lbl.get(k) == want for k, want in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        exact = [v for lbl, v in self.matching(name, **labels) if lbl == labels]
        return exact[0] if exact else None

    def total(self, name: str, **labels: str) -> float:
        return sum(v for _, v in self.matching(name, **labels))

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}


def scrape(port: int, *, netns: str | None = None, accept: str | None = None,
           host: str = "127.0.0.1") -> tuple[int, str, str]:
    """GET /metrics with urllib (inside ``netns`` if given): (status, Content-Type, body)."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(f"http://{host}:{port}/metrics", headers={"Accept": accept} if accept else {})

    def get() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()
    if netns is None:
        return get()
    with in_netns(netns):
        return get()


def metrics_of(port: int, *, netns: str | None = None) -> Samples:
    status, _, body = scrape(port, netns=netns)
    assert status == 200, f"/metrics answered {status}: {body[:500]}"
    return Samples(body)


class FakeUdpNetwork:
    """What the metrics collector reads from the udp Network: ``counters()``."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.values = dict(counters)

    def counters(self) -> dict[str, int]:
        return dict(self.values)


class FakeWireguardNetwork:
    """What the metrics collector reads from the wireguard Network: ``devices`` and ``peer_report()``
    (``fail`` makes the report raise, as an unreadable device does)."""

    def __init__(self, reports: list[Any], devices: tuple[str, ...] = ("flannel-wg",)) -> None:
        self.reports = list(reports)
        self.devices = dict.fromkeys(devices)
        self.fail: Exception | None = None

    def peer_report(self) -> list[Any]:
        if self.fail is not None:
            raise self.fail
        return list(self.reports)


# ---- the routed backends (vxlan, host-gw): a fake kernel port and lease generators ------------------

class FakeKernel:
    """The netlink port of ``RoutedNetwork`` over an in-memory kernel with the kernel's semantics:
    one main-table route per destination (``replace`` overwrites whatever is there, ``del``
    matches gateway, device and protocol), neighbours keyed by (device, IP), vxlan fdb entries as
    (MAC, remote) pairs where ``replace`` rewrites the MAC's first remote. Routes carry their
    protocol; ``dump`` classifies them with the same rule as the real port (``rtnl.Classifier``).

    ``bad`` entries fail to be set while ``failing`` is True. No notification socket: the loop
    polls, as it does when the real socket cannot be opened.
    """

    def __init__(self, devs: tuple[str, ...] = ("eth0", "flannel.1", "flannel-v6.1", "eth1", "cni0", "docker0"),
                 local_nets: tuple[Any, ...] = (IPv4Network("198.18.0.0/24"),)) -> None:
        from flannel.backends.routed import model as rm
        self.rm = rm
        self.devs = {name: i for i, name in enumerate(devs, start=2)}
        self.local_nets = local_nets
        # dst -> (dst, gateway, dev, onlink, proto, kind)
        self.routes: dict[Any, tuple[Any, Any, str | None, bool, int, str]] = {}
        self.neighs: dict[tuple[str, Any], Any] = {}
        self.fdbs: list[Any] = []
        self.failing = True
        self.bad: set[object] = set()
        self.applied: list[Any] = []
        self.dumps = 0

    # -- helpers for tests
    def add_route(self, dst: str, gw: str | None, dev: str | None, *, onlink: bool = False, proto: int = 4,
                  kind: str = "unicast") -> None:
        from ipaddress import ip_address, ip_network
        net = ip_network(dst)
        self.routes[net] = (net, ip_address(gw) if gw else None, dev, onlink, proto, kind)

    def state(self) -> Any:
        """Everything in the fake kernel as plain comparable values."""
        return (frozenset(self.routes.values()), frozenset(self.neighs.values()), frozenset(self.fdbs))

    # -- the port
    def link_index(self, name: str) -> int | None:
        return self.devs.get(name)

    def connected_nets(self, index: int, version: int = 4) -> tuple[Any, ...]:
        return tuple(n for n in self.local_nets if n.version == version)

    def classifier(self, scope: Any) -> Any:
        from flannel.backends.routed import rtnl
        names = {self.devs[d]: d for d in scope.devs if d in self.devs}
        overlay = {self.devs[d]: d for d in (scope.overlay_dev, scope.overlay_dev6) if d in self.devs}
        names.update(overlay)
        exclude = tuple(n for n in (scope.exclude, scope.exclude6) if n is not None)
        return rtnl.Classifier(network=scope.network, network6=scope.network6, exclude=exclude, names=names,
                               overlay=overlay)

    def dump(self, scope: Any, expect: Any = None) -> Any:
        """``expect`` only speeds up the real port's dump (it never changes the result): ignored."""
        from flannel.backends.routed import rtnl
        rm = self.rm
        self.dumps += 1
        cl = self.classifier(scope)
        routes, foreign = set(), set()
        for dst, gw, dev, onlink, proto, kind in self.routes.values():
            if not cl.within(dst.version, int(dst.network_address), dst.prefixlen):
                continue
            oif = self.devs.get(dev) if dev else None
            msg = rtnl.RouteMsg(dst, oif, gw, proto, 1 if kind == "unicast" else 6, onlink)
            e = cl.classify(msg, lambda i: next((n for n, x in self.devs.items() if x == i), None))
            if isinstance(e, rm.Route):
                routes.add(e)
            elif e is not None:
                foreign.add(e)
        ov = {d for d in (scope.overlay_dev, scope.overlay_dev6) if d}
        neighs = {n for n in self.neighs.values() if n.dev in ov}
        fdbs = {f for f in self.fdbs if f.dev in ov}
        return rm.KernelState(frozenset(routes), frozenset(neighs), frozenset(fdbs), frozenset(foreign))

    def apply(self, plan: Any) -> list[tuple[object, str]]:
        rm = self.rm
        self.applied.append(plan)
        failed: list[tuple[object, str]] = []
        for r in plan.del_routes:
            cur = self.routes.get(r.dst)
            if cur is not None and cur[1] == r.gateway and cur[2] == r.dev and cur[4] == r.proto:
                del self.routes[r.dst]
        for n in plan.del_neighs:
            self.neighs.pop((n.dev, n.ip), None)
        for f in plan.del_fdbs:
            if f in self.fdbs:
                self.fdbs.remove(f)
        for items in (plan.set_fdbs, plan.set_neighs, plan.set_routes):
            for e in items:
                if self.failing and e in self.bad:
                    failed.append((e, f"set {e}: (22, 'Invalid argument')"))
                    continue
                if e.dev not in self.devs:
                    failed.append((e, f"set {e}: no device {e.dev}"))
                elif isinstance(e, rm.Route):
                    self.routes[e.dst] = (e.dst, e.gateway, e.dev, e.onlink, rm.FLANNEL_PROTO, "unicast")
                elif isinstance(e, rm.Neigh):
                    self.neighs[(e.dev, e.ip)] = e
                elif e not in self.fdbs:
                    same = sorted((f for f in self.fdbs if (f.dev, f.mac) == (e.dev, e.mac)), key=str)
                    if same:
                        self.fdbs.remove(same[0])
                    self.fdbs.append(e)
        return failed

    def addresses(self, index: int, version: int = 4) -> tuple[Any, ...]:
        return ()

    def prune_nexthops(self) -> int:
        return 0    # routes here are plain (no nexthop objects)

    def monitor(self) -> Any:
        raise errors.BackendError("fake kernel: no notifications")

    def close(self) -> None:
        pass


# ---- a TCP proxy whose connections can be frozen (a peer that vanished without a reset)
class FreezableProxy:
    """Forwards 127.0.0.1:<port> to ``target``. ``freeze()`` stops forwarding on every connection
    open at that moment, in both directions, without closing anything: to both ends it looks like
    a host whose packets are dropped (no FIN, no RST). New connections are forwarded normally, so
    a client that notices the dead one and reconnects gets through."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            frozen = threading.Event()
            with self._lock:
                self.connections.append((client, upstream, frozen))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, frozen), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, frozen: threading.Event) -> None:
        try:
            while not self._closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if frozen.is_set():
                    continue  # dropped: nothing reaches the other side, nothing is closed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not frozen.is_set():
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def drop(self, index: int) -> None:
        """Close the ``index``-th connection accepted (0 = the first) on both sides, as a server or a
        proxy closing an idle connection does (FIN to each end)."""
        with self._lock:
            client, upstream, _ = self.connections[index]
        for sock in (client, upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def freeze(self) -> int:
        """Freeze every open connection; returns how many."""
        with self._lock:
            for _, _, frozen in self.connections:
                frozen.set()
            return len(self.connections)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        with self._lock:
            for a, b, _ in self.connections:
                a.close()
                b.close()


class GatewayProxy:
    """Forwards 127.0.0.1:<port> to etcd at ``target``, but decides what an HTTP/1.1 request (etcd's
    JSON gateway) gets, while gRPC (HTTP/2: its connection preface) is always forwarded. ``mode``
    (changeable at any time, for the next connection):

    * ``"forward"``: forwarded like gRPC;
    * ``"404"``: ``HTTP/1.1 404 Not Found`` (an etcd < 3.4, a gateway switched off);
    * ``"503"``: ``HTTP/1.1 503`` with an HTML page (a proxy in front of an etcd that is down);
    * ``"garbage"``: bytes that are not HTTP (a server that does not speak HTTP/1.1), then closed;
    * ``"close"``: closed without a byte;
    * ``"script"``: a watch request (``POST /v3/watch``) gets a 200 chunked JSON stream whose
      chunks are ``script`` (bytes, sent as is; the stream then stays open until the proxy
      closes); other requests (unary calls) are forwarded.

    ``http_requests`` counts the HTTP/1.1 connections seen."""

    PREFACE = b"PRI * HTTP/2.0"

    def __init__(self, target_host: str, target_port: int, mode: str = "forward") -> None:
        self.target = (target_host.strip("[]"), target_port)
        self.mode = mode
        self.script: list[bytes] = []
        self.http_requests = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="gwproxy-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _keep(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.extend(socks)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._keep(client)
            threading.Thread(target=self._serve, args=(client,), name="gwproxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            head = b""
            while len(head) < len(self.PREFACE) and b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    client.close()
                    return
                head += data
            mode = "forward" if head.startswith(self.PREFACE) else self.mode
            if mode == "script" and not head.startswith(b"POST /v3/watch"):
                mode = "forward"   # the script is a watch stream's: unary calls go to etcd
            if not head.startswith(self.PREFACE):
                with self._lock:
                    self.http_requests += 1
            if mode == "forward":
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                self._keep(upstream)
                upstream.sendall(head)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), name="gwproxy-pump", daemon=True).start()
                return
            if mode == "404":
                client.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n"
                               b"Not Found\n")
            elif mode == "503":
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n"
                               b"Content-Length: 14\r\n\r\n<h1>busy</h1>\n")
            elif mode == "garbage":
                client.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00garbage, not HTTP\r\n\r\n")
            elif mode == "script":
                client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(self.script))
                return   # left open (a stream that stalls after its script)
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def chunk(data: bytes) -> bytes:
        """``data`` as one HTTP/1.1 chunk."""
        return b"%x\r\n" % len(data) + data + b"\r\n"

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        with self._lock:
            for s in self._socks:
                s.close()


class ScriptedWatchRegistry(FakeRegistry):
    """A FakeRegistry whose lease watches play ``scripts`` (one list per watch started): a
    ``WatchChunk`` is returned, an exception raised; an exhausted script sets ``idle`` and blocks
    until the watch is cancelled (as a real one does)."""

    def __init__(self, config: str, leases: list[Lease], scripts: list[list[Any]]) -> None:
        super().__init__(config, leases)
        self.scripts = [list(s) for s in scripts]
        self.idle = threading.Event()

    def watch_leases(self, start_revision):  # type: ignore[no-untyped-def]
        script = self.scripts.pop(0) if self.scripts else []
        registry = self

        class Handle:
            def __init__(self) -> None:
                self.cancelled = threading.Event()

            def next(self) -> Any:
                if script:
                    item = script.pop(0)
                    if isinstance(item, BaseException):
                        raise item
                    return item
                registry.idle.set()
                self.cancelled.wait(60)
                raise errors.StoreUnavailable("watch cancelled")

            def cancel(self) -> None:
                self.cancelled.set()
        return Handle()


class FakeClock:
    """Stands in for the ``time`` module of ``reconcile`` (monkeypatched): time moves on request."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def vxlan_lease(i: int, *, mac: str | None = None, ip: str | None = None, typ: str = "vxlan",
                data: str | None = None, net: str = "10.5", v6: int | None = None) -> Lease:
    """Peer ``i``: ``<net>.<i>.0/24`` via 198.18.0.<i>, VtepMAC 02:00:00:00:00:<i>; ``v6`` adds an
    IPv6 subnet (another identity for the same IPv4 subnet)."""
    from ipaddress import IPv6Network
    if data is None and typ == "vxlan":
        data = json.dumps({"VNI": 1, "VtepMAC": mac or f"02:00:00:00:00:{i:02x}"}, separators=(",", ":"))
    return Lease(N(f"{net}.{i}.0/24"), LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), backend_type=typ,
                                                   backend_data=data),
                 ipv6_subnet=None if v6 is None else IPv6Network(f"fd00:5:{v6:x}::/64"))


def lease_ops() -> Any:
    """A hypothesis strategy: a list of batches, each a list of (ADDED|REMOVED, lease) over a small
    pool of subnets, so that adds, changes of MAC / public IP, removals, duplicates (the same IPv4
    subnet under two identities, two peers with one MAC), leases moving to another backend type
    and bad BackendData all occur."""
    from hypothesis import strategies as st

    macs = st.sampled_from(["02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"])
    datas = st.one_of(st.none(), st.sampled_from(['{"VNI":1,"VtepMAC":"nope"}', "[1,2]", "{", '{"VNI":1}']))

    @st.composite
    def one(draw: Any) -> LeaseEvent:
        i = draw(st.integers(1, 7))
        v6 = draw(st.sampled_from([None, None, None, 1, 2]))
        typ = draw(st.sampled_from(["vxlan", "vxlan", "vxlan", "vxlan", "host-gw"]))
        bad = draw(datas) if typ == "vxlan" and draw(st.integers(0, 9)) == 0 else None
        lz = vxlan_lease(i, mac=draw(macs), ip=f"198.18.{draw(st.integers(0, 1))}.{draw(st.integers(2, 4))}",
                         typ=typ, data=bad, v6=v6)
        kind = draw(st.sampled_from([EventType.ADDED, EventType.ADDED, EventType.REMOVED]))
        return LeaseEvent(kind, lz)

    return st.lists(st.lists(one(), min_size=1, max_size=6), min_size=1, max_size=8)


# ---- test certificates (openssl) ---------------------------------------------------------------

def make_pki(d: Path, certs: tuple[tuple[str, str, str], ...], cas: tuple[str, ...] = ("ca", "other-ca")) -> Path:
    """Make test CAs (``<ca>.crt``/``.key``, CN flannel-test-<ca>) and certificates in ``d`` with openssl.

    ``certs``: (name, signing CA, openssl extension lines), e.g. ``("server", "ca",
    "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")`` → ``server.crt``/``server.key``.
    Valid two days: long enough for any run, short enough that nothing outlives it."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)
    for ca in cas:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN=flannel-test-{ca}")
    for name, ca, ext in certs:
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=flannel-test-{name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return d


# ---- etcd with auth and short-lived tokens -------------------------------------------------------

@contextlib.contextmanager
def short_token_etcd(directory: Path, config_key: str, config: str, users: tuple[str, ...]) -> Iterator[EtcdServer]:
    """A fresh etcd whose simple auth tokens expire after 1 s, holding ``config`` at ``config_key``,
    with ``users`` (``"name:password"``; the first must be root) added and auth enabled. Stopped on exit.

    Why 1 s: a test of "the client authenticates again by itself" needs a token that expires during it."""
    srv = EtcdServer(str(directory), extra_args=["--auth-token", "simple", "--auth-token-ttl", "1"])
    srv.start()
    try:
        srv.etcdctl("put", config_key, config)
        for user in users:
            srv.etcdctl("user", "add", user)
        srv.etcdctl("auth", "enable")
        yield srv
    finally:
        srv.close()
