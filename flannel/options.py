"""AgentOptions: every command-line option of the daemon, parsed and typed (frozen).

The CLI builds one of these; the daemon, the subnet managers and the backends read it. Names follow
flannel's flags (reference §1.2) with ``-`` → ``_``. The password is excluded from ``repr`` and from
``loggable()`` so it can never reach a log line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_ETCD_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
DEFAULT_ETCD_PREFIX = "/coreos.com/network"
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_NET_CONFIG_PATH = "/etc/kube-flannel/net-conf.json"
DEFAULT_KUBE_ANNOTATION_PREFIX = "flannel.alpha.coreos.com"
SUBNET_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class AgentOptions:
    subnet_manager: str = "etcd"
    etcd_endpoints: tuple[str, ...] = DEFAULT_ETCD_ENDPOINTS
    etcd_prefix: str = DEFAULT_ETCD_PREFIX
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = field(default="", repr=False)
    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str = ""
    subnet_file: str = DEFAULT_SUBNET_FILE
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_lease_renew_margin: int = 60  # minutes, 1..1439
    subnet_lease_ttl: int = SUBNET_TTL_SECONDS  # seconds; our extension (tests, short-lived labs)
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    kube_api_url: str = ""
    kube_annotation_prefix: str = DEFAULT_KUBE_ANNOTATION_PREFIX
    kubeconfig_file: str = ""
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    ip_blackhole_route: bool = False
    net_config_path: str = DEFAULT_NET_CONFIG_PATH
    set_node_network_unavailable: bool = True
    verbosity: int = 0

    def loggable(self) -> dict[str, Any]:
        """All options for the startup log line, with the password masked."""
        d = asdict(self)
        if d["etcd_password"]:
            d["etcd_password"] = "***"
        return d
