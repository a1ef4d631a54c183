#!/usr/bin/env python3
"""The etcd store boundary alone: CPU to list and decode N leases, and to decode one watch event.

What it isolates from ``bench/agent_scale.py``: the part of a cold start spent in
``EtcdRegistry.list_leases()`` (paged Range at one revision, every key/value through the trust
boundary, ``_record``), next to the bare paged Range of the same keys (gRPC + protobuf only), and
the part of a lease event spent decoding it (``_Stream.next`` on a real etcd WatchResponse), hot
(the same loop over and over) and cold (after a 2 ms sleep, as a real event arrives). A real etcd
on 127.0.0.1 (a temporary data dir); the leases are written as ``agent_scale.peer`` writes them
(vxlan values, reservations). No network namespace, no agent, no kernel state.

Usage:  .venv/bin/python bench/etcd_records.py [--n 5000] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_scale import peer
from pyetcd.etcdrpc import kv_pb2, rpc_pb2

from flannel import wire
from flannel.lab.etcd import EtcdServer
from flannel.subnet_managers.etcd import registry as registry_mod

PREFIX = "/coreos.com/network"


def cpu_ms(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(min, median) thread CPU of ``fn`` in ms."""
    out = []
    for _ in range(runs):
        c0 = time.thread_time()
        fn()
        out.append((time.thread_time() - c0) * 1e3)
    return min(out), statistics.median(out)


def bare_range(client: Any, prefix: bytes) -> int:
    import pyetcd
    start, end, revision, n = prefix, pyetcd.utils.prefix_range_end(prefix), None, 0
    while True:
        resp = client.get_range_response(start, end, limit=registry_mod.LIST_PAGE_KEYS, revision=revision)
        revision = revision or resp.header.revision
        n += len(resp.kvs)
        if not resp.more or not resp.kvs:
            return n
        start = bytes(resp.kvs[-1].key) + b"\0"


def watch_event_us(n: int) -> tuple[float, float]:
    """µs to decode one PUT watch response (``_Stream.next``): hot (median of loops) and cold (median,
    each after a 2 ms sleep)."""
    reg = registry_mod.EtcdRegistry(endpoints=["http://127.0.0.1:1"], prefix=PREFIX)
    responses = []
    for i in range(1, n + 1):
        net, attrs = peer(i)
        kv = kv_pb2.KeyValue(key=(reg.subnets_prefix + wire.format_subnet_key(net)).encode(),
                             value=wire.encode_attrs(attrs).encode(), mod_revision=100 + i, lease=7)
        responses.append(rpc_pb2.WatchResponse(header=rpc_pb2.ResponseHeader(revision=100 + i),
                                               events=[kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv)]).SerializeToString())
    it = iter(rpc_pb2.WatchResponse.FromString(r) for _ in range(10**9) for r in responses)
    stream = registry_mod._Stream.__new__(registry_mod._Stream)   # a stream reading recorded responses
    stream._reg, stream._key, stream._client, stream._cancelled, stream._created = reg, PREFIX + "/", None, False, True
    stream._responses = it
    loops = []
    for _ in range(5):
        c0 = time.thread_time()
        for _ in range(n):
            stream.next()
        loops.append((time.thread_time() - c0) / n * 1e6)
    cold = []
    for _ in range(300):
        time.sleep(0.002)
        c0 = time.thread_time_ns()
        stream.next()
        cold.append((time.thread_time_ns() - c0) / 1e3)
    return min(loops), statistics.median(cold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="leases in etcd (default 5000)")
    ap.add_argument("--runs", type=int, default=15, help="listings measured (default 15)")
    args = ap.parse_args(argv)
    uptime = [os.popen("uptime").read().strip()]
    etcd = EtcdServer(data_dir=tempfile.mkdtemp(prefix="flannel-records-bench-"))
    etcd.start()
    try:
        reg = registry_mod.EtcdRegistry(endpoints=[etcd.endpoint], prefix=PREFIX, warn_insecure=False)
        for i in range(1, args.n + 1):
            net, attrs = peer(i)
            reg.update_lease(net, None, attrs, None)
        assert len(reg.list_leases().leases) == args.n
        listing = cpu_ms(reg.list_leases, args.runs)
        client = reg._connect()
        bare = cpu_ms(lambda: bare_range(client, reg.subnets_prefix.encode()), args.runs)
        reg.close()
    finally:
        etcd.stop()
    hot, cold = watch_event_us(min(args.n, 2000) or 1)
    uptime.append(os.popen("uptime").read().strip())
    result = {"n": args.n, "list_cpu_ms_min": round(listing[0], 1), "list_cpu_ms_median": round(listing[1], 1),
              "bare_range_cpu_ms_min": round(bare[0], 1), "bare_range_cpu_ms_median": round(bare[1], 1),
              "decode_us_per_lease": round((listing[0] - bare[0]) * 1e3 / max(args.n, 1), 1),
              "watch_event_decode_us_hot": round(hot, 1), "watch_event_decode_us_cold": round(cold, 1),
              "uptime": uptime}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
