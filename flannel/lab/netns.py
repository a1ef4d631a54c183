"""Network-namespace plumbing for tests, the lab and benchmarks (via iproute2, an independent tool).

Every namespace gets a per-run prefix so parallel runs don't collide, and ``cleanup_prefix``
removes whatever a crashed run left behind. Only namespaces we created are ever touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

_CLONE_NEWNET = 0x40000000


def run(*cmd: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def run_prefix() -> str:
    """A short unique prefix for one run's namespaces, e.g. ``ft3a9c-``."""
    return f"ft{uuid.uuid4().hex[:4]}-"


class NetNS:
    """A named network namespace with loopback up."""

    def __init__(self, name: str) -> None:
        self.name = name
        run("ip", "netns", "add", name)
        self.ip("link", "set", "lo", "up")

    def exec(self, *cmd: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
        return run("ip", "netns", "exec", self.name, *cmd, check=check, timeout=timeout, input=input)

    def ip(self, *args: str, check: bool = True) -> str:
        return run("ip", "-n", self.name, *args, check=check)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` in the namespace; ``kw`` as for Popen (text or bytes as it says)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def delete(self) -> None:
        # kill anything still running inside (only processes in *our* namespace)
        pids = run("ip", "netns", "pids", self.name, check=False).split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        run("ip", "netns", "del", self.name, check=False)

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def veth_pair(a: NetNS, a_if: str, b: NetNS, b_if: str) -> None:
    """Create a veth pair with one end in each namespace (both up)."""
    tmp = f"v{uuid.uuid4().hex[:10]}"
    run("ip", "link", "add", tmp, "type", "veth", "peer", "name", tmp + "p")
    run("ip", "link", "set", tmp, "netns", a.name, "name", a_if)
    run("ip", "link", "set", tmp + "p", "netns", b.name, "name", b_if)
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")


def cleanup_prefix(prefix: str) -> None:
    """Delete every namespace whose name starts with ``prefix`` (leftovers of a crashed run)."""
    for line in run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            ns = NetNS.__new__(NetNS)
            ns.name = name
            ns.delete()


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch *the calling thread* into namespace ``name`` for the block (setns(2)).

    Sockets created inside the block stay in that namespace after it ends, so a test can e.g. open
    a listening socket in the lab's hub namespace and serve it from a thread. Don't start threads
    or clients that open sockets later (grpc) from here: they would be in the root namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as orig, open(f"/run/netns/{name}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(orig.fileno(), _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns(back): {os.strerror(err)}")


def tcp_connections(ns: str, addr: str, port: int) -> list[int]:
    """Local ports of the established TCP connections from namespace ``ns`` to ``addr``:``port``
    (read with ``ss``; IPv4 peers of IPv6 sockets, as gRPC opens them, are included)."""
    out = run("ip", "netns", "exec", ns, "ss", "-Htn", "state", "established",
              "dst", addr, "dport", "=", f":{port}", check=False)
    ports = []
    for line in out.splitlines():
        locals_ = [tok for tok in line.split() if ":" in tok]
        if locals_:
            ports.append(int(locals_[0].rsplit(":", 1)[1]))
    return sorted(set(ports))


class Blackhole:
    """Silently drop one namespace's TCP traffic with a server (``addr``:``port``): what a client
    sees when the server's host vanishes without a reset (a crash, a pulled cable, a load-balancer
    failover). Uses an nftables table of its own in that namespace only (``inet flannel_lab_fault``,
    hooked before everything else), so nothing else's rules are touched.

    ``cut()`` drops everything to and from the server and remembers the connections that were
    open. ``heal()`` lets new connections through; by default the remembered ones stay dead (their
    packets are still dropped, as a replacement host or load balancer that never knew them would),
    so a client only recovers if it notices the dead connection by itself (keepalives, a read
    timeout) and reconnects. ``heal(old_connections=True)`` restores everything. ``close()``
    removes the table.
    """

    TABLE = "flannel_lab_fault"

    def __init__(self, ns: str, addr: str, port: int) -> None:
        self.ns, self.addr, self.port = ns, addr, int(port)
        self.old_ports: list[int] = []

    def _nft(self, script: str) -> None:
        run("ip", "netns", "exec", self.ns, "nft", "-f", "-", input=script)

    def connections(self) -> list[int]:
        """Local ports of this namespace's established TCP connections to the server."""
        return tcp_connections(self.ns, self.addr, self.port)

    def _apply(self, rules_in: list[str], rules_out: list[str]) -> None:
        t = self.TABLE
        lines = [f"table inet {t} {{}}", f"delete table inet {t}", f"table inet {t} {{",
                 "  chain in { type filter hook input priority -400; policy accept;",
                 *[f"    {r}" for r in rules_in], "  }",
                 "  chain out { type filter hook output priority -400; policy accept;",
                 *[f"    {r}" for r in rules_out], "  }", "}"]
        self._nft("\n".join(lines) + "\n")

    def cut(self) -> list[int]:
        """Drop every packet between the namespace and the server; returns the open connections'
        local ports (remembered for ``heal``)."""
        self.old_ports = self.connections()
        self._apply([f"ip saddr {self.addr} tcp sport {self.port} drop"],
                    [f"ip daddr {self.addr} tcp dport {self.port} drop"])
        return self.old_ports

    def heal(self, *, old_connections: bool = False) -> None:
        if old_connections or not self.old_ports:
            self.close()
            return
        ports = ", ".join(str(p) for p in self.old_ports)
        self._apply([f"ip saddr {self.addr} tcp sport {self.port} tcp dport {{ {ports} }} drop"],
                    [f"ip daddr {self.addr} tcp dport {self.port} tcp sport {{ {ports} }} drop"])

    def close(self) -> None:
        run("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", self.TABLE, check=False)

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
