#!/usr/bin/env python3
"""A new lease reaching every kernel of a many-agent lab: put → route on all N agents, p50/p99.

The lab (``flannel.lab``: hub bridge 198.18.0.254/24 with etcd, hosts 198.18.0.x/24 each running a
real agent, vxlan) is built with ``--hosts`` agents and no pods. Then ``--events`` fake peers'
leases (public IPs 198.18.1.x: never answered, no traffic) are written one at a time by a writer
process inside the hub namespace, and the script watches every host's kernel through a netlink
route socket opened in that host's namespace. For each lease: latency = when the last host has the
route − when the put was issued; the per-host latencies are reported too. The agents' CPU (all
threads, all agents) during the series gives "CPU per event × agents", which on a CPU-bound
machine bounds the latency from below: that figure ÷ cores is reported next to it.

Usage (root):  .venv/bin/python bench/lab_scale.py [--hosts 50] [--events 20]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from agent_scale import cpu_ns

from flannel.backends.routed import rtnl
from flannel.lab.cluster import ETCD_PREFIX, Lab, LabConfig
from flannel.lab.netns import cleanup_prefix, in_netns, run, run_prefix

WRITER = r"""
import json, sys, time
from ipaddress import IPv4Address, IPv4Network
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.etcd.registry import EtcdRegistry
reg = EtcdRegistry(endpoints=[sys.argv[1]], prefix=sys.argv[2], warn_insecure=False)
reg.get_config()
print("ready", flush=True)
for line in sys.stdin:
    op, subnet, ip, mac = line.split()
    net = IPv4Network(subnet)
    t0 = time.monotonic()
    if op == "put":
        reg.update_lease(net, None, LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan",
                                               backend_data='{"VNI":1,"VtepMAC":"%s"}' % mac), None)
    else:
        reg.delete_lease(net, None)
    print(t0, flush=True)
"""


def open_watch(ns: str) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)
    s.bind((0, rtnl.RTMGRP_IPV4_ROUTE))
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    prefix = run_prefix()
    tmp = Path(tempfile.mkdtemp(prefix="flannel-lab-bench-"))
    lab = Lab(LabConfig(hosts=args.hosts, pods_per_host=0, backend="vxlan", dir=str(tmp), prefix=prefix,
                        agent_timeout=600.0))
    up0 = run("uptime").strip()
    try:
        t0 = time.monotonic()
        lab.up()
        print(f"lab of {args.hosts} agents up in {time.monotonic() - t0:.0f} s", flush=True)
        hosts = list(lab.hosts.values())
        socks = {open_watch(h.ns): h.name for h in hosts}
        pids = [h.agent.pid for h in hosts]
        writer = subprocess.Popen(["ip", "netns", "exec", prefix + "hub", sys.executable, "-c", WRITER,
                                   lab.etcd_endpoint, ETCD_PREFIX], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=str(HERE.parent), env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        assert writer.stdin is not None and writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(5)
        worst: list[float] = []
        each: list[float] = []
        i0, w0 = sum(cpu_ns(p) for p in pids), time.monotonic()
        time.sleep(10)   # the agents' idle CPU, subtracted from the event series' CPU below
        idle_rate = (sum(cpu_ns(p) for p in pids) - i0) / (time.monotonic() - w0)
        c0, w1 = sum(cpu_ns(p) for p in pids), time.monotonic()
        for i in range(args.events):
            subnet = f"10.244.{200 + i}.0/24"
            dst = int.from_bytes(socket.inet_aton(f"10.244.{200 + i}.0"), "big")
            writer.stdin.write(f"put {subnet} 198.18.1.{i + 1} 02:00:00:00:09:{i:02x}\n")
            writer.stdin.flush()
            t_put = float(writer.stdout.readline())
            seen: dict[str, float] = {}
            deadline = time.monotonic() + 120
            while len(seen) < len(socks) and time.monotonic() < deadline:
                ready, _, _ = select.select(list(socks), [], [], 1.0)
                now = time.monotonic()
                for s in ready:
                    data = s.recv(1 << 16)
                    for kind, _f, _s, off, end in rtnl.messages(data):
                        if kind != rtnl.RTM_NEWROUTE:
                            continue
                        m = rtnl.parse_route(data, off, end, lambda v, d, p, dst=dst: v == 4 and d == dst and p == 24)
                        if m is not None and m.proto == 152:
                            seen.setdefault(socks[s], now)
            if len(seen) < len(socks):
                raise RuntimeError(f"lease {subnet} reached only {len(seen)} of {len(socks)} agents")
            lat = [t - t_put for t in seen.values()]
            worst.append(max(lat))
            each.extend(lat)
            print(f"event {i}: all {len(seen)} kernels after {max(lat) * 1e3:.0f} ms "
                  f"(median host {statistics.median(lat) * 1e3:.0f} ms)", flush=True)
            time.sleep(0.5)
        spent = sum(cpu_ns(p) for p in pids) - c0 - idle_rate * (time.monotonic() - w1)
        cpu_total_ms = spent / 1e6 / args.events
        for i in range(args.events):
            writer.stdin.write(f"del 10.244.{200 + i}.0/24 - -\n")
            writer.stdin.flush()
            writer.stdout.readline()
        writer.stdin.close()
        writer.wait(10)
        worst.sort()
        each.sort()
        cores = os.cpu_count() or 1
        res = {"hosts": args.hosts, "events": args.events, "uptime": [up0, run("uptime").strip()],
               "all_p50_ms": statistics.median(worst) * 1e3,
               "all_p99_ms": worst[min(len(worst) - 1, int(len(worst) * 0.99))] * 1e3,
               "host_p50_ms": statistics.median(each) * 1e3,
               "host_p99_ms": each[min(len(each) - 1, int(len(each) * 0.99))] * 1e3,
               "cpu_per_event_all_agents_ms": cpu_total_ms, "idle_all_agents_ms_per_s": idle_rate / 1e6,
               "cores": cores,
               "cpu_bound_ms": cpu_total_ms / cores}
        print(json.dumps(res, indent=1))
        print(f"\nnew lease → all {args.hosts} kernels: p50 {res['all_p50_ms']:.0f} ms, "
              f"p99 {res['all_p99_ms']:.0f} ms; "
              f"agents' CPU per event (sum over {args.hosts}) {cpu_total_ms:.1f} ms ÷ {cores} cores = "
              f"{res['cpu_bound_ms']:.1f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        for s in socks:
            s.close()
    finally:
        lab.teardown()
        cleanup_prefix(prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
