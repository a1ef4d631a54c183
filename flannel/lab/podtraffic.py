"""Traffic between lab pods with nothing but Python: ping matrix, TCP transfer with a content
check, and a continuous pinger that counts every lost echo exactly.

The pod-side programs are small Python scripts run with ``ip netns exec <pod> python3 -c ...`` so
the lab needs no extra tools in the pods (no netcat, no iperf). Why our own pinger rather than
``ping -i 0.05``: iputils' ping, stopped by SIGINT, counts an echo that was in flight at that
moment as lost; ours stops sending first and then waits for the outstanding replies, so "zero lost"
means zero lost.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TCP_PORT = 5201

# Echo server: for every connection read until EOF, reply with the sha256 of what was received.
_SERVER = r"""
import hashlib, socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(128)
print("ready", flush=True)
def serve(c):
    with c:
        c.settimeout(30); h = hashlib.sha256()
        while True:
            b = c.recv(65536)
            if not b: break
            h.update(b)
        c.sendall(h.hexdigest().encode())
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Client: send random bytes to each target, compare the server's digest with our own.
_CLIENT = r"""
import hashlib, json, os, socket, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
out = {}
for dst in sys.argv[3:]:
    data = os.urandom(size)
    try:
        with socket.create_connection((dst, port), timeout=5) as c:
            c.settimeout(15); c.sendall(data); c.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                b = c.recv(4096)
                if not b: break
                reply += b
        out[dst] = "ok" if reply.decode() == hashlib.sha256(data).hexdigest() else "mismatch"
    except OSError as e:
        out[dst] = "error: %s" % e
print(json.dumps(out))
"""

# Continuous pinger: an echo every interval until stdin closes, then wait for stragglers.
_PINGER = r"""
import json, os, select, socket, struct, sys, threading, time
dst, interval, grace = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ident = os.getpid() & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
sent, got = set(), set()
stop = threading.Event()
def rx():
    while True:
        r, _, _ = select.select([s], [], [], 0.1)
        if stop.is_set() and not r and done.is_set(): return
        if not r: continue
        pkt, addr = s.recvfrom(2048)
        hl = (pkt[0] & 0x0F) * 4
        typ, code, _, pid, seq = struct.unpack("!BBHHH", pkt[hl:hl + 8])
        if typ == 0 and pid == ident and addr[0] == dst: got.add(seq)
done = threading.Event()
t = threading.Thread(target=rx, daemon=True); t.start()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
seq = 0; nxt = time.monotonic()
while not stop.is_set():
    seq = (seq + 1) & 0xFFFF
    payload = struct.pack("!d", time.time()) + b"x" * 48
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    hdr = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, seq)
    try:
        s.sendto(hdr + payload, (dst, 0)); sent.add(seq)
    except OSError:
        sent.add(seq)
    nxt += interval
    time.sleep(max(0.0, nxt - time.monotonic()))
end = time.monotonic() + grace
while time.monotonic() < end and not sent <= got: time.sleep(0.05)
done.set(); stop.set(); t.join(2)
lost = sorted(sent - got)
print(json.dumps({"sent": len(sent), "received": len(sent & got), "lost": lost[:50]}), flush=True)
"""


def _python() -> str:
    return sys.executable or "python3"


@dataclass(frozen=True)
class Endpoint:
    """A pod as the traffic helpers see it: the namespace to run in and the address it owns.

    ``enter`` is how to run a command in the pod's network namespace; empty means a named namespace
    of this machine (``ip netns exec <ns>``). The compose lab's pods are namespaces inside
    containers, entered with ``nsenter --net=<path>``. ``python`` is the interpreter to run the
    helpers' scripts with there (default: this one; they need only the standard library).
    """
    name: str
    ns: str
    ip: str
    enter: tuple[str, ...] = ()
    python: str = ""

    def argv(self, *cmd: str) -> list[str]:
        return [*(self.enter or ("ip", "netns", "exec", self.ns)), *cmd]

    def interpreter(self) -> str:
        return self.python or _python()

    def run(self, *cmd: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout, check=check)


def ns_exec(ns: str, *cmd: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout, check=check)


def ping_once(ns: str, dst: str, *, count: int = 2, wait: float = 1.0) -> bool:
    """True if at least one echo reply came back (the first may be spent on ARP in the pod)."""
    return ping_from(Endpoint(ns, ns, ""), dst, count=count, wait=wait)


def ping_from(src: Endpoint, dst: str, *, count: int = 2, wait: float = 1.0) -> bool:
    """``ping_once`` from an endpoint (a namespace here or a pod in a container)."""
    res = src.run("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), dst,
                  timeout=count * wait + 20)
    return res.returncode == 0




def ping_matrix(pods: Sequence[Endpoint], *, workers: int = 8) -> dict[tuple[str, str], bool]:
    """Ping every other pod from every pod, in parallel; {(src, dst): reachable}."""
    pairs = [(a, b) for a in pods for b in pods if a.name != b.name]
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda p: ping_from(p[0], p[1].ip), pairs))
    return {(a.name, b.name): ok for (a, b), ok in zip(pairs, results)}


