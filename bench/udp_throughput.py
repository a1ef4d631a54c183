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
import os
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
SERVER_PID = [0]  # the iperf3 server's pid, set in main()


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


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(client: NetNS, server_ip: str, streams: int, seconds: int, cpu_pids: list[int]) -> tuple[float, float]:
    """(Gbit/s received, CPU seconds per GB): the CPU is the iperf3 client's (its rusage) plus the
    growth of every process in ``cpu_pids`` (the iperf3 server, the udp agents) during the run:
    the data path's cost in task context, which does not depend on how busy the machine is the
    way throughput does (softirq work the kernel does outside these tasks is not included)."""
    before = sum(proc_cpu(p) for p in cpu_pids)
    cli = client.popen("iperf3", "-c", server_ip, "-t", str(seconds), "-P", str(streams), "-J",
                       stdout=subprocess.PIPE, text=True)
    assert cli.stdout is not None
    out = cli.stdout.read()
    _, _, usage = os.wait4(cli.pid, 0)
    cli.returncode = 0
    cpu = usage.ru_utime + usage.ru_stime + sum(proc_cpu(p) for p in cpu_pids) - before
    try:
        data = json.loads(out)
        bps = float(data["end"]["sum_received"]["bits_per_second"])
        gbytes = float(data["end"]["sum_received"]["bytes"]) / 1e9
        return bps / 1e9, cpu / gbytes
    except (ValueError, KeyError, ZeroDivisionError):
        print("iperf3 failed:", out[-500:], file=sys.stderr)
        return 0.0, float("nan")


def ping_rtt(client: NetNS, dst: str) -> float:
    out = client.exec("ping", "-c", "30", "-i", "0.02", "-q", dst, check=False, timeout=30)
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return float(m.group(1)) if m else float("nan")


def measure(pod1: NetNS, seconds: int, cpu_pids: list[int]) -> dict[str, float]:
    res = {"rtt_ms": ping_rtt(pod1, "10.244.2.2")}
    for n in (1, 4):
        res[f"gbps_{n}"], res[f"cpu_{n}"] = iperf(pod1, "10.244.2.2", n, seconds, cpu_pids)
    return res


def run_udp(u: Underlay, hosts: list[Host], pods: list[NetNS], mode: str, queues: int | None,
            seconds: int) -> dict[str, Any]:
    mode, _, q = mode.partition("@")   # "offload@1": that data path with 1 queue
    queues = int(q) if q else queues
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
        res: dict[str, Any] = measure(pods[0], seconds, [SERVER_PID[0], *(n.p.pid for n in nodes)])
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
        return measure(pods[0], seconds, [SERVER_PID[0]])
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
                         "queue, opt-in), c (C, plain), python; a suffix @N sets that variant's queues")
    ap.add_argument("--queues", type=int, default=None)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    with Underlay(run_prefix()) as u:
        hosts = [u.add_host("h1"), u.add_host("h2")]
        pods = [add_pod(u, h, i + 1, 1500) for i, h in enumerate(hosts)]
        server = pods[1].popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        SERVER_PID[0] = server.pid
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
    keys = ("gbps_1", "gbps_4", "rtt_ms", "cpu_1", "cpu_4")
    med = {name: {k: median([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    ref = med["vxlan"]
    print(f"{args.repeat} round(s) of {args.seconds} s, medians; per-run values in brackets; load {os.getloadavg()}")
    print(f"{'path':<20} {'1 stream Gb/s':>26} {'4 streams Gb/s':>26} {'ping ms':>8} {'CPU s/GB 1 / 4':>15}"
          "   udp/vxlan Gb/s 1 / 4   vxlan/udp CPU per GB 1 / 4")
    for name, m in med.items():
        one = " ".join(f"{r['gbps_1']:.2f}" for r in runs[name])
        four = " ".join(f"{r['gbps_4']:.2f}" for r in runs[name])
        ratio = "" if name == "vxlan" else (
            f"   {m['gbps_1'] / ref['gbps_1']:.2f} / {m['gbps_4'] / ref['gbps_4']:.2f}"
            f"            {ref['cpu_1'] / m['cpu_1']:.2f} / {ref['cpu_4'] / m['cpu_4']:.2f}")
        print(f"{name:<20} {m['gbps_1']:>6.2f} [{one:>17}] {m['gbps_4']:>6.2f} [{four:>17}] "
              f"{m['rtt_ms']:>8.3f} {m['cpu_1']:>7.2f} / {m['cpu_4']:<5.2f}{ratio}")
    print(json.dumps(runs, indent=1, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
