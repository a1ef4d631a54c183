#!/usr/bin/env python3
"""Kube mode at scale (issue 9 item 3): one real agent against the stand-in API server holding N
nodes shaped like real ones (~10 KB of JSON each: labels, 30 images, conditions, managedFields).

Topology: the lab's hub namespace (bridge, 198.18.0.254) runs the stand-in as its own process
(``python -m flannel.lab.kubeapi --generate N``) and, for the etcd comparison, a real etcd; the agent
(``python -m flannel``, vxlan) runs in a host namespace on the underlay. Fake peers live in
198.19.0.0/16 and 10.0.0.0/8 and are never reachable (the hub has no route out).

Measured, per round (``--rounds``, each round builds everything afresh):

* **cold start**: agent start → N routes on ``flannel.1`` (LIST in pages of 500, snapshot, reconcile),
  for kube mode and, the same way, for etcd mode with N leases in etcd;
* **RSS** of the agent (``VmRSS`` after the cold start, ``VmHWM`` = its peak) in both modes;
* **idle CPU** of the kube agent (ms per s over ``--idle`` seconds, bookmarks every 60 s);
* **heartbeats at a kubelet's pace**: every node posts a ``Ready`` heartbeat every 10 s, i.e. N/10
  MODIFIED events per second, for ``--seconds``; agent CPU per event (minus idle), and the netlink
  work they cause (``ip monitor`` + ``bridge monitor`` in the agent's namespace: must be none);
* **absorption rate**: ``--burst`` × N heartbeats posted at once, then one new node; events per
  second from the end of the posting to the new node's route in the kernel (this includes the
  stand-in streaming them; agent CPU per event is reported too).

Usage (root):  .venv/bin/python bench/kube_scale.py [-n 5000] [--rounds 2] [--skip-etcd]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flannel.lab.agent import AgentProcess
from flannel.lab.etcd import EtcdServer
from flannel.lab.kubeapi.generate import NETWORK, pod_cidr, public_ip, vtep_mac
from flannel.lab.kubeapi.kubeconfig import write_kubeconfig
from flannel.lab.netns import NetNS, cleanup_prefix, in_netns, run_prefix
from flannel.lab.topology import Host, Underlay

TOKEN = "bench-token"
PORT = 6443
OWN = ("me", "10.250.0.0/24")
NET_CONF = {"Network": NETWORK, "Backend": {"Type": "vxlan"}}
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def route_count(ns: NetNS) -> int:
    out = subprocess.run(["ip", "-n", ns.name, "route", "show", "dev", "flannel.1"], capture_output=True,
                         text=True, check=False).stdout
    return out.count("\n")


def has_route(ns: NetNS, cidr: str) -> bool:
    out = subprocess.run(["ip", "-n", ns.name, "route", "show", cidr, "dev", "flannel.1"], capture_output=True,
                         text=True, check=False).stdout
    return bool(out.strip())


def wait(cond: Any, what: str, timeout: float, agent: AgentProcess, interval: float = 0.1) -> float:
    t0 = time.monotonic()
    while not cond():
        if not agent.running:
            raise RuntimeError(f"agent exited while waiting for {what}:\n{agent.log_tail(30)}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}:\n{agent.log_tail(30)}")
        time.sleep(interval)
    return time.monotonic() - t0


class StandIn:
    """The stand-in API server as a process in the hub namespace, with its test hooks over HTTP."""

    def __init__(self, hub: NetNS, host: str, n: int, workdir: Path) -> None:
        self.hub, self.host = hub, host
        ready = workdir / "kubeapi.url"
        cmd = ["ip", "netns", "exec", hub.name, sys.executable, "-m", "flannel.lab.kubeapi", "--host", host,
               "--port", str(PORT), "--token", TOKEN, "--generate", str(n), "--history", "1000000",
               "--node", f"{OWN[0]}={OWN[1]}", "--ready-file", str(ready)]
        self.log = open(workdir / "kubeapi.log", "wb")  # noqa: SIM115 (kept open for the process' life)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"stand-in did not start: {(workdir / 'kubeapi.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self.url = ready.read_text().strip()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        with in_netns(self.hub.name):  # the socket lives in the hub namespace
            conn = http.client.HTTPConnection(self.host, PORT, timeout=120)
            conn.connect()
        try:
            data = json.dumps(body).encode() if body is not None else b""
            conn.request(method, path, body=data, headers={
                "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            out = resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {out[:200]!r}")
            return json.loads(out)
        finally:
            conn.close()

    def heartbeat(self, count: int = 0) -> int:
        return int(self.request("POST", f"/_test/heartbeat?count={count}" if count else "/_test/heartbeat")
                   ["heartbeats"])

    def add_marker(self, i: int) -> str:
        """A new managed node (index ``i``); returns its pod CIDR (its route shows it was processed)."""
        from flannel.lab.kubeapi.generate import realistic_node

        node = realistic_node(i)
        for k in ("uid", "creationTimestamp", "resourceVersion"):
            node["metadata"].pop(k, None)
        self.request("POST", "/api/v1/nodes", node)
        return pod_cidr(i)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Monitor:
    """``ip monitor route neigh`` + ``bridge monitor fdb`` in a namespace: counts netlink changes."""

    def __init__(self, ns: NetNS, workdir: Path) -> None:
        self.paths = [workdir / "ipmon.txt", workdir / "brmon.txt"]
        self.procs = [subprocess.Popen(["ip", "-n", ns.name, "monitor", "route", "neigh"],
                                       stdout=open(self.paths[0], "wb"), stderr=subprocess.DEVNULL),  # noqa: SIM115
                      subprocess.Popen(["ip", "netns", "exec", ns.name, "bridge", "monitor", "fdb"],
                                       stdout=open(self.paths[1], "wb"), stderr=subprocess.DEVNULL)]  # noqa: SIM115

    def stop(self) -> list[str]:
        for p in self.procs:
            p.terminate()
            p.wait(5)
        return [line for path in self.paths for line in path.read_text().splitlines() if line.strip()]


def kube_round(underlay: Underlay, n: int, workdir: Path, args: argparse.Namespace, idx: int) -> dict[str, Any]:
    host: Host = underlay.add_host(f"k{idx}", index=idx)
    api = StandIn(underlay.hub, str(underlay.hub_ip), n, workdir)
    agent: AgentProcess | None = None
    try:
        kubeconfig = write_kubeconfig(str(workdir / "kubeconfig"), api.url, TOKEN)
        (workdir / "net-conf.json").write_text(json.dumps(NET_CONF))
        agent = AgentProcess(f"kube{idx}", netns=host.ns.name, workdir=workdir, env={"NODE_NAME": OWN[0]},
                             args=["--subnet-manager", "kube", "--kubeconfig-file", kubeconfig,
                                   "--net-config-path", str(workdir / "net-conf.json"), "--iface", "eth0"])
        t0 = time.monotonic()
        agent.start()
        agent.wait_ready(300)
        ready = time.monotonic() - t0
        listed: list[float] = []

        def programmed() -> bool:
            if not listed and "listed " in agent.log_text():
                listed.append(time.monotonic() - t0)
            return route_count(host.ns) >= n

        wait(programmed, f"{n} routes", 600, agent, 0.2)
        cold = time.monotonic() - t0
        pid = agent.pid
        assert pid is not None
        rss, hwm = rss_mb(pid)

        # idle
        c0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle)
        idle = (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        rss_idle = rss_mb(pid)[0]

        # heartbeats at the kubelets' pace: N/10 per second
        rate = max(1, n // 10)
        mon = Monitor(host.ns, workdir)
        time.sleep(0.5)  # let the monitors subscribe
        c0, w0 = cpu_seconds(pid), time.monotonic()
        sent = 0
        for s in range(args.seconds):
            sent += api.heartbeat(rate)
            next_tick = w0 + s + 1
            time.sleep(max(0.0, next_tick - time.monotonic()))
        marker = api.add_marker(n + 1)
        wait(lambda: has_route(host.ns, marker), "the marker node after the paced heartbeats", 300, agent)
        paced_wall = time.monotonic() - w0
        paced_cpu = cpu_seconds(pid) - c0 - idle * paced_wall
        lines = mon.stop()
        rss_paced = rss_mb(pid)[0]
        # flannel's entries are all on flannel.1 (underlay ARP for the API server is not flannel work)
        netlink = [ln for ln in lines if "flannel.1" in ln and pod_cidr(n + 1).split("/")[0] not in ln
                   and vtep_mac(n + 1) not in ln and public_ip(n + 1) not in ln]

        # absorption: a burst of heartbeats, then a marker
        c0 = cpu_seconds(pid)
        burst = 0
        for _ in range(args.burst):
            burst += api.heartbeat()
        t1 = time.monotonic()
        marker = api.add_marker(n + 2)
        absorb = wait(lambda: has_route(host.ns, marker), "the marker node after the burst", 600, agent, 0.02)
        burst_cpu = cpu_seconds(pid) - c0
        rss2, hwm2 = rss_mb(pid)
        # the whole burst was streamed after t1 at the latest; count from there
        absorb_total = time.monotonic() - t1 if absorb else 0.0
        return {"mode": "kube", "nodes": n, "ready_s": ready, "listed_s": listed[0] if listed else -1.0,
                "cold_s": cold, "rss_mb": rss, "hwm_mb": hwm, "rss_idle_mb": rss_idle, "rss_paced_mb": rss_paced,
                "rss_after_mb": rss2, "hwm_after_mb": hwm2, "idle_ms_per_s": idle * 1000,
                "paced_events": sent, "paced_rate": rate, "paced_cpu_ms_per_event": paced_cpu * 1000 / max(sent, 1),
                "netlink_changes_from_heartbeats": len(netlink), "netlink_sample": netlink[:5],
                "burst_events": burst, "burst_s": absorb_total, "burst_events_per_s": burst / max(absorb_total, 1e-9),
                "burst_cpu_ms_per_event": burst_cpu * 1000 / max(burst, 1)}
    finally:
        if agent is not None:
            agent.kill()
        api.close()
        underlay.remove_host(host.name)


ETCD_WRITER = r"""
import json, sys
import pyetcd
from ipaddress import IPv4Address, IPv4Network
from flannel import wire
from flannel.lab.kubeapi.generate import pod_cidr, public_ip, vtep_mac
from flannel.lease import LeaseAttrs
host, port, n, conf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
c = pyetcd.client(host=host, port=port)
c.put("/coreos.com/network/config", conf)
for i in range(1, n + 1):
    net = IPv4Network(pod_cidr(i))
    attrs = LeaseAttrs(public_ip=IPv4Address(public_ip(i)), backend_type="vxlan",
                       backend_data=json.dumps({"VNI": 1, "VtepMAC": vtep_mac(i)}, separators=(",", ":")))
    c.put(f"/coreos.com/network/subnets/{net.network_address}-{net.prefixlen}", wire.encode_attrs(attrs))
