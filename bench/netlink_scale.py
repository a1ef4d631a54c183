#!/usr/bin/env python3
"""vxlan control plane: time to program N peers from a cold start, backend vs. iproute2 batch mode.

Each variant gets a fresh, isolated network namespace (a veth pair with 198.18.0.1/15, no default
route, nothing leaves it); the fake peers' public IPs are in 198.19.0.0/16 and their subnets in
10.0.0.0/8. Per peer: route ``S via G dev flannel.1 onlink``, permanent neighbour, fdb entry.

Variants (same entries, measured in one run, repeated ``--rounds`` times, median reported):
* ``backend``          – VXLANBackend's reconcile of one synced snapshot (dump, diff, apply): what the
                         backend does at a cold start (raw rtnetlink, many messages per send);
* ``backend-restart``  – a second backend instance reconciling the same snapshot against the
                         programmed kernel: one dump per table, no writes (asserted);
* ``ip-batch``         – ``ip -batch`` (neigh + route) + ``bridge -batch`` (fdb) of the same entries,
                         the device created by hand: the limit.

Usage (root):  .venv/bin/python bench/netlink_scale.py [-n 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel.backends.base import ExternalInterface
from flannel.backends.routed.model import Context, desired_state
from flannel.backends.vxlan import VXLANBackend
from flannel.backends.vxlan.network import vxlan_entries
from flannel.config import NetworkConfig, parse_network_config
from flannel.lab.netns import NetNS, cleanup_prefix, in_netns, run, run_prefix
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent

LOCAL = "198.18.0.1"
CFG = '{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}'


def peers(n: int) -> list[Lease]:
    out = []
    for i in range(1, n + 1):
        mac = f"02:00:00:00:{i >> 8:02x}:{i & 0xff:02x}"
        out.append(Lease(IPv4Network(f"10.{i >> 8}.{i & 0xff}.0/24"),
                         LeaseAttrs(public_ip=IPv4Address(f"198.19.{i >> 8}.{i & 0xff}"), backend_type="vxlan",
                                    backend_data=f'{{"VNI":1,"VtepMAC":"{mac}"}}')))
    return out


def fresh_ns(prefix: str, tag: str) -> NetNS:
    ns = NetNS(f"{prefix}{tag}")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", f"{LOCAL}/15", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    return ns


class OwnLease:
    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        return Lease(IPv4Network("10.255.255.0/24"), attrs)

    def stored_backend_data(self) -> tuple[None, None]:
        return (None, None)


def in_ns_thread(ns: NetNS, fn: Callable[[], Any]) -> Any:
    out: dict[str, Any] = {}

    def main() -> None:
        with in_netns(ns.name):
            try:
                out["v"] = fn()
            except BaseException as e:
                out["e"] = e
    t = threading.Thread(target=main)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["v"]


def count(ns: NetNS) -> tuple[int, int, int]:
    r = len(json.loads(ns.ip("-j", "route", "show", "dev", "flannel.1")))
    n = len(json.loads(ns.ip("-j", "neigh", "show", "dev", "flannel.1")))
    f = sum(1 for x in json.loads(ns.exec("bridge", "-j", "fdb", "show", "dev", "flannel.1")) if x.get("dst"))
    return r, n, f


def bench_backend(prefix: str, leases: list[Lease]) -> tuple[float, float]:
    """(cold start, restart): the restart is a second backend instance reconciling the same
    snapshot against the programmed kernel (one dump per table, no writes)."""
    ns = fresh_ns(prefix, "b")
    try:
        idx = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
        ext = ExternalInterface("eth0", idx, 1500, IPv4Address(LOCAL), IPv4Address(LOCAL))
        batch = Batch(tuple(LeaseEvent(EventType.ADDED, lz) for lz in leases), synced=True)

        def go() -> tuple[float, float]:
            times = []
            for _ in range(2):
                net = VXLANBackend(ext).register_network(config=parse_network_config(CFG), leases=OwnLease())
                writes: list[int] = []
                orig = net.nl.apply
                net.nl.apply = lambda p, writes=writes, orig=orig: (writes.append(len(p)), orig(p))[1]
                t0 = time.perf_counter()
                net.step(batch)           # what Network.run does with the first (synced) snapshot
                times.append(time.perf_counter() - t0)
                net.close()
            assert writes == [], f"restart wrote {writes} entries"
            return times[0], times[1]
        dt = in_ns_thread(ns, go)
        got = count(ns)
        assert got == (len(leases),) * 3, f"backend programmed {got}, expected {len(leases)} each"
        return dt
    finally:
        ns.delete()


def bench_ip_batch(prefix: str, leases: list[Lease]) -> float:
    ns = fresh_ns(prefix, "i")
    try:
        ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", LOCAL, "dev", "eth0", "nolearning")
        ns.ip("addr", "add", "10.255.255.0/32", "dev", "flannel.1")
        ns.ip("link", "set", "flannel.1", "up")
        ctx = Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0")
        st = desired_state(leases, ctx, vxlan_entries).state
        fdb = "".join(f"fdb replace {f.mac} dev flannel.1 dst {f.dst} self permanent\n" for f in st.fdbs)
        ip = "".join(f"neigh replace {n.ip} lladdr {n.mac} dev flannel.1 nud permanent\n" for n in st.neighs)
        ip += "".join(f"route replace {r.dst} via {r.gateway} dev flannel.1 onlink\n" for r in st.routes)
        t0 = time.perf_counter()
        run("bridge", "-n", ns.name, "-batch", "-", input=fdb)
        run("ip", "-n", ns.name, "-batch", "-", input=ip)
        dt = time.perf_counter() - t0
        got = count(ns)
        assert got == (len(leases),) * 3, f"ip -batch programmed {got}"
        return dt
    finally:
        ns.delete()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000, help="number of peers (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions per variant (median reported)")
    args = ap.parse_args(argv)
    prefix = run_prefix()
    leases = peers(args.n)
    results: dict[str, list[float]] = {"backend": [], "ip-batch": [], "backend-restart": []}
    try:
        for _ in range(args.rounds):
            results["ip-batch"].append(bench_ip_batch(prefix, leases))
            cold, restart = bench_backend(prefix, leases)
            results["backend"].append(cold)
            results["backend-restart"].append(restart)
    finally:
        cleanup_prefix(prefix)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"N = {args.n} peers (route + neigh + fdb each), cold start, {args.rounds} rounds, median")
    print(f"{'variant':<18} {'median s':>9}  {'runs':<30} ratio vs ip-batch")
    for k, v in results.items():
        print(f"{k:<18} {med[k]:>9.3f}  {', '.join(f'{x:.3f}' for x in v):<30} {med[k] / med['ip-batch']:.2f}x")
    print(f"ratio backend / ip-batch = {med['backend'] / med['ip-batch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
