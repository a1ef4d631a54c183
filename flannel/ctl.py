"""flannelctl: manage the network config, leases and reservations in etcd; check a node (``doctor``).

It connects exactly like the daemon (same ``--etcd-*`` flags and ``FLANNELD_ETCD_*`` variables) and
goes through the same storage module (``subnet_managers/etcd/registry.py``), so what it writes is
byte for byte what flannel writes. ``config set`` validates with the daemon's parser before writing
anything; ``reservations add`` writes a key without an etcd lease, which a node whose public IP
matches takes over as a reservation (it stays one, unlike in flannel, reference §14.5).
``doctor`` (etcd or kube mode) compares this node's kernel with the store; its logic lives in
``flannel.doctor``, this module only maps its result to output and an exit status.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NoReturn

import click

from flannel import errors, wire
from flannel.config import parse_network_config
from flannel.lease import Lease, LeaseAttrs
from flannel.options import (
    DEFAULT_ETCD_ENDPOINTS,
    DEFAULT_ETCD_PREFIX,
    DEFAULT_KUBE_ANNOTATION_PREFIX,
    DEFAULT_NET_CONFIG_PATH,
    DEFAULT_SUBNET_FILE,
    AgentOptions,
)
from flannel.subnet_managers.etcd.store import TTL_NOT_LOOKED_UP


class _Ctx:
    def __init__(self, **conn: Any) -> None:
        self.conn = conn
        self._registry: Any = None

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from flannel.subnet_managers.etcd.registry import EtcdRegistry
            self._registry = EtcdRegistry(**self.conn, warn_insecure=False)
        return self._registry

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


def _run(fn: Callable[[], Any]) -> Any:
    """FlannelError → a one-line message and exit 1 (usage errors exit 2)."""
    try:
        return fn()
    except errors.UsageError as e:
        raise click.UsageError(str(e)) from None
    except errors.FlannelError as e:
        raise click.ClickException(str(e)) from None


def _split_endpoints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    eps = tuple(e.strip() for e in value.split(",") if e.strip())
    if not eps:
        raise click.BadParameter("at least one endpoint is required")
    return eps


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--etcd-endpoints", envvar="FLANNELD_ETCD_ENDPOINTS", default=",".join(DEFAULT_ETCD_ENDPOINTS),
              show_default=True, callback=_split_endpoints, help="Comma-separated list of etcd endpoints.")
@click.option("--etcd-prefix", envvar="FLANNELD_ETCD_PREFIX", default=DEFAULT_ETCD_PREFIX, show_default=True,
              help="etcd prefix of the network.")
@click.option("--etcd-keyfile", envvar="FLANNELD_ETCD_KEYFILE", default="",
              help="SSL key file used to secure etcd communication.")
@click.option("--etcd-certfile", envvar="FLANNELD_ETCD_CERTFILE", default="",
              help="SSL certification file used to secure etcd communication.")
@click.option("--etcd-cafile", envvar="FLANNELD_ETCD_CAFILE", default="",
              help="SSL Certificate Authority file used to secure etcd communication.")
@click.option("--etcd-username", envvar="FLANNELD_ETCD_USERNAME", default="", help="Username for etcd authentication.")
@click.option("--etcd-password", envvar="FLANNELD_ETCD_PASSWORD", default="", show_default=False,
              help="Password for etcd authentication.")
@click.pass_context
def cli(ctx: click.Context, etcd_endpoints: tuple[str, ...], etcd_prefix: str, etcd_keyfile: str,
        etcd_certfile: str, etcd_cafile: str, etcd_username: str, etcd_password: str) -> None:
    """Manage a flannel network stored in etcd: config, leases, reservations; check a node (doctor)."""
    obj = _Ctx(endpoints=etcd_endpoints, prefix=etcd_prefix, keyfile=etcd_keyfile, certfile=etcd_certfile,
               cafile=etcd_cafile, username=etcd_username, password=etcd_password)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


# -- config ---------------------------------------------------------------------------------------

@cli.group()
def config() -> None:
    """The network config (<prefix>/config)."""


@config.command("get")
@click.option("--effective", is_flag=True, help="Print the config with every default filled in.")
@click.pass_obj
def config_get(obj: _Ctx, effective: bool) -> None:
    """Print the network config."""
    text = _run(obj.registry.get_config)
    if effective:
        text = _run(lambda: parse_network_config(text, source="etcd").to_json())
    click.echo(text.rstrip("\n"))


@config.command("set")
@click.argument("file", type=click.File("r"))
@click.pass_obj
def config_set(obj: _Ctx, file: Any) -> None:
    """Validate FILE (or - for stdin) as a network config and store it."""
    text = file.read()
    source = "stdin" if file.name in ("-", "<stdin>") else file.name
    cfg = _run(lambda: parse_network_config(text, source=source))
    _run(lambda: obj.registry.put_config(text))
    click.echo(f"network config written to {obj.registry.config_key} (Network {cfg.network}, "
               f"{cfg.subnet_count} subnets of /{cfg.subnet_len}, backend {cfg.backend_type})")


# -- leases ---------------------------------------------------------------------------------------

def _ttl_left(lease: Lease, now: float) -> str:
    if lease.expiration is None:
        return "reservation"
    if lease.expiration == TTL_NOT_LOOKED_UP:
        return "?"
    left = max(0, int(lease.expiration - now))
    h, rest = divmod(left, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@cli.group()
def leases() -> None:
    """Leases (<prefix>/subnets/...)."""


@leases.command("list")
@click.pass_obj
def leases_list(obj: _Ctx) -> None:
    """Table of every lease: subnet, public IP, backend, TTL left (reservations never expire)."""
    listing = _run(lambda: obj.registry.list_leases(ttl=True))
    items = listing.leases
    now = time.time()
    items.sort(key=lambda lease: (int(lease.subnet.network_address) if lease.subnet else 0))
    v6 = any(lease.ipv6_subnet is not None for lease in items)
    header = ["SUBNET"] + (["IPV6 SUBNET"] if v6 else []) + ["PUBLIC IP", "BACKEND", "TTL"]
    rows = [header]
    for lease in items:
        row = [str(lease.subnet)] + ([str(lease.ipv6_subnet or "-")] if v6 else [])
        pub = str(lease.attrs.public_ip) + (f",{lease.attrs.public_ipv6}" if lease.attrs.public_ipv6 else "")
        rows.append([*row, pub, lease.attrs.backend_type or "udp/alloc", _ttl_left(lease, now)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not items:
        click.echo("(no leases)")
    skipped = obj.registry.skipped.total
    if skipped:
        click.echo(f"({skipped} unreadable keys skipped: see the warnings above)", err=True)


# -- reservations ---------------------------------------------------------------------------------

def _subnet(value: str, param: str) -> IPv4Network:
    try:
        return IPv4Network(value, strict=True)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not an IPv4 subnet like 10.5.1.0/24 ({e})", param_hint=param) from None


@cli.group()
def reservations() -> None:
    """Reservations: subnet keys without a TTL, taken by the node with the matching public IP."""


@reservations.command("add")
@click.argument("subnet")
@click.option("--public-ip", required=True, help="Public IPv4 of the node the subnet is reserved for.")
@click.option("--public-ipv6", default="", help="Public IPv6 of that node (dual stack).")
@click.option("--ipv6-subnet", default="", help="IPv6 subnet to reserve with it (dual stack).")
@click.option("--backend-type", default="", help="BackendType to publish (the node rewrites it when it starts).")
@click.option("--backend-data", default="", help="BackendData JSON to publish.")
@click.pass_obj
def reservations_add(obj: _Ctx, subnet: str, public_ip: str, public_ipv6: str, ipv6_subnet: str,
                     backend_type: str, backend_data: str) -> None:
    """Reserve SUBNET (e.g. 10.5.1.0/24) for the node with --public-ip."""
    sn = _subnet(subnet, "SUBNET")
    try:
        pip = IPv4Address(public_ip)
        pip6 = IPv6Address(public_ipv6) if public_ipv6 else None
        sn6 = IPv6Network(ipv6_subnet, strict=True) if ipv6_subnet else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    data = None
    if backend_data:
        try:
            data = wire.compact_json(wire.parse_json_value(backend_data, "--backend-data"))
        except errors.BadLeaseRecord as e:
            raise click.BadParameter(str(e), param_hint="--backend-data") from None
    attrs = LeaseAttrs(public_ip=pip, public_ipv6=pip6, backend_type=backend_type, backend_data=data)
    reg = obj.registry
    listing = _run(lambda: reg.list_leases())
    for nets in listing.occupied:
        if nets[0].overlaps(sn):
            raise click.ClickException(f"{sn} overlaps the unreadable key {reg.lease_key(*nets)}; remove it first")
    for lease in listing.leases:
        if lease.subnet is not None and lease.subnet.overlaps(sn) and (lease.subnet, lease.ipv6_subnet) != (sn, sn6):
            raise click.ClickException(f"{sn} overlaps the existing lease {lease.describe()}; remove it first")
        if (lease.subnet, lease.ipv6_subnet) == (sn, sn6) and lease.attrs.public_ip != pip:
            raise click.ClickException(f"{sn} is currently held by {lease.attrs.public_ip}; "
                                       f"it can only be reserved for that node")
    try:
        cfg = parse_network_config(reg.get_config())
        if not cfg.is_compatible(sn, sn6 if cfg.enable_ipv6 else None):
            click.echo(f"warning: {sn} does not fit the network config (Network {cfg.network}, "
                       f"/{cfg.subnet_len} from {cfg.subnet_min} to {cfg.subnet_max}); "
                       f"the node will not use it", err=True)
    except errors.ConfigError:
        pass
    _run(lambda: reg.update_lease(sn, sn6, attrs, None))
    click.echo(f"reserved {sn}{' & ' + str(sn6) if sn6 else ''} for {pip} ({reg.lease_key(sn, sn6)})")


@reservations.command("remove")
@click.argument("subnet")
@click.pass_obj
def reservations_remove(obj: _Ctx, subnet: str) -> None:
    """Remove the reservation of SUBNET (a lease with a TTL is left alone)."""
    sn = _subnet(subnet, "SUBNET")
    reg = obj.registry
    matches = [lease for lease in _run(lambda: reg.list_leases()).leases if lease.subnet == sn]
    if not matches:
        raise click.ClickException(f"no reservation for {sn} under {reg.subnets_prefix}")
    for lease in matches:
        if lease.expiration is not None:
            raise click.ClickException(f"{sn} is a lease held by {lease.attrs.public_ip} (it has a TTL), "
                                       f"not a reservation; not removing it")
    for lease in matches:
        _run(functools.partial(reg.delete_lease, lease.subnet, lease.ipv6_subnet))
        click.echo(f"removed reservation {reg.lease_key(lease.subnet, lease.ipv6_subnet)}")


# -- doctor ---------------------------------------------------------------------------------------

@cli.command("doctor")
@click.option("--subnet-manager", type=click.Choice(["etcd", "kube"], case_sensitive=False),
              envvar="FLANNELD_SUBNET_MANAGER", default="etcd", show_default=True,
              help="Where the leases are: etcd (the --etcd-* options of flannelctl) or the Kubernetes API.")
@click.option("--kube-subnet-mgr", is_flag=True, help="flannel's spelling of --subnet-manager=kube.")
@click.option("--kubeconfig-file", envvar="FLANNELD_KUBECONFIG_FILE", default="",
              help="kube mode: kubeconfig path (default: in-cluster config).")
@click.option("--kube-api-url", envvar="FLANNELD_KUBE_API_URL", default="",
              help="kube mode: API server URL (overrides the kubeconfig).")
@click.option("--kube-annotation-prefix", envvar="FLANNELD_KUBE_ANNOTATION_PREFIX",
              default=DEFAULT_KUBE_ANNOTATION_PREFIX, show_default=True, help="kube mode: node annotation prefix.")
@click.option("--net-config-path", envvar="FLANNELD_NET_CONFIG_PATH", default=DEFAULT_NET_CONFIG_PATH,
              show_default=True, help="kube mode: the network config (net-conf.json).")
@click.option("--node-name", envvar="NODE_NAME", default="", help="kube mode: this node's name [env NODE_NAME].")
@click.option("--subnet-file", envvar="FLANNELD_SUBNET_FILE", default=DEFAULT_SUBNET_FILE, show_default=True,
              help="The agent's subnet.env (etcd mode: it names this node's lease).")
@click.option("--iface", multiple=True, envvar="FLANNELD_IFACE",
              help="The agent's --iface (default: the interface with this node's public IP).")
@click.option("--wireguard-uapi-dir", envvar="FLANNEL_WIREGUARD_UAPI_DIR", default="",
              help="wireguard-go's socket directory, as the agent's FLANNEL_WIREGUARD_UAPI_DIR "
                   "[default: /var/run/wireguard].")
@click.option("--store-timeout", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Seconds to keep retrying an unreachable store before giving up (exit 2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def doctor(ctx: click.Context, subnet_manager: str, kube_subnet_mgr: bool, kubeconfig_file: str, kube_api_url: str,
           kube_annotation_prefix: str, net_config_path: str, node_name: str, subnet_file: str,
           iface: tuple[str, ...], wireguard_uapi_dir: str, store_timeout: float, as_json: bool) -> None:
    """Compare this node's kernel (routes, neighbours, fdb, WireGuard peers) with the store.

    Run it on the node, as root. Prints one line per difference with the lease it concerns.
    Read-only: it changes neither the kernel nor the store.

    Exit status: 0 the kernel matches the store, 1 differences, 2 cannot check (store unreachable,
    no subnet.env, our node unknown, unsupported backend, bad options). See docs/doctor.md.
    """
    from flannel import doctor as doc

    kube = kube_subnet_mgr or subnet_manager.lower() == "kube"
    obj: _Ctx = ctx.obj

    def run() -> doc.Report:
        if kube:
            view = _kube_view(kubeconfig_file, kube_api_url, kube_annotation_prefix, net_config_path, node_name,
                              subnet_file, store_timeout)
        else:
            view = doc.from_etcd(obj.registry, subnet_file, store_timeout=store_timeout)
        return doc.check(view, ifaces=iface, uapi_dir=wireguard_uapi_dir or None)

    try:
        report = run()
    except errors.FlannelError as e:
        _cannot_check(ctx, str(e), as_json)
    except Exception as e:  # a bug must not look like "differences found" (exit 1)
        logging.getLogger(__name__).exception("doctor crashed")
        _cannot_check(ctx, f"internal error: {type(e).__name__}: {e}", as_json)
    click.echo(report.to_json() if as_json else "\n".join(report.lines()))
    ctx.exit(report.exit_code)


def _kube_view(kubeconfig_file: str, kube_api_url: str, prefix: str, net_config_path: str, node_name: str,
               subnet_file: str, store_timeout: float) -> Any:
    """The kube store's view, through the kube subnet manager and client the daemon uses. This
    node's name: ``--node-name`` / ``$NODE_NAME``, else (as the daemon) the ``spec.nodeName`` of pod
    ``$POD_NAMESPACE/$POD_NAME`` — the DaemonSet sets those, so doctor works in the flannel pod."""
    import os
    import threading

    from flannel import doctor as doc
    from flannel.subnet_managers.kube.client import KubeClient
    from flannel.subnet_managers.kube.manager import KubeSubnetManager

    client = KubeClient(kubeconfig_file=kubeconfig_file, api_url=kube_api_url)
    opts = AgentOptions(subnet_manager="kube", kubeconfig_file=kubeconfig_file, kube_api_url=kube_api_url,
                        kube_annotation_prefix=prefix, net_config_path=net_config_path)
    manager = KubeSubnetManager(opts, client=client, node_name=node_name.strip() or None)
    try:
        if not node_name.strip() and not (os.environ.get("POD_NAME") and os.environ.get("POD_NAMESPACE")):
            raise errors.ConfigError("kube mode needs this node's name: set NODE_NAME or --node-name "
                                     "(or POD_NAME and POD_NAMESPACE, as in the flannel pod)")
        config = manager.get_network_config()
        # the manager retries an unreachable API server until it is closed: bound that
        timer = threading.Timer(store_timeout, manager.close)
        timer.daemon = True
        timer.start()
        try:
            node = manager.node_name()
        finally:
            timer.cancel()
        return doc.from_kube(client, manager.annotation_names, config, node, subnet_file,
                             store_timeout=store_timeout)
    finally:
        manager.close()


def _cannot_check(ctx: click.Context, message: str, as_json: bool) -> NoReturn:
    from flannel.doctor import EXIT_CANNOT_CHECK

    click.echo(f"flannelctl doctor: cannot check: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"ok": None, "error": message}))
    ctx.exit(EXIT_CANNOT_CHECK)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="flannelctl: %(levelname)s: %(message)s")
    cli(prog_name="flannelctl")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # type: ignore[func-returns-value]
