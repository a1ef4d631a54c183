"""One compose lab: a compose project (``-p``) from the repository's ``docker-compose.yml``.

The topology comes from the compose file (services ``hostN``, ``agentN``, ``podN``; see its header);
the settings from its variables: ``FLANNEL_BACKEND``, ``FLANNEL_NETWORK`` and ``FLANNEL_UNDERLAY``
(the underlay subnet: two labs on one engine need different ones). A pod is entered with
``nsenter --net=/proc/<pod container pid>/root/run/netns/pod``, which is all ``flannel.lab.podtraffic``
needs to run the lab's ping matrix, TCP transfers and iperf3 there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flannel.lab import podtraffic
from flannel.lab.compose import engine as engines
from flannel.lab.compose import images
from flannel.lab.compose.docker import ComposeError, Docker
from flannel.lab.compose.steps import Steps
from flannel.options import DEFAULT_SUBNET_FILE

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "pyflannel"
DEFAULT_NETWORK = "10.244.0.0/16"
DEFAULT_UNDERLAY = "198.18.0.0/24"
BACKENDS = ("vxlan", "host-gw", "udp")
COMPOSE_FILE = "docker-compose.yml"
POD_NETNS = "pod"
UDP_PATH_MARK = "udp: data path:"


@dataclass(frozen=True)
class ComposeConfig:
    repo: Path
    project: str = DEFAULT_PROJECT
    backend: str = "vxlan"
    network: str = DEFAULT_NETWORK
    underlay: str = DEFAULT_UNDERLAY

    @property
    def compose_file(self) -> Path:
        return self.repo / COMPOSE_FILE

    def env(self) -> dict[str, str]:
        return {"FLANNEL_BACKEND": self.backend, "FLANNEL_NETWORK": self.network, "FLANNEL_UNDERLAY": self.underlay}

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ComposeError(f"backend {self.backend!r}: the compose lab runs {', '.join(BACKENDS)}")
        for name, value in (("network", self.network), ("underlay", self.underlay)):
            try:
                ipaddress.IPv4Network(value)
            except ValueError as e:
                raise ComposeError(f"--{name} {value!r} is not an IPv4 network: {e}") from e
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.project):
            raise ComposeError(f"project name {self.project!r}: lower-case letters, digits, '-' and '_' only")
        if not self.compose_file.is_file():
            raise ComposeError(f"{self.compose_file} not found (--repo must be the pyflannel repository)")


def free_underlay(docker: Docker, candidates: Sequence[str]) -> str:
    """The first candidate subnet no network on the engine overlaps (two labs need two underlays)."""
    used = []
    for found in docker.inspect(*docker.run("network", "ls", "-q").stdout.split(), kind="network"):
        for c in (found.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(ValueError, KeyError):
                used.append(ipaddress.IPv4Network(c["Subnet"]))
    for cand in candidates:
        net = ipaddress.IPv4Network(cand)
        if not any(net.overlaps(u) for u in used):
            return cand
    raise ComposeError(f"every candidate underlay overlaps a network on the engine: {list(candidates)}")


def service_names(compose_file: Path) -> dict[str, list[str]]:
    """{"host": [host1, ...], "agent": [...], "pod": [...]} from the compose file, in numeric order."""
    doc: dict[str, Any] = yaml.safe_load(compose_file.read_text())
    out: dict[str, list[str]] = {"host": [], "agent": [], "pod": []}
    for name in doc.get("services") or {}:
        m = re.fullmatch(r"(host|agent|pod)(\d+)", name)
        if m:
            out[m.group(1)].append(name)
    for names in out.values():
        names.sort(key=lambda n: int(re.sub(r"\D", "", n)))
    return out


class ComposeLab:
    """A compose project on an engine: bring it up, look at it, restart parts, take it down."""

    def __init__(self, config: ComposeConfig, engine: engines.Engine) -> None:
        config.validate()
        self.config = config
        self.engine = engine
        self.docker = engine.docker.with_compose()
        self.names = service_names(config.compose_file)

    # ---- preparation ------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: ComposeConfig, steps: Steps) -> ComposeLab:
        """Engine, base image, wheelhouse, images: everything ``up`` needs, each step timed."""
        config.validate()
        with steps.step("engine") as s:
            engine = engines.find(start=True)
            assert engine is not None
            s.note = engine.describe()
        lab = cls(config, engine)
        with steps.step("base image") as s:
            s.note = images.ensure_base(lab.docker)
        with steps.step("wheelhouse") as s:
            s.note = images.ensure_wheelhouse(config.repo)
        with steps.step("images") as s:
            s.note = images.build_images(lab.docker, config.compose_file, engines.STATE_DIR / "logs")
        return lab

    # ---- up / down --------------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        res = self.docker.compose(self.config.project, [str(self.config.compose_file)], *args,
                                  env=self.config.env(), timeout=timeout, check=check)
        return res.stdout + res.stderr

    def is_up(self) -> bool:
        return bool(self.docker.project_objects(self.config.project)["container"])

    def up(self, steps: Steps, *, timeout: float = 300) -> dict[tuple[str, str], bool]:
        """Start the project, wait for every agent and pod to be healthy; the first full ping matrix."""
        if self.is_up():
            raise ComposeError(f"compose lab {self.config.project!r} is already up: `scripts/compose status` "
                               "or `scripts/compose down` first")
        with steps.step("compose up"):
            self.compose("up", "-d", "--no-build", timeout=timeout)
        with steps.step("agents and pods healthy") as s:
            self.wait_healthy(self.names["agent"] + self.names["pod"], time.monotonic() + timeout)
            s.note = ", ".join(f"{a} {self.subnet(a)}" for a in self.names["agent"])
        with steps.step("pod-to-pod matrix") as s:
            m = podtraffic.wait_full_matrix(self.pods(), time.monotonic() + 60)
            s.note = f"{sum(m.values())}/{len(m)} pairs reachable"
        return m

    def down(self) -> list[str]:
        """Remove the project's containers, networks and volumes; check nothing of it is left."""
        lines = []
        if any(self.docker.project_objects(self.config.project).values()):
            self.compose("down", "-v", "--remove-orphans", "--timeout", "10")
            lines.append(f"compose project {self.config.project!r}: containers, networks and volumes removed")
        left = {k: v for k, v in self.docker.project_objects(self.config.project).items() if v}
        if left:
            raise ComposeError(f"compose down left objects of project {self.config.project!r}: {left}")
        return lines

    # ---- state ------------------------------------------------------------------------------------
    def container(self, service: str) -> str:
        cid = self.docker.service_container(self.config.project, service)
        if cid is None:
            raise ComposeError(f"service {service} of project {self.config.project!r} has no container")
        return cid

    def state(self, service: str) -> str:
        """``healthy``/``unhealthy``/``starting`` for a service with a healthcheck, else the container state."""
        found = self.docker.inspect(self.container(service), kind="container")
        if not found:
            return "missing"
        st = found[0]["State"]
        health = (st.get("Health") or {}).get("Status")
        return str(health if st.get("Running") and health else st.get("Status"))

    def wait_healthy(self, services: Sequence[str], deadline: float) -> None:
        while True:
            states = {s: self.state(s) for s in services}
            bad = {s: st for s, st in states.items() if st not in ("healthy", "running")}
            if not bad:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {s} ({st}):\n{self.logs(s, tail=15)}" for s, st in bad.items())
                raise ComposeError(f"not healthy in time: {bad}\n{logs}")
            time.sleep(0.5)

    def logs(self, service: str, *, tail: int | None = None) -> str:
        args = ["logs", *(["--tail", str(tail)] if tail else []), self.container(service)]
        res = self.docker.run(*args, check=False)
        return res.stdout + res.stderr

    def exec(self, service: str, *cmd: str, timeout: float = 60, check: bool = True) -> str:
        res = self.docker.run("exec", self.container(service), *cmd, timeout=timeout, check=check)
        return res.stdout

    def subnet_env(self, agent: str) -> dict[str, str]:
        text = self.exec(agent, "cat", DEFAULT_SUBNET_FILE, check=False)
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def subnet(self, agent: str) -> str:
        return self.subnet_env(agent).get("FLANNEL_SUBNET", "?")

    def host_ip(self, host: str) -> str:
        found = self.docker.inspect(self.container(host), kind="container")
        nets = found[0]["NetworkSettings"]["Networks"] if found else {}
        return next((str(n.get("IPAddress")) for n in nets.values() if n.get("IPAddress")), "?")

    def pods(self) -> list[podtraffic.Endpoint]:
        """The pods as podtraffic endpoints: entered from this machine with ``nsenter``.

        The pod's namespace is the one ``ip netns add pod`` bind-mounted inside the pod container,
        reached through the container's root (``/proc/<pid>/root/run/netns/pod``). Why not ``docker
        exec``: what it starts keeps running in the container when the local client is killed (a
        stopped TCP server would still hold its port); with nsenter, helpers are our own children and
        run this machine's ping/python/iperf3 inside the pod's network namespace.
        """
        out = []
        for pod in self.names["pod"]:
            found = self.docker.inspect(self.container(pod), kind="container")
            pid = int(found[0]["State"]["Pid"]) if found else 0
            if pid <= 0:
                raise ComposeError(f"{pod} is not running")
            ip = self.exec(pod, "flannel-test-pod", "ip", check=False).strip()
            out.append(podtraffic.Endpoint(pod, f"{pod}:{POD_NETNS}", ip,
                                           enter=("nsenter", f"--net=/proc/{pid}/root/run/netns/{POD_NETNS}")))
        return out

    def data_path_lines(self, agent: str) -> list[str]:
        """The agent's ``udp: data path: ...`` log messages (the udp backend states its path once)."""
        return [line[line.index(UDP_PATH_MARK):] for line in self.logs(agent).splitlines() if UDP_PATH_MARK in line]

    def running_config(self) -> dict[str, Any]:
        """The network config this project stored (etcd-init's FLANNEL_CONFIG), {} if unknown."""
        cid = self.docker.service_container(self.config.project, "etcd-init")
        found = self.docker.inspect(cid, kind="container") if cid else []
        env = dict(e.split("=", 1) for e in (found[0]["Config"]["Env"] if found else []) if "=" in e)
        try:
            cfg: dict[str, Any] = json.loads(env.get("FLANNEL_CONFIG", "{}"))
        except ValueError:
            return {}
        return cfg

    def restart(self, service: str, *, timeout: float = 180) -> None:
        """Restart one container (``docker restart``) and wait until it is healthy again."""
        self.docker.run("restart", "--time", "10", self.container(service), timeout=120)
        self.wait_healthy([service], time.monotonic() + timeout)

    def status_lines(self) -> list[str]:
        cfg = self.running_config()
        lines = [f"compose lab {self.config.project!r}  backend {(cfg.get('Backend') or {}).get('Type', '?')}  "
                 f"network {cfg.get('Network', '?')}  engine {self.engine.describe()}",
                 f"etcd  {self.state('etcd')}  http://etcd:2379 on the underlay"]
        for host, agent, pod in zip(self.names["host"], self.names["agent"], self.names["pod"]):
            paths = self.data_path_lines(agent)
            lines.append(f"{host}  ip {self.host_ip(host)}  {agent} {self.state(agent)}  subnet {self.subnet(agent)}"
                         + (f"  {paths[-1]}" if paths else ""))
            pod_ip = self.exec(pod, "flannel-test-pod", "ip", check=False).strip()
            lines.append(f"    {pod} {self.state(pod)}  ip {pod_ip}")
        return lines
