"""Helpers for the e2e tests: build one lab (hub + etcd + 3 hosts + pods + real agents) per backend,
shared by every test of a module (building a lab costs seconds; the CI budget is minutes).

A piece of the project that is not there yet (the agent, a backend, the masquerade rules) makes the
tests that need it skip with a reason that names the missing piece — never pass silently.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from flannel.lab.cluster import Lab, LabConfig
from flannel.lab.netns import cleanup_prefix, run_prefix

REPO = Path(__file__).resolve().parents[2]


def agent_missing() -> str | None:
    """Why ``python -m flannel`` cannot run here (None if it can)."""
    if importlib.util.find_spec("flannel.__main__") is None:
        return "the agent (python -m flannel: flannel/__main__.py) does not exist yet"
    res = subprocess.run([sys.executable, "-c", "import flannel.cli, flannel.daemon"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"the agent does not import: {res.stderr.strip().splitlines()[-1:]}"
    return None


def backend_missing(name: str) -> str | None:
    for ep in metadata.entry_points(group="flannel.backends"):
        if ep.name == name:
            try:
                ep.load()
            except Exception as e:  # any import failure means "not there yet" for the skip reason
                return f"backend {name!r} does not load: {type(e).__name__}: {e}"
            return None
    return f"backend {name!r} is not registered"


def kube_missing() -> str | None:
    """The kube-mode lab needs the kube subnet manager, the stand-in API server and the CNI plugin."""
    for ep in metadata.entry_points(group="flannel.subnet_managers"):
        if ep.name == "kube":
            try:
                ep.load()
            except Exception as e:  # any import failure means "not there yet"
                return f"subnet manager 'kube' does not load: {type(e).__name__}: {e}"
            break
    else:
        return "subnet manager 'kube' is not registered"
    for mod in ("flannel.lab.kubeapi.server", "flannel.cni.plugin"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} does not exist yet"
    for plugin in ("bridge", "host-local"):
        if not Path("/usr/lib/cni", plugin).exists():
            return f"/usr/lib/cni/{plugin} missing (run scripts/setup)"
    return None


def masq_missing() -> str | None:
    """The --ip-masq test needs flannel.traffic and the daemon calling it."""
    if importlib.util.find_spec("flannel.traffic") is None:
        return "flannel.traffic (masquerade rules) does not exist yet"
    daemon = REPO / "flannel" / "daemon.py"
    text = daemon.read_text() if daemon.exists() else ""
    if not re.search(r"^\s*(from flannel\.traffic\b|import flannel\.traffic\b|from flannel import .*\btraffic\b)",
                     text, re.M):
        return "flannel.traffic exists but the daemon does not call it yet (--ip-masq not wired)"
    return None


def build_lab(backend: str, tmp: Path, *, hosts: int = 3, pods_per_host: int = 2, **kw: object) -> Lab:
    why = agent_missing() or backend_missing(backend)
    if not why and kw.get("subnet_manager") == "kube":
        why = kube_missing()
    if why:
        pytest.skip(why)
    cfg = LabConfig(hosts=hosts, pods_per_host=pods_per_host, backend=backend, dir=str(tmp),
                    prefix=run_prefix(), **kw)  # type: ignore[arg-type]
    lab = Lab(cfg)
    try:
        lab.up()
    except BaseException:
        lab.teardown(keep_dir=True)
        cleanup_prefix(cfg.prefix)
        raise
    return lab
