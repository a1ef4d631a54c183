"""Write a kubeconfig that points an agent (``flannel --kubeconfig-file``: read by the agent's own loader,
``flannel.subnet_managers.kube.kubeconfig``) or a test's ``kubernetes`` client at the stand-in server,
with a bearer token."""

from __future__ import annotations

import json
import os


def write_kubeconfig(path: str, url: str, token: str | None = None, *, name: str = "standin") -> str:
    """A minimal kubeconfig (JSON is valid YAML). Returns ``path``."""
    user: dict[str, str] = {"token": token} if token else {}
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": name,
        "clusters": [{"name": name, "cluster": {"server": url}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, path)
    return path
