"""Run one udp Network standalone, driven over stdin/stdout (for tests and ``bench/``).

    ip netns exec <ns> python -m flannel.lab.udp_harness --iface eth0 \
        --subnet 10.244.1.0/24 --network 10.244.0.0/16 [--accel c|python|auto] [--queues N]

It goes through ``UDPBackend.register_network`` exactly as the daemon does, with a fixed-subnet
LeaseSource instead of etcd; the flags become the typed options of the ``Backend`` config
(``--accel`` → ``DataPath``, ``--queues`` → ``Queues``, ``--offload`` → ``Offload``,
``--spread-ports`` → ``SpreadPorts``, ``--trusted`` → ``TrustedSources``). Commands, one JSON object per line on stdin:
``{"op":"add","subnet":"10.244.2.0/24","ip":"198.18.0.2"}``, ``{"op":"del",...}``,
``{"op":"counters"}``, ``{"op":"quit"}``. Replies are JSON lines on stdout; the first is
``{"ready":true,...}`` (with the lease value as it would be stored).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from flannel.backends.base import ExternalInterface
from flannel.backends.udp import UDPBackend
from flannel.backends.udp.tun import iface_mtu_and_addr
from flannel.config import NetworkConfig, parse_network_config
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.wire import encode_attrs


class FixedLeaseSource:
    """Hands out one preset subnet; remembers the attrs it was asked to publish."""

    def __init__(self, subnet: IPv4Network) -> None:
        self.subnet = subnet
        self.attrs: LeaseAttrs | None = None

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        self.attrs = attrs
        return Lease(subnet=self.subnet, attrs=attrs)


def _lease(subnet: str, ip: str) -> Lease:
    return Lease(subnet=IPv4Network(subnet), attrs=LeaseAttrs(public_ip=IPv4Address(ip)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--subnet", required=True)
    ap.add_argument("--network", required=True)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--accel", choices=("auto", "c", "python"), default="auto")
    ap.add_argument("--queues", type=int, default=None)
    ap.add_argument("--offload", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--spread-ports", action="store_true")
    ap.add_argument("--trusted", action="append", default=[], help="a TrustedSources network (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    idx, mtu, addr = iface_mtu_and_addr(args.iface)
    ext = ExternalInterface(name=args.iface, index=idx, mtu=mtu, iface_addr=addr, ext_addr=addr)
    backend: dict[str, object] = {"Type": "udp", "DataPath": args.accel}
    if args.port is not None:
        backend["Port"] = args.port
    if args.queues:
        backend["Queues"] = args.queues
    if args.offload != "auto":
        backend["Offload"] = args.offload == "on"
    if args.spread_ports:
        backend["SpreadPorts"] = True
    if args.trusted:
        backend["TrustedSources"] = args.trusted
    config = parse_network_config(json.dumps({"Network": args.network, "Backend": backend}))
    source = FixedLeaseSource(IPv4Network(args.subnet))
    net = UDPBackend(ext).register_network(config=config, leases=source)
    batches: queue.Queue[Batch | None] = queue.Queue()
    stop = threading.Event()
    runner = threading.Thread(target=net.run, args=(batches, stop), daemon=True)
    runner.start()

    def reply(obj: object) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    assert source.attrs is not None
    reply({"ready": True, "dev": net.device_name, "mtu": net.mtu, "accel": net.accelerated,  # type: ignore[attr-defined]
           "lease_value": encode_attrs(source.attrs), "queues": len(net.tun.fds),  # type: ignore[attr-defined]
           "offload": net.proxy.offload})  # type: ignore[attr-defined]
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            op = cmd.get("op")
            if op in ("add", "del"):
                typ = EventType.ADDED if op == "add" else EventType.REMOVED
                batches.put(Batch(events=(LeaseEvent(typ, _lease(cmd["subnet"], cmd["ip"])),)))
                # wait until applied, so the caller can act on it right away
                batches.put(Batch())  # an empty batch: dequeued only after ours was applied
                while batches.qsize():
                    time.sleep(0.005)
                reply({"ok": op})
            elif op == "counters":
                reply({"counters": net.counters()})  # type: ignore[attr-defined]
            elif op == "quit":
                break
    finally:
        stop.set()
        runner.join(3)
        net.close()
        reply({"closed": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())


class NetNSLike(Protocol):
    """The part of ``flannel.lab.netns.NetNS`` the harness client uses."""

    name: str

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]: ...


class HarnessProcess:
    """Client side of the harness: start it in a namespace and talk to it (tests, bench)."""

    def __init__(self, ns: NetNSLike, subnet: str, network: str, *, accel: str = "auto",
                 queues: int | None = None, offload: str = "auto", spread_ports: bool = False,
                 trusted: tuple[str, ...] = (), python: str = sys.executable,
                 env: dict[str, str] | None = None, cwd: str | None = None, log_path: str | None = None) -> None:
        """``python``/``env``/``cwd``: which installation runs it (the install test runs a
        ``pip install --target`` copy); ``log_path``: where its log (stderr) goes."""
        args = [python, "-m", "flannel.lab.udp_harness", "--subnet", subnet, "--network", network,
                "--accel", accel, "--offload", offload]
        if queues:
            args += ["--queues", str(queues)]
        if spread_ports:
            args.append("--spread-ports")
        for t in trusted:
            args += ["--trusted", t]
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed in close())
        extra: dict[str, Any] = {"env": env, "cwd": cwd}
        if self._log is not None:
            extra["stderr"] = self._log
        self.p = ns.popen(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **extra)
        self.ready = self._read()
        if not self.ready.get("ready"):
            self.p.kill()
            self.p.wait(5)
            if self._log is not None:
                self._log.close()
            raise RuntimeError(f"udp harness failed to start in {ns.name}: {self.ready}")

    def _read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        return json.loads(line) if line else {}

    def cmd(self, **kw: object) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(kw) + "\n")
        self.p.stdin.flush()
        return self._read()

    def add(self, subnet: str, ip: object) -> None:
        self.cmd(op="add", subnet=subnet, ip=str(ip))

    def remove(self, subnet: str, ip: object) -> None:
        self.cmd(op="del", subnet=subnet, ip=str(ip))

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.cmd(op="counters")["counters"]
        return counters

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.cmd(op="quit")
                self.p.wait(10)
            except (BrokenPipeError, ValueError, OSError):
                self.p.kill()
                self.p.wait(5)
        if self._log is not None:
            self._log.close()
