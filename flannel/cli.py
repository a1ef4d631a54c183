"""The ``flannel`` / ``flanneld`` command: flags → AgentOptions → ``flannel.daemon.run``.

Flag names and defaults are flannel's (reference §1.2). Differences, on purpose:

* every flag can also be set with ``FLANNELD_<FLAG>`` (upper case, ``-`` → ``_``); a flag given on
  the command line wins. ``FLANNELD_IFACE`` / ``FLANNELD_IFACE_REGEX`` give exactly one element.
  An environment value that does not parse is an error (exit 2, naming the variable); flannel
  logs it and silently keeps the default, which hides typos in unit files;
* an invalid flag exits 2 with a one-line reason (flannel exits 0);
* ``--subnet-manager=etcd|kube`` chooses the store; ``--kube-subnet-mgr`` is kept as flannel's
  spelling of ``--subnet-manager=kube``; ``--subnet-lease-ttl`` (seconds) is our extension;
* booleans accept Go's forms: ``--ip-masq``, ``--ip-masq=false``; long flags may be written with
  one dash (``-iface eth0``), as Go's flag package allows;
* the etcd password never appears in a log line.

This is the only module where errors become exit statuses: 0 clean stop, 1 ``FlannelError``
(or an unexpected crash), 2 usage.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import click

from flannel import __version__, daemon, errors, logsetup, memory
from flannel import options as options_mod
from flannel.options import AgentOptions

log = logging.getLogger(__name__)

ENV_PREFIX = "FLANNELD_"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_D = AgentOptions()


def envvar(flag: str) -> str:
    """``--iface-regex`` → ``FLANNELD_IFACE_REGEX``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


