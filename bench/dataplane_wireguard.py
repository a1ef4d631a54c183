#!/usr/bin/env python3
"""wireguard data plane: pod→pod TCP throughput through the wireguard backend (wireguard-go: the
kernel here has no WireGuard) next to the vxlan backend (kernel vxlan), measured in one run.

Two labs side by side (``flannel.lab``: hub-bridge underlay MTU 1500, 2 hosts with a real agent
each, one pod per host; etcd): one ``--backend wireguard``, one ``--backend vxlan``. iperf3 (Debian)
pod → pod, TCP, 1 and 4 streams; the runs alternate (wireguard, vxlan, wireguard, ...) so machine
noise hits both alike. The ratio says what encryption in user space costs against the unencrypted
kernel path; wireguard-go is CPU-bound, so on a shared 2-core machine the load average (printed,
from /proc/loadavg before and after) matters as much as the numbers.

    sudo .venv/bin/python bench/dataplane_wireguard.py [--seconds 5] [--repeat 3] [--no-write]

Appends/replaces the section "wireguard data plane" in docs/benchmarks.md (other sections untouched).
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.dataplane_vxlan import iperf, mtu_of, write_section
from flannel.lab import podtraffic
from flannel.lab.cluster import Lab, LabConfig
from flannel.lab.netns import run_prefix

SECTION = "wireguard data plane"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def ping_avg(src: podtraffic.Endpoint, dst: podtraffic.Endpoint) -> float:
    out = podtraffic.ns_exec(src.ns, "ping", "-c", "20", "-i", "0.05", "-q", dst.ip).stdout
    for line in out.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only, don't touch docs/benchmarks.md")
    args = ap.parse_args()
    for tool in ("iperf3", "wireguard-go"):
        if shutil.which(tool) is None:
            print(f"{tool} missing: run scripts/setup", file=sys.stderr)
            return 1
    labs: dict[str, Lab] = {}
    tmp = tempfile.mkdtemp(prefix="flannel-bench-")
    load_before = loadavg()
    results: dict[tuple[str, int], list[float]] = {}
    pings: dict[str, float] = {}
    mtus: dict[str, int] = {}
    try:
        for backend in ("wireguard", "vxlan"):
            lab = labs[backend] = Lab(LabConfig(hosts=2, pods_per_host=1, backend=backend, dir=f"{tmp}/{backend}",
                                                prefix=run_prefix()))
            lab.up()
            pods = lab.pods()
            if not all(podtraffic.wait_full_matrix(pods, time.monotonic() + 30).values()):
                raise RuntimeError(f"{backend}: pods cannot reach each other")
            dev = "flannel-wg" if backend == "wireguard" else "flannel.1"
            mtus[backend] = mtu_of(lab.hosts["h1"].ns, dev)
            pings[backend] = ping_avg(pods[0], pods[1])
        for _ in range(args.repeat):
            for streams in (1, 4):
                for backend, lab in labs.items():
                    pods = lab.pods()
                    g = iperf(pods[0], pods[1], streams, args.seconds)
                    results.setdefault((backend, streams), []).append(g)
                    print(f"{backend:9s} {streams} stream(s): {g:6.2f} Gbit/s", flush=True)
    finally:
        for lab in labs.values():
            lab.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = loadavg()

    lines = [f"## {SECTION}", "",
             f"Command: `sudo .venv/bin/python bench/dataplane_wireguard.py --seconds {args.seconds} "
             f"--repeat {args.repeat}`  ",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, kernel "
             f"{platform.release()}, {args.repeat}× alternating {args.seconds} s iperf3 runs (median shown); "
             f"load average before {load_before}, after {load_after} (2 cores, shared).", "",
             "Topology: two labs (hub-bridge underlay MTU 1500, two hosts with a real agent each, one pod "
             "per host, etcd), pod → pod TCP. *wireguard* = the wireguard backend with wireguard-go (this "
             "kernel has no WireGuard module); *vxlan* = the vxlan backend (kernel vxlan). Device MTUs: "
             f"{mtus}. Ping (20 × 50 ms, avg ms): {', '.join(f'{k} {v:.3f}' for k, v in pings.items())}.", "",
             "| streams | wireguard-go (Gbit/s) | kernel vxlan (Gbit/s) | ratio wireguard/vxlan |",
             "|---|---|---|---|"]
    for streams in (1, 4):
        w = statistics.median(results[("wireguard", streams)])
        v = statistics.median(results[("vxlan", streams)])
        lines.append(f"| {streams} | {w:.2f} ({', '.join(f'{x:.2f}' for x in results[('wireguard', streams)])}) | "
                     f"{v:.2f} ({', '.join(f'{x:.2f}' for x in results[('vxlan', streams)])}) | {w / v:.2f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        print(f"written to {write_section_named(text)}")
    return 0


def write_section_named(text: str) -> Path:
    """``write_section`` of the vxlan benchmark, for this file's section name."""
    import bench.dataplane_vxlan as vx

    old, vx.SECTION = vx.SECTION, SECTION
    try:
        return write_section(text)
    finally:
        vx.SECTION = old


if __name__ == "__main__":
    sys.exit(main())
