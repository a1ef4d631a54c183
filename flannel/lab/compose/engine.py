"""Which Docker engine the compose lab uses, and the private one it starts when none answers.

Order: ``DOCKER_HOST`` if the operator set it (it must answer; we never start anything then), else
the machine's engine at ``/var/run/docker.sock`` if it answers, else our private engine:

    dockerd --data-root /var/lib/pyflannel/docker --exec-root /run/pyflannel/docker
            -H unix:///run/pyflannel/docker.sock --pidfile /run/pyflannel/dockerd.pid
            --bridge=none --iptables=false --ip-forward=false --ip-masq=false
            --containerd-namespace=pyflannel ...

Why private, and why these flags: starting the machine's ``dockerd`` on ``/var/lib/docker`` would
restart an operator's containers that have a restart policy, and a default engine changes the
machine's network (docker0 and its route, iptables chains, ``ip_forward=1``). The private engine has
its own state directory and changes nothing of the machine's namespace: no default bridge (builds
use ``--network host``), no iptables rules, no sysctls; the compose file's underlay bridge gets no
address on the machine (``inhibit_ipv4``). Nothing but ``scripts/compose`` uses it.

Lifecycle: ``ensure`` starts it; ``stop_if_idle`` (called by ``down``) stops it when no container is
left on it, so ``down`` leaves no process behind. Its data root stays: it is the image cache
(base image, built images, build layers) that makes the next ``up`` take seconds; ``scripts/compose
purge`` deletes it. The machine's engine and one named by ``DOCKER_HOST`` are never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flannel.lab.compose.docker import ComposeError, Docker

log = logging.getLogger(__name__)

SYSTEM_SOCKET = "/var/run/docker.sock"
STATE_DIR = Path("/var/lib/pyflannel")
RUN_DIR = Path("/run/pyflannel")
PRIVATE_SOCKET = RUN_DIR / "docker.sock"
PRIVATE_HOST = f"unix://{PRIVATE_SOCKET}"
PIDFILE = RUN_DIR / "dockerd.pid"
DATA_ROOT = STATE_DIR / "docker"
EXEC_ROOT = RUN_DIR / "docker"
LOG_FILE = STATE_DIR / "dockerd.log"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Engine:
    """The engine in use: how to reach it, where it came from, whether it is our private one."""

    docker: Docker
    origin: str  # "DOCKER_HOST", "system" or "private"
    started: bool = False  # we started it in this call

    @property
    def private(self) -> bool:
        return self.origin == "private"

    def describe(self) -> str:
        where = {"DOCKER_HOST": f"DOCKER_HOST={self.docker.host}", "system": SYSTEM_SOCKET,
                 "private": f"private engine {self.docker.host} (data {DATA_ROOT}, log {LOG_FILE})"}[self.origin]
        return f"{self.docker.server_version()} at {where}" + (" — started now" if self.started else "")


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One process at a time decides to start or stop the private engine."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "engine.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find(*, start: bool = True) -> Engine | None:
    """The engine to use (started if ``start`` and none answers); None if none answers and not ``start``."""
    env_host = os.environ.get("DOCKER_HOST", "")
    if env_host and env_host != PRIVATE_HOST:
        d = Docker(env_host)
        if not d.answers():
            raise ComposeError(f"DOCKER_HOST={env_host} does not answer (unset it to use the machine's engine "
                               "or a private one)")
        return Engine(d, "DOCKER_HOST")
    if os.path.exists(SYSTEM_SOCKET) and not env_host:
        d = Docker(f"unix://{SYSTEM_SOCKET}")
        if d.answers():
            return Engine(d, "system")
    private = Docker(PRIVATE_HOST)
    if PRIVATE_SOCKET.exists() and private.answers():
        return Engine(private, "private")
    if not start:
        return None
    with _lock():
        if PRIVATE_SOCKET.exists() and private.answers():
            return Engine(private, "private")
        _start_private()
    return Engine(private, "private", started=True)


def dockerd_binary() -> str | None:
    return shutil.which("dockerd") or next((p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd")
                                            if os.access(p, os.X_OK)), None)


def _start_private() -> None:
    exe = dockerd_binary()
    if exe is None:
        raise ComposeError("no Docker engine answers and dockerd is not installed (scripts/setup installs "
                           "Debian's docker.io)")
    if os.geteuid() != 0:
        raise ComposeError("no Docker engine answers, and starting one needs root")
    for directory in (STATE_DIR, RUN_DIR, DATA_ROOT, EXEC_ROOT):
        directory.mkdir(parents=True, exist_ok=True)
    _stop_stale()
    cmd = [exe, f"--data-root={DATA_ROOT}", f"--exec-root={EXEC_ROOT}", f"--pidfile={PIDFILE}",
           f"--host={PRIVATE_HOST}", "--bridge=none", "--iptables=false", "--ip-forward=false",
           "--ip-masq=false", "--containerd-namespace=pyflannel",
           "--containerd-plugins-namespace=pyflannel-plugins", "--log-level=warn"]
    log.info("starting a private Docker engine: %s", " ".join(cmd))
    with open(LOG_FILE, "w") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    d = Docker(PRIVATE_HOST)
    while not (PRIVATE_SOCKET.exists() and d.answers(timeout=5)):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            raise ComposeError(f"the private Docker engine did not start (exit {proc.poll()}); its log "
                               f"{LOG_FILE} ends with:\n{_tail(LOG_FILE)}")
        time.sleep(0.3)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def _our_dockerd(pid: int) -> bool:
    """True if ``pid`` is a dockerd serving our private socket (so a recycled PID is never signalled)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"dockerd" and f"--host={PRIVATE_HOST}".encode() in argv


