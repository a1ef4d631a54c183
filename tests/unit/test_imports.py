"""The import rules of DESIGN.md §2, checked on the source with ``ast`` (every import statement,
including those inside functions and ``if TYPE_CHECKING`` blocks):

(a) backends never import subnet managers and subnet managers never import backends (both may
    import the core); the core (``flannel/`` outside ``flannel/lab``) never imports the lab;
(b) pyroute2 only in the kernel ports (PYROUTE2_USERS: backends/routed/netlink.py and the udp TUN
    device; everything else speaks raw rtnetlink through flannel/nl.py);
(c) only ``subnet_managers/etcd/registry.py`` imports the etcd client (pyetcd, grpc);
(d) nothing installed imports ``tests``;
(e) a backend package imports no other backend package except ``routed`` and ``base``;
(f) code imports ``flannel.backends`` / ``flannel.subnet_managers``, never the bare folder names
    (they only exist as packages in a source checkout).

Each failure names the file, the line and the import.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# source folder → the package it installs as (setup.cfg package_dir)
PACKAGES = {"flannel": "flannel", "backends": "flannel.backends", "subnet_managers": "flannel.subnet_managers"}

# (b) pyroute2 users. backends/routed/netlink.py is the backends' netlink port (it opens pyroute2
# lazily, for a message shape flannel/nl.py does not pack); udp/tun.py creates and configures the
# TUN device (its own small port). The core (interface selection included) uses flannel/nl.py:
# importing pyroute2 costs ~22 MB. Keep this list short: a new user belongs in one of these.
PYROUTE2_USERS = {"backends/routed/netlink.py", "backends/udp/tun.py"}
ETCD_CLIENT_USERS = {"subnet_managers/etcd/registry.py"}


@dataclass(frozen=True)
class Import:
    path: str     # relative to the repository root, e.g. "backends/vxlan/backend.py"
    line: int
    module: str   # absolute dotted name of what is imported (``from`` imports: the module named)
    names: tuple[str, ...] = ()   # ``from module import names``

    def __str__(self) -> str:
        what = f"from {self.module} import {', '.join(self.names)}" if self.names else f"import {self.module}"
        return f"{self.path}:{self.line}: {what}"

    def modules(self) -> tuple[str, ...]:
        """Every module this may import: ``from pkg import sub`` may import the submodule ``pkg.sub``."""
        return (self.module, *(f"{self.module}.{n}" for n in self.names if n != "*"))


def _module_name(rel: Path) -> str:
    """Installed dotted name of a source file: backends/vxlan/backend.py → flannel.backends.vxlan.backend."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def _imports_of(path: Path, root: Path = ROOT) -> Iterator[Import]:
    rel = path.relative_to(root)
    module = _module_name(rel)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(rel))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(str(rel), node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package the file installs into
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield Import(str(rel), node.lineno, target, tuple(alias.name for alias in node.names))


def _all_imports() -> list[Import]:
    found = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found.extend(_imports_of(path))
    return found


IMPORTS = _all_imports()


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports_from(imp: Import, package: str) -> bool:
    return any(_within(m, package) for m in imp.modules())


def _backend_package(path: str) -> str | None:
    """The backend package a file belongs to (backends/vxlan/x.py → vxlan); None for backends/*.py."""
    parts = Path(path).parts
    return parts[1] if parts[0] == "backends" and len(parts) > 2 else None


def _violations(rule: Callable[[Import], str | None]) -> list[str]:
    out = []
    for imp in sorted(IMPORTS, key=lambda i: (i.path, i.line)):
        why = rule(imp)
        if why is not None:
            out.append(f"{imp}  ({why})")
    return out


def rule_a_layers(imp: Import) -> str | None:
    if imp.path.startswith("backends/") and _imports_from(imp, "flannel.subnet_managers"):
        return "backends must not depend on subnet managers"
    if imp.path.startswith("subnet_managers/") and _imports_from(imp, "flannel.backends"):
        return "subnet managers must not depend on backends"
    if (imp.path.startswith("flannel/") and not imp.path.startswith("flannel/lab/")
            and _imports_from(imp, "flannel.lab")):
        return "the core must not depend on the lab"
    return None


def rule_b_pyroute2(imp: Import) -> str | None:
    if _imports_from(imp, "pyroute2") and imp.path not in PYROUTE2_USERS:
        return f"only {', '.join(sorted(PYROUTE2_USERS))} may import pyroute2"
    return None


def rule_c_etcd_client(imp: Import) -> str | None:
    if (_imports_from(imp, "pyetcd") or _imports_from(imp, "grpc")) and imp.path not in ETCD_CLIENT_USERS:
        return f"only {', '.join(sorted(ETCD_CLIENT_USERS))} may import the etcd client"
    return None


def rule_d_no_tests(imp: Import) -> str | None:
    if _imports_from(imp, "tests"):
        return "the installed package must not import tests"
    return None


def rule_e_backend_packages(imp: Import) -> str | None:
    own = _backend_package(imp.path)
    if own is None:
        return None
    others = {m.split(".")[2] for m in imp.modules() if _within(m, "flannel.backends") and m.count(".") >= 2}
    others -= {own, "routed", "base"}
    if not others:
        return None
    return f"backend package {own} must not import backend package {', '.join(sorted(others))} (only routed and base)"


def rule_f_installed_names(imp: Import) -> str | None:
    if _imports_from(imp, "backends") or _imports_from(imp, "subnet_managers"):
        return "import flannel.backends / flannel.subnet_managers (the installed names)"
    return None


@pytest.mark.parametrize("rule", [rule_a_layers, rule_b_pyroute2, rule_c_etcd_client, rule_d_no_tests,
                                  rule_e_backend_packages, rule_f_installed_names],
                         ids=lambda r: r.__name__)
def test_import_rule(rule: Callable[[Import], str | None]) -> None:
    bad = _violations(rule)
    assert not bad, "import rule broken:\n  " + "\n  ".join(bad)


def test_the_scan_sees_the_imports_the_rules_are_about() -> None:
    """Guards the scanner: if it silently found nothing, every rule above would pass."""
    seen = {(imp.path, m) for imp in IMPORTS for m in imp.modules()}
    assert ("backends/routed/netlink.py", "pyroute2") in seen
    assert ("subnet_managers/etcd/registry.py", "pyetcd") in {(p, m.split(".")[0]) for p, m in seen}
    assert any(p.startswith("backends/hostgw/") and _within(m, "flannel.backends.routed") for p, m in seen)
    assert any(p.startswith("flannel/lab/") and _within(m, "flannel.lab") for p, m in seen)


@pytest.mark.parametrize("path, source, rule", [
    ("backends/vxlan/x.py", "from flannel.subnet_managers.etcd import manager", rule_a_layers),
    ("subnet_managers/kube/x.py", "import flannel.backends.vxlan.backend", rule_a_layers),
    ("flannel/daemon.py", "from flannel.lab import netns", rule_a_layers),
    ("backends/vxlan/x.py", "from pyroute2 import IPRoute", rule_b_pyroute2),
    ("subnet_managers/etcd/manager.py", "import grpc", rule_c_etcd_client),
    ("flannel/lab/x.py", "from tests import support", rule_d_no_tests),
    ("backends/hostgw/x.py", "from flannel.backends.vxlan import backend", rule_e_backend_packages),
    ("backends/hostgw/x.py", "from ..vxlan import backend", rule_e_backend_packages),
    ("flannel/x.py", "import backends.vxlan", rule_f_installed_names),
])
def test_each_rule_catches_its_violation(tmp_path: Path, path: str, source: str,
                                         rule: Callable[[Import], str | None]) -> None:
    """A made-up file breaking the rule is reported, naming the file, the line and the import
    (a relative import as the absolute one it resolves to)."""
    shown = source.replace("from ..vxlan", "from flannel.backends.vxlan")
    f = tmp_path / path
    f.parent.mkdir(parents=True)
    f.write_text(f'"""doc"""\n\n{source}\n')
    reasons = [f"{imp}  ({why})" for imp in _imports_of(f, tmp_path) if (why := rule(imp)) is not None]
    assert reasons, f"{rule.__name__} missed {source!r} in {path}"
    assert reasons[0].startswith(f"{path}:3: {shown}  ("), reasons


def test_allowed_imports_pass() -> None:
    """The rules let through what the design allows (so they are not just 'reject everything')."""
    ok = [Import("backends/hostgw/backend.py", 1, "flannel.backends.routed.reconcile"),
          Import("backends/udp/backend.py", 1, "flannel.backends.base"),
          Import("backends/udp/backend.py", 1, "flannel.backends.udp.proxy"),
          Import("backends/vxlan/backend.py", 1, "flannel.errors"),
          Import("subnet_managers/kube/manager.py", 1, "flannel.lease"),
          Import("flannel/lab/cluster.py", 1, "flannel.lab.netns")]
    rules = [rule_a_layers, rule_b_pyroute2, rule_c_etcd_client, rule_d_no_tests, rule_e_backend_packages,
             rule_f_installed_names]
    assert [(str(imp), r.__name__) for imp in ok for r in rules if r(imp) is not None] == []
