"""e2e: the lab with the extension backend — host-gw built from shell commands
(``flannel.lab.cluster.EXTENSION_BACKEND``: ``ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0``),
run by real agents in the lab's host namespaces."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from flannel.lab import podtraffic as pt
from flannel.lab.cluster import ETCD_PREFIX, Lab
from flannel.lab.netns import run
from tests.support import build_lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = build_lab("extension", tmp_path_factory.mktemp("lab-extension"), pods_per_host=1)
    yield lab
    lab.teardown(keep_dir=True)


def routes(lab: Lab, host: str) -> set[str]:
    out = run("ip", "-n", lab.hosts[host].ns, "-j", "route", "show", "table", "main")
    return {f"{r['dst']} via {r['gateway']}" for r in json.loads(out or "[]") if r.get("gateway") and
            r["dst"].startswith("10.244.")}


def test_commands_program_routes_and_every_pod_reaches_every_other(lab: Lab) -> None:
    for name in lab.hosts:
        want = {f"{h.subnet} via {h.ip}" for n, h in lab.hosts.items() if n != name}
        wait_for(lambda name=name, want=want: routes(lab, name) == want, what=f"routes on {name}", timeout=60)
        log = lab.log_file(name).read_text()
        assert "ran SubnetAddCommand" in log
    pods = lab.pods()
    m = pt.wait_full_matrix(pods, time.monotonic() + 60)
    assert all(m.values()), pt.format_matrix(pods, m)
    h = next(iter(lab.hosts.values()))
    value = lab.etcdctl("get", f"{ETCD_PREFIX}/subnets/{h.subnet.replace('/', '-')}", "--print-value-only").strip()
    assert value == f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"extension"}}'


def test_a_failing_command_is_logged_with_output_and_the_agent_goes_on(lab: Lab) -> None:
    h1, h2, h3 = list(lab.hosts)[:3]
    # h1 already has the route to h3's subnet; someone replaces it with a blackhole. Then h3's lease is
    # deleted: the remove command (`ip route del <subnet> via <ip> dev eth0`) fails on h1, logged with output
    ns1 = lab.hosts[h1].ns
    subnet3 = lab.hosts[h3].subnet
    run("ip", "-n", ns1, "route", "replace", "blackhole", subnet3)
    lab.stop_agent(h3)
    lab.delete_lease(h3)
    wait_for(lambda: "SubnetRemoveCommand failed" in lab.log_file(h1).read_text(), what="failure logged", timeout=60)
    text = lab.log_file(h1).read_text()
    assert "Output: RTNETLINK answers: No such process" in text, text[-2000:]
    # h2's remove command worked; h1's agent is still running and still serves its other peer
    wait_for(lambda: subnet3 not in {r.split()[0] for r in routes(lab, h2)}, what="route removed on h2")
    assert lab.agent_alive(h1)
    p1, p2 = lab.pods([h1])[0], lab.pods([h2])[0]
    assert pt.ping_once(p1.ns, p2.ip) and pt.ping_once(p2.ns, p1.ip)
    run("ip", "-n", ns1, "route", "del", "blackhole", subnet3)
    lab.remove_host(h3, delete_lease=False)
