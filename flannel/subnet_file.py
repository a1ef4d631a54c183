"""subnet.env (reference §10): written atomically for CNI/docker, read back for hints.

The file is the contract with the CNI plugin and mk-docker-opts.sh: plain ``KEY=VALUE`` lines, no
quotes, no spaces. It is replaced atomically (temp file in the same directory, fsync, rename) so a
reader never sees half a file. Mode 0644 for a new file, existing permission bits kept.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from flannel.config import NetworkConfig
from flannel.lease import Lease

log = logging.getLogger(__name__)


def render(*, config: NetworkConfig, lease: Lease, mtu: int, ip_masq: bool) -> str:
    lines: list[str] = []
    if config.enable_ipv4 and lease.subnet is not None:
        first = lease.subnet.network_address + 1
        lines += [f"FLANNEL_NETWORK={config.network}", f"FLANNEL_SUBNET={first}/{lease.subnet.prefixlen}"]
    if config.enable_ipv6 and lease.ipv6_subnet is not None:
        first6 = lease.ipv6_subnet.network_address + 1
        lines += [f"FLANNEL_IPV6_NETWORK={config.ipv6_network}",
                  f"FLANNEL_IPV6_SUBNET={first6}/{lease.ipv6_subnet.prefixlen}"]
    lines += [f"FLANNEL_MTU={mtu}", f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}"]
    return "".join(line + "\n" for line in lines)


def write_atomic(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` atomically (same-directory temp file + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write(path: str | os.PathLike[str], *, config: NetworkConfig, lease: Lease, mtu: int, ip_masq: bool) -> None:
    write_atomic(path, render(config=config, lease=lease, mtu=mtu, ip_masq=ip_masq))


def read(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a dotenv file: ``#`` comments, optional ``export`` and quotes. Missing file → {}."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("cannot read subnet file %s: %s", path, e)
        return {}
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def parse_networks(value: str | None, version: int) -> list[Any]:
    """A subnet.env value (maybe a comma list) → the valid networks in it; bad elements logged."""
    nets: list[Any] = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            log.error("ignoring %r in subnet file: not a CIDR", item)
            continue
        if net.version == version:
            nets.append(net)
    return nets


def previous_subnets(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(IPv4 hint, IPv6 hint) from a previous run's subnet.env; ``None`` unless exactly one."""
    env = read(path)
    v4 = parse_networks(env.get("FLANNEL_SUBNET"), 4)
    v6 = parse_networks(env.get("FLANNEL_IPV6_SUBNET"), 6)
    return (v4[0] if len(v4) == 1 else None, v6[0] if len(v6) == 1 else None)
