"""``scripts/compose up|down|status|iperf|purge``: the compose lab's command line (see docs/docker.md)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flannel.lab import podtraffic
from flannel.lab.compose import engine as engines
from flannel.lab.compose import images
from flannel.lab.compose.docker import ComposeError
from flannel.lab.compose.lab import (
    BACKENDS,
    DEFAULT_NETWORK,
    DEFAULT_PROJECT,
    DEFAULT_UNDERLAY,
    ComposeConfig,
    ComposeLab,
)
from flannel.lab.compose.steps import Steps


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/compose", description=__doc__)
    p.add_argument("command", choices=["up", "down", "status", "iperf", "purge"])
    p.add_argument("--backend", choices=BACKENDS, default="vxlan", help="up: the backend (default vxlan)")
    p.add_argument("--network", default=DEFAULT_NETWORK, help=f"up: flannel Network (default {DEFAULT_NETWORK})")
    p.add_argument("--underlay", default=DEFAULT_UNDERLAY,
                   help=f"up: the underlay network's subnet (default {DEFAULT_UNDERLAY})")
    p.add_argument("--project", default=DEFAULT_PROJECT, help=f"compose project name (default {DEFAULT_PROJECT})")
    p.add_argument("--repo", default=os.environ.get("FLANNEL_REPO", "."),
                   help="the pyflannel repository (compose file, Dockerfiles); scripts/compose passes it")
    p.add_argument("--keep-engine", action="store_true", help="down: leave a private engine running")
    p.add_argument("--streams", type=int, default=1, help="iperf: parallel streams (default 1)")
    p.add_argument("--seconds", type=int, default=5, help="iperf: seconds per run (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="iperf: runs, median reported (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="compose: %(message)s")
    cfg = ComposeConfig(repo=Path(args.repo).resolve(), project=args.project, backend=args.backend,
                        network=args.network, underlay=args.underlay)
    try:
        return {"up": _up, "down": _down, "status": _status, "iperf": _iperf, "purge": _purge}[args.command](cfg, args)
    except ComposeError as e:
        print(f"compose: {e}", file=sys.stderr)
        return 1


def _say(msg: str) -> None:
    print(f"compose: {msg}", flush=True)


def _existing(cfg: ComposeConfig) -> ComposeLab | None:
    """The lab on an engine that already runs (status/down never start an engine)."""
    engine = engines.find(start=False)
    return ComposeLab(cfg, engine) if engine is not None else None


def _up(cfg: ComposeConfig, args: argparse.Namespace) -> int:
    steps = Steps(say=_say)
    lab = ComposeLab.prepare(cfg, steps)
    matrix = lab.up(steps)
    print("\n".join(lab.status_lines()))
    pods = lab.pods()
    print("\npod-to-pod ping:")
    print(podtraffic.format_matrix(pods, matrix))
    print(f"\n{sum(matrix.values())}/{len(matrix)} pairs reachable")
    print("\nstep times:\n  " + "\n  ".join(steps.table()))
    flags = "" if cfg.project == DEFAULT_PROJECT else f" --project {cfg.project}"
    print(f"\nlogs: docker logs <container> (DOCKER_HOST={lab.docker.host})   stop with: scripts/compose down{flags}")
    return 0 if all(matrix.values()) else 1


def _status(cfg: ComposeConfig, args: argparse.Namespace) -> int:
    lab = _existing(cfg)
    if lab is None or not lab.is_up():
        print(f"compose: not up (no containers of project {cfg.project!r}"
              + ("" if lab is not None else "; no engine running") + ")")
        return 3
    print("\n".join(lab.status_lines()))
    pods = lab.pods()
    print(podtraffic.format_matrix(pods, podtraffic.ping_matrix(pods)))
    return 0


def _down(cfg: ComposeConfig, args: argparse.Namespace) -> int:
    lab = _existing(cfg)
    if lab is None:
        print("compose: not up (no engine running)")
        return 0
    t0 = time.monotonic()
    lines = lab.down() or [f"compose project {cfg.project!r} was not up"]
    if not args.keep_engine:
        lines.append(engines.stop_if_idle(lab.engine))
    print("\n".join(f"compose: {line}" for line in lines) + f"\ncompose: down in {time.monotonic() - t0:.1f} s")
    return 0


def _iperf(cfg: ComposeConfig, args: argparse.Namespace) -> int:
    lab = _existing(cfg)
    if lab is None or not lab.is_up():
        print(f"compose: not up (project {cfg.project!r})", file=sys.stderr)
        return 3
    pods = lab.pods()
    if len(pods) < 2:
        print("compose: need two pods", file=sys.stderr)
        return 1
    runs = [podtraffic.iperf3(pods[0], pods[1], streams=args.streams, seconds=args.seconds)
            for _ in range(args.repeat)]
    backend = (lab.running_config().get("Backend") or {}).get("Type", "?")
    load = os.getloadavg()
    print(f"iperf3 {pods[0].name} → {pods[1].name} ({backend}, {args.streams} stream(s), {args.seconds} s): "
          f"{statistics.median(runs):.2f} Gbit/s (runs: {', '.join(f'{r:.2f}' for r in runs)}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    return 0


def _purge(cfg: ComposeConfig, args: argparse.Namespace) -> int:
    """Remove what ``down`` keeps as a cache: images (the private engine's data) and the wheelhouse."""
    lab = _existing(cfg)
    if lab is not None and lab.is_up():
        print("compose: the lab is up: `scripts/compose down` first", file=sys.stderr)
        return 1
    removed: list[str] = []
    if lab is not None and not lab.engine.private:
        removed += [f"image {r}" for r in images.remove_our_images(lab.docker, cfg.compose_file)]
    elif lab is not None:
        print(engines.stop_if_idle(lab.engine))
    removed += engines.purge()
    for d in (images.CACHE_DIR / "wheelhouse", engines.STATE_DIR / "logs"):
        if d.exists():
            shutil.rmtree(d)
            removed.append(str(d))
    for whl in (cfg.repo / images.WHEELHOUSE).glob("*.whl"):
        whl.unlink()
    print("compose: removed " + (", ".join(removed) if removed else "nothing (no cache)"))
    return 0