def _pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _our_dockerd(pid) else None


def _stop_stale() -> None:
    """A private dockerd that does not answer (hung, half-started): stop it before starting anew."""
    pid = _pid()
    if pid is not None:
        log.warning("stopping an unresponsive private dockerd (pid %d)", pid)
        _terminate(pid)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while _our_dockerd(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _our_dockerd(pid):
        log.warning("private dockerd (pid %d) did not stop within %.0f s; killing it", pid, STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_if_idle(engine: Engine) -> str:
    """Stop the private engine if no container is left on it; say what happened."""
    if not engine.private:
        return f"engine left running ({engine.origin}: not ours to stop)"
    with _lock():
        left = engine.docker.run("ps", "-aq", check=False).stdout.split()
        if left:
            return f"private engine left running: {len(left)} other container(s) on it"
        pid = _pid()
        if pid is None:
            return "private engine not running"
        _terminate(pid)
        unmounted = _unmount_exec_root()
        left_mounts = f", {unmounted} mount(s) it left unmounted" if unmounted else ""
        return f"private engine stopped (pid {pid}){left_mounts}; image cache kept in {DATA_ROOT}"


def _unmount_exec_root() -> int:
    """dockerd leaves mounts in its exec root after it exits (e.g. ``netns/default``, a bind mount of
    the machine's network namespace); remove them so a stopped engine leaves no mount behind."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return 0
    prefix = str(EXEC_ROOT) + "/"
    points = [line.split()[4] for line in mountinfo.splitlines() if len(line.split()) > 4]
    ours = sorted({p for p in points if p.startswith(prefix)}, key=len, reverse=True)
    for point in ours:
        res = subprocess.run(["umount", point], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            log.warning("cannot unmount %s: %s", point, res.stderr.strip())
    return len(ours)


def running_private() -> Engine | None:
    """The private engine if it runs and answers (for ``status`` / ``down`` without starting one)."""
    d = Docker(PRIVATE_HOST)
    if PRIVATE_SOCKET.exists() and d.answers():
        return Engine(d, "private")
    return None


def purge() -> list[str]:
    """Remove the private engine's state (image cache) — only when it is not running."""
    if _pid() is not None:
        raise ComposeError("the private engine is running: `scripts/compose down` first")
    removed = []
    for d in (DATA_ROOT, EXEC_ROOT):
        if d.exists():
            shutil.rmtree(d)
            removed.append(str(d))
    return removed
