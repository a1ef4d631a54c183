"""The wireguard backend's port to the kernel and to wireguard-go: the only module that creates,
configures, reads or deletes a WireGuard device.

Two implementations behind one interface (``WGDevice``):

* ``KernelDevice`` – the kernel's WireGuard: the link is created through the netlink port
  (``ip link add <dev> type wireguard``) and configured with the ``wg`` tool (wireguard-tools),
  which speaks WireGuard's generic netlink family;
* ``UserspaceDevice`` – ``wireguard-go -f <dev>`` as a child process (Debian package
  ``wireguard-go``), configured over its UAPI socket ``<uapi_dir>/<dev>.sock`` with the text
  protocol of ``uapi.py``.

``create`` tries the kernel first and falls back to wireguard-go when the kernel has no WireGuard
(``FLANNEL_WIREGUARD_IMPL=kernel|wireguard-go`` forces one); the caller logs which one runs.
``read_status`` reads any existing device's peers without owning it (for ``flannelctl doctor``
and metrics).

**The UAPI directory.** wireguard-go always puts its socket in ``/var/run/wireguard``, one
directory shared by every network namespace, so two agents on one machine (the lab, tests) would
collide on ``flannel-wg.sock``. With ``uapi_dir`` (env ``FLANNEL_WIREGUARD_UAPI_DIR``) set to
another directory, wireguard-go is started in a private mount namespace (``unshare --mount``)
where that directory is bind-mounted over ``/var/run/wireguard``; the agent talks to
``<uapi_dir>/<dev>.sock``. Production hosts run one agent and keep the default, so ``wg show``
works as usual.
"""

from __future__ import annotations

import abc
import collections
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from flannel import errors
from flannel.backends.routed.netlink import Netlink
from flannel.backends.wireguard import uapi
from flannel.backends.wireguard.model import DeviceStatus, SetRequest

log = logging.getLogger(__name__)

KERNEL = "kernel"
USERSPACE = "wireguard-go"
AUTO = "auto"
IMPL_ENV = "FLANNEL_WIREGUARD_IMPL"
UAPI_DIR_ENV = "FLANNEL_WIREGUARD_UAPI_DIR"
DEFAULT_UAPI_DIR = "/var/run/wireguard"
WIREGUARD_GO = "wireguard-go"
START_TIMEOUT = 30.0       # generous: a loaded machine can be slow to start a Go binary
UAPI_TIMEOUT = 10.0

# runs wireguard-go with <dir> bind-mounted over /var/run/wireguard, in a mount namespace of its own
_PRIVATE_DIR_WRAPPER = ('mkdir -p /var/run/wireguard && mount --bind "$1" /var/run/wireguard && shift '
                        '&& exec "$@"')


def socket_path(name: str, uapi_dir: str = DEFAULT_UAPI_DIR) -> str:
    return os.path.join(uapi_dir, f"{name}.sock")


class WGDevice(abc.ABC):
    """One WireGuard device we created (and delete in ``close``)."""

    implementation: str = ""

    def __init__(self, name: str, nl: Netlink) -> None:
        self.name = name
        self.nl = nl

    @property
    def index(self) -> int | None:
        idx: int | None = self.nl.link_index(self.name)
        return idx

    @abc.abstractmethod
    def set(self, req: SetRequest) -> None:
        """Apply one configuration transaction. :raises errors.BackendError:."""

    @abc.abstractmethod
    def status(self) -> DeviceStatus:
        """Listen port, our public key and every peer with its last handshake. :raises errors.BackendError:."""

    def alive(self) -> bool:
        """The device still exists (and, for wireguard-go, its process runs)."""
        return self.index is not None

    def close(self) -> None:
        """Delete the device (flannel removes its wireguard devices on shutdown, reference §9.4)."""
        _delete_link(self.nl, self.name)


# --------------------------------------------------------------------------------------------
# wireguard-go over UAPI
# --------------------------------------------------------------------------------------------

class UAPIClient:
    """One request per connection to a UAPI socket (wireguard-go's ``/var/run/wireguard/<dev>.sock``)."""

    def __init__(self, path: str, name: str, timeout: float = UAPI_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout

    def request(self, data: bytes) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.path)
                s.sendall(data)
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            raise errors.BackendError(f"wireguard UAPI {self.path}: {e}") from e
        return buf.decode("ascii", errors="replace")

    def get(self) -> DeviceStatus:
        try:
            return uapi.parse_get(self.request(uapi.GET_REQUEST), self.name)
        except uapi.ProtocolError as e:
            raise errors.BackendError(f"wireguard UAPI {self.path}: {e}") from e

    def set(self, req: SetRequest) -> None:
        answer = self.request(uapi.encode_set(req))
        try:
            err = uapi.parse_errno(answer)
        except uapi.ProtocolError as e:
            raise errors.BackendError(f"wireguard UAPI {self.path}: {e}") from e
        if err != 0:
            raise errors.BackendError(f"wireguard UAPI set on {self.name} failed: errno {err} "
                                      f"({os.strerror(abs(err)) if abs(err) < 200 else 'unknown'})")