class EnvOption(click.Option):
    """An option that also reads ``FLANNELD_<FLAG>`` and names the variable when its value is bad."""

    def __init__(self, *args: Any, single_env_element: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.single_env_element = single_env_element

    def value_from_envvar(self, ctx: click.Context) -> Any:
        if not self.single_env_element:
            return super().value_from_envvar(ctx)
        rv = self.resolve_envvar_value(ctx)
        return None if rv is None else (rv,)

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as e:
            if ctx.get_parameter_source(self.name or "") is not click.core.ParameterSource.ENVIRONMENT:
                raise
            var = self.envvar if isinstance(self.envvar, str) else ",".join(self.envvar or ())
            raise click.UsageError(f"Invalid value in environment variable {var} "
                                   f"(for {self.opts[-1]}): {e.format_message()}", ctx) from None


class IPType(click.ParamType[str, Any]):
    """An IP address of the given version (4, 6 or None for either)."""

    def __init__(self, version: int | None = None) -> None:
        self.version = version
        self.name = f"IPv{version}" if version else "IP"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value == "":
            return ""
        try:
            addr = ipaddress.ip_address(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an {self.name} address", param, ctx)
        if self.version and addr.version != self.version:
            self.fail(f"{value!r} is not an {self.name} address", param, ctx)
        return str(addr)


class RegexType(click.ParamType[str, Any]):
    name = "REGEX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            re.compile(value)
        except re.error as e:
            self.fail(f"{value!r} is not a valid regular expression: {e}", param, ctx)
        return str(value)


class EndpointsType(click.ParamType[tuple[str, ...], Any]):
    """Comma-separated etcd endpoints (flannel splits on ``,`` without trimming)."""

    name = "URLS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        items = str(value).split(",")
        for item in items:
            if not re.fullmatch(r"(https?://)?[^\s/,]+(:\d+)?/?", item):
                self.fail(f"{item!r} is not an etcd endpoint like http://127.0.0.1:2379", param, ctx)
        return tuple(items)


class BoolFlag(click.ParamType[bool, Any]):
    name = "true|false"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value)
        if text in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if text in ("0", "f", "F", "false", "FALSE", "False"):
            return False
        self.fail(f"{text!r} is not a boolean (use true or false)", param, ctx)


def opt(flag: str, *names: str, help: str, **kw: Any) -> Callable[[Any], Any]:
    """One flag, with its FLANNELD_ variable and its default shown in --help."""
    kw.setdefault("show_default", True)
    return click.option(flag, *names, cls=EnvOption, envvar=envvar(flag), show_envvar=True, help=help, **kw)


def bool_opt(flag: str, default: bool, help: str) -> Callable[[Any], Any]:
    """A Go-style boolean: ``--flag`` means true, ``--flag=false`` false."""
    return opt(flag, type=BoolFlag(), is_flag=False, flag_value="true", default=default, help=help)


def _existing_file() -> click.Path:
    return click.Path(exists=True, dir_okay=False, readable=True)


FLAGS: list[Callable[[Any], Any]] = [
    opt("--subnet-manager", type=click.Choice(["etcd", "kube"], case_sensitive=False), default=None,
        help="Lease store: etcd, or the Kubernetes API (node podCIDR + annotations).  [default: etcd]",
        show_default=False),
    bool_opt("--kube-subnet-mgr", False, "flannel's spelling of --subnet-manager=kube."),
    opt("--etcd-endpoints", type=EndpointsType(), default=",".join(options_mod.DEFAULT_ETCD_ENDPOINTS),
        help="Comma-separated etcd v3 endpoints."),
    opt("--etcd-prefix", default=_D.etcd_prefix, help="etcd key prefix for the config and the leases."),
    opt("--etcd-keyfile", type=_existing_file(), default=None, show_default=False, help="etcd client TLS key (PEM)."),
    opt("--etcd-certfile", type=_existing_file(), default=None, show_default=False,
        help="etcd client TLS certificate (PEM)."),
    opt("--etcd-cafile", type=_existing_file(), default=None, show_default=False,
        help="CA bundle that signs the etcd servers' certificates."),
    opt("--etcd-username", default="", help="etcd v3 auth user."),
    opt("--etcd-password", default="", help="etcd v3 auth password (never logged)."),
    opt("--iface", multiple=True, single_env_element=True, show_default=False,
        help="Interface name or IP address for inter-host traffic; repeatable, tried in order.  [default: none]"),
    opt("--iface-regex", type=RegexType(), multiple=True, single_env_element=True, show_default=False,
        help="Regex searched in interface IPs, then names; repeatable, tried after --iface.  [default: none]"),
    opt("--iface-can-reach", type=IPType(), default="",
        help="Use the interface (and source IP) the kernel routes this IP through."),
    opt("--subnet-file", default=_D.subnet_file,
        help="Where to write subnet.env (read at start for the previous subnet)."),
    opt("--public-ip", type=IPType(4), default="", help="IPv4 address advertised to other hosts."),
    opt("--public-ipv6", type=IPType(6), default="", help="IPv6 address advertised to other hosts."),
    opt("--subnet-lease-renew-margin", type=click.IntRange(1, 1439), default=_D.subnet_lease_renew_margin,
        help="Renew the etcd lease this many minutes before it expires (1..1439)."),
    opt("--subnet-lease-ttl", type=click.IntRange(min=1), default=_D.subnet_lease_ttl,
        help="etcd lease TTL in seconds (extension, for tests and short-lived labs)."),
    bool_opt("--ip-masq", False, "Masquerade traffic that leaves the flannel network."),
    bool_opt("--ip-masq-fully-random-disable", False, "Do not use --random-fully on MASQUERADE rules."),
    opt("--kube-api-url", default="", help="Kubernetes API server URL (overrides the kubeconfig)."),
    opt("--kube-annotation-prefix", default=_D.kube_annotation_prefix, help="Prefix of the node annotations."),
    opt("--kubeconfig-file", default="", help="kubeconfig path (default: in-cluster config)."),
    opt("--healthz-ip", type=IPType(), default=_D.healthz_ip, help="Listen address of the health server."),
    opt("--healthz-port", type=click.IntRange(0, 65535), default=0, help="Health server port (0 = disabled)."),
    opt("--iptables-resync", type=click.IntRange(min=1), default=_D.iptables_resync,
        help="Seconds between checks of the iptables rules and the blackhole route."),
    bool_opt("--iptables-forward-rules", True, "Accept forwarded traffic of the flannel network (FORWARD rules)."),
    bool_opt("--ip-blackhole-route", False, "Keep a blackhole route for this host's subnet."),
    opt("--net-config-path", default=_D.net_config_path, help="Network config file (kube mode)."),
    bool_opt("--set-node-network-unavailable", True, "kube mode: set NetworkUnavailable=False on the node."),
    opt("-v", "--v", "verbosity", type=click.IntRange(min=0), is_flag=False, flag_value=1, default=0,
        help="Log verbosity: 0 info, 1+ debug (4+ also libraries); '-v' alone means 1."),
    opt("--vmodule", default="", help="Per-logger verbosity: logger=N,... (e.g. flannel.daemon=2)."),
    opt("--log-backtrace-at", default="", help="Accepted for compatibility with flannel's klog flag; ignored."),
]

LONG_NAMES = {"v"} | {f.lstrip("-") for f in [
    "--subnet-manager", "--kube-subnet-mgr", "--etcd-endpoints", "--etcd-prefix", "--etcd-keyfile",
    "--etcd-certfile", "--etcd-cafile", "--etcd-username", "--etcd-password", "--iface", "--iface-regex",
    "--iface-can-reach", "--subnet-file", "--public-ip", "--public-ipv6", "--subnet-lease-renew-margin",
    "--subnet-lease-ttl", "--ip-masq", "--ip-masq-fully-random-disable", "--kube-api-url",
    "--kube-annotation-prefix", "--kubeconfig-file", "--healthz-ip", "--healthz-port", "--iptables-resync",
    "--iptables-forward-rules", "--ip-blackhole-route", "--net-config-path", "--set-node-network-unavailable",
    "--vmodule", "--log-backtrace-at", "--version", "--help",
]}


def normalize_argv(args: Sequence[str]) -> list[str]:
    """Go's flag package accepts ``-iface`` for ``--iface``; click does not, so rewrite them."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        name = arg[1:].split("=", 1)[0]
        out.append("-" + arg if arg.startswith("-") and not arg.startswith("--") and name in LONG_NAMES
                   and (len(name) > 1 or "=" in arg) else arg)
    return out


def build_options(kw: dict[str, Any]) -> AgentOptions:
    """Turn parsed flag values into AgentOptions, checking what click alone cannot."""
    manager = (kw.pop("subnet_manager") or "").lower()
    if kw.pop("kube_subnet_mgr"):
        if manager == "etcd":
            raise click.UsageError("--kube-subnet-mgr contradicts --subnet-manager=etcd")
        manager = "kube"
    if bool(kw["etcd_certfile"]) != bool(kw["etcd_keyfile"]):
        raise click.UsageError("--etcd-certfile and --etcd-keyfile must be given together")
    try:
        logsetup.parse_vmodule(kw["vmodule"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--vmodule'") from None
    for name in ("etcd_keyfile", "etcd_certfile", "etcd_cafile"):
        kw[name] = kw[name] or ""
    known = {f.name for f in fields(AgentOptions)}
    return AgentOptions(subnet_manager=manager or "etcd", **{k: v for k, v in kw.items() if k in known})


def run_agent(opts: AgentOptions, **daemon_kw: Any) -> int:
    """Run the daemon; the one place where errors become exit statuses."""
    try:
        daemon.run(opts, **daemon_kw)
    except errors.UsageError as e:
        log.error("%s", e)
        return EXIT_USAGE
    except errors.FlannelError as e:
        log.error("%s", e)
        return EXIT_FAILURE
    except Exception:  # the last line of defence: a crash still exits 1 with its traceback logged
        log.exception("flannel crashed")
        return EXIT_FAILURE
    return EXIT_OK


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: the version, then one line per optional data path (the udp fast path is
    built at install time and may be missing; operators and the compose test read this line)."""
    if not value or ctx.resilient_parsing:
        return
    from flannel.backends.udp import accel  # only here: the CLI does not otherwise depend on a backend

    click.echo(f"flannel {__version__}")
    click.echo(f"udp fast path: {accel.status()}")
    ctx.exit()


def _decorate(f: Callable[..., Any]) -> Callable[..., Any]:
    for flag in reversed(FLAGS):
        f = flag(f)
    return f


@click.command(name="flannel", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
               epilog=f"Every flag can also be set with {ENV_PREFIX}<FLAG> (e.g. FLANNELD_IFACE=eth0); the command "
                      "line wins. An unparsable environment value is an error (exit 2), not silently ignored.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the version and which data paths are available, and exit.")
@_decorate
@click.pass_context
def command(ctx: click.Context, /, **kw: Any) -> None:
    """flannel: a flannel-compatible overlay network agent (etcd or Kubernetes; vxlan, udp, host-gw)."""
    vmodule, _ = kw.pop("vmodule"), kw.pop("log_backtrace_at")
    opts = build_options(dict(kw, vmodule=vmodule))
    logsetup.setup(opts.verbosity, vmodule=vmodule)
    log.info("flannel %s; CLI flags config: %s", __version__, opts.loggable())
    memory.limit_malloc_arenas()   # before the daemon starts its threads
    ctx.exit(run_agent(opts, **(ctx.obj or {})))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``flannel``, ``flanneld``, ``python -m flannel``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    command.main(args=normalize_argv(args), prog_name="flannel")
