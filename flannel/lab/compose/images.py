"""The images the compose lab runs, made without a registry when none answers.

* **Base** ``debian:bookworm-slim``: pulled if a registry answers; else built with
  ``debootstrap --variant=minbase bookworm`` from the machine's own Debian mirror (read from
  /etc/apt/sources.list*), trimmed and configured the way Debian's official slim image is (apt
  cleans its cache, no docs/man/locales, ``policy-rc.d`` keeps services from starting), and imported
  with ``docker import``. The Dockerfiles name only ``debian:bookworm-slim``, so they are the same
  files either way.
* **Wheelhouse**: ``pip wheel`` on the host (the host's pip configuration reaches the indexes; pip
  inside a build container may not, e.g. when its CA is not in the container) into a cache keyed
  by the requirements, copied into the build context (``deploy/docker/wheelhouse/``).
* **Images**: every ``build:`` in the compose file, built with ``docker build --network host`` (our
  private engine has no default bridge; RUN steps use the machine's network to reach Debian's
  mirror). Docker's layer cache makes an unchanged image a no-op.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flannel.lab.compose.docker import ComposeError, Docker

log = logging.getLogger(__name__)

BASE_IMAGE = "debian:bookworm-slim"
SUITE = "bookworm"
IMAGE_PYTHON = (3, 11)  # Debian bookworm's python3: the wheels must fit it
BASE_LABEL = "org.pyflannel.base"
BUILT_LABEL = "org.pyflannel.built-by"
CACHE_DIR = Path(os.environ.get("FLANNEL_COMPOSE_CACHE", "/var/cache/pyflannel"))
WHEELHOUSE = Path("deploy/docker/wheelhouse")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# What Debian's own slim image sets (docker-debian-artifacts / debuerreotype), so builds behave alike.
_SLIM_FILES = {
    "etc/apt/apt.conf.d/docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'),
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/dpkg/dpkg.cfg.d/docker": (
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/groff/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/lintian/*\n"
        "path-exclude /usr/share/linda/*\npath-exclude /usr/share/locale/*\n"),
    "usr/sbin/policy-rc.d": "#!/bin/sh\n# no services start inside an image build\nexit 101\n",
}


# ---- base image ---------------------------------------------------------------------------------

def debian_mirrors(paths: list[Path] | None = None) -> tuple[str, str | None]:
    """(mirror for ``bookworm``, mirror for ``bookworm-security`` or None) from the machine's apt sources.

    Reads both formats: one-line ``deb [opts] URI suite comps`` and deb822 stanzas (``URIs:``,
    ``Suites:``). Entries for other suites (third-party repositories) are ignored.
    """
    if paths is None:
        d = Path("/etc/apt")
        paths = [d / "sources.list", *sorted((d / "sources.list.d").glob("*.list")),
                 *sorted((d / "sources.list.d").glob("*.sources"))]
    main: str | None = None
    security: str | None = None
    for uri, suites in _apt_entries(paths):
        if SUITE in suites and main is None:
            main = uri
        if f"{SUITE}-security" in suites and security is None:
            security = uri
    return main or DEFAULT_MIRROR, security


def _apt_entries(paths: list[Path]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for p in paths:
        try:
            text = p.read_text()
        except OSError:
            continue
        if p.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.strip().startswith("#") or ":" not in line:
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                    out += [(u, fields.get("suites", "").split()) for u in fields.get("uris", "").split()]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    out.append((words[1], [words[2]]))
    return out


def ensure_base(docker: Docker, image: str = BASE_IMAGE) -> str:
    """Make sure ``image`` exists on the engine; say how (present / pulled / built with debootstrap)."""
    if docker.image_exists(image):
        return "present"
    pulled = docker.run("pull", "-q", image, check=False, timeout=300)
    if pulled.returncode == 0:
        return "pulled"
    log.info("no registry for %s (%s); building it with debootstrap", image, pulled.stderr.strip()[-200:])
    return build_base(docker, image)


def build_base(docker: Docker, image: str = BASE_IMAGE) -> str:
    if shutil.which("debootstrap") is None:
        raise ComposeError(f"{image} cannot be pulled and debootstrap is not installed (scripts/setup installs it)")
    mirror, security = debian_mirrors()
    root = Path(tempfile.mkdtemp(prefix="pyflannel-rootfs-", dir="/var/tmp"))
    try:
        res = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror],
                             capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise ComposeError(f"debootstrap {SUITE} from {mirror} failed ({res.returncode}):\n"
                               f"{(res.stderr + res.stdout).strip()[-2000:]}")
        slim_rootfs(root, mirror, security)
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imp = subprocess.run(["docker", "import", "--change", 'CMD ["bash"]',
                              "--change", f"LABEL {BASE_LABEL}=debootstrap", "-", image],
                             stdin=tar.stdout, capture_output=True, text=True, timeout=600, env=docker.env())
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise ComposeError(f"docker import of the {SUITE} root file system failed: {imp.stderr.strip()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return f"built with debootstrap from {mirror}"


def slim_rootfs(root: Path, mirror: str, security: str | None) -> None:
    """Configure a debootstrap tree like Debian's slim image and drop what an image does not need."""
    for rel, text in _SLIM_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    stanzas = [f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
               "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"]
    if security:
        stanzas.append(f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
                       "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text("\n".join(stanzas))
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for rel in ("etc/resolv.conf", "etc/hostname"):  # the engine provides both
        (root / rel).unlink(missing_ok=True)
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/groff/*",
                    "usr/share/lintian/*", "var/log/*.log", "var/log/apt/*"):
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for p in (root / "usr/share/doc").glob("*/*"):
        if p.name != "copyright":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# ---- wheelhouse ---------------------------------------------------------------------------------

def requirements(repo: Path) -> list[str]:
    """What the image's venv needs from an index: install_requires and the build requirements."""
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")
    reqs = [r.strip() for r in cfg.get("options", "install_requires", fallback="").splitlines() if r.strip()]
    pyproject = repo / "pyproject.toml"
    if pyproject.exists():
        build = tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", [])
        reqs += [str(r) for r in build]
    return reqs


def wheelhouse_key(reqs: list[str]) -> str:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return hashlib.sha256("\n".join([tag, *sorted(reqs)]).encode()).hexdigest()[:16]


def ensure_wheelhouse(repo: Path, cache_dir: Path = CACHE_DIR) -> str:
    """Fill ``deploy/docker/wheelhouse/`` with wheels for the requirements (from the cache if it has them)."""
    if sys.version_info[:2] != IMAGE_PYTHON:
        raise ComposeError(f"the wheelhouse is built with this Python ({sys.version.split()[0]}), but the image "
                           f"runs Debian {SUITE}'s Python {IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]}: run scripts/compose "
                           "from a venv of that version")
    reqs = requirements(repo)
    key = wheelhouse_key(reqs)
    cached = cache_dir / "wheelhouse" / key
    note = f"cached ({key})"
    if not (cached / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=_mkdir(cache_dir / "wheelhouse")))
        res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                              "--wheel-dir", str(tmp), *reqs], capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ComposeError(f"pip wheel failed ({res.returncode}):\n{(res.stderr + res.stdout).strip()[-2000:]}")
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
        note = f"built ({key})"
    wanted = {p.name: p for p in cached.glob("*.whl")}
    target = repo / WHEELHOUSE
    target.mkdir(parents=True, exist_ok=True)
    for p in target.glob("*.whl"):
        if p.name not in wanted:
            p.unlink()
    for name, src in wanted.items():
        dst = target / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return f"{len(wanted)} wheels, {note}"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---- images -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Build:
    image: str
    context: Path
    dockerfile: Path


