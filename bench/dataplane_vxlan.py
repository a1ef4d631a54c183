#!/usr/bin/env python3
"""vxlan data plane: pod→pod TCP throughput through the agent-programmed overlay vs. the same
topology with kernel vxlan configured by hand (the limit), measured side by side in one run.

Both topologies: two "hosts" (network namespaces) on the lab's hub-bridge underlay (MTU 1500), one
"pod" behind a ``cni0`` bridge on each host, iperf3 (Debian) pod → pod, TCP, 1 and 4 streams. The
runs alternate (agent, hand, agent, hand, ...) so machine noise hits both alike; the ratio
agent/hand is what matters (expected ≈ 1.0: the agent only programs the kernel, which then does the
forwarding — a lower ratio means a configuration difference such as MTU or offloads).

    sudo .venv/bin/python bench/dataplane_vxlan.py [--seconds 5] [--repeat 2] [--no-write]

Appends/replaces the section "vxlan data plane" in docs/benchmarks.md (other sections untouched).
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flannel.lab import podtraffic
from flannel.lab.cluster import Lab, LabConfig
from flannel.lab.netns import cleanup_prefix, run_prefix
from flannel.lab.topology import Underlay, add_pod

SECTION = "vxlan data plane"
VNI, PORT = 1, 8472


def hand_vxlan(prefix: str) -> tuple[Underlay, list[podtraffic.Endpoint]]:
    """Two hosts with flannel's vxlan entries written by hand with iproute2 (reference §7.4–7.5)."""
    u = Underlay(prefix)
    hosts = [u.add_host("h1"), u.add_host("h2")]
    subnets = [ipaddress.IPv4Network("10.244.1.0/24"), ipaddress.IPv4Network("10.244.2.0/24")]
    macs = []
    for h, sn in zip(hosts, subnets):
        h.ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", str(VNI), "local", str(h.ip), "dev", "eth0",
                "dstport", str(PORT), "nolearning")
        h.ns.ip("link", "set", "flannel.1", "mtu", "1450")
        h.ns.ip("addr", "add", f"{sn.network_address}/32", "dev", "flannel.1")
        h.ns.ip("link", "set", "flannel.1", "up")
        macs.append(json.loads(h.ns.ip("-j", "link", "show", "flannel.1"))[0]["address"])
    pods = []
    for i, (h, sn) in enumerate(zip(hosts, subnets)):
        o = 1 - i
        peer, psn, pmac = hosts[o], subnets[o], macs[o]
        gw = str(psn.network_address)
        h.ns.ip("neigh", "replace", gw, "lladdr", pmac, "dev", "flannel.1", "nud", "permanent")
        h.ns.exec("bridge", "fdb", "replace", pmac, "dev", "flannel.1", "dst", str(peer.ip), "self", "permanent")
        h.ns.ip("route", "replace", str(psn), "via", gw, "dev", "flannel.1", "onlink")
        p = add_pod(h, f"{prefix}h{i + 1}-p1", index=1, gateway=ipaddress.IPv4Interface(f"{sn.network_address + 1}/24"),
                    mtu=1450, name=f"h{i + 1}-p1")
        pods.append(podtraffic.Endpoint(p.name, p.ns.name, str(p.ip)))
    return u, pods


def iperf(src: podtraffic.Endpoint, dst: podtraffic.Endpoint, streams: int, seconds: int) -> float:
    """Gbit/s received, one iperf3 run from src to dst."""
    srv = subprocess.Popen(["ip", "netns", "exec", dst.ns, "iperf3", "-s", "-1", "-J"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if ":5201 " in podtraffic.ns_exec(dst.ns, "ss", "-ltn").stdout:
                break
            time.sleep(0.05)
        res = podtraffic.ns_exec(src.ns, "iperf3", "-c", dst.ip, "-J", "-t", str(seconds), "-P", str(streams),
                                 timeout=seconds + 30)
        if res.returncode != 0:
            raise RuntimeError(f"iperf3 {src.name}→{dst.name} failed: {res.stdout[-500:]} {res.stderr}")
        data = json.loads(res.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)


def vxlan_attrs(ns: str, dev: str) -> dict[str, object]:
    """The device's vxlan attributes and MTU as iproute2 reports them (for a config diff)."""
    link = json.loads(subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", dev], capture_output=True,
                                     text=True, check=True).stdout)[0]
    return {"mtu": link["mtu"], **link.get("linkinfo", {}).get("info_data", {})}


def mtu_of(ns: str, dev: str) -> int:
    return int(json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True,
                                         text=True, check=True).stdout)[0]["mtu"])


