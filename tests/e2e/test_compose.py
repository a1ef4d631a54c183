"""The compose lab for real: images built offline, docker-compose.yml brought up on a Docker engine,
pods that talk across hosts, an agent container restarted, and ``down`` leaving nothing behind.

Everything goes through the product code (``flannel.lab.compose``, the code behind
``scripts/compose``): the engine (the machine's, else a private dockerd started here), the base
image (pull, else debootstrap), the wheelhouse and the images. Each backend gets its own compose
project and underlay subnet, so a developer's ``scripts/compose up`` on the same engine is untouched.

Skipped only where no engine can be had at all: not root, or no engine answers and ``dockerd`` is not
installed (``scripts/setup`` installs Debian's docker.io). A dockerd that is installed but does not
start is a failure, with its log in the message.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.compose import engine as engines
from flannel.lab.compose import images
from flannel.lab.compose.lab import ComposeConfig, ComposeLab, free_underlay
from flannel.lab.compose.steps import Steps

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.e2e,
              pytest.mark.timeout(2400)]  # a cold run builds a base image and two images first

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["vxlan", "udp"]
NETWORK = "10.244.0.0/16"
UNDERLAYS = [f"198.18.{n}.0/24" for n in range(100, 200)]


@pytest.fixture(scope="module")
def prepared() -> Iterator[tuple[engines.Engine, Steps]]:
    """Engine, base image, wheelhouse and images, once for the module (timed: see the test output)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if engines.find(start=False) is None and engines.dockerd_binary() is None:
        pytest.skip("no Docker engine answers and dockerd is not installed (scripts/setup installs docker.io)")
    steps = Steps(say=lambda m: print(f"compose test: {m}", flush=True))
    lab = ComposeLab.prepare(ComposeConfig(repo=REPO, project="pyfltestprep"), steps)
    yield lab.engine, steps
    print("compose test: preparation times:\n  " + "\n  ".join(steps.table()))
    if lab.engine.started:
        print(f"compose test: {engines.stop_if_idle(lab.engine)}")


@pytest.fixture(scope="module", params=BACKENDS)
def lab(request: pytest.FixtureRequest, prepared: tuple[engines.Engine, Steps]) -> Iterator[ComposeLab]:
    engine, _ = prepared
    underlay = free_underlay(engine.docker.with_compose(), UNDERLAYS)
    cfg = ComposeConfig(repo=REPO, project=f"pyfltest{uuid.uuid4().hex[:6]}", backend=request.param,
                        network=NETWORK, underlay=underlay)
    lab = ComposeLab(cfg, engine)
    steps = Steps(say=lambda m: print(f"compose test [{cfg.backend}]: {m}", flush=True))
    try:
        lab.up(steps)
        yield lab
    finally:
        t0 = time.monotonic()
        lab.down()
        print(f"compose test [{cfg.backend}]: up {sum(s.seconds for s in steps.done):.1f} s, "
              f"down {time.monotonic() - t0:.1f} s")


def _logs(lab: ComposeLab) -> str:
    return "\n".join(f"--- {a}:\n{lab.logs(a, tail=20)}" for a in lab.names["agent"])


# ---- the image (once, not per backend) -----------------------------------------------------------

def _in_image(prepared: tuple[engines.Engine, Steps], *cmd: str) -> tuple[int, str]:
    engine, _ = prepared
    image = next(b.image for b in images.builds(REPO / "docker-compose.yml") if b.context == REPO)
    res = engine.docker.run("run", "--rm", "--network", "none", image, *cmd, check=False, timeout=120)
    return res.returncode, res.stdout + res.stderr


def test_image_carries_no_compiler_and_no_wheelhouse(prepared: tuple[engines.Engine, Steps]) -> None:
    rc, out = _in_image(prepared, "sh", "-c",
                        "command -v gcc cc x86_64-linux-gnu-gcc; ls -d /wheelhouse /src /usr/include/python3*")
    assert rc != 0 and out.strip().startswith("ls:"), f"the final image has build leftovers:\n{out}"
    rc, out = _in_image(prepared, "flannel-cni", "version")
    assert rc == 0 and '"cniVersion"' in out, out


def test_image_has_the_udp_fast_path(prepared: tuple[engines.Engine, Steps]) -> None:
    """The builder stage compiles the udp extension; the final image can load it (no compiler there)."""
    rc, out = _in_image(prepared, "flannel", "--version")
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.startswith("udp fast path:")]
    assert len(lines) == 1 and re.match(r"udp fast path: available\b", lines[0]), \
        f"`flannel --version` in the image says:\n{out}"


# ---- the lab, per backend ------------------------------------------------------------------------

