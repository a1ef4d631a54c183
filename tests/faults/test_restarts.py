"""Chaos: agents restarted by SIGTERM and by SIGKILL while pods ping every 10 ms (vxlan, host-gw).

The data plane of these backends lives in the kernel, so a restart (clean or not) must lose no
packet: the new agent finds its entries in place and leaves correct ones untouched. One lab per
backend (3 hosts, one pod each); the agent on h3 is restarted while pods on every host ping the
pods of the others, and the pings go on for a while after it is ready (the first full reconcile
comes after readiness).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import Lab
from tests.support import Figure, ensure_healthy, lab_logs, report_echoes, running_lab, stop_pingers, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.root, pytest.mark.etcd]

INTERVAL = 0.01  # 100 echoes per second per pair


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab(request.param, tmp_path_factory.mktemp(f"faults-restart-{request.param}"), hosts=3,
                           pods_per_host=1)


@pytest.fixture(autouse=True)
def healthy(lab: Lab) -> None:
    ensure_healthy(lab)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_under_10ms_ping_loses_no_packet(lab: Lab, sig: signal.Signals, figure: Figure) -> None:
    h1, h2, h3 = list(lab.hosts)
    p1, p2, p3 = (lab.pods([h])[0] for h in (h1, h2, h3))
    subnet = lab.hosts[h3].subnet
    peers = {lab.hosts[h].subnet for h in (h1, h2)}
    pingers = [pt.ContinuousPing(p1, p3.ip, interval=INTERVAL), pt.ContinuousPing(p3, p1.ip, interval=INTERVAL),
               pt.ContinuousPing(p2, p3.ip, interval=INTERVAL), pt.ContinuousPing(p1, p2.ip, interval=INTERVAL)]
    try:
        agent = lab.agent(h3)
        t0 = time.monotonic()
        if sig == signal.SIGKILL:
            agent.kill()
            figure("exit code", agent.returncode)
        else:
            lab.stop_agent(h3)
            figure("exit code", agent.returncode)
            assert agent.returncode == 0, "SIGTERM must end the agent cleanly" + lab_logs(lab)
        lab.start_agent(h3)
        assert lab.wait_subnet(h3).compressed == subnet, "a restarted agent must keep its subnet"
        figure("signal to ready", time.monotonic() - t0, "s")
        # the new agent has seen every peer (its first snapshot is applied) ...
        wait_for(lambda: {r["subnet"] for r in lab.agent(h3).debug_leases()["remote"]} >= peers,
                 "the restarted agent to track its peers", timeout=60, on_timeout=lambda: lab_logs(lab))
        # ... and pods keep pinging through its first full reconcile
        time.sleep(2.0)
        assert lab.agent_alive(h3), "the restarted agent exited" + lab_logs(lab)
    finally:
        results = stop_pingers(pingers)
    report_echoes(figure, results)
    for name, r in results:
        assert r.sent >= 100, f"{name}: only {r.sent} echoes sent"
        assert r.lost == (), f"{name}: lost {len(r.lost)} of {r.sent} echoes across the restart (seq {r.lost[:20]})"
