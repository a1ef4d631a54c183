"""e2e: "how to write a backend plugin" (docs/architecture.md) is true.

The test takes the plugin's files out of the doc (every fenced block whose info string says
``file=<name>``), builds and installs that distribution with pip into a temporary directory (the
project's venv is never changed), and runs a lab on it with ``backend="example-routes"``: the
agents find the plugin through the ``flannel.backends`` entry-point group (``PYTHONPATH`` points
them at the directory), pods on different hosts ping each other over the routes it programs, each
host has exactly one route per peer, and a lease added to and removed from etcd adds and removes
its route on every host. If the doc's example breaks, this test fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import Lab, installed_backends
from tests.support import REPO, build_lab, etcd_key, lab_logs, lab_ns, wait_for

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e, pytest.mark.timeout(600)]

DOC = REPO / "docs" / "architecture.md"
PLUGIN = "example-routes"
FAKE = "10.244.200.0/24"        # a peer that exists only in etcd
FAKE_IP = "198.18.0.200"        # on the lab's underlay; nothing answers there


def doc_files(text: str) -> dict[str, str]:
    """The example's files: fenced blocks opened with ```<lang> file=<name>."""
    return {m.group(1): m.group(2) + "\n" for m in re.finditer(r"^```\w+ file=(\S+)\n(.*?)\n```$", text, re.M | re.S)}


def test_the_doc_holds_the_plugin_files() -> None:
    files = doc_files(DOC.read_text())
    assert set(files) == {"pyproject.toml", "example_routes.py"}, sorted(files)
    assert f'{PLUGIN} = "example_routes:RoutesBackend"' in files["pyproject.toml"]
    assert '[project.entry-points."flannel.backends"]' in files["pyproject.toml"]


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example distribution, written from the doc and installed by pip into a directory of its
    own; the agents (children of this process) find it on ``PYTHONPATH``."""
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name, text in doc_files(DOC.read_text()).items():
        (src / name).write_text(text)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip could not install the doc's example:\n{res.stdout}\n{res.stderr}"
    entry_points = list(site.glob("*.dist-info/entry_points.txt"))
    assert entry_points and PLUGIN in entry_points[0].read_text(), "the installed distribution has no entry point"
    assert PLUGIN not in installed_backends(), "the plugin must come from this install, not from the venv"
    monkeypatch.setenv("PYTHONPATH", str(site))
    yield site


@pytest.fixture
def lab(plugin_path: Path, tmp_path: Path) -> Iterator[Lab]:
    assert PLUGIN in installed_backends(), "the agents' interpreter does not see the installed plugin"
    lab = build_lab(PLUGIN, tmp_path / "lab", hosts=3, pods_per_host=1)
    try:
        yield lab
    finally:
        lab.teardown(keep_dir=True)


def plugin_routes(lab: Lab, host: str) -> set[str]:
    """``<dst> via <gateway>`` of every gateway route into the lab's network on ``host``."""
    out = lab_ns(lab, host).ip("-j", "route", "show", "table", "main")
    return {f"{r['dst']} via {r['gateway']}" for r in json.loads(out or "[]")
            if r.get("gateway") and r.get("dst", "").startswith("10.244.")}


def test_the_doc_plugin_runs_in_the_lab_and_programs_a_route_per_peer(lab: Lab) -> None:
    for name in lab.hosts:
        want = {f"{h.subnet} via {h.ip}" for n, h in lab.hosts.items() if n != name}
        wait_for(lambda name=name, want=want: plugin_routes(lab, name) == want, f"one route per peer on {name}",
                 timeout=60, on_timeout=lambda: lab_logs(lab))
        assert f"{PLUGIN}: route replace" in lab.log_file(name).read_text(), "the plugin's own log line"
    value = json.loads(lab.etcdctl("get", etcd_key(next(iter(lab.hosts.values())).subnet), "--print-value-only"))
    assert value["BackendType"] == PLUGIN, value
    pods = lab.pods()
    m = pt.wait_full_matrix(pods, time.monotonic() + 60)
    assert all(m.values()), pt.format_matrix(pods, m) + lab_logs(lab)

    # a peer that comes and goes: its route comes and goes on every host
    lab.etcdctl("put", etcd_key(FAKE), json.dumps({"PublicIP": FAKE_IP, "BackendType": PLUGIN}))
    wait_for(lambda: all(f"{FAKE} via {FAKE_IP}" in plugin_routes(lab, h) for h in lab.hosts),
             "the new peer's route on every host", timeout=60, on_timeout=lambda: lab_logs(lab))
    lab.etcdctl("del", etcd_key(FAKE))
    wait_for(lambda: not any(r.startswith(FAKE) for h in lab.hosts for r in plugin_routes(lab, h)),
             "the removed peer's route gone from every host", timeout=60, on_timeout=lambda: lab_logs(lab))
    assert all(lab.agent_alive(h) for h in lab.hosts), lab_logs(lab)
