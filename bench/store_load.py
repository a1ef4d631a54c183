#!/usr/bin/env python3
"""The store's side (issue 9.4): what our agents ask of etcd, measured on one real etcd, next to
what Go flannel's etcd subnet manager asks (from its code, reference §4), extrapolated to 5000 nodes.

Setup: K real agents (``python -m flannel``, ``alloc`` backend: leases only, nothing is programmed
in any kernel), each in a host namespace of its own on a lab underlay this script creates
(``flannel.lab.topology.Underlay``: 198.18.0.0/24, no route out), and one real etcd in the
underlay's hub namespace. The script observes etcd only:

* etcd's Prometheus ``/metrics`` (scraped from inside the hub), diffed over each phase:
  ``grpc_server_started_total`` per unary method (every request), ``grpc_server_msg_sent_total``
  and ``grpc_server_msg_received_total`` of ``Watch`` (watch responses / watch requests),
  ``etcd_debugging_mvcc_watch_stream_total`` and ``etcd_debugging_mvcc_watcher_total`` (gauges),
  ``etcd_network_client_grpc_{sent,received}_bytes_total``;
* ``ss -ti`` on etcd's side of each agent's TCP connection: data segments and bytes each way.
  gRPC keepalive pings (HTTP/2 PING frames) are in no etcd metric; at idle, the data segments an
  agent sends are exactly its pings (etcd answers each with a PING ack).

Phases:
1. **start**: K agents start (24 h TTL, the default); requests per agent until all are ready and
   settled (a one-time cost per agent start; it includes the other agents' creations reaching its watch);
2. **idle**: ``--window`` seconds of steady state, nothing happening: requests, watch messages,
   TCP data segments (keepalive) per agent;
3. **fan-out**: one lease key put then deleted by etcdctl (a node joining and leaving): watch
   messages and requests per agent per event (the script's own put and delete are subtracted);
4. **renewal**: the agents restarted with ``--subnet-lease-ttl=--ttl`` (renewal half-way: the
   default 60 min margin is longer than the TTL), observed for ``--renew-window`` seconds: requests
   and watch messages per renewal (renewals counted from the agents' "Lease renewed" log lines);
5. **start at N**: ``--start-leases`` (5000) other nodes' leases written to etcd, then one agent
   started (24 h TTL): its requests until it is ready and watching.

Then the extrapolation to ``--nodes`` (5000) agents with flannel's defaults (TTL 24 h, renewal
60 min before expiry, i.e. every 23 h) for us (measured per-event costs × event rates) and for Go
flannel (its code: pkg/subnet/etcd/registry.go, local_manager.go, v0.2x), printed as markdown.

Usage (root):  .venv/bin/python bench/store_load.py [--agents 10] [--window 60] [--ttl 30]
                                                    [--renew-window 60] [--nodes 5000] [--start-leases 5000]
                                                    [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from flannel.lab.agent import AgentProcess
from flannel.lab.etcd import EtcdServer, b64
from flannel.lab.netns import cleanup_prefix, in_netns, run, run_prefix
from flannel.lab.topology import Underlay

PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "alloc"}}'
#: a node that joins and leaves in the fan-out phase (an underlay address no host uses)
FAKE_KEY = f"{PREFIX}/subnets/10.250.0.0-24"
FAKE_VALUE = '{"PublicIP":"198.18.0.200","PublicIPv6":null,"BackendType":"alloc"}'
#: flannel's defaults: 24 h TTL, renewal 60 min before expiry
RENEW_PERIOD_S = 24 * 3600 - 60 * 60
#: etcd's default --experimental-watch-progress-notify-interval (we ask for progress notifications)
PROGRESS_INTERVAL_S = 600
#: etcd's default --grpc-keepalive-interval (server → client pings, the same for both agents)
SERVER_PING_INTERVAL_S = 2 * 3600

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# ---- observation ----------------------------------------------------------------------------------

class Metrics:
    """One scrape of etcd's /metrics, the samples this benchmark reads."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m:
                self.samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def unary(self) -> Counter[str]:
        """Unary requests started, per method."""
        out: Counter[str] = Counter()
        for n, lab, v in self.samples:
            if n == "grpc_server_started_total" and lab.get("grpc_type") == "unary":
                out[lab["grpc_method"]] += int(v)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "unary": dict(self.unary()),
            "watch_streams_started": self.value("grpc_server_started_total", grpc_method="Watch"),
            "watch_msgs_sent": self.value("grpc_server_msg_sent_total", grpc_method="Watch"),
            "watch_msgs_received": self.value("grpc_server_msg_received_total", grpc_method="Watch"),
            "watch_streams": self.value("etcd_debugging_mvcc_watch_stream_total"),
            "watchers": self.value("etcd_debugging_mvcc_watcher_total"),
            "bytes_sent": self.value("etcd_network_client_grpc_sent_bytes_total"),
            "bytes_received": self.value("etcd_network_client_grpc_received_bytes_total"),
        }


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Counters: after − before (unary per method); gauges (streams, watchers): the value after."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        if k == "unary":
            u = Counter(v)
            u.subtract(Counter(before[k]))
            out[k] = {m: n for m, n in u.items() if n}
        elif k in ("watch_streams", "watchers"):
            out[k] = v
        else:
            out[k] = v - before[k]
    return out


