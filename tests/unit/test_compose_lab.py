"""The compose lab's pure parts (flannel.lab.compose): which Debian mirror the base image is built
from, how the debootstrap tree is trimmed, what the wheelhouse holds and when it is rebuilt, the
topology read from the compose file, the checks on the lab's settings, and the PID check that keeps
``down`` from signalling anything but our own dockerd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flannel.lab.compose import engine, images
from flannel.lab.compose.docker import ComposeError
from flannel.lab.compose.lab import ComposeConfig, service_names
from flannel.lab.compose.steps import Steps
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_mirrors_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    (tmp_path / "vendor.list").write_text("deb [signed-by=/k.gpg] https://vendor.example/apt stable main\n")
    paths = [tmp_path / "vendor.list", tmp_path / "debian.sources"]
    assert images.debian_mirrors(paths) == ("http://mirror.example/debian", "http://security.example/debian-security")
    (tmp_path / "sources.list").write_text("# old style\ndeb [arch=amd64] http://old.example/debian bookworm main\n")
    assert images.debian_mirrors([tmp_path / "sources.list"]) == ("http://old.example/debian", None)


def test_mirror_defaults_when_nothing_names_bookworm(tmp_path: Path) -> None:
    (tmp_path / "x.sources").write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: trixie\n"
                                        "Enabled: yes\n\nTypes: deb-src\nURIs: http://src.example\nSuites: bookworm\n")
    assert images.debian_mirrors([tmp_path / "x.sources", tmp_path / "missing.list"]) == (images.DEFAULT_MIRROR, None)


def test_slim_rootfs_configures_apt_like_debians_slim_image(tmp_path: Path) -> None:
    root = tmp_path
    for rel in ("etc/apt/sources.list", "etc/resolv.conf", "var/cache/apt/archives/a.deb", "var/lib/apt/lists/x",
                "usr/share/doc/pkg/copyright", "usr/share/doc/pkg/changelog.gz", "usr/share/man/man1/ls.1.gz",
                "usr/share/locale/de/LC_MESSAGES/x.mo", "usr/bin/keep"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    images.slim_rootfs(root, "http://mirror.example/debian", "http://security.example/debian-security")
    sources = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates" in sources
    assert "URIs: http://security.example/debian-security\nSuites: bookworm-security" in sources
    assert not (root / "etc/apt/sources.list").exists() and not (root / "etc/resolv.conf").exists()
    assert list((root / "var/cache/apt/archives").iterdir()) == []
    assert list((root / "var/lib/apt/lists").iterdir()) == []
    assert sorted(p.name for p in (root / "usr/share/doc/pkg").iterdir()) == ["copyright"]
    assert list((root / "usr/share/man").iterdir()) == [] and list((root / "usr/share/locale").iterdir()) == []
    assert (root / "usr/bin/keep").exists()
    policy = root / "usr/sbin/policy-rc.d"
    assert os.access(policy, os.X_OK) and subprocess.run([str(policy)]).returncode == 101
    assert "docker-clean" in {p.name for p in (root / "etc/apt/apt.conf.d").iterdir()}


def test_wheelhouse_holds_the_install_and_build_requirements() -> None:
    reqs = images.requirements(ROOT)
    names = {r.split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in reqs}
    assert {"click", "pyroute2", "grpcio", "kubernetes", "setuptools", "wheel"} <= names
    key = images.wheelhouse_key(reqs)
    assert key == images.wheelhouse_key(list(reversed(reqs)))  # order does not matter
    assert key != images.wheelhouse_key([*reqs, "extra-dependency>=1"])  # a new requirement rebuilds it


def test_wheelhouse_refuses_a_python_the_image_does_not_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 12, 0, "final", 0))
    with pytest.raises(ComposeError, match=r"Python 3\.11"):
        images.ensure_wheelhouse(ROOT, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_topology_and_builds_come_from_the_compose_file(tmp_path: Path) -> None:
    f = tmp_path / "docker-compose.yml"
    f.write_text("services:\n  host10: {image: a}\n  host2: {image: a, build: .}\n  agent2: {image: a}\n"
                 "  pod2: {image: a}\n  etcd: {image: e, build: {context: ., dockerfile: e.Dockerfile}}\n"
                 "  agent10: {image: a}\n  other: {image: a, build: .}\n")
    assert service_names(f) == {"host": ["host2", "host10"], "agent": ["agent2", "agent10"], "pod": ["pod2"]}
    assert {(b.image, b.dockerfile.name) for b in images.builds(f)} == {("a", "Dockerfile"), ("e", "e.Dockerfile")}
    f.write_text("services:\n  x: {build: .}\n")
    with pytest.raises(ComposeError, match="names none"):
        images.builds(f)


@pytest.mark.parametrize(("kw", "match"), [
    ({"backend": "alloc"}, "backend 'alloc'"),
    ({"network": "10.5.0.0/33"}, "--network"),
    ({"underlay": "nope"}, "--underlay"),
    ({"project": "Bad Name"}, "project name"),
])
def test_lab_settings_are_checked(kw: dict[str, str], match: str) -> None:
    with pytest.raises(ComposeError, match=match):
        ComposeConfig(repo=ROOT, **kw).validate()
    ComposeConfig(repo=ROOT).validate()
    with pytest.raises(ComposeError, match="not found"):
        ComposeConfig(repo=ROOT / "tests").validate()


def test_only_our_own_dockerd_is_ever_signalled() -> None:
    assert engine._our_dockerd(os.getpid()) is False  # a live process that is not our dockerd
    for host, ours in ((engine.PRIVATE_HOST, True), ("unix:///var/run/docker.sock", False)):
        # a process whose command line reads like a dockerd (argv[0] "dockerd") serving ``host``
        proc = subprocess.Popen(["dockerd", "-c", "import time; time.sleep(30)", f"--host={host}"],
                                executable=sys.executable)
        try:
            wait_for(lambda p=proc: Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(b"dockerd\0"),
                     "the stand-in dockerd to start")
            assert engine._our_dockerd(proc.pid) is ours, host
        finally:
            proc.kill()
            proc.wait()


def test_steps_are_timed_and_tabled() -> None:
    said: list[str] = []
    steps = Steps(say=said.append)
    with steps.step("base image") as s:
        s.note = "present"
    with pytest.raises(RuntimeError), steps.step("images"):
        raise RuntimeError("build failed")
    assert [s.name for s in steps.done] == ["base image", "images"]  # a failed step is recorded too
    assert said[0] == "base image ..." and said[1].startswith("base image: ") and said[1].endswith("present")
    assert steps.table()[-1].startswith("total")
