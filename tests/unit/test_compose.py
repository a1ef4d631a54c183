"""docker-compose.yml, the Dockerfiles and deploy/docker/, checked statically (no engine needed):
references resolve, the topology mirrors the lab, the command lines are ones our CLIs accept, the
etcd endpoint and the network config agree with what the agents expect, the underlay is internal,
the image is multi-stage with nothing of the build in the final stage, and every file a Dockerfile
copies exists and is not hidden by .dockerignore. tests/e2e/test_compose.py runs all of it for real.

The CLIs are imported at module level on purpose: a CLI that does not import fails these tests.
"""

from __future__ import annotations

import configparser
import fnmatch
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

import flannel
from flannel import cli, ctl, plugins
from flannel.cni import netconf as cni_netconf
from flannel.config import parse_network_config
from flannel.lab.compose import images
from flannel.lab.compose.lab import BACKENDS, DEFAULT_UNDERLAY, service_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ETCD_DOCKERFILE = ROOT / "deploy" / "docker" / "etcd.Dockerfile"
HOSTS = ("host1", "host2", "host3")
AGENTS = ("agent1", "agent2", "agent3")
PODS = ("pod1", "pod2", "pod3")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} substitution and $$ escape (cross-checked
    against docker-compose itself below); a variable with no default and no value → AssertionError."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if name in env and (env[name] or op != ":-"):
            return env[name]
        assert op in (":-", "-"), f"${{{name}}} has no default"
        return default or ""

    return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def load(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def argv(cmd: Any) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (line.partition("=") for line in lines)}