def test_every_pod_reaches_every_other_pod(lab: ComposeLab) -> None:
    pods = lab.pods()
    assert len(pods) == 3 and all(ipaddress.IPv4Address(p.ip) in ipaddress.IPv4Network(NETWORK) for p in pods), pods
    m = pt.wait_full_matrix(pods, time.monotonic() + 60)
    assert all(m.values()), "pod-to-pod ping:\n" + pt.format_matrix(pods, m) + "\n" + _logs(lab)
    with pt.TcpServers(pods):
        res = pt.tcp_matrix(pods)
    bad = {k: v for k, v in res.items() if v != "ok"}
    assert not bad and len(res) == 6, f"TCP transfers that failed or were corrupted: {bad}"


def test_every_agent_is_healthy_with_its_own_lease(lab: ComposeLab) -> None:
    states = {a: lab.state(a) for a in lab.names["agent"]}
    assert set(states.values()) == {"healthy"}, states
    subnets = {a: ipaddress.IPv4Interface(lab.subnet(a)).network for a in lab.names["agent"]}
    assert len(set(subnets.values())) == 3 and all(s.subnet_of(ipaddress.IPv4Network(NETWORK))
                                                   for s in subnets.values()), subnets
    keys = lab.exec("etcd", "etcdctl", "get", "--prefix", "--keys-only", "/coreos.com/network/subnets/").split()
    assert sorted(keys) == sorted(f"/coreos.com/network/subnets/{s.network_address}-{s.prefixlen}"
                                  for s in subnets.values()), keys
    backend = lab.running_config()["Backend"]["Type"]
    assert backend == lab.config.backend


def _machine_routes() -> str:
    return subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout


def test_underlay_is_internal_and_the_machine_gets_no_route_to_it(lab: ComposeLab) -> None:
    nets = lab.docker.inspect(*lab.docker.project_objects(lab.config.project)["network"], kind="network")
    assert len(nets) == 1 and nets[0]["Internal"] is True, nets
    assert [c["Subnet"] for c in nets[0]["IPAM"]["Config"]] == [lab.config.underlay]
    for host in lab.names["host"]:
        assert lab.exec(host, "ip", "-4", "route", "show", "default").strip() == "", f"{host} has a default route"
    bridge = f"br-{nets[0]['Id'][:12]}"
    link = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", bridge], capture_output=True, text=True)
    assert link.returncode == 0 and link.stdout.strip() == "", f"the machine has an address on {bridge}: {link}"
    routes = _machine_routes()
    assert lab.config.underlay not in routes and bridge not in routes, routes


def test_udp_agents_state_the_accelerated_data_path(lab: ComposeLab) -> None:
    """Each udp agent says once, at start, which data path runs; in the image it is the C one."""
    if lab.config.backend != "udp":
        pytest.skip("udp only")
    for agent in lab.names["agent"]:
        lines = lab.data_path_lines(agent)
        assert len(lines) == 1, f"{agent} states its data path {len(lines)} times:\n{lab.logs(agent, tail=30)}"
        assert lines[0].startswith("udp: data path: accelerated"), (agent, lines)


def test_restarting_an_agent_keeps_pods_talking(lab: ComposeLab) -> None:
    p1, p2, p3 = lab.pods()
    agent = lab.names["agent"][1]
    subnet_before = lab.subnet(agent)
    # The restarted host's pod keeps its traffic in the kernel with vxlan (the device, routes and
    # fdb entries stay); udp's data path is the agent process, so there only the other hosts'
    # traffic must be undisturbed (as in the namespace lab's restart test).
    pairs = [(p1, p3), (p3, p1)] + ([(p1, p2), (p2, p3)] if lab.config.backend != "udp" else [])
    pingers = [pt.ContinuousPing(a, b.ip) for a, b in pairs]
    try:
        lab.restart(agent)
    finally:
        results = []
        for p in pingers:
            try:
                results.append((p.src.name, p.dst, p.stop()))
            except Exception:
                p.kill()
                raise
    for src, dst, r in results:
        assert r.sent >= 20, f"{src}→{dst}: only {r.sent} echoes sent"
        assert r.lost == (), f"{src}→{dst}: lost {len(r.lost)} of {r.sent} echoes during the restart"
    assert lab.subnet(agent) == subnet_before, "the restarted agent must keep its lease"
    pods = lab.pods()
    m = pt.wait_full_matrix(pods, time.monotonic() + 60)
    assert all(m.values()), "after the restart:\n" + pt.format_matrix(pods, m) + "\n" + _logs(lab)


def test_down_leaves_no_container_network_or_volume(lab: ComposeLab) -> None:
    """Runs last for each backend (definition order); the fixture's own down is then a no-op."""
    before = lab.docker.project_objects(lab.config.project)
    assert before["container"] and before["network"] and before["volume"], before
    bridge = f"br-{before['network'][0][:12]}"
    lab.down()
    after = lab.docker.project_objects(lab.config.project)
    assert after == {"container": [], "network": [], "volume": []}, after
    gone = subprocess.run(["ip", "link", "show", bridge], capture_output=True, text=True)
    assert gone.returncode != 0, f"the underlay bridge {bridge} is still on the machine"
