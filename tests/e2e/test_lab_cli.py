"""e2e: ``scripts/lab up|status|down`` as a user runs it — from separate processes, and leaving
nothing behind (no processes, no namespaces, no links in the root namespace, no lab dir)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flannel.lab.netns import cleanup_prefix, run, run_prefix
from tests.support import REPO

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e]


def _lab(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "lab"), *args], capture_output=True, text=True, timeout=timeout)


def _namespaces(prefix: str) -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines()
            if line.split() and line.split()[0].startswith(prefix)]


def _root_links() -> set[str]:
    return {link["ifname"] for link in json.loads(run("ip", "-j", "link", "show"))}


def test_lab_cli_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    prefix = run_prefix()
    labdir = tmp_path / "lab"
    common = ["--dir", str(labdir), "--prefix", prefix]
    links_before = _root_links()
    try:
        up = _lab("up", "--hosts", "2", "--pods-per-host", "1", "--backend", "vxlan", *common)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "2/2 pairs reachable" in up.stdout, up.stdout
        state = json.loads((labdir / "state.json").read_text())
        pids = [h["agent"]["pid"] for h in state["hosts"].values()] + [state["etcd"]["pid"]]
        assert all(Path(f"/proc/{p}").exists() for p in pids)
        for h in state["hosts"]:
            assert (labdir / h / "flannel.log").stat().st_size > 0
            assert "FLANNEL_SUBNET=" in (labdir / h / "subnet.env").read_text()

        again = _lab("up", *common)
        assert again.returncode == 1 and "already up" in again.stdout

        st = _lab("status", *common)
        assert st.returncode == 0, st.stderr
        assert st.stdout.count("(running)") == 3 and "FAIL" not in st.stdout, st.stdout

        down = _lab("down", *common)
        assert down.returncode == 0, down.stderr
        assert not labdir.exists()
        assert _namespaces(prefix) == []
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[:1]]
        assert alive == [], f"processes left running: {alive}"
        assert _root_links() - links_before == set()

        again = _lab("down", *common)
        assert again.returncode == 0 and "not up" in again.stdout
        st = _lab("status", *common)
        assert st.returncode == 3
    finally:
        if labdir.exists():
            _lab("down", *common)
        cleanup_prefix(prefix)


def test_lab_cli_down_cleans_up_after_a_crashed_up(tmp_path: Path) -> None:
    """No state file but namespaces with the prefix (a killed `up`): down removes them."""
    prefix = run_prefix()
    try:
        run("ip", "netns", "add", prefix + "hub")
        run("ip", "netns", "add", prefix + "h1")
        res = _lab("down", "--dir", str(tmp_path / "none"), "--prefix", prefix)
        assert res.returncode == 0, res.stderr
        assert "removed 2 leftover" in res.stdout
        assert _namespaces(prefix) == []
    finally:
        cleanup_prefix(prefix)


def test_lab_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    res = _lab("up", "--hosts", "0", "--dir", str(tmp_path), "--prefix", run_prefix())
    assert res.returncode == 2 and "--hosts" in res.stderr
    res = _lab("up", "--backend", "nope", "--dir", str(tmp_path))
    assert res.returncode == 2 and "unknown backend 'nope'" in res.stderr
    assert "vxlan" in res.stderr.split("installed backend plugins:")[1], "the message lists what is installed"
    assert os.listdir(tmp_path) == []