def parse_agent_argv(args: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    """Parse with the real click command (no daemon started): make_context + build_options."""
    assert console_scripts().get(args[0]) == "flannel.cli:main", f"{args[0]} is not the agent's console script"
    for k in list(os.environ):
        if k.startswith(cli.ENV_PREFIX):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    ctx = cli.command.make_context(args[0], cli.normalize_argv(args[1:]))
    kw = dict(ctx.params)
    kw.pop("log_backtrace_at", None)
    return cli.build_options(kw)


def parse_ctl_argv(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse a flannelctl command line down to its subcommand: (command path, merged params)."""
    assert console_scripts().get(args[0]) == "flannel.ctl:main", f"{args[0]} is not flannelctl"
    cmd: click.Command = ctl.cli
    ctx = cmd.make_context(args[0], args[1:])
    path, params = [], dict(ctx.params)
    while isinstance(cmd, click.Group):
        name, sub, rest = cmd.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
        assert sub is not None and name is not None
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        params.update(ctx.params)
        cmd = sub
    return path, params


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path → source (named volume or host path) for short-syntax volumes."""
    out = {}
    for v in svc.get("volumes") or []:
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


# ---- topology and references --------------------------------------------------------------------

def test_topology_mirrors_the_lab(compose):
    """etcd (+ the one-shot that stores the config), and per host: the namespace, the agent, a pod."""
    assert set(services(compose)) == {"etcd", "etcd-init", *HOSTS, *AGENTS, *PODS}
    assert service_names(COMPOSE) == {"host": list(HOSTS), "agent": list(AGENTS), "pod": list(PODS)}


def depends_on_all(svcs: dict[str, Any], name: str) -> set[str]:
    """Every service ``name`` depends on, directly or through others."""
    seen: set[str] = set()
    todo = list(svcs[name].get("depends_on") or {})
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo += list(svcs[dep].get("depends_on") or {})
    return seen


def test_every_reference_resolves(compose):
    svcs = services(compose)
    nets, vols = set(compose.get("networks") or {}), set(compose.get("volumes") or {})
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in svcs, f"{name} depends on unknown service {dep}"
        for dep, cond in (deps.items() if isinstance(deps, dict) else []):
            assert cond["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            owner = mode.split(":", 1)[1]
            assert owner in svcs and owner in depends_on_all(svcs, name), \
                f"{name} joins {owner}'s namespace without depending on it"
            assert "networks" not in svc and "sysctls" not in svc, f"{name}: set these on {owner}"
        for net in svc.get("networks") or []:
            assert net in nets, f"{name} uses undefined network {net}"
        for source in mounts(svc).values():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} bind-mounts missing {source}"
            else:
                assert source in vols, f"{name} uses undefined volume {source}"
        if "build" in svc:
            ctx = ROOT / svc["build"]["context"]
            assert (ctx / svc["build"].get("dockerfile", "Dockerfile")).is_file()
            # our private engine has no default bridge: RUN steps use the machine's network
            assert svc["build"].get("network") == "host", f"{name} builds without network: host"
    used = {s for svc in svcs.values() for s in mounts(svc).values()}
    assert vols <= used, f"unused volumes {vols - used}"


def test_our_services_use_the_project_images(compose):
    svcs = services(compose)
    for name in (*HOSTS, *AGENTS, *PODS, "etcd-init"):
        assert svcs[name]["image"] == f"pyflannel:{flannel.__version__}" and svcs[name]["build"]["context"] == "."
    assert svcs["etcd"]["build"]["dockerfile"] == ETCD_DOCKERFILE.name
    assert {(b.image, b.dockerfile) for b in images.builds(COMPOSE)} == {
        (f"pyflannel:{flannel.__version__}", DOCKERFILE), (svcs["etcd"]["image"], ETCD_DOCKERFILE)}


def test_compose_itself_resolves_the_file_as_these_tests_do():
    """docker-compose's own parser (no engine needed) agrees with this module's interpolation."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNEL_")}
    for backend in BACKENDS:
        res = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                             env={**env, "FLANNEL_BACKEND": backend}, timeout=60)
        assert res.returncode == 0, res.stderr
        real, ours = yaml.safe_load(res.stdout)["services"], load({"FLANNEL_BACKEND": backend})["services"]
        assert set(real) == set(ours)
        for name, svc in ours.items():
            assert argv(real[name]["command"]) == [a.replace("$", "$$") for a in argv(svc["command"])] or \
                argv(real[name]["command"]) == argv(svc["command"]), name
            assert env_of(real[name]) == env_of(svc), name


# ---- hosts, the underlay -------------------------------------------------------------------------

def test_underlay_is_internal_with_no_address_on_the_machine(compose):
    net = compose["networks"]["underlay"]
    assert net["internal"] is True
    assert net["driver"] == "bridge" and net["driver_opts"]["com.docker.network.bridge.inhibit_ipv4"] == "true"
    subnet = ipaddress.IPv4Network(net["ipam"]["config"][0]["subnet"])
    assert str(subnet) == DEFAULT_UNDERLAY and subnet.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))
    override = load({"FLANNEL_UNDERLAY": "198.18.7.0/24"})["networks"]["underlay"]["ipam"]["config"][0]["subnet"]
    assert override == "198.18.7.0/24"


def test_hosts_own_the_namespaces_and_route(compose):
    svcs = services(compose)
    for name in HOSTS:
        svc = svcs[name]
        assert svc["networks"] == ["underlay"] and "network_mode" not in svc
        assert argv(svc["command"]) == ["flannel-test-pod", "host"]
        assert svc["sysctls"]["net.ipv4.ip_forward"] == "1"
        assert "NET_ADMIN" in svc["cap_add"]  # drops its default route
        assert not svc.get("privileged")
    assert len({svcs[h]["hostname"] for h in HOSTS}) == len(HOSTS)


# ---- agents -------------------------------------------------------------------------------------

def etcd_client_url(compose) -> tuple[str, int]:
    args = argv(services(compose)["etcd"]["command"])
    advertised = [urlsplit(u) for u in (flag(args, "advertise-client-urls") or "").split(",")]
    listening = {urlsplit(u).port for u in (flag(args, "listen-client-urls") or "").split(",")}
    assert advertised[0].port in listening
    assert advertised[0].hostname is not None and advertised[0].port is not None
    return advertised[0].hostname, advertised[0].port


def test_agents_live_in_their_hosts_namespace_with_their_own_run_dir(compose):
    svcs = services(compose)
    run_volumes = set()
    for host, name in zip(HOSTS, AGENTS):
        svc = svcs[name]
        assert svc["network_mode"] == f"service:{host}"
        assert svc["depends_on"][host]["condition"] == "service_started"
        assert svc["depends_on"]["etcd-init"]["condition"] == "service_completed_successfully"
        # least privilege that works everywhere: `privileged` needs every capability in the
        # engine's bounding set, which some machines do not grant (runc: "unable to apply caps")
        assert not svc.get("privileged") and {"NET_ADMIN", "NET_RAW"} <= set(svc["cap_add"])
        assert "/dev/net/tun:/dev/net/tun" in svc["devices"]  # the udp backend's TUN
        run_volumes.add(mounts(svc)["/run/flannel"])
    assert len(run_volumes) == len(AGENTS), "each agent needs its own /run/flannel"


def test_agent_command_lines_are_accepted_and_reach_etcd(compose, monkeypatch):
    host, port = etcd_client_url(compose)
    svcs = services(compose)
    for name in AGENTS:
        svc = svcs[name]
        opts = parse_agent_argv(argv(svc["command"]), monkeypatch, env_of(svc))
        assert opts.subnet_manager == "etcd"
        assert opts.etcd_endpoints, name
        for ep in opts.etcd_endpoints:
            u = urlsplit(ep)
            assert (u.hostname, u.port) == (host, port), f"{name}: {ep} is not the etcd service"
            assert u.hostname in svcs
        assert opts.iface == ("eth0",)  # the host container's underlay interface
        assert opts.healthz_port > 0
        assert f":{opts.healthz_port}/readyz" in " ".join(svc["healthcheck"]["test"])
        assert os.path.dirname(opts.subnet_file) == "/run/flannel"  # the volume its pod reads


def test_config_written_to_etcd_is_what_the_agents_read(compose, monkeypatch):
    svcs = services(compose)
    init = svcs["etcd-init"]
    assert init["depends_on"]["etcd"]["condition"] == "service_healthy" and init["restart"] == "no"
    script = argv(init["command"])
    assert script[:2] == ["sh", "-c"]
    producer, _, consumer = script[2].partition("|")
    assert "$FLANNEL_CONFIG" in producer, "the config must reach flannelctl's stdin"
    path, params = parse_ctl_argv(shlex.split(consumer))
    assert path == ["config", "set"] and shlex.split(consumer)[-1] == "-"  # FILE = stdin
    host, port = etcd_client_url(compose)
    assert [(urlsplit(e).hostname, urlsplit(e).port) for e in params["etcd_endpoints"]] == [(host, port)]
    opts = parse_agent_argv(argv(svcs["agent1"]["command"]), monkeypatch, env_of(svcs["agent1"]))
    assert params["etcd_prefix"] == opts.etcd_prefix
    cfg = parse_network_config(env_of(init)["FLANNEL_CONFIG"], source="docker-compose etcd-init")
    assert cfg.backend_type == "vxlan" and cfg.backend_type in plugins.available(plugins.BACKENDS)
    assert cfg.network is not None and cfg.subnet_count >= len(AGENTS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_override_gives_a_valid_config(backend):
    text = env_of(load({"FLANNEL_BACKEND": backend, "FLANNEL_NETWORK": "10.77.0.0/16"})["services"]["etcd-init"])
    cfg = parse_network_config(text["FLANNEL_CONFIG"])
    assert cfg.backend_type == backend and str(cfg.network) == "10.77.0.0/16"


# ---- pods ---------------------------------------------------------------------------------------

def test_each_pod_lives_on_its_host_and_sees_its_agents_subnet_env(compose):
    svcs = services(compose)
    for host, agent, pod in zip(HOSTS, AGENTS, PODS):
        svc = svcs[pod]
        assert svc["network_mode"] == f"service:{host}"
        assert svc["depends_on"][agent]["condition"] == "service_healthy"
        assert not svc.get("privileged") and {"NET_ADMIN", "SYS_ADMIN"} <= set(svc["cap_add"])
        assert mounts(svc)["/run/flannel"] == mounts(svcs[agent])["/run/flannel"]
        assert argv(svc["command"]) == ["flannel-test-pod", "run"]
        assert argv(svc["healthcheck"]["test"])[1:] == ["flannel-test-pod", "ready"]


def test_pod_cni_config_is_accepted_by_the_plugin(compose):
    script = (ROOT / "deploy" / "docker" / "pod.sh").read_text()
    m = re.search(r"CNI_CONF:-([^}]+)\}", script)
    assert m is not None
    for pod in PODS:
        source = mounts(services(compose)[pod])[m.group(1)]
        conf = cni_netconf.parse_netconf((ROOT / source).read_text())
        assert conf.subnet_file == cni_netconf.DEFAULT_SUBNET_FILE  # inside the shared /run/flannel
        env = cni_netconf.parse_subnet_env("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\n"
                                           "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", source="sample")
        assert cni_netconf.build_delegate(conf, env)["type"] == "bridge"


def test_pod_script_is_valid_shell_and_has_every_subcommand_compose_runs(compose):
    path = ROOT / "deploy" / "docker" / "pod.sh"
    res = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cases = set(re.findall(r"^\s+([a-z]+)\)$", path.read_text(), re.M))
    used = {argv(s["command"])[1] for s in services(compose).values() if argv(s["command"])[0] == "flannel-test-pod"}
    used |= {argv(s["healthcheck"]["test"])[2] for s in services(compose).values()
             if "healthcheck" in s and "flannel-test-pod" in s["healthcheck"]["test"]}
    assert used == {"host", "run", "ready"} and used <= cases, (used, cases)


# ---- Dockerfiles --------------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def stages(path: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(ARGs declared before the first FROM, the instructions of each stage starting with its FROM)."""
    args: dict[str, str] = {}
    out: list[list[tuple[str, str]]] = []
    for op, rest in instructions(path):
        if op == "FROM":
            out.append([(op, rest)])
        elif out:
            out[-1].append((op, rest))
        elif op == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args, out


def runs(stage: list[tuple[str, str]]) -> str:
    return " ".join(rest for op, rest in stage if op == "RUN")


def test_images_build_from_debians_slim_image():
    for path in (DOCKERFILE, ETCD_DOCKERFILE):
        args, st = stages(path)
        assert args == {"BASE_IMAGE": images.BASE_IMAGE}, path.name
        assert all(s[0][1].split()[0] == "${BASE_IMAGE}" for s in st), path.name
    assert "etcd-server" in runs(stages(ETCD_DOCKERFILE)[1][0]) and "etcd-client" in runs(stages(ETCD_DOCKERFILE)[1][0])


def test_agent_image_is_multi_stage_and_the_final_stage_has_no_build_tools():
    _, (builder, final) = stages(DOCKERFILE)
    assert builder[0][1].endswith(" AS builder")
    for pkg in ("gcc", "python3-dev", "python3-venv"):
        assert pkg in runs(builder).split(), f"the builder lacks {pkg} (the udp extension is compiled there)"
    final_pkgs = set(runs(final).split())
    assert {"python3", "iproute2", "iptables", "nftables", "containernetworking-plugins"} <= final_pkgs
    assert not final_pkgs & {"gcc", "python3-dev", "libc6-dev", "build-essential", "python3-venv"}
    copies = [shlex.split(rest) for op, rest in final if op == "COPY"]
    from_builder = [c for c in copies if c[0].startswith("--from=")]
    assert from_builder == [["--from=builder", "/opt/pyflannel", "/opt/pyflannel"]], "only the venv comes along"
    assert not any("wheelhouse" in " ".join(c) for c in copies)
    env = " ".join(rest for op, rest in final if op == "ENV")
    assert "PATH=/opt/pyflannel/bin:$PATH" in env


def test_builder_installs_offline_from_the_wheelhouse_when_it_has_wheels():
    _, (builder, _) = stages(DOCKERFILE)
    text = runs(builder)
    assert "--no-index --find-links=/wheelhouse" in text
    assert re.search(r"if ls /wheelhouse/\*\.whl .*then .*--no-index .* else .*pip install --no-cache-dir \. ", text)
    copies = [shlex.split(rest) for op, rest in builder if op == "COPY"]
    assert [str(images.WHEELHOUSE) + "/", "/wheelhouse/"] in copies
    assert (ROOT / images.WHEELHOUSE / "README.md").is_file(), "COPY needs the directory even without wheels"


def test_every_file_the_dockerfiles_copy_exists():
    for path, ctx in ((DOCKERFILE, ROOT), (ETCD_DOCKERFILE, ETCD_DOCKERFILE.parent)):
        copied = set()
        for op, rest in instructions(path):
            if op not in ("COPY", "ADD") or "--from=" in rest:
                continue
            for src in [p for p in shlex.split(rest) if not p.startswith("--")][:-1]:
                if "*" in src:  # optional files (setup.py* : the extension's build script, if any)
                    continue
                assert (ctx / src).exists(), f"{path.name} copies missing {src}"
                copied.add(src.rstrip("/").split("/")[0])
        if path == DOCKERFILE:
            # everything `pip install .` needs is in the build context copy
            assert {"pyproject.toml", "setup.cfg", "README.md", "flannel", "backends", "subnet_managers"} <= copied


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignore = ROOT / ".dockerignore"
    assert ignore.is_file(), "without .dockerignore the venv and .git are sent as build context"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns
    for op, rest in instructions(DOCKERFILE):
        if op != "COPY" or "--from=" in rest:
            continue
        for src in [p for p in shlex.split(rest) if not p.startswith("--")][:-1]:
            for pat in patterns:
                assert not fnmatch.fnmatch(src.rstrip("/"), pat) and not fnmatch.fnmatch(src.split("/")[0], pat), \
                    f".dockerignore pattern {pat!r} hides {src}, which the Dockerfile copies"


def test_pod_script_is_installed_under_the_name_compose_runs(compose):
    copies = [shlex.split(rest) for op, rest in instructions(DOCKERFILE) if op == "COPY"]
    installed = {Path(c[-1]).name for c in copies if c[0] == "deploy/docker/pod.sh"}
    assert {argv(services(compose)[p]["command"])[0] for p in (*PODS, *HOSTS)} <= installed
