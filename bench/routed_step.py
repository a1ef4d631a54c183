#!/usr/bin/env python3
"""The routed backend's own CPU, in process: the first reconcile of N peers, and single lease events.

What ``agent_scale.py`` measures on a whole agent (etcd, watch, gRPC threads) this measures on the
backend alone, with less noise: a ``VXLANNetwork`` in a namespace this script creates (a veth
``eth0`` with 198.18.0.1/15, no route out; deleted at the end), fed batches directly.

* ``cold`` -- ``step()`` of the first snapshot of N peers (index, desired state, plan, encode,
  send, cache): the calling thread's CPU (``time.thread_time``, kernel included), user and system
  apart. Each run starts from a fresh namespace; the minimum and the median are printed.
* ``event`` -- ``step()`` of one lease event (add, then remove, of ``--events`` extra peers) with
  N peers programmed, after a pause of ``--gap`` seconds each: a thread that slept runs its code
  cold (caches, branch predictors), as the agent's network thread does between events; ``0`` shows
  the same work hot.

Usage (root):  .venv/bin/python bench/routed_step.py [--n 5000] [--runs 5] [--events 200] [--gap 0,0.002,0.02]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import agent_scale as scale  # the same peers, config and namespace helpers

from flannel.backends.base import ExternalInterface
from flannel.backends.vxlan import VXLANBackend
from flannel.config import parse_network_config
from flannel.lab.netns import NetNS, cleanup_prefix, run_prefix
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent


class _Own:
    """The lease store, as much of it as registering the network needs."""

    def acquire_lease(self, config: Any, attrs: LeaseAttrs) -> Lease:
        return Lease(IPv4Network("10.0.1.0/24"), attrs)

    def stored_backend_data(self) -> tuple[None, None]:
        return (None, None)


def _network() -> Any:
    ext = ExternalInterface("eth0", socket.if_nametoindex("eth0"), 1500, IPv4Address(scale.LOCAL),
                            IPv4Address(scale.LOCAL))
    return VXLANBackend(ext).register_network(config=parse_network_config(json.dumps(scale.CONFIG)), leases=_Own())


def _in_namespace(fn: Any) -> Any:
    """Run ``fn()`` in a fresh namespace (created, entered, left and deleted here)."""
    prefix = run_prefix()
    ns = NetNS(f"{prefix}step")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", f"{scale.LOCAL}/15", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    orig = scale.enter_netns(ns.name)
    try:
        return fn()
    finally:
        scale.leave_netns(orig)
        cleanup_prefix(prefix)


def _snapshot(n: int) -> Batch:
    return Batch(tuple(LeaseEvent(EventType.ADDED, Lease(*scale.peer(i))) for i in range(1, n + 1)), synced=True)


def cold(n: int) -> tuple[float, float, float]:
    """(thread CPU, user, system) seconds of the first snapshot's step."""
    def body() -> tuple[float, float, float]:
        net = _network()
        try:
            batch = _snapshot(n)
            r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
            net.step(batch)
            t1, r1 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
            return t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        finally:
            net.close()
    result: tuple[float, float, float] = _in_namespace(body)
    return result


def events(n: int, count: int, gaps: list[float]) -> list[tuple[float, float, float]]:
    """Per gap: (ms per add, ms per remove, ms per event) of single-event steps at N peers."""
    def body() -> list[tuple[float, float, float]]:
        net = _network()
        try:
            net.step(_snapshot(n))
            extra = [Lease(*scale.peer(n + 20000 + k)) for k in range(count)]
            out = []
            for gap in gaps:
                per = []
                for kind in (EventType.ADDED, EventType.REMOVED):
                    total = 0.0
                    for lz in extra:
                        time.sleep(gap)
                        t0 = time.thread_time()
                        net.step(Batch((LeaseEvent(kind, lz),)))
                        total += time.thread_time() - t0
                    per.append(total / count * 1000)
                out.append((per[0], per[1], (per[0] + per[1]) / 2))
            return out
        finally:
            net.close()
    result: list[tuple[float, float, float]] = _in_namespace(body)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="peers (default 5000)")
    ap.add_argument("--runs", type=int, default=5, help="cold steps, each in a fresh namespace (default 5)")
    ap.add_argument("--events", type=int, default=200, help="extra peers added then removed one at a time")
    ap.add_argument("--gap", default="0,0.002,0.02", help="pauses before each event, seconds, comma-separated")
    args = ap.parse_args(argv)
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    if args.runs:
        runs = sorted(cold(args.n) for _ in range(args.runs))
        med = runs[(len(runs) - 1) // 2]
        print(f"cold step, {args.n} peers, {args.runs} runs: min {runs[0][0]:.3f} s (user {runs[0][1]:.3f}, "
              f"sys {runs[0][2]:.3f}); median {med[0]:.3f} s (user {med[1]:.3f}, sys {med[2]:.3f}); "
              f"all {[round(r[0], 3) for r in runs]}")
    if args.events:
        gaps = [float(g) for g in args.gap.split(",") if g.strip()]
        for gap, (add, rm, both) in zip(gaps, events(args.n, args.events, gaps)):
            print(f"single event, {args.n} peers, gap {gap * 1000:g} ms: add {add:.3f} ms, remove {rm:.3f} ms, "
                  f"mean {both:.3f} ms")
    with open("/proc/loadavg") as f:
        print(f"load average at end: {' '.join(f.read().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
