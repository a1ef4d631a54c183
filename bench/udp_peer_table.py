#!/usr/bin/env python3
"""udp control plane: CPU per single lease event at N peers (issue 9 item 1).

Drives the real ``UDPNetwork.apply`` (incremental ``TableBuilder`` + ``Proxy.set_table``, which
hands the C workers a new table in ``struct fl_table`` layout) with one-event batches against a
table of N peers, alternating add and remove of one extra peer; prints the median and p99 CPU
time per event. For comparison, the old way: rebuilding the whole table from scratch
(``PeerTable.build``) on every event. No root, no kernel objects: the Proxy is not started.

    .venv/bin/python bench/udp_peer_table.py [--peers 0,1000,5000,10000] [--events 2000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from ipaddress import IPv4Address, IPv4Network

from flannel.backends.udp import accel
from flannel.backends.udp.backend import UDPNetwork
from flannel.backends.udp.packet import Peer, PeerTable, TableBuilder
from flannel.backends.udp.proxy import Proxy
from flannel.backends.udp.tun import TunDevice
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent

NETWORK = IPv4Network("10.0.0.0/8")


def lease(i: int) -> Lease:
    return Lease(subnet=IPv4Network((0x0A000000 + (i << 8), 24)),
                 attrs=LeaseAttrs(public_ip=IPv4Address(0xC6120000 + i)))


def per_event(n: int, events: int) -> tuple[list[float], list[float]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        proxy = Proxy([a.fileno()], [udp], IPv4Address("10.255.255.0"), 8285, 1472, use_accel=accel.load() is not None)
        own = Lease(subnet=IPv4Network("10.255.255.0/24"), attrs=LeaseAttrs(public_ip=IPv4Address("198.18.255.1")))
        net = UDPNetwork(own, 1472, 8285, TunDevice([], "bench"), [], proxy, TableBuilder(8285, network=NETWORK))
        net.apply(Batch(events=tuple(LeaseEvent(EventType.ADDED, lease(i)) for i in range(n))))
        assert len(net.peers) == n
        extra = lease(n + 1)
        incr = []
        for k in range(events):
            ev = LeaseEvent(EventType.ADDED if k % 2 == 0 else EventType.REMOVED, extra)
            t0 = time.process_time()
            net.apply(Batch(events=(ev,)))
            incr.append(time.process_time() - t0)
        peers = [Peer(lease(i).subnet, lease(i).attrs.public_ip) for i in range(n)]  # type: ignore[arg-type]
        full = []
        for _ in range(max(5, min(events, 200_000 // max(n, 1)))):
            t0 = time.process_time()
            PeerTable.build(peers, 8285, network=NETWORK)
            full.append(time.process_time() - t0)
        return incr, full
    finally:
        for s in (a, b, udp):
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="0,1000,5000,10000")
    ap.add_argument("--events", type=int, default=2000)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}, C fast path: {accel.status()}")
    print(f"{'peers':>6} {'per event median (ms)':>22} {'p99 (ms)':>9} {'full rebuild (ms)':>18}")
    for n in (int(x) for x in args.peers.split(",")):
        incr, full = per_event(n, args.events)
        p99 = sorted(incr)[int(len(incr) * 0.99) - 1]
        print(f"{n:>6} {statistics.median(incr) * 1e3:>22.3f} {p99 * 1e3:>9.3f} {statistics.median(full) * 1e3:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
