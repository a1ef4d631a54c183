"""``scripts/lab up|down|status``: the command line of the lab (see ``flannel.lab.cluster``)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flannel.lab import cluster, podtraffic
from flannel.lab.cluster import (
    BACKENDS,
    DEFAULT_DIR,
    DEFAULT_NETWORK,
    DEFAULT_PREFIX,
    Lab,
    LabConfig,
    LabError,
    installed_backends,
    leftovers,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/lab",
                                description=cluster.__doc__.split("\n\n")[0] if cluster.__doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    p.add_argument("--pods-per-host", type=int, default=1, help="pods per host (default 1)")
    p.add_argument("--backend", default="vxlan",
                   help=f"{', '.join(BACKENDS)} or any installed backend plugin (default vxlan)")
    p.add_argument("--subnet-manager", choices=["etcd", "kube"], default="etcd")
    p.add_argument("--network", default=DEFAULT_NETWORK, help=f"flannel Network (default {DEFAULT_NETWORK})")
    p.add_argument("--ip-masq", action="store_true", help="run the agents with --ip-masq")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"lab directory: state, logs (default {DEFAULT_DIR})")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)  # tests: a per-run prefix
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lab: %(message)s")
    if args.hosts < 1 or args.hosts > 200 or args.pods_per_host < 0 or args.pods_per_host > 200:
        print("lab: --hosts must be 1..200 and --pods-per-host 0..200", file=sys.stderr)
        return 2
    if args.command == "up" and args.backend not in BACKENDS:
        try:
            known = installed_backends()
        except LabError as e:
            print(f"lab: {e}", file=sys.stderr)
            return 1
        if args.backend not in known:
            print(f"lab: unknown backend {args.backend!r}; installed backend plugins: {', '.join(known)}",
                  file=sys.stderr)
            return 2
    existing = Lab.load(args.dir)
    if args.command == "status":
        if existing is None:
            left = leftovers(args.prefix)
            print(f"lab: not up (no {Path(args.dir).resolve() / 'state.json'})"
                  + (f"; leftover namespaces: {' '.join(left)} (run `scripts/lab down`)" if left else ""))
            return 3
        print("\n".join(existing.status_lines()))
        print(podtraffic.format_matrix(existing.pods(), existing.matrix()))
        return 0
    if args.command == "down":
        if existing is None:
            lab = Lab(LabConfig(dir=args.dir, prefix=args.prefix))
            left = leftovers(lab.config.prefix)
            lab.teardown()
            print(f"lab: was not up; removed {len(left)} leftover namespace(s)" if left else "lab: not up")
            return 0
        existing.teardown()
        print(f"lab: down (agents and {existing.config.subnet_manager} store stopped, namespaces deleted, "
              f"{existing.dir} removed)")
        return 0
    # up
    if existing is not None:
        print(f"lab: already up (state in {existing.state_path}); `scripts/lab status` or `scripts/lab down`")
        return 1
    left = leftovers(args.prefix)
    if left:
        print(f"lab: leftover namespaces from an earlier run ({' '.join(left)}): run `scripts/lab down` first",
              file=sys.stderr)
        return 1
    cfg = LabConfig(hosts=args.hosts, pods_per_host=args.pods_per_host, backend=args.backend,
                    subnet_manager=args.subnet_manager, dir=args.dir, network=args.network,
                    ip_masq=args.ip_masq, prefix=args.prefix)
    lab = Lab(cfg)
    try:
        lab.up()
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    print("\n".join(lab.status_lines()))
    pods = lab.pods()
    if pods:
        m = podtraffic.wait_full_matrix(pods, time.monotonic() + 10)
        print("\npod-to-pod ping:")
        print(podtraffic.format_matrix(pods, m))
        ok = sum(m.values())
        print(f"\n{ok}/{len(m)} pairs reachable")
    print(f"\nlogs: {lab.dir}/<host>/flannel.log   stop with: scripts/lab down"
          + (f" --dir {args.dir}" if args.dir != DEFAULT_DIR else "")
          + (f" --prefix {args.prefix}" if args.prefix != DEFAULT_PREFIX else ""))
    return 0
