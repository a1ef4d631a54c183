"""The udp fast path is part of the installed package (issue 12 item 1): ``pip install`` builds
it (setup.py, an optional setuptools Extension) into ``flannel/backends/udp/``, the agent loads it
from there and nowhere else, and an install without a C compiler still works, on the pure-Python
data path, and says so (``flannel --version``, the ``udp: data path:`` start-up line).

Each install is a real ``pip install --target`` of a copy of this source tree into a temporary
directory, run from outside the worktree so that the copy, not the editable install, is imported.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel.lab.netns import cleanup_prefix, run_prefix
from flannel.lab.topology import Underlay
from flannel.lab.udp_harness import HarnessProcess

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "flannel", "backends", "subnet_managers")
SO_GLOB = "_fastpath*.so"


def _install(tmp: Path, name: str, env: dict[str, str]) -> Path:
    """``pip install --no-deps --target`` of a clean copy of the tree; returns the target."""
    src, target = tmp / f"{name}-src", tmp / f"{name}-site"
    src.mkdir()
    for item in SOURCES:
        if (ROOT / item).is_dir():
            shutil.copytree(ROOT / item, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / item, src / item)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", "--target", str(target), str(src)],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert res.returncode == 0, f"pip install failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return target


def _run_installed(target: Path, tmp: Path, code: str) -> str:
    """Python code against the installed copy (cwd outside the worktree, the copy first on the path)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert res.returncode == 0, res.stderr
    return res.stdout


PROBE = ("import flannel.backends.udp.accel as a, flannel.cli as c\n"
         "print(a.__file__)\nprint(a.status())\n"
         "print(a.library_path() if a.load() is not None else '-')\n"
         "c.main(['--version'])\n")


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    tmp = tmp_path_factory.mktemp("install")
    with_cc = _install(tmp, "with-cc", {})
    no_cc = _install(tmp, "no-cc", {"CC": "/bin/false"})  # a compiler that always fails
    yield tmp, with_cc, no_cc


def test_installed_package_has_the_fast_path_and_loads_it_from_there(installs: tuple[Path, Path, Path]) -> None:
    tmp, target, _ = installs
    built = list((target / "flannel" / "backends" / "udp").glob(SO_GLOB))
    assert len(built) == 1, f"no extension in the installed package: {sorted(os.listdir(target))}"
    accel_file, status, lib, *version = _run_installed(target, tmp, PROBE).splitlines()
    assert Path(accel_file).is_relative_to(target), f"imported the wrong copy: {accel_file}"
    assert status == "available"
    assert Path(lib) == built[0]
    assert "udp fast path: available" in version, version
    # the C source is not needed at run time, so it is not installed
    assert not list(target.rglob("*.c"))


@pytest.mark.root
def test_install_without_compiler_runs_pure_python_and_says_so(installs: tuple[Path, Path, Path]) -> None:
    tmp, _, target = installs
    assert not list(target.rglob(SO_GLOB))
    assert (target / "flannel" / "backends" / "udp" / "accel.py").exists()  # the package itself is complete
    _, status, lib, *version = _run_installed(target, tmp, PROBE).splitlines()
    assert status.startswith("not available (the C fast path was not built at install time"), status
    assert lib == "-"
    assert any(line.startswith("udp fast path: not available (") for line in version), version
    # and the backend itself starts on the pure-Python path, with exactly one line saying so
    prefix = run_prefix()
    u = Underlay(prefix)
    try:
        h = u.add_host("h1")
        log = tmp / "harness.log"
        node = HarnessProcess(h.ns, "10.244.1.0/24", "10.244.0.0/16", env={**os.environ, "PYTHONPATH": str(target)},
                              cwd=str(tmp), log_path=str(log))
        try:
            assert node.ready["accel"] is False and node.ready["offload"] is False
        finally:
            node.close()
    finally:
        u.close()
        cleanup_prefix(prefix)
    lines = [line for line in log.read_text().splitlines() if "udp: data path:" in line]
    assert len(lines) == 1, log.read_text()
    assert lines[0].split("udp: data path: ", 1)[1].startswith("pure Python (the C fast path was not built"), lines


def _runtime_strings(path: Path) -> Iterator[tuple[int, str]]:
    """String constants of a module that are not docstrings (what the code may execute or read)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


FORBIDDEN = re.compile(r"^(gcc|cc|clang|tcc|c99|cpp|ld)$|\bCC\b|XDG_CACHE_HOME|FLANNEL_ACCEL_CACHE|\.cache\b"
                       r"|FLANNEL_UDP_|-shared\b|-fPIC\b")


def test_nothing_in_the_package_compiles_or_reads_a_cache_at_run_time() -> None:
    """No module of the installed package names a compiler, ``$CC``, a cache directory or the old
    udp environment variables in anything it can execute; ctypes loads only the library that
    ``accel.library_path()`` finds inside the package (and libc, for setns in the lab)."""
    hits = []
    cdll = []
    for top in ("flannel", "backends", "subnet_managers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            hits += [f"{rel}:{line}: {value!r}" for line, value in _runtime_strings(path) if FORBIDDEN.search(value)]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("CDLL"):
                    cdll.append(f"{rel}: {ast.unparse(node)}")
    assert not hits, "run-time references to a compiler or a cache:\n" + "\n".join(hits)
    assert sorted(cdll) == sorted([
        "backends/udp/accel.py: ctypes.CDLL(str(path))",
        "flannel/lab/netns.py: ctypes.CDLL(None, use_errno=True)",
        "flannel/threadname.py: ctypes.CDLL(None, use_errno=True)",   # libc (prctl: thread names)
        "flannel/memory.py: ctypes.CDLL(None)",   # libc (mallopt: one malloc arena; malloc_trim)
    ]), cdll
    src = (ROOT / "backends" / "udp" / "accel.py").read_text()
    assert "path = library_path()" in src
