"""Run a real agent (``python -m flannel``) as a process inside a network namespace.

Used by the integration tests, the lab and the benchmarks. API::

    agent = AgentProcess("h1", netns="ft12ab-h1", workdir=tmp_path,
                         args=["--etcd-endpoints", etcd.endpoint, "--iface", "eth0"],
                         healthz_port=8471)
    agent.start()                  # Popen: ip netns exec <netns> <python> -m flannel <args>
                                   #   --subnet-file <workdir>/<name>.env [--healthz-ip 0.0.0.0 --healthz-port N]
    env = agent.wait_ready(30)     # waits for a *new* subnet.env (and /readyz == 200 if a health port is set);
                                   # returns its KEY=VALUE dict. Raises AgentFailed (with the log tail) if
                                   # the process exits first or the deadline passes.
    agent.subnet()                 # IPv4Network of the lease, from subnet.env (FLANNEL_SUBNET minus 1)
    agent.http_get("/readyz")      # (status, body) from the agent's health server, fetched inside its netns
    agent.debug_leases()           # /debug/leases JSON: {"own": {...}, "remote": [{"subnet": ...}, ...]}
    agent.running                  # still alive?
    code = agent.stop()            # SIGTERM, wait (default 10 s, then SIGKILL + AgentFailed); returns the exit code
    code = agent.wait_exit(10)     # for an agent expected to exit on its own (bad config, full network)
    agent.log_path, agent.log_tail(40), agent.log_text()

``AgentProcess`` is a context manager: leaving the block stops the agent (SIGKILL if SIGTERM does
not work within the deadline). Every process is started by us, in a namespace the caller created,
and is only ever signalled by its own PID.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flannel import subnet_file
from flannel.lab.netns import in_netns


class AgentFailed(AssertionError):
    """The agent exited or missed a deadline; the message carries the tail of its log."""


class AgentProcess:
    def __init__(self, name: str, *, netns: str, workdir: str | os.PathLike[str], args: Sequence[str] = (),
                 healthz_port: int | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable, subnet_file: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.netns = netns
        self.workdir = Path(workdir)
        self.args = list(args)
        self.healthz_port = healthz_port
        self.env = env
        self.python = python
        self.subnet_file = Path(subnet_file) if subnet_file else self.workdir / f"{name}.env"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._before: tuple[int, int] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = ["ip", "netns", "exec", self.netns, self.python, "-m", "flannel", *self.args,
               "--subnet-file", str(self.subnet_file)]
        if self.healthz_port:
            cmd += ["--healthz-ip", "0.0.0.0", "--healthz-port", str(self.healthz_port)]
        return cmd

    def start(self) -> AgentProcess:
        if self.running:
            raise RuntimeError(f"agent {self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._before = self._stamp()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        with open(self.log_path, "ab") as log:
            log.write(f"=== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout: float = 30.0) -> dict[str, str]:
        """Wait until this run has written subnet.env (and /readyz says ready, with a health port)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise AgentFailed(f"agent {self.name} exited with {self.returncode} before it was ready\n"
                                  f"{self.log_tail()}")
            if self._stamp() not in (None, self._before) and self._ready_endpoint():
                return subnet_file.read(self.subnet_file)
            time.sleep(0.1)
        raise AgentFailed(f"agent {self.name} not ready after {timeout:.0f}s\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AgentFailed(f"agent {self.name} still running after {timeout:.0f}s\n{self.log_tail()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the agent and return its exit code; SIGKILL and AgentFailed if it overstays."""
        if self.proc is None:
            raise RuntimeError("not started")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AgentFailed(f"agent {self.name} ignored signal {sig} for {timeout:.0f}s\n"
                                  f"{self.log_tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> AgentProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.running:
                self.stop()
        except AgentFailed:
            pass

    # --- observation -----------------------------------------------------------------------------
    def subnet(self) -> ipaddress.IPv4Network:
        env = subnet_file.read(self.subnet_file)
        return ipaddress.IPv4Interface(env["FLANNEL_SUBNET"]).network

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET from the agent's health server, from inside its namespace."""
        if not self.healthz_port:
            raise RuntimeError(f"agent {self.name} has no health port")
        url = f"http://127.0.0.1:{self.healthz_port}{path}"
        with in_netns(self.netns):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

    def debug_leases(self) -> dict[str, Any]:
        status, body = self.http_get("/debug/leases")
        if status != 200:
            raise AgentFailed(f"/debug/leases answered {status}: {body}")
        return json.loads(body)  # type: ignore[no-any-return]

    def remote_subnets(self) -> set[str]:
        return {r["subnet"] for r in self.debug_leases()["remote"]}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    # --- internals -------------------------------------------------------------------------------
    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.subnet_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def _ready_endpoint(self) -> bool:
        if not self.healthz_port:
            return True
        try:
            return self.http_get("/readyz", timeout=1.0)[0] == 200
        except OSError:
            return False
