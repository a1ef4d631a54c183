"""Run a real etcd (Debian's ``etcd-server``) on free loopback ports with a private data dir, or a
multi-member cluster with one member per network namespace (``EtcdCluster``, for fault tests)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flannel.lab.netns import in_netns

ETCD_BIN = os.environ.get("FLANNEL_TEST_ETCD", "/usr/bin/etcd")
ETCDCTL_BIN = os.environ.get("FLANNEL_TEST_ETCDCTL", "/usr/bin/etcdctl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_available() -> bool:
    return Path(ETCD_BIN).exists()


#: where ``EtcdServer(memory=True)`` keeps etcd's WAL and database (a tmpfs), if it exists
MEMORY_DIR = "/dev/shm"


class EtcdServer:
    """One single-member etcd. ``stop()`` keeps the data dir so ``start()`` resumes it."""

    def __init__(self, data_dir: str | None = None, *, host: str = "127.0.0.1", log_path: str | None = None,
                 netns: str | None = None, extra_args: Sequence[str] = (), name: str = "flannel-test",
                 memory: bool = False) -> None:
        """``netns``: run etcd inside that network namespace, listening on ``host`` there (agents in
        other namespaces reach it over the test underlay; the root namespace is not involved).
        ``extra_args``: more etcd flags (e.g. TLS: ``--cert-file ... --client-cert-auth``).
        ``name``: the member name (``EtcdCluster`` sets it and ``initial_cluster``).
        ``memory``: keep etcd's WAL and database on tmpfs (``MEMORY_DIR``; the log stays in
        ``data_dir``), removed by ``close()``. For tests whose leases live a few seconds: on a shared
        machine a disk can hold etcd's fsync for seconds, and every grant and put waits for it, so a
        4 s lease can expire while its renewal waits in etcd. ``stop()``/``start()`` keep the data
        (a restarted process finds it); a crash of the machine does not, which no test needs."""
        self.netns = netns
        self.name = name
        #: ``--initial-cluster`` for a multi-member cluster; None = a cluster of this member alone
        self.initial_cluster: str | None = None
        self.extra_args = tuple(extra_args)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="flannel-etcd-")
        self.host = host
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = log_path or os.path.join(self.data_dir, "etcd.log")
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(self.data_dir, exist_ok=True)
        self._memory_dir: str | None = None
        if memory and os.path.isdir(MEMORY_DIR):
            self._memory_dir = tempfile.mkdtemp(prefix="flannel-etcd-", dir=MEMORY_DIR)
        self.store_dir = os.path.join(self._memory_dir or self.data_dir, "data")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> EtcdServer:
        """Start (or resume, with the same data dir) etcd. ``wait=False`` returns at once: the
        members of a new cluster only become healthy together (see ``EtcdCluster``)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        cmd = [ETCD_BIN, "--name", self.name, "--data-dir", self.store_dir,
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
               "--initial-cluster", cluster, "--log-level", "warn", *self.extra_args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd at {self.endpoint} not healthy after {timeout}s; see {self.log_path}")

    def healthy(self) -> bool:
        if self.netns:
            try:
                self.etcdctl("endpoint", "health", "--command-timeout=1s")
                return True
            except (RuntimeError, subprocess.TimeoutExpired):
                return False
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL etcd (a crashed member: no goodbye to clients or peers); ``start()`` resumes it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def v3(self, path: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One call of etcd's JSON gateway (``/v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/compaction``...),
        from inside ``netns`` when set. Keys and values are bytes and travel base64-encoded, so
        anything can be written (non-UTF-8, megabytes: etcdctl takes values as argv and cannot).

        Use ``b64`` for the ``key``/``value``/``range_end`` fields of ``body``."""
        data = json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.netns:
            with in_netns(self.netns):
                return self._urlopen(req, timeout)
        return self._urlopen(req, timeout)

    @staticmethod
    def _urlopen(req: urllib.request.Request, timeout: float) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                out: dict[str, Any] = json.loads(r.read() or b"{}")
                return out
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"etcd {req.full_url} answered {e.code}: {e.read()[:300]!r}") from None

    def etcdctl(self, *args: str, input: bytes | None = None) -> str:
        """Run etcdctl (API v3) against this server; returns stdout. Raises on failure."""
        env = dict(os.environ, ETCDCTL_API="3")
        cmd = [ETCDCTL_BIN, "--endpoints", self.endpoint, *args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        res = subprocess.run(cmd, input=input,
                             capture_output=True, env=env, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {res.stderr.decode().strip()}")
        return res.stdout.decode()

    def log_tail(self, lines: int = 20) -> str:
        """The end of etcd's log (for a failing test's message: etcd warns about slow disks and
        slow requests there, e.g. "slow fdatasync", "apply request took too long")."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError as e:
            return f"(no etcd log at {self.log_path}: {e})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of etcd's log {self.log_path} ---\n{tail}"

    def close(self) -> None:
        self.stop()
        if self._memory_dir:
            shutil.rmtree(self._memory_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def b64(data: bytes | str) -> str:
    """base64 text of ``data`` (str is UTF-8 encoded) for the JSON gateway (``EtcdServer.v3``)."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class EtcdCluster:
    """A multi-member etcd cluster, each member in its own network namespace (created by the
    caller, e.g. hosts of a ``flannel.lab.topology.Underlay``), so that a member can be killed,
    cut off or restarted on its own. Same ``etcdctl``/``endpoint``/``stop``/``close`` surface as
    ``EtcdServer``; ``endpoint`` lists every member (comma-separated, as ``--etcd-endpoints``).

    :param members: (namespace name, address in it) per member.
    """

    def __init__(self, data_dir: str, members: Sequence[tuple[str, str]]) -> None:
        if len(members) < 1:
            raise ValueError("a cluster needs at least one member")
        self.data_dir = data_dir
        self.members = [EtcdServer(os.path.join(data_dir, f"m{i}"), host=addr, netns=ns, name=f"m{i}",
                                   log_path=os.path.join(data_dir, f"m{i}.log"),
                                   extra_args=("--initial-cluster-token", f"flannel-lab-{os.getpid()}"))
                        for i, (ns, addr) in enumerate(members, 1)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial

    @property
    def endpoint(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_ready(timeout)
        return self

    def member_at(self, endpoint: str) -> EtcdServer:
        return next(m for m in self.members if m.endpoint == endpoint or m.host in endpoint)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per running member endpoint: ``etcdctl endpoint status`` (``leader``, ``raft_term``...)."""
        out = {}
        for m in self.members:
            if not m.running:
                continue
            try:
                st = json.loads(m.etcdctl("endpoint", "status", "-w", "json", "--command-timeout=3s"))[0]["Status"]
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, LookupError):
                continue
            out[m.endpoint] = st
        return out

    def leader(self) -> EtcdServer | None:
        """The member that is the raft leader now (as the members themselves report it)."""
        for ep, st in self.status().items():
            if st["header"]["member_id"] == st["leader"]:
                return self.member_at(ep)
        return None

    def etcdctl(self, *args: str, input: bytes | None = None) -> str:
        """etcdctl against every running member's endpoint (it uses whichever answers)."""
        alive = [m for m in self.members if m.running] or self.members
        env = dict(os.environ, ETCDCTL_API="3")
        cmd = [ETCDCTL_BIN, "--endpoints", ",".join(m.endpoint for m in alive), *args]
        if alive[0].netns:
            cmd = ["ip", "netns", "exec", alive[0].netns, *cmd]
        res = subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {res.stderr.decode().strip()}")
        return res.stdout.decode()

    def v3(self, path: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """``EtcdServer.v3`` on the first running member (any member serves the whole cluster)."""
        member = next((m for m in self.members if m.running), self.members[0])
        return member.v3(path, body, timeout)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def close(self) -> None:
        for m in self.members:
            m.close()