def builds(compose_file: Path) -> list[Build]:
    """Every distinct image the compose file builds (services sharing an image build it once)."""
    doc: dict[str, Any] = yaml.safe_load(compose_file.read_text())
    out: dict[str, Build] = {}
    for name, svc in (doc.get("services") or {}).items():
        b = svc.get("build")
        if not b:
            continue
        if isinstance(b, str):
            b = {"context": b}
        if "image" not in svc:
            raise ComposeError(f"{compose_file}: service {name} builds an image but names none")
        ctx = (compose_file.parent / b.get("context", ".")).resolve()
        out.setdefault(svc["image"], Build(svc["image"], ctx, ctx / b.get("dockerfile", "Dockerfile")))
    return list(out.values())


def build_images(docker: Docker, compose_file: Path, log_dir: Path) -> str:
    """Build every image the compose file builds; say which ones changed (logs in ``log_dir``)."""
    notes = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for b in builds(compose_file):
        before = _image_id(docker, b.image)
        logf = log_dir / f"build-{re.sub(r'[^A-Za-z0-9_.-]', '_', b.image)}.log"
        res = docker.run("build", "--force-rm", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                         "--label", f"{BUILT_LABEL}=scripts/compose", "-t", b.image, "-f", str(b.dockerfile),
                         str(b.context), check=False, timeout=3600)
        logf.write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
            raise ComposeError(f"docker build of {b.image} failed (full log {logf}):\n{tail}")
        notes.append(f"{b.image} {'unchanged' if before and before == _image_id(docker, b.image) else 'built'}")
    return ", ".join(notes)


def _image_id(docker: Docker, ref: str) -> str:
    found = docker.inspect(ref, kind="image")
    return str(found[0]["Id"]) if found else ""


def remove_our_images(docker: Docker, compose_file: Path) -> list[str]:
    """On an engine that is not ours: remove the images scripts/compose built (the compose file's
    images, if they carry our build label) and the base if we imported it. Only those references:
    an image someone built FROM one of them inherits the label and must not be touched."""
    wanted = {b.image: (BUILT_LABEL, "scripts/compose") for b in builds(compose_file)}
    wanted[BASE_IMAGE] = (BASE_LABEL, "debootstrap")
    refs = []
    for ref, (label, value) in wanted.items():
        found = docker.inspect(ref, kind="image")
        if found and ((found[0].get("Config") or {}).get("Labels") or {}).get(label) == value:
            refs.append(ref)
    if refs:
        docker.run("rmi", *refs, check=False)
    return refs
