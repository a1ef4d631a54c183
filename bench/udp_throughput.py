#!/usr/bin/env python3
"""udp data plane benchmark: pod→pod TCP throughput and ping RTT, udp backend vs kernel vxlan.

Topology (network namespaces only, addresses in 198.18.0.0/15 and 10.244.0.0/16):
hub bridge + two hosts (flannel.lab.topology.Underlay, MTU 1500), and on each host a bridge
``cni0`` (10.244.N.1/24) with one pod namespace (10.244.N.2) behind a veth. The same topology runs
in turn: the udp backend (C accelerator and/or pure Python, via the harness the tests use), then
kernel vxlan configured by hand the way flannel's vxlan backend programs it (``flannel.1``, route
via .0 onlink, permanent neigh, fdb). Ratios udp/vxlan are printed at the end.

    sudo .venv/bin/python bench/udp_throughput.py [--seconds 5] [--repeat 3] [--modes offload,c,python] [--queues N]

Not a test: numbers vary run to run; compare the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from flannel.lab.netns import NetNS, run_prefix, veth_pair
from flannel.lab.topology import Host, Underlay
from flannel.lab.udp_harness import HarnessProcess

PY = sys.executable


def add_pod(u: Underlay, h: Host, n: int, mtu: int) -> NetNS:
    h.ns.ip("link", "add", "cni0", "type", "bridge")
    h.ns.ip("addr", "add", f"10.244.{n}.1/24", "dev", "cni0")
    h.ns.ip("link", "set", "cni0", "up")
    pod = NetNS(f"{u.prefix}pod{n}")
    veth_pair(pod, "eth0", h.ns, f"veth{n}")
    h.ns.ip("link", "set", f"veth{n}", "master", "cni0")
    set_pod_mtu(h, pod, n, mtu)
    pod.ip("addr", "add", f"10.244.{n}.2/24", "dev", "eth0")
    pod.ip("route", "add", "default", "via", f"10.244.{n}.1")
    return pod


def set_pod_mtu(h: Host, pod: NetNS, n: int, mtu: int) -> None:
    """FLANNEL_MTU as the CNI plugin would apply it."""
    pod.ip("link", "set", "eth0", "mtu", str(mtu))
    h.ns.ip("link", "set", f"veth{n}", "mtu", str(mtu))
    h.ns.ip("link", "set", "cni0", "mtu", str(mtu))


def iperf(client: NetNS, server_ip: str, streams: int, seconds: int) -> float:
    out = client.exec("iperf3", "-c", server_ip, "-t", str(seconds), "-P", str(streams), "-J",
                      timeout=seconds + 30, check=False)
    try:
        data = json.loads(out)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        print("iperf3 failed:", out[-500:], file=sys.stderr)
        return 0.0


def ping_rtt(client: NetNS, dst: str) -> float:
    out = client.exec("ping", "-c", "30", "-i", "0.02", "-q", dst, check=False, timeout=30)
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return float(m.group(1)) if m else float("nan")


def measure(pod1: NetNS, seconds: int) -> dict[str, float]:
    return {"rtt_ms": ping_rtt(pod1, "10.244.2.2"),
            "gbps_1": iperf(pod1, "10.244.2.2", 1, seconds),
            "gbps_4": iperf(pod1, "10.244.2.2", 4, seconds)}


def run_udp(u: Underlay, hosts: list[Host], pods: list[NetNS], mode: str, queues: int | None,
            seconds: int) -> dict[str, Any]:
    accel_mode, offload = {"offload": ("c", "on"), "offload-spread": ("c", "on"), "c": ("c", "off"),
                           "python": ("python", "off")}[mode]
    nodes = [HarnessProcess(h.ns, f"10.244.{i + 1}.0/24", "10.244.0.0/16", accel=accel_mode, queues=queues,
                            offload=offload, spread_ports=mode.endswith("-spread"))
             for i, h in enumerate(hosts)]
    try:
        mtu = int(nodes[0].ready["mtu"])
        for i, (h, pod) in enumerate(zip(hosts, pods)):
            set_pod_mtu(h, pod, i + 1, mtu)
        nodes[0].add("10.244.2.0/24", hosts[1].ip)
        nodes[1].add("10.244.1.0/24", hosts[0].ip)
        res: dict[str, Any] = measure(pods[0], seconds)
        res["counters_h1"] = nodes[0].counters()
        res["accel"] = nodes[0].ready["accel"]
        res["queues"] = nodes[0].ready["queues"]
        res["offload"] = nodes[0].ready["offload"]
        return res
    finally:
        for n in nodes:
            n.close()


def run_vxlan(hosts: list[Host], pods: list[NetNS], seconds: int) -> dict[str, Any]:
    macs = ["0e:00:00:00:00:01", "0e:00:00:00:00:02"]
    for i, h in enumerate(hosts):
        n = i + 1
        h.ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", str(h.ip), "dev", "eth0",
                "dstport", "8472", "nolearning")
        h.ns.ip("link", "set", "flannel.1", "address", macs[i], "mtu", "1450", "up")
        h.ns.ip("addr", "add", f"10.244.{n}.0/32", "dev", "flannel.1")
        set_pod_mtu(h, pods[i], n, 1450)
        j = 1 - i
        m = j + 1
        h.ns.ip("route", "add", f"10.244.{m}.0/24", "via", f"10.244.{m}.0", "dev", "flannel.1", "onlink")
        h.ns.ip("neigh", "add", f"10.244.{m}.0", "lladdr", macs[j], "dev", "flannel.1", "nud", "permanent")
        h.ns.exec("bridge", "fdb", "add", macs[j], "dev", "flannel.1", "dst", str(hosts[j].ip))
    try:
        return measure(pods[0], seconds)
    finally:
        for h in hosts:
            h.ns.ip("link", "del", "flannel.1", check=False)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="rounds (vxlan and each udp mode alternate); medians")
    ap.add_argument("--modes", default="offload,c,python",
                    help="udp data paths: offload (C + TSO/GSO/GRO), offload-spread (+ a source port per "
                         "queue, opt-in), c (C, plain), python")
    ap.add_argument("--queues", type=int, default=None)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    with Underlay(run_prefix()) as u:
        hosts = [u.add_host("h1"), u.add_host("h2")]
        pods = [add_pod(u, h, i + 1, 1500) for i, h in enumerate(hosts)]
        server = pods[1].popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            for _ in range(args.repeat):
                runs.setdefault("vxlan", []).append(run_vxlan(hosts, pods, args.seconds))
                for mode in args.modes.split(","):
                    runs.setdefault(f"udp-{mode}", []).append(
                        run_udp(u, hosts, pods, mode, args.queues, args.seconds))
        finally:
            server.kill()
            server.wait()
            for p in pods:
                p.delete()
    med = {name: {k: median([r[k] for r in rs]) for k in ("gbps_1", "gbps_4", "rtt_ms")}
           for name, rs in runs.items()}
    ref = med["vxlan"]
    print(f"{args.repeat} round(s) of {args.seconds} s, medians; per-run values in brackets")
    print(f"{'path':<20} {'1 stream Gb/s':>26} {'4 streams Gb/s':>26} {'ping avg ms':>12}   udp/vxlan 1 / 4 streams")
    for name, m in med.items():
        one = " ".join(f"{r['gbps_1']:.2f}" for r in runs[name])
        four = " ".join(f"{r['gbps_4']:.2f}" for r in runs[name])
        ratio = "" if name == "vxlan" else f"   {m['gbps_1'] / ref['gbps_1']:.2f} / {m['gbps_4'] / ref['gbps_4']:.2f}"
        print(f"{name:<20} {m['gbps_1']:>6.2f} [{one:>17}] {m['gbps_4']:>6.2f} [{four:>17}] "
              f"{m['rtt_ms']:>12.3f}{ratio}")
    print(json.dumps(runs, indent=1, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