class UserspaceDevice(WGDevice):
    """``wireguard-go -f <name>`` as our child; its output goes to our log."""

    implementation = USERSPACE

    def __init__(self, name: str, nl: Netlink, proc: subprocess.Popen[bytes], uapi_dir: str) -> None:
        super().__init__(name, nl)
        self.proc = proc
        self.uapi_dir = uapi_dir
        self.client = UAPIClient(socket_path(name, uapi_dir), name)
        self.output: collections.deque[str] = collections.deque(maxlen=20)
        self._pump = threading.Thread(target=self._read_output, name=f"{name}-wireguard-go", daemon=True)
        self._pump.start()

    @classmethod
    def start(cls, name: str, nl: Netlink, *, uapi_dir: str = DEFAULT_UAPI_DIR,
              binary: str = WIREGUARD_GO, timeout: float = START_TIMEOUT) -> UserspaceDevice:
        """Start wireguard-go and wait until its TUN device and UAPI socket answer.

        :raises errors.BackendError: binary missing, exited early (its output in the message), timeout.
        """
        exe = shutil.which(binary)
        if exe is None:
            raise errors.BackendError(f"the kernel has no WireGuard and {binary} is not installed "
                                      "(Debian package wireguard-go)")
        uapi_dir = os.path.abspath(uapi_dir)
        cmd = [exe, "-f", name]
        if os.path.realpath(uapi_dir) != os.path.realpath(DEFAULT_UAPI_DIR):
            os.makedirs(uapi_dir, mode=0o700, exist_ok=True)
            cmd = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", _PRIVATE_DIR_WRAPPER, "sh",
                   uapi_dir, *cmd]
        sock = socket_path(name, uapi_dir)
        _wait_socket_free(sock, name)
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1",
                   LOG_LEVEL="verbose" if log.isEnabledFor(logging.DEBUG) else "error")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        except OSError as e:
            raise errors.BackendError(f"cannot start {binary}: {e}") from e
        dev = cls(name, nl, proc, uapi_dir)
        try:
            dev._wait_ready(timeout)
        except BaseException:
            dev.close()
            raise
        return dev

    def _wait_ready(self, timeout: float) -> None:
        """Until our TUN exists and the socket answers (a stale socket file is replaced by
        wireguard-go itself; one still served by someone else was refused before we started)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._pump.join(2)
                out = " | ".join(self.output) or "no output"
                hint = f"; another agent on this machine? set {UAPI_DIR_ENV}" if "in use" in out else ""
                raise errors.BackendError(f"wireguard-go for {self.name} exited with {self.proc.returncode}: "
                                          f"{out}{hint}")
            if self.nl.link_index(self.name) is not None and os.path.exists(self.client.path):
                try:
                    self.client.get()
                    return
                except errors.BackendError as e:
                    last = e
            time.sleep(0.05)
        raise errors.BackendError(f"wireguard-go for {self.name} not ready after {timeout:.0f}s "
                                  f"({last or 'no device/socket'}); output: {' | '.join(self.output) or 'none'}")

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.output.append(line)
                log.info("wireguard-go[%s]: %s", self.name, line)

    def set(self, req: SetRequest) -> None:
        self.client.set(req)

    def status(self) -> DeviceStatus:
        return self.client.get()

    def alive(self) -> bool:
        return self.proc.poll() is None and super().alive()

    def close(self) -> None:
        """Delete the TUN device (wireguard-go then exits by itself and removes its socket); a
        process that does not exit within 5 s is terminated, then killed — ours, by handle."""
        try:
            _delete_link(self.nl, self.name)
        except errors.BackendError as e:
            log.warning("deleting %s: %s", self.name, e)
        for sig_fn in (None, self.proc.terminate, self.proc.kill):
            if sig_fn is not None:
                sig_fn()
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        self._pump.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --------------------------------------------------------------------------------------------
# Kernel WireGuard through the wg tool
# --------------------------------------------------------------------------------------------

class WgTool:
    """``wg`` (wireguard-tools). ``argv`` is the command prefix (a test may wrap it)."""

    def __init__(self, argv: Sequence[str] = ("wg",)) -> None:
        self.argv = list(argv)

    def run(self, args: Sequence[str], *, pass_fds: Sequence[int] = ()) -> str:
        try:
            res = subprocess.run([*self.argv, *args], capture_output=True, text=True, timeout=30,
                                 pass_fds=tuple(pass_fds))
        except (OSError, subprocess.SubprocessError) as e:
            raise errors.BackendError(f"wg {' '.join(args[:2])}: {e}") from e
        if res.returncode != 0:
            raise errors.BackendError(f"wg {' '.join(args[:2])} failed ({res.returncode}): "
                                      f"{(res.stderr or res.stdout).strip()[:500]}")
        return res.stdout

    def status(self, name: str) -> DeviceStatus:
        try:
            return uapi.parse_wg_dump(self.run(["show", name, "dump"]), name)
        except uapi.ProtocolError as e:
            raise errors.BackendError(str(e)) from e

    def set(self, name: str, req: SetRequest) -> None:
        """``wg set``; keys go through memfds (``/dev/fd/N``), never through files on disk."""
        fds: list[int] = []
        try:
            key_path = _memfd(req.private_key, fds) if req.private_key else None
            psk = next((p.preshared_key for p in req.upsert if p.preshared_key), None)
            psk_path = _memfd(psk, fds) if psk else None
            if any(p.preshared_key not in (None, psk) for p in req.upsert):
                raise errors.BackendError("wg set: peers with different preshared keys in one request")
            self.run(uapi.wg_set_args(name, req, psk_path=psk_path, key_path=key_path), pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)


def _wait_socket_free(path: str, name: str, timeout: float = 5.0) -> None:
    """A UAPI socket that still answers belongs to a running wireguard-go: our previous one exits
    within moments of its device being deleted; anything else is another agent's, which we must
    never configure. :raises errors.BackendError: still served after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(path)
        except OSError:
            return   # absent or stale (nobody listening): wireguard-go takes it over
        if time.monotonic() >= deadline:
            raise errors.BackendError(f"{path} is served by another wireguard-go (another agent on this machine, in "
                                      f"another network namespace?); refusing to start one for {name}; give each "
                                      f"agent its own directory with {UAPI_DIR_ENV}")
        time.sleep(0.1)


