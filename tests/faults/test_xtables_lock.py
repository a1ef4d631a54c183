"""Chaos: another process holds the xtables lock for 60 s (a busy node: kube-proxy restoring
thousands of rules). The agent must not exit, and must repair its rules once the lock is free.

Only legacy iptables takes the xtables lock (iptables-nft, the machine's default, has none), so
the agent on h1 runs with a PATH whose ``iptables*`` are the legacy binaries, as on a node that
uses iptables-legacy. The lock is a private file named by ``XTABLES_LOCKFILE`` (honoured by
iptables-legacy), never the machine's /run/xtables.lock: other tests on the machine use that one.
While the lock is held, the test deletes one of the agent's masquerade rules (with a different
lock file: the test plays an admin who does not wait), so the agent has something to repair.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import Lab
from tests.support import Figure, dead_agents, lab_logs, lab_ns, report_echoes, running_lab, stop_pingers, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.root, pytest.mark.etcd]

HOLD = 60.0
LEGACY = {"iptables": "iptables-legacy", "iptables-restore": "iptables-legacy-restore",
          "iptables-save": "iptables-legacy-save", "ip6tables": "ip6tables-legacy",
          "ip6tables-restore": "ip6tables-legacy-restore", "ip6tables-save": "ip6tables-legacy-save"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from running_lab("vxlan", tmp_path_factory.mktemp("faults-xtables"), hosts=2, pods_per_host=1, ip_masq=True)


def legacy_env(tmp: Path) -> tuple[dict[str, str], Path]:
    bindir = tmp / "legacy-bin"
    bindir.mkdir(exist_ok=True)
    for name, target in LEGACY.items():
        link = bindir / name
        if not link.exists():
            link.symlink_to(f"/usr/sbin/{target}")
    lock = tmp / "xtables.lock"
    lock.touch()
    return {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "XTABLES_LOCKFILE": str(lock)}, lock


def masq_rules(lab: Lab, host: str, free_lock: Path) -> list[str]:
    """The agent's legacy nat/FLANNEL-POSTRTG rules, read without waiting for the held lock."""
    out = lab_ns(lab, host).exec("env", f"XTABLES_LOCKFILE={free_lock}", "iptables-legacy", "-w", "5", "-t", "nat",
                                 "-S", "FLANNEL-POSTRTG", check=False)
    return [line for line in out.splitlines() if line.startswith("-A ")]


def lock_held(lock: Path) -> bool:
    return subprocess.run(["flock", "-n", str(lock), "true"], capture_output=True).returncode != 0


def test_xtables_lock_held_60s_agent_survives_and_repairs_rules(lab: Lab, tmp_path: Path, figure: Figure) -> None:
    h1, h2 = list(lab.hosts)
    env, lock = legacy_env(tmp_path)
    free_lock = tmp_path / "admin.lock"
    lab.restart_agent(h1, env=env)
    holder: subprocess.Popen[bytes] | None = None
    p1, p2 = lab.pods([h1])[0], lab.pods([h2])[0]
    pingers = [pt.ContinuousPing(p1, p2.ip), pt.ContinuousPing(p2, p1.ip)]
    results: list[tuple[str, pt.PingResult]] = []
    try:
        rules = wait_for(lambda: masq_rules(lab, h1, free_lock), "the agent's legacy masquerade rules", timeout=60,
                         on_timeout=lambda: lab_logs(lab))
        figure("masquerade rules installed (legacy iptables)", len(rules))
        pid = lab.agent(h1).pid
        holder = subprocess.Popen(["flock", str(lock), "sleep", str(HOLD)])
        wait_for(lambda: lock_held(lock), "the lock holder to take the lock", timeout=10)
        t_lock = time.monotonic()
        victim = rules[-1]
        lab_ns(lab, h1).exec("env", f"XTABLES_LOCKFILE={free_lock}", "iptables-legacy", "-w", "5", "-t", "nat",
                             *shlex.split(victim.replace("-A ", "-D ", 1)))
        assert victim not in masq_rules(lab, h1, free_lock)
        health: tuple[int, str] | None = None
        while holder.poll() is None:
            assert lab.agent_alive(h1), (f"the agent exited {time.monotonic() - t_lock:.0f}s into the lock hold"
                                         + lab_logs(lab, 25))
            if health is None and time.monotonic() - t_lock > 40:
                health = lab.agent(h1).http_get("/healthz")
            time.sleep(0.5)
        t_free = time.monotonic()
        figure("lock held for", t_free - t_lock, "s")
        if health is not None:
            figure("/healthz 40 s into the hold", f"{health[0]} {health[1][:200]!r}")
        assert victim not in masq_rules(lab, h1, free_lock), "the rule came back while the lock was held?"
        wait_for(lambda: victim in masq_rules(lab, h1, free_lock), "the agent to repair its masquerade rule",
                 timeout=60, interval=0.5, on_timeout=lambda: lab_logs(lab, 25))
        figure("rule repaired after the lock was freed", time.monotonic() - t_free, "s")
        assert lab.agent_alive(h1) and lab.agent(h1).pid == pid, "the agent exited or was restarted" + lab_logs(lab)
        status, body = lab.agent(h1).http_get("/healthz")
        figure("/healthz after the hold", f"{status} {body[:200]!r}")
        assert status == 200, body
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(5)
        results = stop_pingers(pingers)
        if dead_agents(lab):
            lab.start_agent(h1)
        else:
            lab.restart_agent(h1)  # back to the machine's iptables
    assert report_echoes(figure, results) == 0, f"pods lost echoes: {results}"