def write_section(text: str) -> Path:
    path = REPO / "docs" / "benchmarks.md"
    path.parent.mkdir(exist_ok=True)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    head = f"## {SECTION}"
    if head in old:
        before, _, rest = old.partition(head)
        nxt = rest.find("\n## ")
        after = rest[nxt + 1:] if nxt >= 0 else ""
        new = before + text.rstrip() + "\n\n" + after
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only, don't touch docs/benchmarks.md")
    args = ap.parse_args()
    if shutil.which("iperf3") is None:
        print("iperf3 missing: run scripts/setup", file=sys.stderr)
        return 1
    pa, pb = run_prefix(), run_prefix()
    tmp = tempfile.mkdtemp(prefix="flannel-bench-")
    lab = Lab(LabConfig(hosts=2, pods_per_host=1, backend="vxlan", dir=tmp, prefix=pa))
    try:
        lab.up()
        agent_pods = lab.pods()
        if not all(podtraffic.wait_full_matrix(agent_pods, time.monotonic() + 20).values()):
            raise RuntimeError("agent overlay: pods cannot reach each other")
        _, hand_pods = hand_vxlan(pb)
        if not all(podtraffic.wait_full_matrix(hand_pods, time.monotonic() + 10).values()):
            raise RuntimeError("hand-made vxlan: pods cannot reach each other")
        mtus = {"agent flannel.1": mtu_of(lab.hosts["h1"].ns, "flannel.1"),
                "hand flannel.1": mtu_of(pb + "h1", "flannel.1")}
        a_attrs, h_attrs = vxlan_attrs(lab.hosts["h1"].ns, "flannel.1"), vxlan_attrs(pb + "h1", "flannel.1")
        diff = {k: (a_attrs.get(k), h_attrs.get(k)) for k in sorted(set(a_attrs) | set(h_attrs))
                if a_attrs.get(k) != h_attrs.get(k)}
        print(f"vxlan device attributes that differ (agent, hand): {diff or 'none'}")
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeat):
            for streams in (1, 4):
                for name, pods in (("agent", agent_pods), ("hand", hand_pods)):
                    g = iperf(pods[0], pods[1], streams, args.seconds)
                    results.setdefault((name, streams), []).append(g)
                    print(f"{name:5s} {streams} stream(s): {g:6.2f} Gbit/s", flush=True)
    finally:
        lab.teardown()
        cleanup_prefix(pb)
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"## {SECTION}", "",
             f"Command: `sudo .venv/bin/python bench/dataplane_vxlan.py --seconds {args.seconds} "
             f"--repeat {args.repeat}`  ",
             f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, kernel "
             f"{platform.release()}, {args.repeat}× alternating {args.seconds} s iperf3 runs (median shown).", "",
             "Topology: two hosts (namespaces) on the lab's hub-bridge underlay (MTU 1500), one pod behind "
             "`cni0` per host; pod → pod TCP. *agent* = the lab's `flannel` agents (vxlan backend, etcd); "
             "*hand* = `flannel.1` + route via `.0` onlink + permanent neigh + fdb written with iproute2. "
             f"MTUs: {mtus}. vxlan device attributes that differ (agent, hand): {diff or 'none'}.", "",
             "| streams | agent overlay (Gbit/s) | hand-made kernel vxlan (Gbit/s) | ratio agent/hand |",
             "|---|---|---|---|"]
    for streams in (1, 4):
        a = statistics.median(results[("agent", streams)])
        h = statistics.median(results[("hand", streams)])
        lines.append(f"| {streams} | {a:.2f} ({', '.join(f'{x:.2f}' for x in results[('agent', streams)])}) | "
                     f"{h:.2f} ({', '.join(f'{x:.2f}' for x in results[('hand', streams)])}) | {a / h:.2f} |")
    lines += ["", "Individual runs vary a lot on a 2-core machine shared with other jobs (see the per-run "
              "values); the attribute diff above is the check that both paths are configured identically, "
              "so the kernel does the same work and the expected ratio is 1.0."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        print(f"written to {write_section(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
