"""What ``flannelctl doctor`` reports: findings (one kernel-vs-store difference each), notes, the report.

Pure values and their two renderings: one human line per finding (grep-friendly: the problem is
the first word) and a JSON document for machines. Nothing here reads the kernel or the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flannel.lease import UNSPECIFIED_V4, Lease

#: exit statuses of ``flannelctl doctor``
EXIT_CLEAN = 0          # the kernel matches the store
EXIT_DIFFERENCES = 1    # at least one finding
EXIT_CANNOT_CHECK = 2   # store unreachable, no subnet.env, unknown backend, bad flags, ...

# problems (the first word of a finding's line)
MISSING = "missing"              # the store justifies an entry the kernel lacks
STALE = "stale"                  # the kernel has an entry flannel would delete (no lease justifies it)
WRONG_GATEWAY = "wrong-gateway"  # a route to the right subnet via another gateway
WRONG_ROUTE = "wrong-route"      # a route to the right subnet, same gateway, other device / onlink flag
WRONG_MAC = "wrong-mac"          # a neighbour (or our vxlan device) with another MAC
WRONG_ENDPOINT = "wrong-endpoint"  # an fdb entry or WireGuard peer pointing at another address
WRONG_ALLOWED_IPS = "wrong-allowed-ips"
WRONG_PSK = "wrong-psk"
WRONG_KEEPALIVE = "wrong-keepalive"
WRONG_LISTEN_PORT = "wrong-listen-port"
WRONG_PUBLIC_KEY = "wrong-public-key"
WRONG_SUBNET = "wrong-subnet"    # subnet.env and the store disagree on our subnet


@dataclass(frozen=True)
class LeaseRef:
    """The lease a finding concerns, as an operator looks it up (``flannelctl leases list``,
    ``kubectl get node``)."""

    subnet: str | None
    ipv6_subnet: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None
    node: str | None = None       # kube mode: the node's name

    @classmethod
    def of(cls, lease: Lease, node: str | None = None) -> LeaseRef:
        pub = lease.attrs.public_ip
        return cls(subnet=str(lease.subnet) if lease.subnet else None,
                   ipv6_subnet=str(lease.ipv6_subnet) if lease.ipv6_subnet else None,
                   public_ip=str(pub) if pub != UNSPECIFIED_V4 else None,
                   public_ipv6=str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 else None,
                   node=node)

    def __str__(self) -> str:
        nets = " & ".join(n for n in (self.subnet, self.ipv6_subnet) if n) or "<no subnet>"
        parts = [f"public IP {ip}" for ip in (self.public_ip, self.public_ipv6) if ip]
        if self.node:
            parts.append(f"node {self.node}")
        return f"lease {nets}" + (f" ({', '.join(parts)})" if parts else "")

    def to_json(self) -> dict[str, Any]:
        return {"subnet": self.subnet, "ipv6_subnet": self.ipv6_subnet, "public_ip": self.public_ip,
                "public_ipv6": self.public_ipv6, "node": self.node}


@dataclass(frozen=True)
class Finding:
    """One difference between the kernel and the store.

    ``kernel`` is the entry as the kernel has it (``None``: absent), ``expected`` as the store
    says it should be (``None``: nothing should be there). ``lease`` is the lease it concerns
    (``None`` for an entry no lease justifies).
    """

    problem: str
    kind: str                 # route | neigh | fdb | peer | device | lease
    kernel: str | None
    expected: str | None
    lease: LeaseRef | None = None
    detail: str = ""

    def line(self) -> str:
        if self.problem == MISSING:
            what = f"{self.expected}"
        elif self.problem == STALE:
            what = f"{self.kernel}"
        else:
            what = f"kernel has {self.kernel}; the store says {self.expected}"
        tail = str(self.lease) if self.lease else "no lease"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.problem} {self.kind}: {what}{detail} — {tail}"

    def to_json(self) -> dict[str, Any]:
        return {"problem": self.problem, "kind": self.kind, "kernel": self.kernel, "expected": self.expected,
                "lease": self.lease.to_json() if self.lease else None, "detail": self.detail,
                "text": self.line()}


@dataclass(frozen=True)
class Report:
    """The result of one check. ``notes`` are facts worth knowing that are not differences
    (a lease the agent skips on purpose, and why)."""

    mode: str                          # etcd | kube
    store: str                         # where the leases were read
    backend: str
    node: LeaseRef                     # our own lease
    interface: str                     # the external interface the check assumed
    checked: dict[str, int]            # how many leases / entries were compared
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        return EXIT_CLEAN if self.ok else EXIT_DIFFERENCES

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {what}" for what, n in self.checked.items())
        out = [f"flannelctl doctor ({self.mode}): leases from {self.store}; backend {self.backend}; "
               f"this node: {self.node} on {self.interface}",
               f"compared: {counts}"]
        out += [f"note: {n}" for n in self.notes]
        out += [f.line() for f in self.findings]
        if self.ok:
            out.append("OK: the kernel matches the store")
        else:
            n = len(self.findings)
            out.append(f"{n} difference{'s' if n != 1 else ''} (the agent repairs {'it' if n == 1 else 'them'} "
                       "at its next full reconcile; if this persists, see the agent's log)")
        return out

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "mode": self.mode, "store": self.store, "backend": self.backend,
                           "node": self.node.to_json(), "interface": self.interface, "checked": self.checked,
                           "findings": [f.to_json() for f in self.findings], "notes": list(self.notes)},
                          indent=2)
