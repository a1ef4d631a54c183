"""``python -m flannel.lab.kubeapi``: run the stand-in API server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from flannel.lab.kubeapi.server import KubeAPIServer


def _node(spec: str) -> tuple[str, list[str]]:
    name, _, cidrs = spec.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--node {spec!r}: expected NAME=CIDR[,CIDR]")
    return name, [c for c in cidrs.split(",") if c]


def _pod(spec: str) -> tuple[str, str, str]:
    ref, _, node = spec.partition("=")
    ns, _, name = ref.partition("/")
    if not (ns and name and node):
        raise argparse.ArgumentTypeError(f"--pod {spec!r}: expected NAMESPACE/NAME=NODE")
    return ns, name, node


def _rule(spec: str) -> tuple[str, str]:
    verb, _, resource = spec.partition(":")
    if not (verb and resource):
        raise argparse.ArgumentTypeError(f"--deny {spec!r}: expected VERB:RESOURCE, e.g. patch:nodes/status")
    return verb, resource


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flannel.lab.kubeapi",
                                description="Stand-in Kubernetes API server for flannel tests and the lab.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (printed on stdout)")
    p.add_argument("--token", default=None, help="require this bearer token")
    p.add_argument("--node", action="append", type=_node, default=[], metavar="NAME=CIDR[,CIDR]",
                   help="pre-create a node with these pod CIDRs (repeatable)")
    p.add_argument("--pod", action="append", type=_pod, default=[], metavar="NS/NAME=NODE",
                   help="pre-create a pod scheduled on NODE (repeatable)")
    p.add_argument("--deny", action="append", type=_rule, default=[], metavar="VERB:RESOURCE",
                   help="answer 403 for this verb on this resource (repeatable)")
    p.add_argument("--history", type=int, default=1000, help="watch history window (events)")
    p.add_argument("--bookmark-interval", type=float, default=60.0,
                   help="seconds between BOOKMARK events on idle watches (real API servers: about 60)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="pre-load N generated nodes shaped like real ones (~10 KB each, flannel annotations, "
                        "pod CIDRs in 10.0.0.0/8; see flannel.lab.kubeapi.generate)")
    p.add_argument("--generate-start", type=int, default=1, metavar="I", help="index of the first generated node")
    p.add_argument("--ready-file", default="", help="write the URL here once listening")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s kubeapi %(levelname)s %(message)s")
    srv = KubeAPIServer(host=args.host, port=args.port, token=args.token, history_limit=args.history,
                        bookmark_interval=args.bookmark_interval)
    for name, cidrs in args.node:
        srv.add_node(name, cidrs)
    if args.generate:
        from flannel.lab.kubeapi.generate import realistic_cluster

        srv.add_nodes(realistic_cluster(args.generate, start=args.generate_start))
    for ns, name, node in args.pod:
        srv.add_pod(ns, name, node)
    for verb, resource in args.deny:
        srv.deny(verb, resource)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    srv.start()
    print(f"listening on {srv.url}", flush=True)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(srv.url + "\n")
        os.replace(tmp, args.ready_file)
    done.wait()
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
