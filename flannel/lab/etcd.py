"""Run a real etcd (Debian's ``etcd-server``) on free loopback ports with a private data dir."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ETCD_BIN = os.environ.get("FLANNEL_TEST_ETCD", "/usr/bin/etcd")
ETCDCTL_BIN = os.environ.get("FLANNEL_TEST_ETCDCTL", "/usr/bin/etcdctl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_available() -> bool:
    return Path(ETCD_BIN).exists()


class EtcdServer:
    """One single-member etcd. ``stop()`` keeps the data dir so ``start()`` resumes it."""

    def __init__(self, data_dir: str | None = None, *, host: str = "127.0.0.1", log_path: str | None = None,
                 netns: str | None = None, extra_args: Sequence[str] = ()) -> None:
        """``netns``: run etcd inside that network namespace, listening on ``host`` there (agents in
        other namespaces reach it over the test underlay; the root namespace is not involved).
        ``extra_args``: more etcd flags (e.g. TLS: ``--cert-file ... --client-cert-auth``)."""
        self.netns = netns
        self.extra_args = tuple(extra_args)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="flannel-etcd-")
        self.host = host
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = log_path or os.path.join(self.data_dir, "etcd.log")
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(self.data_dir, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        name = "flannel-test"
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [ETCD_BIN, "--name", name, "--data-dir", os.path.join(self.data_dir, "data"),
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"{name}={peer}", "--log-level", "warn", *self.extra_args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
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

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
