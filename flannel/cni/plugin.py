"""The flannel CNI plugin entry point: ADD, DEL, CHECK, VERSION (CNI spec 1.0).

Runtime protocol: the operation and container come from ``CNI_*`` environment variables, the
network config from stdin; a result goes to stdout; an error goes to stdout as
``{"cniVersion","code","msg"[,"details"]}`` with exit status 1. Diagnostics go to stderr.

Behaviour (flannel's Go plugin, plus the fixes noted):
* ADD reads subnet.env, builds the delegate config (``netconf.build_delegate``), saves it under
  ``<dataDir>/<containerID>``, runs the delegate's ADD and prints its result unchanged (so the
  result's cniVersion is the one the runtime asked for). A failed ADD keeps the saved config so the
  runtime's DEL can clean up what the delegate left.
* DEL uses only the saved config (works after a restart or with subnet.env gone); an unknown
  container is a success (DEL is idempotent); the file is removed once the delegate's DEL succeeded.
* CHECK (flannel's plugin does nothing here) runs the delegate's CHECK with the runtime's
  ``prevResult`` and also reports an address that left this node's flannel subnet.
* Without ``CNI_COMMAND`` it is an admin tool: ``install`` (put the plugin into a CNI bin dir as
  ``flannel``) and ``install-conf`` (atomic copy of a CNI config), used by the DaemonSet's init
  containers and the lab.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from flannel.cni import errors as cerr
from flannel.cni import netconf, store
from flannel.cni.errors import CNIError
from flannel.cni.invoke import exec_plugin, find_in_path
from flannel.errors import FlannelError

log = logging.getLogger(__name__)

LATEST = "1.0.0"
Result = dict[str, Any] | None


def _require(env: Mapping[str, str], *names: str) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise CNIError(cerr.INVALID_ENVIRONMENT, f"required environment variable(s) not set: {', '.join(missing)}")


def _load_saved(conf: netconf.NetConf, container_id: str) -> dict[str, Any] | None:
    raw = store.load(conf.data_dir, container_id)
    if raw is None:
        return None
    try:
        saved = json.loads(raw)
    except ValueError:
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("type"), str):
        log.error("saved delegate config %s is corrupt; ignoring it",
                  store.path_for(conf.data_dir, container_id))
        return {}
    return saved


def cmd_add(conf: netconf.NetConf, env: Mapping[str, str]) -> Result:
    container_id = store.check_container_id(env.get("CNI_CONTAINERID", ""))
    _require(env, "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    senv = netconf.load_subnet_env(conf.subnet_file)
    delegate = netconf.build_delegate(conf, senv)
    binary = find_in_path(delegate["type"], env["CNI_PATH"])
    store.save(conf.data_dir, container_id, delegate)
    result = exec_plugin(binary, "ADD", delegate, env)
    if result is None:
        raise CNIError(cerr.DELEGATE_FAILED, f"delegate {delegate['type']} ADD printed no result")
    return result


def cmd_del(conf: netconf.NetConf, env: Mapping[str, str]) -> Result:
    container_id = store.check_container_id(env.get("CNI_CONTAINERID", ""))
    saved = _load_saved(conf, container_id)
    if saved is None:
        log.info("DEL %s: no saved config in %s, nothing to do", container_id, conf.data_dir)
        return None
    if not saved:  # corrupt: nothing we can hand a delegate; drop it like flannel does
        store.remove(conf.data_dir, container_id)
        return None
    _require(env, "CNI_PATH")
    if conf.prev_result is not None and saved.get("cniVersion", "") == conf.cni_version:
        saved["prevResult"] = conf.prev_result
    if conf.runtime_config is not None:
        saved["runtimeConfig"] = conf.runtime_config
    binary = find_in_path(saved["type"], env["CNI_PATH"])
    exec_plugin(binary, "DEL", saved, env)
    store.remove(conf.data_dir, container_id)
    return None


def _check_addresses(prev_result: Mapping[str, Any], senv: netconf.SubnetEnv) -> None:
    for ip in prev_result.get("ips") or []:
        try:
            iface = ipaddress.ip_interface(ip.get("address", ""))
        except (ValueError, AttributeError):
            raise CNIError(cerr.INVALID_NETWORK_CONFIG, f"prevResult has an invalid address entry {ip!r}") from None
        subnet = senv.subnet if iface.version == 4 else senv.ipv6_subnet
        if subnet is not None and iface.ip not in subnet:
            raise CNIError(cerr.CHECK_MISMATCH,
                           f"container address {iface.ip} is not in this node's flannel subnet {subnet}",
                           "the node's lease changed since the container was created; recreate the pod")


def cmd_check(conf: netconf.NetConf, env: Mapping[str, str]) -> Result:
    if netconf.version_tuple(conf.cni_version or "0.1.0") < (0, 4, 0):
        raise CNIError(cerr.INCOMPATIBLE_VERSION,
                       f"CHECK is not supported by cniVersion {conf.cni_version or '0.1.0'!r}",
                       "CHECK needs cniVersion 0.4.0 or later")
    container_id = store.check_container_id(env.get("CNI_CONTAINERID", ""))
    _require(env, "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    if conf.prev_result is None:
        raise CNIError(cerr.INVALID_NETWORK_CONFIG, "CHECK needs prevResult in the network config")
    saved = _load_saved(conf, container_id)
    if not saved:
        raise CNIError(cerr.UNKNOWN_CONTAINER, f"no flannel state for container {container_id} in {conf.data_dir}",
                       "ADD was not run for this container, or its state was lost")
    try:
        senv: netconf.SubnetEnv | None = netconf.load_subnet_env(conf.subnet_file)
    except CNIError as e:  # the agent may be restarting: the delegate's check still applies
        log.warning("CHECK %s: skipping the subnet check: %s", container_id, e.msg)
        senv = None
    if senv is not None:
        _check_addresses(conf.prev_result, senv)
    saved["cniVersion"] = conf.cni_version
    saved["prevResult"] = conf.prev_result
    if conf.runtime_config is not None:
        saved["runtimeConfig"] = conf.runtime_config
    binary = find_in_path(saved["type"], env["CNI_PATH"])
    exec_plugin(binary, "CHECK", saved, env)
    return None


def cmd_version() -> dict[str, Any]:
    return {"cniVersion": LATEST, "supportedVersions": list(netconf.SUPPORTED_VERSIONS)}


def _requested_version(stdin: bytes) -> str:
    """The cniVersion to answer errors in (the request's if it is usable, else the latest)."""
    try:
        v = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return LATEST
    return v if isinstance(v, str) and v in netconf.SUPPORTED_VERSIONS else LATEST


def run(command: str, stdin: bytes, env: Mapping[str, str]) -> tuple[int, Result]:
    """One plugin invocation → (exit status, JSON object for stdout or None). Never raises."""
    try:
        if command == "VERSION":
            return 0, cmd_version()
        handlers = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}
        if command not in handlers:
            raise CNIError(cerr.INVALID_ENVIRONMENT, f"unknown CNI_COMMAND {command!r}",
                           "supported: ADD, DEL, CHECK, VERSION")
        conf = netconf.parse_netconf(stdin)
        return 0, handlers[command](conf, env)
    except CNIError as e:
        log.error("%s failed: %s", command, e.msg)
        return 1, e.to_json(_requested_version(stdin))
    except Exception as e:  # a bug must still answer in the protocol, not with a traceback
        log.exception("%s failed unexpectedly", command)
        return 1, CNIError(999, f"internal error in the flannel CNI plugin: {e!r}").to_json(_requested_version(stdin))


