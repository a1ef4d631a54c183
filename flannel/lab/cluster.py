"""The lab: a flannel cluster on one machine (``scripts/lab up|down|status``), also used by tests/e2e.

What ``up`` builds (every name starts with the lab prefix, ``flab-`` for the CLI, random in tests):

    <prefix>hub      bridge br0 198.18.0.254/24; etcd listens here (nothing routes out of it)
    <prefix>h1..hN   one "host" each: eth0 198.18.0.N/24 on the hub bridge, one ``flannel`` agent
                     (a real process: ``ip netns exec <host> python -m flannel ...``)
    <prefix>hK-pJ    "pods": eth0 = veth into the host's ``cni0`` bridge, address from the host's
                     subnet.env (FLANNEL_SUBNET + J), default route via the bridge
    <prefix>e1..eM   only with ``etcd_members`` > 1: one etcd member each (198.18.0.241...), agents
                     get every member's endpoint

Files (the lab dir, default /tmp/flannel-lab, ``--dir`` to change it):

    state.json              what ``status`` and ``down`` need from another process (PIDs, names)
    etcd.log, etcd/         etcd's log and data
    <host>/flannel.log      the agent's stdout+stderr
    <host>/subnet.env       the agent's --subnet-file

``down`` stops agents and etcd by PID (SIGTERM, SIGKILL after a deadline; a PID is only signalled
if its command line still names this lab, so a recycled PID is never hit), deletes every namespace
with the lab prefix (which also kills anything left inside) and removes the lab dir. It is
idempotent and also cleans up after a crashed ``up``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flannel import subnet_file
from flannel.lab import podtraffic
from flannel.lab.agent import AgentFailed, AgentProcess
from flannel.lab.etcd import ETCD_BIN, EtcdCluster, EtcdServer
from flannel.lab.kubeapi.kubeconfig import write_kubeconfig
from flannel.lab.netns import NetNS, cleanup_prefix, run
from flannel.lab.topology import Host, Pod, Underlay, add_pod, subnet_env_gateway

log = logging.getLogger(__name__)

DEFAULT_DIR = "/tmp/flannel-lab"
DEFAULT_PREFIX = "flab-"
DEFAULT_NETWORK = "10.244.0.0/16"
ETCD_PREFIX = "/coreos.com/network"
HEALTHZ_PORT = 8471
KUBEAPI_PORT = 6443
CNI_BIN = "/usr/lib/cni"
#: the built-in backends (setup.cfg's ``flannel.backends`` entry points); the lab runs any installed
#: backend plugin, built-in or not (``installed_backends``)
BACKENDS = ("vxlan", "host-gw", "udp", "wireguard", "extension", "alloc")
# the extension lab: host-gw done with shell commands (flannel's Documentation/extension.md example)
EXTENSION_BACKEND = {
    "SubnetAddCommand": 'ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0',
    "SubnetRemoveCommand": 'ip route del "$SUBNET" via "$PUBLIC_IP" dev eth0',
}


class LabError(RuntimeError):
    """The lab could not be built or controlled; the message says what and where to look."""


_LIST_BACKENDS = "import json; from flannel import plugins; print(json.dumps(plugins.available(plugins.BACKENDS)))"


def installed_backends(python: str = sys.executable) -> list[str]:
    """The backend plugins the agents' interpreter finds (entry-point group ``flannel.backends``):
    the built-ins and any third-party plugin installed where it looks (its site-packages, or a
    directory on ``PYTHONPATH``, which the agents inherit). Asked in a child process, as an agent
    would load them, so the answer does not depend on what this process has imported."""
    res = subprocess.run([python, "-c", _LIST_BACKENDS], capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise LabError(f"cannot list the backend plugins of {python}: {res.stderr.strip()[-500:] or 'no output'}")
    names: list[str] = json.loads(lines[-1])
    return names


@dataclass(frozen=True)
class LabConfig:
    hosts: int = 3
    pods_per_host: int = 1
    backend: str = "vxlan"
    subnet_manager: str = "etcd"
    dir: str = DEFAULT_DIR
    prefix: str = DEFAULT_PREFIX
    network: str = DEFAULT_NETWORK
    ip_masq: bool = False
    lease_ttl: int = 0  # seconds; 0 = the agent's default
    agent_args: tuple[str, ...] = ()
    python: str = sys.executable
    agent_timeout: float = 60.0  # generous: a loaded CI machine can be slow; waits end on the condition
    etcd_members: int = 1  # > 1: a cluster, one member per namespace (fault tests kill members)
    subnet_min: str = ""  # SubnetMin / SubnetMax of the network config ("" = flannel's default)
    subnet_max: str = ""

    def network_config(self) -> str:
        backend: dict[str, Any] = {"Type": self.backend}
        if self.backend == "extension":
            backend.update(EXTENSION_BACKEND)
        conf: dict[str, Any] = {"Network": self.network, "Backend": backend}
        if self.subnet_min:
            conf["SubnetMin"] = self.subnet_min
        if self.subnet_max:
            conf["SubnetMax"] = self.subnet_max
        return json.dumps(conf)

    def pod_cidr(self, index: int) -> str:
        """kube mode: the podCIDR the "node-ipam controller" gives host ``index`` (a /24)."""
        net = ipaddress.IPv4Network(self.network)
        if net.prefixlen > 24:
            raise LabError(f"network {net} too small for /24 pod CIDRs")
        return str(net.network_address + index * 256) + "/24"


@dataclass
class AgentState:
    pid: int = 0
    args: list[str] = field(default_factory=list)


@dataclass
class HostState:
    name: str
    ns: str
    ip: str
    index: int
    agent: AgentState = field(default_factory=AgentState)
    subnet: str = ""
    pods: list[dict[str, str]] = field(default_factory=list)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, marker: str, *, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid`` (only if its command line contains ``marker``), SIGKILL after ``timeout``.
    Returns True if it exited by SIGTERM (or was already gone)."""
    if pid <= 0 or marker not in _cmdline(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    while _running(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (we may be its parent and not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def _attach(name: str) -> NetNS:
    """A handle on an existing namespace (NetNS() would create it)."""
    ns = NetNS.__new__(NetNS)
    ns.name = name
    return ns


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Lab:
    """A running (or to-be-started) lab. Tests drive it directly; the CLI re-attaches via state.json."""

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.dir = Path(config.dir).resolve()
        self.underlay: Underlay | None = None
        self.etcd: EtcdServer | EtcdCluster | None = None
        self.etcd_pid = 0
        self.etcd_endpoint = ""
        self.kubeapi_pid = 0
        self.kubeapi_url = ""
        self.kube_token = ""
        self.hosts: dict[str, HostState] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._agents: dict[str, AgentProcess] = {}
        self._next_index = 1

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        state = {"config": {**asdict(self.config), "agent_args": list(self.config.agent_args)},
                 "etcd": {"pid": self.etcd_pid, "endpoint": self.etcd_endpoint},
                 "kubeapi": {"pid": self.kubeapi_pid, "url": self.kubeapi_url, "token": self.kube_token},
                 "next_index": self._next_index,
                 "hosts": {n: asdict(h) for n, h in self.hosts.items()}}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_path)

    @classmethod
    def load(cls, directory: str) -> Lab | None:
        path = Path(directory).resolve() / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise LabError(f"{path}: unreadable lab state ({e}); remove the directory by hand") from e
        cfg = state["config"]
        cfg["agent_args"] = tuple(cfg.get("agent_args", ()))
        lab = cls(LabConfig(**cfg))
        lab.etcd_pid = state["etcd"]["pid"]
        lab.etcd_endpoint = state["etcd"]["endpoint"]
        kube = state.get("kubeapi", {})
        lab.kubeapi_pid, lab.kubeapi_url = kube.get("pid", 0), kube.get("url", "")
        lab.kube_token = kube.get("token", "")
        lab._next_index = state.get("next_index", 1)
        for name, h in state["hosts"].items():
            agent = AgentState(**h.pop("agent"))
            lab.hosts[name] = HostState(agent=agent, **h)
        return lab

    # ------------------------------------------------------------------ up
    def preflight(self) -> list[str]:
        """What is missing on this machine to run the lab (empty = fine)."""
        missing = []
        if os.geteuid() != 0:
            missing.append("root (network namespaces): run as root")
        for tool in ("ip", "ping", "iptables"):
            if shutil.which(tool) is None:
                missing.append(f"{tool}: run scripts/setup")
        if self.config.backend == "wireguard":
            for tool in ("wireguard-go", "unshare", "mount"):
                if shutil.which(tool) is None:
                    missing.append(f"{tool}: run scripts/setup (Debian packages wireguard-go, util-linux, mount)")
        if self.config.subnet_manager == "etcd" and not Path(ETCD_BIN).exists():
            missing.append(f"etcd at {ETCD_BIN}: run scripts/setup (Debian package etcd-server)")
        if self.config.subnet_manager == "kube":
            for plugin in ("bridge", "host-local"):
                if not Path(CNI_BIN, plugin).exists():
                    missing.append(f"CNI plugin {CNI_BIN}/{plugin}: run scripts/setup (containernetworking-plugins)")
            if shutil.which("curl") is None:
                missing.append("curl: run scripts/setup")
        probe = "import importlib.util, flannel.cli; assert importlib.util.find_spec('flannel.__main__')"
        res = subprocess.run([self.config.python, "-c", probe],
                             capture_output=True, text=True)
        if res.returncode != 0:
            missing.append(f"the flannel agent is not importable with {self.config.python} "
                           f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'unknown'})")
        return missing

    def up(self) -> None:
        cfg = self.config
        if cfg.backend not in BACKENDS:   # a third-party plugin: the agents must be able to load it
            known = installed_backends(cfg.python)
            if cfg.backend not in known:
                raise LabError(f"unknown backend {cfg.backend!r}: no such plugin in the flannel.backends entry-point "
                               f"group of {cfg.python}; installed: {', '.join(known)}")
        if cfg.subnet_manager not in ("etcd", "kube"):
            raise LabError(f"unknown subnet manager {cfg.subnet_manager!r}; choose etcd or kube")
        missing = self.preflight()
        if missing:
            raise LabError("cannot start the lab, missing:\n  " + "\n  ".join(missing))
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.underlay = Underlay(cfg.prefix)
            hub = self.underlay.hub
            if cfg.subnet_manager == "kube":
                self._start_kubeapi()
            elif cfg.etcd_members > 1:
                self.etcd = self._start_etcd_cluster(cfg.etcd_members)
                self.etcd_endpoint = self.etcd.endpoint
                self.etcdctl("put", f"{ETCD_PREFIX}/config", cfg.network_config())
            else:
                self.etcd = EtcdServer(str(self.dir / "etcd"), host=str(self.underlay.hub_ip), netns=hub.name,
                                       log_path=str(self.dir / "etcd.log"))
                self.etcd.start()
                assert self.etcd.proc is not None
                self.etcd_pid = self.etcd.proc.pid
                self.etcd_endpoint = self.etcd.endpoint
                self.etcdctl("put", f"{ETCD_PREFIX}/config", cfg.network_config())
            self.save()
            names = [self._new_host(start=True) for _ in range(cfg.hosts)]
            self.save()
            for name in names:
                self.wait_subnet(name)
                self.add_pods(name, cfg.pods_per_host)
            self.save()
        except BaseException:
            log.error("lab up failed; tearing down what was built (logs stay in %s until down)", self.dir)
            self.teardown(keep_dir=True)
            raise

    def _start_etcd_cluster(self, members: int) -> EtcdCluster:
        """Members in namespaces ``<prefix>e1..`` on the underlay at .241, .242, ... (the members'
        processes die with their namespaces at teardown)."""
        assert self.underlay is not None
        if members > 13:
            raise LabError("at most 13 etcd members (underlay addresses .241-.253)")
        hosts = [self.underlay.add_host(f"e{i}", index=240 + i) for i in range(1, members + 1)]
        cluster = EtcdCluster(str(self.dir / "etcd"), [(h.ns.name, str(h.ip)) for h in hosts])
        return cluster.start()

    # ------------------------------------------------------------------ kube mode
    def _start_kubeapi(self) -> None:
        """The stand-in API server (flannel/lab/kubeapi) in the hub, plus net-conf.json and a kubeconfig."""
        assert self.underlay is not None
        self.kube_token = os.urandom(12).hex()
        url_file = self.dir / "kubeapi.url"
        url_file.unlink(missing_ok=True)
        cmd = [self.config.python, "-m", "flannel.lab.kubeapi", "--host", str(self.underlay.hub_ip),
               "--port", str(KUBEAPI_PORT), "--token", self.kube_token, "--ready-file", str(url_file)]
        with open(self.dir / "kubeapi.log", "ab") as logf:
            proc = subprocess.Popen(["ip", "netns", "exec", self.underlay.hub.name, *cmd], cwd=str(self.dir),
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.kubeapi_pid = proc.pid
        self._procs["<kubeapi>"] = proc
        deadline = time.monotonic() + 20
        while not url_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"stand-in API server did not start; log {self.dir / 'kubeapi.log'}:\n"
                               f"{_tail(self.dir / 'kubeapi.log')}")
            time.sleep(0.05)
        self.kubeapi_url = url_file.read_text().strip()
        (self.dir / "net-conf.json").write_text(self.config.network_config())
        write_kubeconfig(str(self.dir / "kubeconfig"), self.kubeapi_url, self.kube_token)

    def kube(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request to the stand-in API server (curl inside the hub: only the hub reaches it)."""
        args = ["ip", "netns", "exec", self.config.prefix + "hub", "curl", "-sS", "-X", method,
                "-H", f"Authorization: Bearer {self.kube_token}", "-H", "Content-Type: application/json"]
        if body is not None:
            args += ["--data-binary", json.dumps(body)]
        out = run(*args, self.kubeapi_url + path)
        result: dict[str, Any] = json.loads(out) if out.strip() else {}
        if result.get("kind") == "Status" and result.get("status") == "Failure":
            raise LabError(f"API server: {method} {path}: {result.get('message')}")
        return result

    def _register_node(self, name: str, index: int) -> str:
        cidr = self.config.pod_cidr(index)
        self.kube("POST", "/api/v1/nodes", {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
                                            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
        return cidr

    def _new_host(self, *, start: bool) -> str:
        idx = self._next_index
        self._next_index += 1
        name = f"h{idx}"
        if self.underlay is None:  # a lab re-attached from state.json (CLI) only supports status/down
            raise LabError("adding hosts needs the lab object that ran `up`")
        if idx >= 254:
            raise LabError("the underlay /24 has room for 253 hosts")
        self.underlay.add_host(name, index=idx)
        ip = str(self.underlay.subnet.network_address + idx)
        self.hosts[name] = HostState(name=name, ns=self.config.prefix + name, ip=ip, index=idx)
        if self.config.subnet_manager == "kube":
            self._register_node(name, idx)
        (self.dir / name).mkdir(parents=True, exist_ok=True)
        if start:
            self.start_agent(name)
        return name

    def add_host(self, *, pods: int | None = None, wait: bool = True) -> str:
        """A new host joins: namespace, agent, (after its subnet.env) pods."""
        name = self._new_host(start=True)
        self.save()
        if wait:
            self.wait_subnet(name)
            self.add_pods(name, self.config.pods_per_host if pods is None else pods)
            self.save()
        return name

    # ------------------------------------------------------------------ agents
    def subnet_file(self, host: str) -> Path:
        return self.dir / host / "subnet.env"

    def log_file(self, host: str) -> Path:
        return self.dir / host / "flannel.log"

    def agent_args(self, host: str, extra: Sequence[str] = ()) -> list[str]:
        """The agent's flags (AgentProcess adds --subnet-file and the health flags)."""
        cfg = self.config
        if cfg.subnet_manager == "kube":
            args = ["--subnet-manager=kube", f"--kubeconfig-file={self.dir / 'kubeconfig'}",
                    f"--net-config-path={self.dir / 'net-conf.json'}"]
        else:
            args = [f"--etcd-endpoints={self.etcd_endpoint}", f"--etcd-prefix={ETCD_PREFIX}"]
        args.append("--iface=eth0")
        if cfg.ip_masq:
            args.append("--ip-masq")
        if cfg.lease_ttl:
            args.append(f"--subnet-lease-ttl={cfg.lease_ttl}")
        return args + list(cfg.agent_args) + list(extra)

    def wireguard_dir(self, host: str) -> Path:
        """wireguard lab: the host's UAPI directory (its wireguard-go's ``flannel-wg.sock``)."""
        return self.dir / host / "wireguard"

    def wireguard_key_file(self, host: str) -> Path:
        return self.dir / host / "wgkey"

    def agent_env(self, host: str) -> dict[str, str]:
        """Per-host environment. wireguard: each host has its own key file, and its own UAPI
        directory, because wireguard-go's socket path /var/run/wireguard/flannel-wg.sock is shared
        by every namespace (the agent mounts the directory over it privately for its wireguard-go)."""
        env = {"NODE_NAME": host}
        if self.config.backend == "wireguard":
            env["WIREGUARD_KEY_FILE"] = str(self.wireguard_key_file(host))
            env["FLANNEL_WIREGUARD_UAPI_DIR"] = str(self.wireguard_dir(host))
        return env

    def start_agent(self, host: str, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> int:
        """Start the host's agent (flannel.lab.agent.AgentProcess; log <dir>/<host>/flannel.log).
        ``env``: more environment variables for this run (e.g. a PATH with other binaries)."""
        h = self.hosts[host]
        if self.agent_alive(host):
            raise LabError(f"agent on {host} already running (pid {h.agent.pid})")
        agent = AgentProcess("flannel", netns=h.ns, workdir=self.dir / host, args=self.agent_args(host, extra),
                             healthz_port=HEALTHZ_PORT, env={**self.agent_env(host), **(env or {})},
                             python=self.config.python, subnet_file=self.subnet_file(host))
        agent.start()
        assert agent.pid is not None
        self._agents[host] = agent
        h.agent = AgentState(pid=agent.pid, args=agent.command())
        return agent.pid

    def stop_agent(self, host: str, *, timeout: float = 10.0) -> bool:
        """SIGTERM the host's agent; True if it exited within ``timeout`` (else it was killed)."""
        h = self.hosts[host]
        agent = self._agents.pop(host, None)
        if agent is not None:
            try:
                agent.stop(timeout=timeout)
                clean = True
            except AgentFailed:
                clean = False
        else:  # re-attached lab (CLI): only the PID is known
            clean = stop_pid(h.agent.pid, str(self.subnet_file(host)), timeout=timeout)
        h.agent = AgentState()
        return clean

    def agent(self, host: str) -> AgentProcess:
        """The agent process this lab object started last on ``host`` (for /debug/leases, its log, PID)."""
        agent = self._agents.get(host)
        if agent is None:
            raise LabError(f"no agent started on {host} by this lab object")
        return agent

    def agent_alive(self, host: str) -> bool:
        agent = self._agents.get(host)
        if agent is not None:
            return agent.running
        pid = self.hosts[host].agent.pid
        return bool(pid) and _running(pid) and str(self.subnet_file(host)) in _cmdline(pid)

    def wait_subnet(self, host: str, *, timeout: float | None = None) -> ipaddress.IPv4Network:
        """Wait until the agent started last on ``host`` is ready (it wrote subnet.env, /readyz is
        200); record and return the host's subnet."""
        agent = self._agents.get(host)
        if agent is None:
            raise LabError(f"no agent started on {host} by this lab object")
        try:
            env = agent.wait_ready(timeout or self.config.agent_timeout)
        except AgentFailed as e:
            raise LabError(f"agent on {host} did not become ready: {e}") from None
        gw, _ = subnet_env_gateway(env)
        self.hosts[host].subnet = str(gw.network)
        return gw.network

    def restart_agent(self, host: str, extra: Sequence[str] = (),
                      env: dict[str, str] | None = None) -> ipaddress.IPv4Network:
        self.stop_agent(host)
        self.start_agent(host, extra, env)
        net = self.wait_subnet(host)
        self.save()
        return net

    # ------------------------------------------------------------------ pods
    def add_pods(self, host: str, count: int) -> list[podtraffic.Endpoint]:
        if self.config.subnet_manager == "kube":
            return [self._cni_pod(host) for _ in range(count)]
        h = self.hosts[host]
        env = subnet_file.read(self.subnet_file(host))
        gw, mtu = subnet_env_gateway(env)
        made = []
        hobj = Host(name=host, ns=_attach(h.ns), ip=ipaddress.IPv4Address(h.ip))
        for _ in range(count):
            j = len(h.pods) + 1
            pod: Pod = add_pod(hobj, f"{h.ns}-p{j}", index=j, gateway=gw, mtu=mtu, name=f"{host}-p{j}")
            h.pods.append({"name": pod.name, "ns": pod.ns.name, "ip": str(pod.ip)})
            made.append(podtraffic.Endpoint(pod.name, pod.ns.name, str(pod.ip)))
        return made

    def _cni_conf(self, host: str) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
                "subnetFile": str(self.subnet_file(host)), "dataDir": str(self.dir / host / "cni"),
                "delegate": {"hairpinMode": True, "isDefaultGateway": True},
                "ipam": {"dataDir": str(self.dir / host / "ipam")}}

    def cni(self, host: str, command: str, pod_ns: str) -> dict[str, Any]:
        """Run the project's CNI plugin (``python -m flannel.cni``) in the host, as a runtime would."""
        h = self.hosts[host]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": pod_ns,
               "CNI_NETNS": f"/run/netns/{pod_ns}", "CNI_IFNAME": "eth0", "CNI_PATH": CNI_BIN}
        res = subprocess.run(["ip", "netns", "exec", h.ns, "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                              self.config.python, "-m", "flannel.cni"],
                             input=json.dumps(self._cni_conf(host)), capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise LabError(f"CNI {command} for {pod_ns} on {host} failed ({res.returncode}): "
                           f"{res.stdout.strip()} {res.stderr.strip()}")
        return json.loads(res.stdout) if res.stdout.strip() else {}

    def _cni_pod(self, host: str) -> podtraffic.Endpoint:
        h = self.hosts[host]
        j = len(h.pods) + 1
        ns = NetNS(f"{h.ns}-p{j}")
        try:
            result = self.cni(host, "ADD", ns.name)
            ip = str(ipaddress.IPv4Interface(result["ips"][0]["address"]).ip)
        except BaseException:
            ns.delete()
            raise
        h.pods.append({"name": f"{host}-p{j}", "ns": ns.name, "ip": ip})
        return podtraffic.Endpoint(f"{host}-p{j}", ns.name, ip)

    def pods(self, hosts: Sequence[str] | None = None) -> list[podtraffic.Endpoint]:
        sel = hosts if hosts is not None else list(self.hosts)
        return [podtraffic.Endpoint(p["name"], p["ns"], p["ip"]) for h in sel for p in self.hosts[h].pods]

    # ------------------------------------------------------------------ etcd / leases
    def etcdctl(self, *args: str) -> str:
        if self.etcd is not None:
            return self.etcd.etcdctl(*args)
        hub = self.config.prefix + "hub"
        return run("ip", "netns", "exec", hub, "env", "ETCDCTL_API=3", "etcdctl",
                   "--endpoints", self.etcd_endpoint, *args)

    def lease_keys(self) -> list[str]:
        if self.config.subnet_manager == "kube":
            nodes = self.kube("GET", "/api/v1/nodes").get("items", [])
            return [n["metadata"]["name"] for n in nodes]
        out = self.etcdctl("get", f"{ETCD_PREFIX}/subnets/", "--prefix", "--keys-only")
        return [k for k in out.split() if k]

    def delete_lease(self, host: str) -> None:
        if self.config.subnet_manager == "kube":
            self.kube("DELETE", f"/api/v1/nodes/{host}")
            return
        net = ipaddress.IPv4Network(self.hosts[host].subnet)
        self.etcdctl("del", f"{ETCD_PREFIX}/subnets/{net.network_address}-{net.prefixlen}")

    def remove_host(self, host: str, *, delete_lease: bool = True) -> None:
        """The host leaves: agent stopped, lease deleted (unless waiting for the TTL), namespaces gone."""
        h = self.hosts[host]
        self.stop_agent(host)
        if delete_lease and h.subnet:
            self.delete_lease(host)
        for p in h.pods:
            _attach(p["ns"]).delete()
        if self.underlay is not None and host in self.underlay.hosts:
            self.underlay.remove_host(host)
        else:
            _attach(h.ns).delete()
        del self.hosts[host]
        self.save()

    # ------------------------------------------------------------------ reporting
    def matrix(self) -> dict[tuple[str, str], bool]:
        return podtraffic.ping_matrix(self.pods())

    def status_lines(self) -> list[str]:
        lines = [f"lab {self.config.prefix}  dir {self.dir}  backend {self.config.backend}  "
                 f"network {self.config.network}  subnet manager {self.config.subnet_manager}",
                 (f"API server (stand-in)  pid {self.kubeapi_pid} "
                  f"({'running' if _running(self.kubeapi_pid) else 'DOWN'})  {self.kubeapi_url}  "
                  f"log {self.dir / 'kubeapi.log'}  kubeconfig {self.dir / 'kubeconfig'}"
                  if self.config.subnet_manager == "kube" else
                  f"etcd  pid {self.etcd_pid} ({'running' if _running(self.etcd_pid) else 'DOWN'})  "
                  f"{self.etcd_endpoint}  log {self.dir / 'etcd.log'}")]
        for name, h in self.hosts.items():
            state = "running" if self.agent_alive(name) else "DOWN"
            lines.append(f"{name}  ns {h.ns}  ip {h.ip}  subnet {h.subnet or '?'}  agent pid {h.agent.pid} "
                         f"({state})  log {self.log_file(name)}")
            for p in h.pods:
                lines.append(f"    pod {p['name']}  ns {p['ns']}  ip {p['ip']}")
        return lines

    # ------------------------------------------------------------------ down
    def teardown(self, *, keep_dir: bool = False) -> None:
        for name in list(self.hosts):
            self.stop_agent(name)
        if self.etcd is not None:
            self.etcd.stop()
        elif self.etcd_pid:
            stop_pid(self.etcd_pid, str(self.dir / "etcd"))
        if self.kubeapi_pid:
            stop_pid(self.kubeapi_pid, str(self.dir / "kubeapi.url"))
            proc = self._procs.pop("<kubeapi>", None)
            if proc is not None:
                proc.wait(5)
        cleanup_prefix(self.config.prefix)
        self.underlay = None
        self.etcd = None
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def leftovers(prefix: str) -> list[str]:
    """Namespaces with the lab prefix that still exist (for `down` on a lab without state)."""
    out = run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)]