def connections(hub: str, port: int, peers: set[str]) -> dict[str, dict[str, int]]:
    """etcd's side of each established TCP connection from ``peers`` (agent addresses): ss -ti counters."""
    text = run("ip", "netns", "exec", hub, "ss", "-tinH", "state", "established", f"( sport = :{port} )")
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            peer = fields[-1].rsplit(":", 1)[0] if len(fields) >= 2 else ""
            current = fields[-1] if peer in peers else None
            if current:
                out[current] = {}
            continue
        if current is not None:
            for key in ("bytes_sent", "bytes_received", "segs_out", "segs_in", "data_segs_out", "data_segs_in"):
                m = re.search(rf"\b{key}:(\d+)", line)
                if m:
                    out[current][key] = int(m.group(1))
    return out


def conn_diff(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, float]:
    """Sums over the connections present both times (a reconnect would show as a missing one)."""
    keys = ("bytes_sent", "bytes_received", "data_segs_out", "data_segs_in")
    common = set(after) & set(before)
    out = {k: float(sum(after[c].get(k, 0) - before[c].get(k, 0) for c in common)) for k in keys}
    out["connections"] = float(len(common))
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        self.args = args
        self.prefix = prefix
        self.workdir = Path(tempfile.mkdtemp(prefix="flannel-store-bench-"))
        self.agents: list[AgentProcess] = []
        self.underlay = Underlay(self.prefix)   # main() deletes the prefix's namespaces whatever fails
        self.etcd = EtcdServer(data_dir=str(self.workdir / "etcd"), host=str(self.underlay.hub_ip),
                               netns=self.underlay.hub.name)
        self.hosts = [self.underlay.add_host(f"s{i + 1}") for i in range(args.agents)]
        self.peers = {str(h.ip) for h in self.hosts}

    def scrape(self) -> dict[str, Any]:
        with in_netns(self.underlay.hub.name), urllib.request.urlopen(self.etcd.endpoint + "/metrics",
                                                                        timeout=10) as r:
            return Metrics(r.read().decode()).summary()

    def conns(self) -> dict[str, dict[str, int]]:
        return connections(self.underlay.hub.name, self.etcd.client_port, self.peers)

    def start_agents(self, *extra: str, count: int | None = None) -> None:
        self.agents = []
        for h in self.hosts[:count]:
            a = AgentProcess(h.name, netns=h.ns.name, workdir=self.workdir,
                             args=["--etcd-endpoints", self.etcd.endpoint, "--etcd-prefix", PREFIX,
                                   "--iface", "eth0", *extra])
            self.agents.append(a.start())
        for a in self.agents:
            a.wait_ready(300)

    def stop_agents(self) -> None:
        for a in self.agents:
            if a.running:
                a.stop(timeout=20)

    def wait_watchers(self, want: float, timeout: float = 60) -> None:
        """Until etcd counts ``want`` watchers (every agent's watch is established)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.scrape()["watchers"] >= want:
                return
            time.sleep(0.5)
        raise RuntimeError(f"etcd has not {want} watchers after {timeout}s")

    def renewals(self) -> int:
        return sum(a.log_text().count("Lease renewed") for a in self.agents)

    def close(self) -> None:
        for a in self.agents:
            a.kill()
        self.etcd.close()
        self.underlay.close()
        cleanup_prefix(self.prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- phases ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args, k = self.args, self.args.agents
        res: dict[str, Any] = {"agents": k, "uptime": [run("uptime").strip()],
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        self.etcd.start()
        self.etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
        base = self.scrape()
        base_watchers = base["watchers"]

        # 1. start
        self.start_agents()
        self.wait_watchers(base_watchers + k)
        time.sleep(args.settle)
        started = self.scrape()
        res["start"] = diff(started, base)

        # 2. idle
        c0, m0, t0 = self.conns(), self.scrape(), time.monotonic()
        time.sleep(args.window)
        c1, m1, t1 = self.conns(), self.scrape(), time.monotonic()
        res["idle"] = {"seconds": t1 - t0, **diff(m1, m0), "tcp": conn_diff(c1, c0)}

        # 3. fan-out: one join, one leave
        m0 = self.scrape()
        self.etcd.etcdctl("put", FAKE_KEY, FAKE_VALUE)
        time.sleep(args.settle)
        self.etcd.etcdctl("del", FAKE_KEY)
        time.sleep(args.settle)
        m1 = self.scrape()
        fan = diff(m1, m0)
        fan["unary"] = {m: n - {"Put": 1, "DeleteRange": 1}.get(m, 0) for m, n in fan["unary"].items()}
        fan["unary"] = {m: n for m, n in fan["unary"].items() if n}
        res["fanout"] = {"events": 2, **fan}

        # 4. renewal with a short TTL
        self.stop_agents()
        self.start_agents(f"--subnet-lease-ttl={args.ttl}")
        self.wait_watchers(base_watchers + k)
        time.sleep(args.settle)
        r0, m0, t0 = self.renewals(), self.scrape(), time.monotonic()
        time.sleep(args.renew_window)
        r1, m1, t1 = self.renewals(), self.scrape(), time.monotonic()
        res["renewal"] = {"seconds": t1 - t0, "renewals": r1 - r0, **diff(m1, m0)}
        self.stop_agents()

        # 5. one agent start with --start-leases other leases in etcd (nobody watching meanwhile)
        if args.start_leases:
            self.populate(args.start_leases)
            m0 = self.scrape()
            self.start_agents(count=1)
            self.wait_watchers(base_watchers + 1)
            time.sleep(args.settle)
            res["start_at_n"] = {"leases": args.start_leases, **diff(self.scrape(), m0)}
            self.stop_agents()
        res["uptime"].append(run("uptime").strip())
        return res

    def populate(self, n: int) -> None:
        """n other nodes' leases: 10.100.0.0/24, 10.100.1.0/24, ... (public IPs 198.19.x.y), 100 puts a txn."""
        ops: list[dict[str, Any]] = []
        for i in range(n):
            key = f"{PREFIX}/subnets/10.{100 + i // 256}.{i % 256}.0-24"
            value = json.dumps({"PublicIP": f"198.19.{i // 256}.{i % 256}", "PublicIPv6": None,
                                "BackendType": "alloc"}, separators=(",", ":"))
            ops.append({"request_put": {"key": b64(key), "value": b64(value)}})
            if len(ops) == 100 or i == n - 1:
                self.etcd.v3("/v3/kv/txn", {"success": ops})
                ops = []