def build_parser() -> argparse.ArgumentParser:
    """The admin command line (used when CNI_COMMAND is not set)."""
    parser = argparse.ArgumentParser(
        prog="flannel-cni",
        description="The flannel CNI plugin. Run by a container runtime with CNI_COMMAND set; "
                    "without it, these admin commands are available.")
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("install", help="install the plugin into a CNI bin dir (as 'flannel')")
    p.add_argument("bin_dir", help="CNI plugin directory, e.g. /opt/cni/bin")
    p.add_argument("--name", default="flannel", help="file name (default: flannel)")
    p.add_argument("--mode", choices=("zipapp", "wrapper"), default="zipapp",
                   help="zipapp: one self-contained file run by the host's python3 (default); "
                        "wrapper: a shell script that runs this installation's Python")
    p.add_argument("--python", default=None,
                   help="interpreter: for zipapp the shebang (default '/usr/bin/env python3'), "
                        "for wrapper the Python to exec (default: this one)")
    c = sub.add_parser("install-conf", help="atomically copy a CNI config (e.g. cni-conf.json → 10-flannel.conflist)")
    c.add_argument("src")
    c.add_argument("dst")
    sub.add_parser("version", help="print the supported CNI versions")
    return parser


def _admin(argv: list[str]) -> int:
    from flannel.cni import install

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install":
            path = install.install_plugin(args.bin_dir, name=args.name, mode=args.mode, python=args.python)
            print(f"installed {path}")
            return 0
        if args.cmd == "install-conf":
            install.install_conf(args.src, args.dst)
            print(f"installed {args.dst}")
            return 0
    except (FlannelError, OSError) as e:
        print(f"flannel-cni {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    if args.cmd == "version":
        print(json.dumps(cmd_version()))
    else:
        print(f"flannel CNI plugin; CNI protocol versions supported: {', '.join(netconf.SUPPORTED_VERSIONS)}",
              file=sys.stderr)
        parser.print_usage(sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="flannel-cni: %(levelname)s %(message)s")
    command = os.environ.get("CNI_COMMAND", "")
    if not command:
        sys.exit(_admin(sys.argv[1:] if argv is None else argv))
    stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
    status, out = run(command, stdin, os.environ)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    sys.exit(status)
