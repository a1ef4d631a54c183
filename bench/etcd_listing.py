#!/usr/bin/env python3
"""The lease listing (``EtcdRegistry.list_leases``: pages of 1000 keys) by transport: wall time in the
client and CPU time in etcd, against one real etcd holding N leases.

Why: the listing is what an agent does before "ready" and on every relist; through etcd's JSON gateway
etcd marshals each page as JSON (17-25 ms per 1000 leases) where gRPC sends protobuf (~5 ms). This
compares ``h2`` (gRPC over our HTTP/2 client, the default), ``gateway`` and ``grpc`` (grpcio) in one
run, interleaved, each on a fresh registry (so a connection set-up is included, as at an agent's start).
No agent runs: only etcd on 127.0.0.1 and this process.

Usage:  .venv/bin/python bench/etcd_listing.py [--n 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from flannel import wire
from flannel.lab.etcd import EtcdServer
from flannel.lease import LeaseAttrs

PREFIX = "/coreos.com/network"
TRANSPORTS = ("h2", "gateway", "grpc")
CHILD = r'''
import sys, time, json
from flannel.subnet_managers.etcd.registry import EtcdRegistry
endpoint, prefix = sys.argv[1:3]
reg = EtcdRegistry(endpoints=[endpoint], prefix=prefix, warn_insecure=False)
t = time.perf_counter()
n = len(reg.list_leases().leases)
print(json.dumps({"n": n, "s": time.perf_counter() - t}))
reg.close()
'''


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="etcd-listing-") as tmp:
        srv = EtcdServer(os.path.join(tmp, "etcd"), memory=True)
        os.makedirs(srv.data_dir, exist_ok=True)
        srv.start()
        try:
            from flannel.subnet_managers.etcd.registry import EtcdRegistry
            reg = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, warn_insecure=False)
            for i in range(1, args.n + 1):
                hi, lo = 1 + i // 256, i % 256
                attrs = LeaseAttrs(public_ip=IPv4Address(f"198.19.{i // 256}.{i % 256}"), backend_type="vxlan",
                                   backend_data=f'{{"VNI":1,"VtepMAC":"02:00:00:00:{i >> 8 & 255:02x}:{i & 255:02x}"}}')
                key = reg.lease_key(IPv4Network(f"10.{hi}.{lo}.0/24"), None)
                reg._call("bench put", lambda c, k=key, a=attrs: c.put(k.encode(), wire.encode_attrs(a).encode()))
            reg.close()
            pid = srv.proc.pid if srv.proc is not None else 0
            wall: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            etcd_cpu: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
            for _ in range(args.rounds):
                for transport in TRANSPORTS:
                    env = {**os.environ, "FLANNEL_ETCD_TRANSPORT": transport}
                    before = cpu_seconds(pid)
                    out = subprocess.run([sys.executable, "-c", CHILD, srv.endpoint, PREFIX], env=env, check=True,
                                         capture_output=True, text=True, cwd=HERE.parent)
                    etcd_cpu[transport].append(cpu_seconds(pid) - before)
                    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
                    assert got["n"] == args.n, got
                    wall[transport].append(got["s"])
            print(f"{args.n} leases, {args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
            print("transport  listing ms (median, min)   etcd CPU ms per listing (median)")
            for t in TRANSPORTS:
                print(f"{t:9}  {statistics.median(wall[t]) * 1000:7.1f} {min(wall[t]) * 1000:7.1f}"
                      f"              {statistics.median(etcd_cpu[t]) * 1000:7.1f}")
        finally:
            srv.close()


if __name__ == "__main__":
    main()
