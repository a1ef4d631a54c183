#!/usr/bin/env python3
"""Control plane at scale, measured on a real agent: CPU per lease event, event → kernel latency,
cold start against ``ip -batch``, RSS and idle CPU, at N = 0 / 1000 / 5000 / 10000 peers.

Everything runs in one isolated network namespace this script creates (``<prefix>agent``: a veth
``eth0`` with 198.18.0.1/15, no route out), which the script itself enters before it starts any
thread: a real etcd on 127.0.0.1 there, a real agent process (``python -m flannel``, vxlan
backend) there, and the fake peers' leases written to that etcd (public IPs 198.19.x.y, never
answered). The script observes the kernel through its own netlink socket in that namespace
(route notifications: when a peer's route appears or goes) and the agent's CPU through
``/proc/<pid>/task/*/schedstat`` (nanoseconds, all threads). The ``ip -batch`` reference runs
in a second namespace in the same run, with the same entries.

Measured per N:
* ``ready``   – agent start → subnet.env written (includes the store list during allocation);
* ``cold``    – agent start → all N routes in the kernel (fresh kernel: flannel.1 deleted before);
  ``(cold(N) − ready(0)) / ip-batch(N)`` is the ratio issue 9 asks for (≤ 1.2); with
  ``--cold-runs K`` the median of K starts (one start varies by ±0.1 s on a shared machine);
* ``rss``     – VmRSS after the cold start;
* ``event``   – agent CPU per single lease event (adds then deletes, one at a time, each waited
  for in the kernel), and the put → route latency p50/p99;
* ``idle``    – agent CPU per second over ``--idle`` seconds with nothing happening, starting
  ``--settle`` seconds (25) after the events, once the agent has closed its idle gRPC channel (the
  periodic full resync runs every 30 min ±20 %; its cost is measured separately, ``resync``, and
  added amortised). CPU is summed per thread between two snapshots, so a thread that exits in
  between does not subtract its lifetime's CPU (threads that exited are listed).

Usage (root):  .venv/bin/python bench/agent_scale.py [--n 0,1000,5000,10000] [--events 100] [--idle 30] [--cold-runs 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from flannel.backends.routed import rtnl
from flannel.backends.routed.reconcile import RESYNC_INTERVAL
from flannel.lab.etcd import EtcdServer
from flannel.lab.netns import NetNS, cleanup_prefix, run, run_prefix
from flannel.lease import LeaseAttrs

LOCAL = "198.18.0.1"
PREFIX = "/coreos.com/network"
#: the paired baseline's prefix: the same config, no peers (``--cold-runs``)
EMPTY_PREFIX = "/bench-empty/network"
CONFIG = {"Network": "10.0.0.0/8", "SubnetLen": 24, "SubnetMin": "10.0.1.0", "SubnetMax": "10.0.255.0",
          "Backend": {"Type": "vxlan"}}


def peer(i: int) -> tuple[IPv4Network, LeaseAttrs]:
    """Peer i (1-based): subnet 10.<1 + i // 256>.<i % 256>.0/24, public IP 198.19.<i // 256>.<i % 256>."""
    hi, lo = 1 + i // 256, i % 256
    mac = f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
    return (IPv4Network(f"10.{hi}.{lo}.0/24"),
            LeaseAttrs(public_ip=IPv4Address(f"198.19.{i // 256}.{i % 256}"), backend_type="vxlan",
                       backend_data=f'{{"VNI":1,"VtepMAC":"{mac}"}}'))