# ---- the model: per agent, per hour, at N nodes ---------------------------------------------------

def per_hour(res: dict[str, Any], nodes: int) -> dict[str, dict[str, float]]:
    """Requests and messages one agent causes per hour at steady state in an N-node cluster with
    24 h leases renewed every 23 h: ours from the measured per-event costs, flannel's from its code."""
    k = res["agents"]
    ren = res["renewal"]
    n_ren = max(1, ren["renewals"])
    unary_per_renewal = sum(ren["unary"].values()) / n_ren
    # every renewal reaches every agent's watch: K watch messages per renewal; per agent and renewal:
    msgs_per_renewal_per_watcher = ren["watch_msgs_sent"] / n_ren / k
    fan = res["fanout"]
    unary_per_foreign_event = sum(fan["unary"].values()) / fan["events"] / k
    idle = res["idle"]
    pings_per_hour = idle["tcp"]["data_segs_in"] / max(1.0, idle["tcp"]["connections"]) / idle["seconds"] * 3600
    renewals_per_hour = 3600 / RENEW_PERIOD_S                 # own renewals
    events_per_hour = nodes * renewals_per_hour               # renewals seen by each watch (others + own)
    # progress notifications are only sent on a watch that got no event for PROGRESS_INTERVAL_S
    progress = 3600 / PROGRESS_INTERVAL_S if 3600 / max(events_per_hour, 1e-9) >= PROGRESS_INTERVAL_S else 0.0
    ours = {
        "unary": (renewals_per_hour * unary_per_renewal
                  + (events_per_hour - renewals_per_hour) * unary_per_foreign_event),
        "watch_msgs": events_per_hour * msgs_per_renewal_per_watcher + progress,
        "client_pings": pings_per_hour,
        "server_pings": 3600 / SERVER_PING_INTERVAL_S,
        "watchers": res["idle"]["watchers"] / k,
        "unary_per_renewal": unary_per_renewal,
        "unary_per_foreign_event": unary_per_foreign_event,
    }
    # flannel: renewal = Grant + Put; each PUT event does a LeaseTimeToLive on every watch that sees it
    # (WatchLeases: every lease's renewal; WatchLease: its own key's renewal), DELETEs none.
    flannel = {
        "unary": renewals_per_hour * (2 + 2) + (events_per_hour - renewals_per_hour) * 1,
        "watch_msgs": events_per_hour + renewals_per_hour,   # + its second watch (own key) on its own renewal
        "client_pings": 0.0,                                 # etcd clientv3 with DialKeepAliveTime unset
        "server_pings": 3600 / SERVER_PING_INTERVAL_S,
        "watchers": 2.0,
        "unary_per_renewal": 4.0,
        "unary_per_foreign_event": 1.0,
    }
    return {"ours": ours, "flannel": flannel}


