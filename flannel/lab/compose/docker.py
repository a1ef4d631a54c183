"""The Docker CLI and docker-compose, as the compose lab calls them.

One class, ``Docker``, that knows which engine to talk to (``host``, passed as ``DOCKER_HOST`` to
every child) and which compose to run: the v2 plugin (``docker compose``) where it exists, else
Debian's ``docker-compose`` 1.29. Both read the same file and label what they create with
``com.docker.compose.project``, which is how ``down`` finds — and checks it removed — only ours.

The docker CLI may be newer than the engine (a static 28.x CLI talking to Debian's 20.10 engine):
the CLI negotiates the API version down by itself; ``DOCKER_API_VERSION`` from the environment is
passed through untouched for the cases where it does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flannel.lab.cluster import LabError

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class ComposeError(LabError):
    """The compose lab could not be built or controlled; the message says what and where to look."""


@dataclass(frozen=True)
class Docker:
    """The docker CLI pointed at one engine (``host`` = a DOCKER_HOST value)."""

    host: str
    compose_cmd: tuple[str, ...] = field(default=())

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.host
        env.update(extra or {})
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, input=input,
                             env=self.env(env))
        if check and res.returncode != 0:
            raise ComposeError(f"docker {' '.join(args[:3])} ... failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    def answers(self, timeout: float = 15) -> bool:
        """True if an engine answers at ``host`` (the CLI's own version negotiation included)."""
        try:
            res = self.run("version", "--format", "{{.Server.Version}}", check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and bool(res.stdout.strip())

    def server_version(self) -> str:
        return self.run("version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})").stdout.strip()

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def inspect(self, *ids: str, kind: str = "") -> list[dict[str, Any]]:
        """``docker [kind] inspect`` of what exists among ``ids`` (missing ones are left out)."""
        if not ids:
            return []
        res = self.run(*([kind] if kind else []), "inspect", *ids, check=False)
        out: list[dict[str, Any]] = json.loads(res.stdout or "[]")
        return out

    def ids(self, kind: str, labels: Mapping[str, str], *, all_states: bool = True) -> list[str]:
        """IDs of containers / networks / volumes carrying every label in ``labels``."""
        filters = [a for k, v in labels.items() for a in ("--filter", f"label={k}={v}")]
        if kind == "container":
            args = ["ps", "-q", "--no-trunc", *(["-a"] if all_states else []), *filters]
        elif kind in ("network", "volume"):
            args = [kind, "ls", "-q", *filters]
        else:
            raise ValueError(kind)
        return self.run(*args).stdout.split()

    def project_objects(self, project: str) -> dict[str, list[str]]:
        """Every container, network and volume compose made for ``project`` (by its label)."""
        labels = {PROJECT_LABEL: project}
        return {kind: self.ids(kind, labels) for kind in ("container", "network", "volume")}

    def service_container(self, project: str, service: str) -> str | None:
        found = self.ids("container", {PROJECT_LABEL: project, SERVICE_LABEL: service})
        return found[0] if found else None

    # ---- compose --------------------------------------------------------------------------------
    def with_compose(self) -> Docker:
        """This engine with the compose command found on the machine (v2 plugin, else docker-compose)."""
        if self.compose_cmd:
            return self
        if self.run("compose", "version", check=False, timeout=30).returncode == 0:
            return Docker(self.host, ("docker", "compose"))
        exe = shutil.which("docker-compose")
        if exe is None:
            raise ComposeError("no docker compose: neither the `docker compose` plugin nor `docker-compose` "
                               "is installed (scripts/setup installs Debian's docker-compose)")
        return Docker(self.host, (exe,))

    def compose(self, project: str, files: Sequence[str], *args: str, env: Mapping[str, str] | None = None,
                timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.with_compose().compose_cmd, "-p", project, *[a for f in files for a in ("-f", f)], *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env(env))
        if check and res.returncode != 0:
            raise ComposeError(f"{' '.join(cmd[:len(cmd) - len(args)])} {' '.join(args)} failed "
                               f"({res.returncode}):\n{(res.stderr + res.stdout).strip()[-3000:]}")
        return res
