"""Putting the plugin where a container runtime finds it, and installing CNI config files.

A runtime executes ``<CNI bin dir>/flannel`` on the *host*, so the installed file must not depend
on this Python environment being present there. Two forms:

* ``zipapp`` (default, what the DaemonSet's init container installs): one executable zip file with
  ``#!/usr/bin/env python3`` holding only ``flannel/__init__.py``, ``flannel/errors.py`` and
  ``flannel/cni/`` (all standard library), so any python3 ≥ 3.8 on the node runs it.
* ``wrapper``: a two-line shell script exec'ing this installation's interpreter with
  ``-m flannel.cni`` (for the lab and for hosts where the project is installed anyway).

``install_conf`` is flannel's ``install-conf``: copy through a temp file in the destination
directory, keep the source's mode, rename, so the runtime never reads half a config.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import flannel
from flannel.errors import ConfigError

_MAIN = "from flannel.cni.plugin import main\nmain()\n"


def _atomic_write(dest: Path, write: Callable[[str], None], mode: int) -> None:
    """Like ``flannel.subnet_file.write_atomic`` but for a writer callback (zip, copy); kept here
    because everything under flannel/cni is bundled into the stdlib-only plugin executable."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def plugin_sources() -> dict[str, Path]:
    """Archive name → source file for everything the plugin imports."""
    root = Path(flannel.__file__).resolve().parent
    files = {"flannel/__init__.py": root / "__init__.py", "flannel/errors.py": root / "errors.py"}
    for src in sorted((root / "cni").glob("*.py")):
        files[f"flannel/cni/{src.name}"] = src
    return files


def build_zipapp(dest: str | os.PathLike[str], *, interpreter: str = "/usr/bin/env python3") -> Path:
    """Write the self-contained plugin executable to ``dest`` (atomically, mode 0755)."""
    target = Path(dest)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw:
            raw.write(f"#!{interpreter}\n".encode())
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr("__main__.py", _MAIN)
                for name, src in plugin_sources().items():
                    z.write(src, name)

    _atomic_write(target, write, 0o755)
    return target


def write_wrapper(dest: str | os.PathLike[str], *, python: str | None = None) -> Path:
    """Write a shell wrapper that runs ``python -m flannel.cni`` with this (or the given) Python."""
    target = Path(dest)
    exe = python or sys.executable
    text = f"#!/bin/sh\n# flannel CNI plugin (pyflannel)\nexec {shlex.quote(exe)} -m flannel.cni \"$@\"\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    _atomic_write(target, write, 0o755)
    return target


def install_plugin(bin_dir: str, *, name: str = "flannel", mode: str = "zipapp", python: str | None = None) -> Path:
    if not name or "/" in name:
        raise ConfigError(f"invalid plugin file name {name!r}")
    dest = Path(bin_dir) / name
    if mode == "zipapp":
        return build_zipapp(dest, interpreter=python or "/usr/bin/env python3")
    if mode == "wrapper":
        return write_wrapper(dest, python=python)
    raise ConfigError(f"unknown install mode {mode!r} (zipapp or wrapper)")


def install_conf(src: str, dst: str) -> Path:
    """Atomically copy ``src`` to ``dst`` keeping the source's permission bits."""
    source = Path(src)
    if not source.is_file():
        raise ConfigError(f"source {src} does not exist or is not a file")
    mode = source.stat().st_mode & 0o7777
    target = Path(dst)

    def copy(tmp: str) -> None:
        shutil.copyfile(source, tmp)

    _atomic_write(target, copy, mode)
    return target