def format_matrix(pods: Sequence[Endpoint], matrix: dict[tuple[str, str], bool]) -> str:
    names = [p.name for p in pods]
    w = max([len(n) for n in names] + [8])
    lines = ["from \\ to".ljust(w) + " " + " ".join(n.rjust(w) for n in names)]
    for a in names:
        cells = ["-".rjust(w) if a == b else ("ok" if matrix.get((a, b)) else "FAIL").rjust(w) for b in names]
        lines.append(a.ljust(w) + " " + " ".join(cells))
    return "\n".join(lines)


def wait_full_matrix(pods: Sequence[Endpoint], deadline: float) -> dict[tuple[str, str], bool]:
    """Poll the matrix until every pair works or ``deadline`` (monotonic) passes; last matrix."""
    while True:
        m = ping_matrix(pods)
        if all(m.values()) or time.monotonic() >= deadline:
            return m
        time.sleep(0.3)


class TcpServers:
    """One digest-echo server per pod (background processes, stopped by ``close``)."""

    def __init__(self, pods: Iterable[Endpoint], port: int = TCP_PORT) -> None:
        self.port = port
        self.procs: dict[str, subprocess.Popen[str]] = {}
        try:
            for p in pods:
                self.add(p)
        except BaseException:
            self.close()
            raise

    def add(self, pod: Endpoint) -> None:
        proc = subprocess.Popen(pod.argv(pod.interpreter(), "-c", _SERVER, str(self.port)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"tcp server in {pod.ns} did not start: {line!r} {err}")
        self.procs[pod.name] = proc

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        self.procs.clear()

    def __enter__(self) -> TcpServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tcp_transfer(src: Endpoint, dsts: Sequence[Endpoint], *, size: int = 256 * 1024,
                 port: int = TCP_PORT) -> dict[str, str]:
    """Send ``size`` random bytes from ``src`` to each dst's server; {dst name: "ok" | error}."""
    res = src.run(src.interpreter(), "-c", _CLIENT, str(port), str(size), *[d.ip for d in dsts],
                  timeout=30 + 20 * len(dsts))
    if res.returncode != 0:
        raise RuntimeError(f"tcp client in {src.ns} failed: {res.stderr.strip()}")
    by_ip = json.loads(res.stdout)
    return {d.name: by_ip.get(d.ip, "missing") for d in dsts}


def tcp_matrix(pods: Sequence[Endpoint], **kw: int) -> dict[tuple[str, str], str]:
    """Every pod sends to every other pod (servers must be running); {(src, dst): result}."""
    def one(src: Endpoint) -> dict[tuple[str, str], str]:
        out = tcp_transfer(src, [p for p in pods if p.name != src.name], **kw)
        return {(src.name, d): r for d, r in out.items()}
    merged: dict[tuple[str, str], str] = {}
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        for part in ex.map(one, pods):
            merged.update(part)
    return merged


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    lost: tuple[int, ...]


class ContinuousPing:
    """Echo requests every ``interval`` seconds from a pod until ``stop()``; exact loss count."""

    def __init__(self, src: Endpoint, dst: str, *, interval: float = 0.05, grace: float = 2.0) -> None:
        self.src, self.dst = src, dst
        self.proc = subprocess.Popen(src.argv(src.interpreter(), "-c", _PINGER, dst, str(interval), str(grace)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"pinger in {src.ns} did not start: {line!r}")

    def stop(self, timeout: float = 20) -> PingResult:
        out, err = self.proc.communicate("", timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"pinger {self.src.name} → {self.dst} failed: {err.strip()}")
        d = json.loads(out.strip().splitlines()[-1])
        return PingResult(d["sent"], d["received"], tuple(d["lost"]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


IPERF_PORT = 5211  # not TCP_PORT: a digest server may be running in the same pod


def iperf3(src: Endpoint, dst: Endpoint, *, streams: int = 1, seconds: int = 5, port: int = IPERF_PORT) -> float:
    """Gbit/s received in one iperf3 TCP run ``src`` → ``dst`` (a one-off server, bounded by ``timeout``)."""
    srv = subprocess.Popen(dst.argv("timeout", str(seconds + 60), "iperf3", "-s", "-1", "-p", str(port)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while f":{port} " not in dst.run("ss", "-ltnH").stdout:
            if srv.poll() is not None or time.monotonic() > deadline:
                err = srv.stderr.read() if srv.stderr and srv.poll() is not None else ""
                raise RuntimeError(f"iperf3 server in {dst.name} did not start: {err.strip()}")
            time.sleep(0.1)
        res = src.run("iperf3", "-c", dst.ip, "-p", str(port), "-J", "-t", str(seconds), "-P", str(streams),
                      timeout=seconds + 40)
        if res.returncode != 0:
            raise RuntimeError(f"iperf3 {src.name}→{dst.name} failed: {res.stdout[-500:]} {res.stderr.strip()}")
        return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(10)