def _memfd(text: str, fds: list[int]) -> str:
    fd = os.memfd_create("flannel-wg", 0)
    fds.append(fd)
    os.write(fd, text.encode("ascii"))
    return f"/dev/fd/{fd}"


class KernelDevice(WGDevice):
    """The kernel's WireGuard link, configured with ``wg``."""

    implementation = KERNEL

    def __init__(self, name: str, nl: Netlink, wg: WgTool | None = None) -> None:
        super().__init__(name, nl)
        self.wg = wg or WgTool()

    def set(self, req: SetRequest) -> None:
        if req.replace_peers:   # `wg set` has no replace-peers: remove the others explicitly
            keep = {p.public_key for p in req.upsert}
            extra = tuple(p.public_key for p in self.status().peers if p.public_key not in keep)
            req = replace(req, replace_peers=False, remove=tuple(dict.fromkeys((*req.remove, *extra))))
        if not req.empty:
            self.wg.set(self.name, req)

    def status(self) -> DeviceStatus:
        return self.wg.status(self.name)


# --------------------------------------------------------------------------------------------
# Creation and read-only access
# --------------------------------------------------------------------------------------------

def create(name: str, nl: Netlink, *, mtu: int, impl: str = AUTO, uapi_dir: str = DEFAULT_UAPI_DIR,
           wireguard_go: str = WIREGUARD_GO) -> WGDevice:
    """Create ``name`` afresh: an existing link of that name is deleted first (flannel always
    re-creates, reference §9.4). Kernel WireGuard when the kernel has it (unless ``impl`` says
    otherwise), else wireguard-go; MTU set either way.

    :raises errors.BackendError: neither implementation could create the device.
    :raises errors.ConfigError: unknown ``impl``.
    """
    if impl not in (AUTO, KERNEL, USERSPACE):
        raise errors.ConfigError(f"{IMPL_ENV}={impl!r}: must be {AUTO}, {KERNEL} or {USERSPACE}")
    if nl.link_index(name) is not None:
        log.warning('"%s" already exists; recreating device', name)
        _delete_link(nl, name)
    dev: WGDevice
    if impl in (AUTO, KERNEL):
        if nl.add_wireguard(name, mtu):
            dev = KernelDevice(name, nl)
            if shutil.which("wg") is None:
                dev.close()
                raise errors.BackendError("kernel WireGuard needs the wg tool to configure it "
                                          "(Debian package wireguard-tools)")
            return dev
        if impl == KERNEL:
            raise errors.BackendError(f"cannot create {name}: the kernel has no WireGuard ({IMPL_ENV}=kernel)")
        log.info("the kernel has no WireGuard (ip link add type wireguard: not supported); using %s", wireguard_go)
    dev = UserspaceDevice.start(name, nl, uapi_dir=uapi_dir, binary=wireguard_go)
    idx = dev.index
    if idx is None:
        dev.close()
        raise errors.BackendError(f"{name} vanished right after wireguard-go created it")
    nl.set_mtu(idx, mtu)
    return dev


def _delete_link(nl: Netlink, name: str) -> None:
    idx = nl.link_index(name)
    if idx is None:
        return
    try:
        nl.delete_link(idx)
    except errors.BackendError:
        if nl.link_index(name) is not None:
            raise


def read_status(name: str, *, uapi_dir: str = DEFAULT_UAPI_DIR, wg: WgTool | None = None) -> DeviceStatus:
    """The peers of an existing device, whichever implementation runs it (wireguard-go if its UAPI
    socket exists, else the kernel through ``wg``). For diagnostics (``flannelctl doctor``).

    :raises errors.BackendError: no such device, or it cannot be read.
    """
    sock = socket_path(name, uapi_dir)
    if os.path.exists(sock):
        return UAPIClient(sock, name).get()
    return (wg or WgTool()).status(name)