"""


def etcd_round(underlay: Underlay, n: int, workdir: Path, idx: int, wait_after: float) -> dict[str, Any]:
    host = underlay.add_host(f"e{idx}", index=idx)
    etcd = EtcdServer(str(workdir / "etcd"), host=str(underlay.hub_ip), netns=underlay.hub.name).start()
    agent: AgentProcess | None = None
    try:
        subprocess.run(["ip", "netns", "exec", underlay.hub.name, sys.executable, "-c", ETCD_WRITER,
                        str(underlay.hub_ip), str(etcd.client_port), str(n), json.dumps(NET_CONF)], check=True)
        agent = AgentProcess(f"etcd{idx}", netns=host.ns.name, workdir=workdir,
                             args=[f"--etcd-endpoints={etcd.endpoint}", "--etcd-prefix=/coreos.com/network",
                                   "--iface", "eth0"])
        t0 = time.monotonic()
        agent.start()
        agent.wait_ready(300)
        ready = time.monotonic() - t0
        wait(lambda: route_count(host.ns) >= n, f"{n} routes", 600, agent, 0.2)
        cold = time.monotonic() - t0
        assert agent.pid is not None
        rss, hwm = rss_mb(agent.pid)
        time.sleep(wait_after)  # as long as the kube round's idle + paced phases: the same periodic work
        rss2, hwm2 = rss_mb(agent.pid)
        return {"mode": "etcd", "nodes": n, "ready_s": ready, "cold_s": cold, "rss_mb": rss, "hwm_mb": hwm,
                "rss_after_mb": rss2, "hwm_after_mb": hwm2}
    finally:
        if agent is not None:
            agent.kill()
        etcd.close()
        underlay.remove_host(host.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5000, help="nodes (default 5000)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=20, help="length of the paced heartbeat phase")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    ap.add_argument("--burst", type=int, default=2, help="heartbeats per node in the absorption burst")
    ap.add_argument("--skip-etcd", action="store_true")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    prefix = run_prefix()
    results: list[dict[str, Any]] = []
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    try:
        with Underlay(prefix) as underlay:
            for r in range(args.rounds):
                with tempfile.TemporaryDirectory(prefix="kube-scale-") as d:
                    res = kube_round(underlay, args.n, Path(d), args, 10 + r)
                    res["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                    results.append(res)
                    print(json.dumps(res), flush=True)
                if not args.skip_etcd:
                    with tempfile.TemporaryDirectory(prefix="etcd-scale-") as d:
                        res = etcd_round(underlay, args.n, Path(d), 50 + r, args.idle + args.seconds)
                        res["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                        results.append(res)
                        print(json.dumps(res), flush=True)
    finally:
        cleanup_prefix(prefix)
    kube = [r for r in results if r["mode"] == "kube"]
    etcd = [r for r in results if r["mode"] == "etcd"]

    def med(rows: list[dict[str, Any]], key: str) -> str:
        vals = [r[key] for r in rows]
        return f"{statistics.median(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})" if vals else "-"

    print(f"\nN = {args.n} nodes, {args.rounds} rounds, median (runs)")
    for key in ("ready_s", "cold_s", "rss_mb", "hwm_mb", "rss_after_mb", "hwm_after_mb"):
        print(f"{key:<28} kube {med(kube, key):<34} etcd {med(etcd, key)}")
    for key in ("listed_s", "rss_idle_mb", "rss_paced_mb", "idle_ms_per_s", "paced_cpu_ms_per_event",
                "netlink_changes_from_heartbeats", "burst_events_per_s", "burst_cpu_ms_per_event"):
        print(f"{key:<28} kube {med(kube, key)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