def flannel_start(nodes: int) -> dict[str, int]:
    """Requests of one flannel start in an N-node cluster, from its code: config read twice (main, then
    AcquireLease), getSubnets (one Range + one LeaseTimeToLive per lease) for the acquisition and again
    for WatchLeases' first snapshot, Grant + Put (reuse), WatchLease's getSubnet (Range + TimeToLive)."""
    return {"Range": 2 + 2 + 1, "LeaseTimeToLive": 2 * nodes + 1, "LeaseGrant": 1, "Put": 1}


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(res: dict[str, Any], nodes: int) -> str:
    k = res["agents"]
    idle, fan, ren = res["idle"], res["fanout"], res["renewal"]
    n_ren = max(1, ren["renewals"])
    conns, secs = max(1.0, idle["tcp"]["connections"]), idle["seconds"]
    start = {m: n / k for m, n in sorted(res["start"]["unary"].items())}
    fan_unary = ", ".join(f"{m} {n}" for m, n in fan["unary"].items()) or "none"
    rows = [
        row(f"measured on one etcd, K = {k} agents", "value"), "|---|---|",
        row("start: unary requests per agent, by method", ", ".join(f"{m} {n:.2f}" for m, n in start.items())),
        row("watch streams / watchers per agent (etcd gauges)",
            f"{idle['watch_streams'] / k:.2f} / {idle['watchers'] / k:.2f}"),
        row(f"idle {secs:.0f} s: unary requests per agent per s", f"{sum(idle['unary'].values()) / k / secs:.4f}"),
        row("idle: watch messages per agent per s", f"{idle['watch_msgs_sent'] / k / secs:.4f}"),
        row("idle: TCP data segments agent → etcd per agent per min (= keepalive pings)",
            f"{idle['tcp']['data_segs_in'] / conns / secs * 60:.2f}"),
        row("idle: bytes agent → etcd / etcd → agent, per agent per min",
            f"{idle['tcp']['bytes_received'] / conns / secs * 60:.0f} / "
            f"{idle['tcp']['bytes_sent'] / conns / secs * 60:.0f}"),
        row("one lease put or delete: watch messages (fan-out)",
            f"{fan['watch_msgs_sent'] / fan['events']:.1f} per event ({fan['watch_msgs_sent'] / fan['events'] / k:.2f} "
            "per agent)"),
        row("one lease put or delete: unary requests by the agents",
            f"{sum(fan['unary'].values()) / fan['events']:.2f} per event ({fan_unary})"),
        row(f"renewal (TTL {res['ttl']} s, {ren['seconds']:.0f} s, {ren['renewals']} renewals): unary requests per "
            "renewal", f"{sum(ren['unary'].values()) / n_ren:.2f} ("
            + ", ".join(f"{m} {n / n_ren:.2f}" for m, n in sorted(ren["unary"].items())) + ")"),
        row("renewal: watch messages per renewal (fan-out)", f"{ren['watch_msgs_sent'] / n_ren:.2f}"),
    ]
    model = per_hour(res, nodes)
    o, f = model["ours"], model["flannel"]
    fs = sum(flannel_start(nodes).values())
    # our start in an N-node cluster: measured if phase 5 ran with N leases, else estimated (the
    # listing takes one Range per 1000 keys, the rest does not grow with N)
    at_n = res.get("start_at_n")
    if at_n:
        rows.append(row(f"start of one agent with {at_n['leases']} other leases in etcd: unary requests, by method",
                        ", ".join(f"{m} {n}" for m, n in sorted(at_n["unary"].items()))))
    if at_n and at_n["leases"] in (nodes, nodes - 1):
        ours_start = float(sum(at_n["unary"].values()))
    else:
        ours_start = sum(start.values()) + -(-nodes // 1000) - 1
    per_s = nodes / 3600
    rows += [
        "",
        row(f"per agent, steady state, {nodes} nodes, TTL 24 h renewed every 23 h", "ours", "Go flannel"),
        "|---|---|---|",
        row("unary requests per hour", f"{o['unary']:.2f}", f"{f['unary']:.1f}"),
        row("… per own renewal / per other node's renewal",
            f"{o['unary_per_renewal']:.2f} / {o['unary_per_foreign_event']:.2f}",
            f"{f['unary_per_renewal']:.0f} / {f['unary_per_foreign_event']:.0f}"),
        row("watch messages received per hour", f"{o['watch_msgs']:.1f}", f"{f['watch_msgs']:.1f}"),
        row("etcd watchers (on one watch stream)", f"{o['watchers']:.0f}", f"{f['watchers']:.0f}"),
        row("HTTP/2 keepalive pings per hour, agent → etcd / etcd → agent",
            f"{o['client_pings']:.0f} / {o['server_pings']:.1f}", f"{f['client_pings']:.0f} / {f['server_pings']:.1f}"),
        row(f"unary requests of one agent start ({nodes} leases)", f"≈ {ours_start:.0f}", f"≈ {fs}"),
        "",
        row(f"etcd, {nodes} agents", "ours", "Go flannel"),
        "|---|---|---|",
        row("unary requests per s", f"{o['unary'] * per_s:.2f}", f"{f['unary'] * per_s:.1f}"),
        row("watch messages sent per s", f"{o['watch_msgs'] * per_s:.0f}", f"{f['watch_msgs'] * per_s:.0f}"),
        row("watchers", f"{o['watchers'] * nodes:.0f}", f"{f['watchers'] * nodes:.0f}"),
        row("keepalive pings per s, agents → etcd", f"{o['client_pings'] * per_s:.0f}",
            f"{f['client_pings'] * per_s:.0f}"),
        row("one lease put: watch messages / unary requests", f"{nodes} / {o['unary_per_foreign_event'] * nodes:.0f}",
            f"{nodes + 1} / {nodes + 1} (the owner's second watch: one more of each)"),
        row("a rolling restart of every agent: unary requests", f"≈ {ours_start * nodes:.0f}", f"≈ {fs * nodes}"),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=10, help="agents (host namespaces) against the one etcd")
    ap.add_argument("--window", type=float, default=60.0, help="seconds of idle steady state measured")
    ap.add_argument("--ttl", type=int, default=30, help="--subnet-lease-ttl of the renewal phase (s)")
    ap.add_argument("--renew-window", type=float, default=60.0, help="seconds of the renewal phase measured")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to let things settle between steps")
    ap.add_argument("--nodes", type=int, default=5000, help="cluster size to extrapolate to")
    ap.add_argument("--start-leases", type=int, default=5000,
                    help="finally, measure one agent start with this many other leases in etcd (0: skip)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    if not 1 <= args.agents <= 200:
        ap.error("--agents: 1 to 200")
    if not 0 <= args.start_leases <= 30000:
        ap.error("--start-leases: 0 to 30000")
    prefix = run_prefix()
    bench: Bench | None = None
    try:
        bench = Bench(args, prefix)
        res = bench.run()
    finally:
        if bench is not None:
            bench.close()
        cleanup_prefix(prefix)   # also what a failed Bench() left
    res["ttl"] = args.ttl
    print(f"date: {res['date']}; load: {res['uptime'][0]}  …  {res['uptime'][-1]}\n")
    print(table(res, args.nodes))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
