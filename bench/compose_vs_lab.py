#!/usr/bin/env python3
"""Pod → pod TCP throughput (iperf3) in the compose lab next to the namespace lab, per backend.

Both labs run side by side with the same backend (etcd, 3 hosts, one pod per host): the namespace
lab (``scripts/lab``: agents as processes of this machine's venv) and the compose lab
(``scripts/compose``: agents in the image, each host a container). The runs alternate (netns,
compose, netns, ...) so machine noise hits both alike; the load average is recorded with them.

    sudo .venv/bin/python bench/compose_vs_lab.py [--backends vxlan,host-gw,udp] [--seconds 5] [--repeat 3]

Appends/replaces the section "compose vs namespace lab" in docs/benchmarks.md. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import Lab, LabConfig
from flannel.lab.compose import engine as engines
from flannel.lab.compose.lab import ComposeConfig, ComposeLab, free_underlay
from flannel.lab.compose.steps import Steps
from flannel.lab.netns import run_prefix

SECTION = "compose vs namespace lab"


def data_path(log: str) -> str:
    """The udp agent's data-path line: ``udp: data path: ...`` (or the proxy's older wording)."""
    found = [line[line.index("udp:"):] for line in log.splitlines() if "udp:" in line and "data path" in line]
    return found[-1] if found else "(not stated)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="vxlan,host-gw,udp")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    backends = args.backends.split(",")
    steps = Steps(say=lambda m: print(f"bench: {m}", flush=True))
    prep = ComposeLab.prepare(ComposeConfig(repo=REPO, project="pyflbench"), steps)
    rows, notes, loads = [], [], []
    try:
        for backend in backends:
            tmp = tempfile.mkdtemp(prefix="flannel-bench-")
            lab = Lab(LabConfig(hosts=3, pods_per_host=1, backend=backend, dir=tmp, prefix=run_prefix()))
            clab = ComposeLab(ComposeConfig(repo=REPO, project="pyflbench", backend=backend,
                                            underlay=free_underlay(prep.docker, [f"198.18.{n}.0/24"
                                                                                 for n in range(50, 99)])),
                              prep.engine)
            try:
                lab.up()
                clab.up(Steps())
                pods = {"netns": lab.pods(), "compose": clab.pods()}
                for name, p in pods.items():
                    if not all(pt.wait_full_matrix(p, time.monotonic() + 30).values()):
                        raise RuntimeError(f"{name} lab ({backend}): pods cannot reach each other")
                res: dict[str, list[float]] = {"netns": [], "compose": []}
                for _ in range(args.repeat):
                    for name, p in pods.items():
                        g = pt.iperf3(p[0], p[1], seconds=args.seconds)
                        res[name].append(g)
                        loads.append(os.getloadavg()[0])
                        print(f"bench: {backend:8s} {name:8s} {g:6.2f} Gbit/s  (load {loads[-1]:.1f})", flush=True)
                if backend == "udp":
                    netns_log = Path(lab.log_file(next(iter(lab.hosts)))).read_text(errors="replace")
                    notes.append(f"udp data path: netns lab agent: {data_path(netns_log)}; compose agent: "
                                 f"{data_path(clab.logs(clab.names['agent'][0]))}")
                rows.append((backend, res))
            finally:
                clab.down()
                lab.teardown()
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if prep.engine.started:
            print("bench:", engines.stop_if_idle(prep.engine))
    lines = [f"## {SECTION}", "",
             f"Command: `sudo .venv/bin/python bench/compose_vs_lab.py --backends {args.backends} "
             f"--seconds {args.seconds} --repeat {args.repeat}`  ",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, kernel "
             f"{platform.release()}, load average during the runs {min(loads):.1f}–{max(loads):.1f} "
             "(2 cores shared with other jobs).", "",
             "Pod → pod TCP, iperf3, 1 stream, pod1 → pod2 (different hosts), medians (per-run values). "
             "*netns* = `scripts/lab` (agents from the venv, hosts are namespaces on a veth/bridge underlay); "
             "*compose* = `scripts/compose` (agents from the image, hosts are containers on the internal "
             "bridge network).", "",
             "| backend | netns lab (Gbit/s) | compose lab (Gbit/s) | compose / netns |", "|---|---|---|---|"]
    for backend, res in rows:
        n, c = statistics.median(res["netns"]), statistics.median(res["compose"])
        lines.append(f"| {backend} | {n:.2f} ({', '.join(f'{x:.2f}' for x in res['netns'])}) | "
                     f"{c:.2f} ({', '.join(f'{x:.2f}' for x in res['compose'])}) | {c / n:.2f} |")
    lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines).rstrip() + "\n"
    print("\n" + text)
    if not args.no_write:
        _write_section(text)
    return 0


def _write_section(text: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    head = f"## {SECTION}"
    if head in old:
        before, _, rest = old.partition(head)
        nxt = rest.find("\n## ")
        new = before + text.rstrip() + "\n\n" + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        new = old.rstrip() + "\n\n" + text
    path.write_text(new)
    print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