def enter_netns(name: str) -> int:
    """Move this (still single-threaded) process into the namespace: every thread and child
    started afterwards lives there too (grpc's threads included). Returns an fd of the namespace
    we came from (``leave_netns``): the cleanup must not run from inside the namespace it deletes,
    or it would kill this very process as one of the namespace's."""
    libc = ctypes.CDLL(None, use_errno=True)
    orig = os.open("/proc/self/ns/net", os.O_RDONLY)
    with open(f"/run/netns/{name}") as f:
        if libc.setns(f.fileno(), 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
    return orig


def leave_netns(orig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(orig, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns(back)")
    os.close(orig)


# ---- observation ----------------------------------------------------------------------------------

def _in_10_8(version: int, dst: int, dst_len: int) -> bool:
    return version == 4 and dst_len == 24 and dst >> 24 == 10


class RouteWatch:
    """Route notifications in our namespace: when each of our peer routes (protocol 152, an IPv4 /24)
    appeared / went.

    The reader must keep up with the kernel: a notification's time is when we read it (netlink
    gives no kernel timestamp), and a cold start makes 5000 of them in a fraction of a second on a
    machine whose two cores the agent is using. So the reader thread only drains the socket, stamps
    each datagram and counts our routes from four header bytes; parsing the destinations (for
    ``added`` / ``gone``) waits until someone asks. (Before, it parsed every route and woke the
    waiting thread per datagram, and fell up to 0.2 s behind a 5000-peer cold start.)"""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)      # SO_RCVBUFFORCE: a cold start is bursty
        self.sock.bind((0, rtnl.RTMGRP_IPV4_ROUTE))
        self._added: dict[IPv4Network, float] = {}
        self._gone: dict[IPv4Network, float] = {}
        self._raw: list[tuple[float, int, bytes, int, int]] = []   # (when read, type, data, off, end)
        self._parsed = 0
        self.count = 0
        self.lost = 0
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        recv, now = self.sock.recv, time.monotonic
        new, gone = rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE
        while not self._stop:
            r, _, _ = select.select([self.sock], [], [], 0.2)
            if not r:
                continue
            got: list[tuple[float, bytes]] = []
            while True:
                try:
                    got.append((now(), recv(1 << 16, socket.MSG_DONTWAIT)))
                except BlockingIOError:
                    break
                except OSError:
                    self.lost += 1
                    break
            with self.cond:
                for when, data in got:
                    off, size = 0, len(data)
                    while off + 28 <= size:
                        n = int.from_bytes(data[off:off + 4], sys.byteorder)
                        if n < 16:
                            break
                        kind = int.from_bytes(data[off + 4:off + 6], sys.byteorder)
                        # rtmsg: family, dst_len, ..., protocol at +5: our peer routes only
                        if kind in (new, gone) and data[off + 16] == socket.AF_INET \
                                and data[off + 17] == 24 and data[off + 21] == 152:
                            self._raw.append((when, kind, data, off, off + n))
                            self.count += 1 if kind == new else -1
                        off += (n + 3) & ~3
                self.cond.notify_all()

    def _parse(self) -> None:
        with self.cond:
            raw, i = self._raw, self._parsed
            while i < len(raw):
                when, kind, data, off, end = raw[i]
                i += 1
                m = rtnl.parse_route(data, off, end, _in_10_8)
                if m is None or m.dst is None:
                    continue
                (self._added if kind == rtnl.RTM_NEWROUTE else self._gone)[m.dst] = when   # type: ignore[index]
            self._parsed = i

    @property
    def added(self) -> dict[IPv4Network, float]:
        self._parse()
        return self._added

    @property
    def gone(self) -> dict[IPv4Network, float]:
        self._parse()
        return self._gone

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def reset(self) -> None:
        with self.cond:
            self._added.clear()
            self._gone.clear()
            self._raw.clear()
            self._parsed = 0
            self.count = 0

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns), plus reaped children (ticks → ns)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    children = int(fields[13]) + int(fields[14])      # cutime + cstime
    return total + children * (10 ** 9 // os.sysconf("SC_CLK_TCK"))


def wakeups(pid: int) -> int:
    """Context switches of every thread of ``pid`` (voluntary + involuntary): each is a thread
    that woke up (or was preempted), so over an idle period it counts the wake-ups of polls."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                total += sum(int(ln.split()[1]) for ln in f if "ctxt_switches:" in ln)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def threads(pid: int) -> dict[str, tuple[str, int, int]]:
    """tid → (name, CPU ns, context switches) of every thread of ``pid`` (Python threads are all
    named after the process; gRPC's C threads have names of their own)."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                cpu = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{t}/status") as f:
                switches = sum(int(ln.split()[1]) for ln in f if "ctxt_switches:" in ln)
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[t] = (name, cpu, switches)
    return out


def idle_by_thread(before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]],
                   seconds: float) -> list[tuple[str, float, float]]:
    """(thread, CPU ms/s, wake-ups/s) over the idle period, busiest first."""
    rows = []
    for tid, (name, cpu, sw) in after.items():
        _, cpu0, sw0 = before.get(tid, (name, 0, 0))
        rows.append((f"{name}/{tid}", (cpu - cpu0) / 1e6 / seconds, (sw - sw0) / seconds))
    return sorted(rows, key=lambda r: (-r[2], -r[1]))


def children_ns(pid: int) -> int:
    """CPU of ``pid``'s reaped children (ticks → ns)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) * (10 ** 9 // os.sysconf("SC_CLK_TCK"))


def cpu_between(before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]]) -> tuple[int, int]:
    """(CPU ns, context switches) of the threads between two ``threads`` snapshots. Per thread, so
    that a thread that exits in between (gRPC's, when the agent closes its idle channel) does not
    take its whole lifetime's CPU out of the total, as a difference of two ``cpu_ns`` sums would;
    what an exiting thread spent between the first snapshot and its exit is not counted."""
    cpu = sw = 0
    for tid, (_name, c, w) in after.items():
        _, c0, w0 = before.get(tid, ("", 0, 0))
        cpu += c - c0
        sw += w - w0
    return cpu, sw


def exited(before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]]) -> list[str]:
    return sorted(f"{name}/{tid}" for tid, (name, _, _) in before.items() if tid not in after)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---- the agent ------------------------------------------------------------------------------------

class Agent:
    def __init__(self, workdir: Path, endpoint: str, extra: Sequence[str] = (), prefix: str = PREFIX) -> None:
        self.workdir = workdir
        self.subnet_file = workdir / "subnet.env"
        self.log = workdir / "agent.log"
        self.args = [sys.executable, "-m", "flannel", f"--etcd-endpoints={endpoint}", f"--etcd-prefix={prefix}",
                     "--iface=eth0", f"--subnet-file={self.subnet_file}", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        self.subnet_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 120) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.subnet_file.exists():
                return time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.002)
        raise RuntimeError("agent not ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# ---- the reference: ip -batch / bridge -batch --------------------------------------------------------

def ip_batch_seconds(prefix: str, n: int, *, nexthops: bool = False) -> tuple[float, float]:
    """(wall, CPU) of ``bridge -batch`` + ``ip -batch`` of the same entries in a fresh namespace.

    ``nexthops``: each route through its own nexthop object, as the agent programs IPv4 routes
    (``ip nexthop replace id K via G dev flannel.1 onlink proto 152`` + ``ip route replace S nhid K
    proto 152``); without, plain routes with their own gateway, as Go flannel programs them."""
    ns = NetNS(f"{prefix}ref")
    try:
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ns.ip("addr", "add", f"{LOCAL}/15", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", LOCAL, "dev", "eth0", "nolearning")
        ns.ip("addr", "add", "10.0.1.0/32", "dev", "flannel.1")
        ns.ip("link", "set", "flannel.1", "up")
        fdb, ip = [], []
        for i in range(1, n + 1):
            net, attrs = peer(i)
            mac = json.loads(attrs.backend_data or "{}")["VtepMAC"]
            g = net.network_address
            fdb.append(f"fdb replace {mac} dev flannel.1 dst {attrs.public_ip} self permanent\n")
            ip.append(f"neigh replace {g} lladdr {mac} dev flannel.1 nud permanent\n")
            if nexthops:
                ip.append(f"nexthop replace id {int(g)} via {g} dev flannel.1 onlink proto 152\n")
                ip.append(f"route replace {net} nhid {int(g)} proto 152\n")
            else:
                ip.append(f"route replace {net} via {g} dev flannel.1 onlink proto 152\n")
        fdb_text, ip_text = "".join(fdb), "".join(ip)
        time.sleep(3)     # let the kernel finish freeing what earlier runs deleted (RCU, per-cpu)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        run("bridge", "-n", ns.name, "-batch", "-", input=fdb_text, timeout=300)
        run("ip", "-n", ns.name, "-batch", "-", input=ip_text, timeout=300)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    finally:
        ns.delete()


# ---- one run ----------------------------------------------------------------------------------------

def populate(reg: Any, have: int, want: int) -> None:
    for i in range(have + 1, want + 1):
        net, attrs = peer(i)
        reg.update_lease(net, None, attrs, None)


def flush_kernel() -> None:
    subprocess.run(["ip", "link", "del", "flannel.1"], capture_output=True)


def measure_events(agent: Agent, watch: RouteWatch, reg: Any, count: int, base: int) -> dict[str, float]:
    """``count`` adds then ``count`` deletes of extra peers, one at a time, each waited for."""
    lat_add, lat_del = [], []
    extra = [peer(base + 20000 + k) for k in range(count)]
    time.sleep(1.0)
    k0, t0s = children_ns(agent.pid), threads(agent.pid)
    for net, attrs in extra:
        t0 = time.monotonic()
        reg.update_lease(net, None, attrs, None)
        if not watch.wait(lambda net=net: net in watch.added, 30):
            raise RuntimeError(f"route {net} never appeared")
        lat_add.append(watch.added[net] - t0)
    for net, _attrs in extra:
        t0 = time.monotonic()
        reg.delete_lease(net, None)
        if not watch.wait(lambda net=net: net in watch.gone, 30):
            raise RuntimeError(f"route {net} never went")
        lat_del.append(watch.gone[net] - t0)
    time.sleep(0.3)
    t1s = threads(agent.pid)
    cpu = (cpu_between(t0s, t1s)[0] + children_ns(agent.pid) - k0) / 1e6 / (2 * count)
    per_thread = [(name, ms_per_s, wake) for name, ms_per_s, wake in idle_by_thread(t0s, t1s, 2 * count)]
    lat = sorted(lat_add + lat_del)
    return {"cpu_ms": cpu, "by_thread": sorted(per_thread, key=lambda r: -r[1]), "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, "max_ms": lat[-1] * 1e3,
            "threads_exited": exited(t0s, t1s)}


def run_n(prefix: str, reg: Any, endpoint: str, workdir: Path, n: int, args: argparse.Namespace,
          watch: RouteWatch) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    flush_kernel()
    watch.reset()
    agent = Agent(workdir, endpoint, args.agent_arg)
    try:
        t0 = agent.start()
        out["ready_s"] = agent.wait_ready() - t0
        if not n:
            out["ready_cpu_s"] = cpu_ns(agent.pid) / 1e9
        if not watch.wait(lambda: watch.count >= n, 300):
            raise RuntimeError(f"only {watch.count} of {n} routes after 300 s")
        out["cold_s"] = (max(watch.added.values()) - t0) if n else out["ready_s"]
        out["cold_cpu_s"] = cpu_ns(agent.pid) / 1e9
        time.sleep(2.0)
        out["rss_mb"] = rss_mb(agent.pid)
        out["event"] = measure_events(agent, watch, reg, args.events, n)
        time.sleep(args.settle)
        k0, t0s, w0 = children_ns(agent.pid), threads(agent.pid), time.monotonic()
        time.sleep(args.idle)
        t1s, seconds = threads(agent.pid), time.monotonic() - w0
        cpu, switches = cpu_between(t0s, t1s)
        out["idle_ms_per_s"] = (cpu + children_ns(agent.pid) - k0) / 1e6 / seconds
        out["idle_wakeups_per_s"] = switches / seconds
        out["idle_by_thread"] = idle_by_thread(t0s, t1s, seconds)
        out["idle_threads_exited"] = exited(t0s, t1s)
        out["rss_after_mb"] = rss_mb(agent.pid)
    finally:
        agent.stop()
    if n and args.cold_runs > 1:
        # One start varies by ±0.1 s here (imports, a busy core), as much as the whole N-dependent
        # part at N = 1000. So: K starts, each followed at once by a 0-peer start (same config, an
        # empty prefix of the same etcd) -- pairs measured at the same moment -- and the medians.
        colds, readies, cold_cpus = [out["cold_s"]], [out["ready_s"]], [out["cold_cpu_s"]]
        base = [baseline_start(workdir, endpoint, args)]
        for _ in range(args.cold_runs - 1):
            flush_kernel()
            ready, cold, cpu = one_start(workdir, endpoint, args, watch=watch, n=n)
            readies.append(ready)
            colds.append(cold)
            cold_cpus.append(cpu)
            base.append(baseline_start(workdir, endpoint, args))
        out["cold_runs"], out["ready_runs"] = colds, readies
        out["cold_s"], out["ready_s"] = statistics.median(colds), statistics.median(readies)
        out["cold_cpu_s"] = statistics.median(cold_cpus)
        out["paired_ready0_runs"] = [w for w, _ in base]
        out["paired_ready0_s"] = statistics.median(w for w, _ in base)
        out["paired_ready0_cpu_s"] = statistics.median(c for _, c in base)
    if not n:   # the baseline everything is compared with: the median of (at least) three starts
        readies, cpus = [out["ready_s"]], [out["ready_cpu_s"]]
        for _ in range(max(3, args.cold_runs) - 1):
            ready, _cold, cpu = one_start(workdir, endpoint, args)
            readies.append(ready)
            cpus.append(cpu)
        out["ready_s"], out["ready_cpu_s"] = statistics.median(readies), statistics.median(cpus)
        out["ready_runs"] = readies
    return out


def one_start(workdir: Path, endpoint: str, args: argparse.Namespace, *, watch: RouteWatch | None = None,
              n: int = 0, prefix: str = PREFIX) -> tuple[float, float, float]:
    """Start an agent and stop it once it is done: (start → ready, start → the last of ``n`` routes
    in the kernel as ``watch`` saw them (ready when ``n`` is 0), the agent's CPU by then)."""
    if watch is not None:
        watch.reset()
    agent = Agent(workdir, endpoint, args.agent_arg, prefix=prefix)
    try:
        t0 = agent.start()
        ready = agent.wait_ready() - t0
        if not n or watch is None:
            return ready, ready, cpu_ns(agent.pid) / 1e9
        if not watch.wait(lambda: watch.count >= n, 300):
            raise RuntimeError(f"only {watch.count} of {n} routes after 300 s")
        return ready, max(watch.added.values()) - t0, cpu_ns(agent.pid) / 1e9
    finally:
        agent.stop()


def baseline_start(workdir: Path, endpoint: str, args: argparse.Namespace) -> tuple[float, float]:
    """One 0-peer start (``EMPTY_PREFIX``) on a flushed kernel: (start → ready, CPU by then)."""
    flush_kernel()
    ready, _cold, cpu = one_start(workdir, endpoint, args, prefix=EMPTY_PREFIX)
    return ready, cpu


def resync_cost_ms(n: int) -> float:
    """CPU of one full reconcile (dump + compare, nothing to write) with n peers, in-process, in
    a scratch namespace: the periodic work, amortised over the resync interval."""
    from flannel.backends.base import ExternalInterface
    from flannel.backends.vxlan import VXLANBackend
    from flannel.config import parse_network_config
    from flannel.lease import Batch, EventType, Lease, LeaseEvent

    class Own:
        def acquire_lease(self, config: object, attrs: LeaseAttrs) -> Lease:
            return Lease(IPv4Network("10.0.1.0/24"), attrs)

        def stored_backend_data(self) -> tuple[None, None]:
            return (None, None)

    idx = socket.if_nametoindex("eth0")
    ext = ExternalInterface("eth0", idx, 1500, IPv4Address(LOCAL), IPv4Address(LOCAL))
    net = VXLANBackend(ext).register_network(config=parse_network_config(json.dumps(CONFIG)), leases=Own())
    try:
        leases = [Lease(*peer(i)) for i in range(1, n + 1)]
        net.step(Batch(tuple(LeaseEvent(EventType.ADDED, lz) for lz in leases), synced=True))
        times = []
        for _ in range(3):
            t0 = time.process_time()
            net.sync_full()
            times.append(time.process_time() - t0)
        return statistics.median(times) * 1e3
    finally:
        net.close()
        flush_kernel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="0,1000,5000,10000", help="peer counts (comma separated)")
    ap.add_argument("--events", type=int, default=100, help="adds (and as many deletes) per N")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement per N")
    ap.add_argument("--settle", type=float, default=25.0,
                    help="seconds to wait after the events before the idle measurement: the agent closes its "
                         "gRPC channel 20 s after its last unary call (steady state)")
    ap.add_argument("--cold-runs", type=int, default=1,
                    help="starts per N for the cold-start figure (their median; the first also measures the rest); "
                         "the 0-peer baseline is the median of as many starts, at least three")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--agent-log", help="copy the agents' log here at the end (e.g. with --agent-arg=-v to see phases)")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="FLAG",
                    help="an extra flag for the agent (repeatable), e.g. --agent-arg=--healthz-port=10256")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.n.split(",")]
    prefix = run_prefix()
    ns = NetNS(f"{prefix}agent")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", f"{LOCAL}/15", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    orig_ns = enter_netns(ns.name)
    workdir = Path(tempfile.mkdtemp(prefix="flannel-agent-bench-"))
    etcd = EtcdServer(data_dir=str(workdir / "etcd"), extra_args=("--quota-backend-bytes", str(1 << 30)))
    results: list[dict[str, Any]] = []
    uptime = [run("uptime").strip()]
    try:
        etcd.start()
        from flannel.subnet_managers.etcd.registry import EtcdRegistry
        reg = EtcdRegistry(endpoints=[etcd.endpoint], prefix=PREFIX)
        reg.put_config(json.dumps(CONFIG))
        empty = EtcdRegistry(endpoints=[etcd.endpoint], prefix=EMPTY_PREFIX)
        empty.put_config(json.dumps(CONFIG))
        empty.close()
        watch = RouteWatch()
        have = 0
        for n in counts:
            populate(reg, have, n)
            have = n
            flush_kernel()      # the reference runs with nothing else programmed, like the agent's cold start
            refs = [ip_batch_seconds(prefix, n)] if n else [(0.0, 0.0)]
            refs_nh = [ip_batch_seconds(prefix, n, nexthops=True)] if n else [(0.0, 0.0)]
            time.sleep(3)
            r = run_n(prefix, reg, etcd.endpoint, workdir, n, args, watch)
            flush_kernel()
            if n:
                refs.append(ip_batch_seconds(prefix, n))
                refs_nh.append(ip_batch_seconds(prefix, n, nexthops=True))
            r["ip_batch_runs"], r["ip_batch_nh_runs"] = refs, refs_nh
            r["ip_batch_s"] = min(w for w, _ in refs)
            r["ip_batch_cpu_s"] = min(c for _, c in refs)
            r["ip_batch_nh_s"] = min(w for w, _ in refs_nh)
            r["ip_batch_nh_cpu_s"] = min(c for _, c in refs_nh)
            r["resync_ms"] = resync_cost_ms(n) if n else 0.0
            results.append(r)
            print(json.dumps(r), flush=True)
        uptime.append(run("uptime").strip())
        watch.close()
        reg.close()
    finally:
        etcd.close()
        if args.agent_log and (workdir / "agent.log").exists():
            shutil.copyfile(workdir / "agent.log", args.agent_log)
        leave_netns(orig_ns)   # the calling thread only; the threads left behind are ours and end with us
        cleanup_prefix(prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    base = next((r for r in results if r["n"] == 0), None)
    print(f"\nload: {uptime[0]}  …  {uptime[-1]}")
    print("| N | ready s | cold s | ip-batch s, plain / nexthop routes | (cold − ready₀) ÷ ip-batch plain, wall / CPU "
          "| ÷ ip-batch nexthop, wall / CPU | RSS MB | CPU/event ms "
          "| event→kernel p50 / p99 ms | idle ms/s | idle wake-ups/s | full resync ms (amortised) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        # ready₀: the paired 0-peer starts of this N when measured (--cold-runs), else the 0-peer row's
        r0 = r.get("paired_ready0_s", base["ready_s"] if base else float("nan"))
        c0 = r.get("paired_ready0_cpu_s", base["ready_cpu_s"] if base else float("nan"))
        ratio = ((r["cold_s"] - r0) / r["ip_batch_s"]) if r["ip_batch_s"] else float("nan")
        ratio_nh = ((r["cold_s"] - r0) / r["ip_batch_nh_s"]) if r["ip_batch_nh_s"] else float("nan")
        cratio = ((r["cold_cpu_s"] - c0) / r["ip_batch_cpu_s"]) if r["ip_batch_cpu_s"] else float("nan")
        cratio_nh = ((r["cold_cpu_s"] - c0) / r["ip_batch_nh_cpu_s"]) if r.get("ip_batch_nh_cpu_s") else float("nan")
        ev = r["event"]
        paired = f" (paired ready₀ {r0:.2f})" if "paired_ready0_s" in r else ""
        print(f"| {r['n']} | {r['ready_s']:.2f} | {r['cold_s']:.2f}{paired} "
              f"| {r['ip_batch_s']:.2f} / {r['ip_batch_nh_s']:.2f} "
              f"| {ratio:.2f}× / {cratio:.2f}× | {ratio_nh:.2f}× / {cratio_nh:.2f}× | {r['rss_mb']:.1f} "
              f"| {ev['cpu_ms']:.2f} "
              f"| {ev['p50_ms']:.1f} / {ev['p99_ms']:.1f} | {r['idle_ms_per_s']:.2f} | {r['idle_wakeups_per_s']:.1f} "
              f"| {r['resync_ms']:.0f} ({r['resync_ms'] / RESYNC_INTERVAL:.2f} ms/s) |")
    for r in results:
        busy = [f"{name} {ms:.2f} ms/s {w:.1f}/s" for name, ms, w in r["idle_by_thread"] if w >= 0.1 or ms >= 0.05]
        print(f"idle by thread at N={r['n']} (wake-ups/s ≥ 0.1 or ≥ 0.05 ms/s): " + "; ".join(busy)
              + (f" (exited meanwhile: {', '.join(r['idle_threads_exited'])})" if r.get("idle_threads_exited") else ""))
        per_event = [f"{name} {ms:.3f} ms {w:.1f}" for name, ms, w in r["event"]["by_thread"] if ms >= 0.01]
        gone = r["event"].get("threads_exited")
        print(f"CPU and wake-ups per event by thread at N={r['n']}: " + "; ".join(per_event)
              + (f" (exited meanwhile: {', '.join(gone)})" if gone else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"uptime": uptime, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
