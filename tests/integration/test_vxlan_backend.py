"""vxlan backend in a fresh namespace per test, checked with iproute2 (ip -d link, ip route, ip neigh,
bridge fdb, ip monitor).

The backend runs in-process on a worker thread that switched into the test's namespace
(``in_netns``): its pyroute2 socket and any ``ip -batch`` child live there. The underlay is a veth
pair inside that namespace with 198.18.0.1/24; fake peers are 198.18.0.x/198.19.x addresses that
never answer (nothing leaves the namespace).
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from typing import Any

import pytest

from flannel import errors
from flannel.backends.base import ExternalInterface
from flannel.backends.vxlan import VXLANBackend
from flannel.config import NetworkConfig
from flannel.lab.netns import NetNS, in_netns
from flannel.lease import Lease, LeaseAttrs
from tests.support import UNDERLAY_LOCAL as LOCAL
from tests.support import (
    Agent,
    FakeLeases,
    added,
    ext_of,
    in_ns,
    make_ns,
    removed,
    routes,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]











def vx_lease(i: int, mac: str | None = None, ip: str | None = None, typ: str = "vxlan",
             data: str | None = None) -> Lease:
    mac = mac or f"02:00:00:00:00:{i:02x}"
    if data is None and typ == "vxlan":
        data = json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":"))
    return Lease(N(f"10.5.{i}.0/24"),
                 LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), backend_type=typ, backend_data=data))









# ---- independent views of the kernel (iproute2) --------------------------------------------



def neighs(ns: NetNS, dev: str = "flannel.1") -> set[str]:
    return {f"{n['dst']} {n['lladdr']} {'/'.join(n.get('state', []))}"
            for n in json.loads(ns.ip("-j", "neigh", "show", "dev", dev) or "[]") if "lladdr" in n}


def fdbs(ns: NetNS, dev: str = "flannel.1") -> set[str]:
    out = set()
    for f in json.loads(ns.exec("bridge", "-j", "fdb", "show", "dev", dev) or "[]"):
        if f.get("dst"):
            out.add(f"{f['mac']} {f['dst']} {f.get('state', '')}")
    return out


def link(ns: NetNS, dev: str = "flannel.1") -> dict[str, Any]:
    return json.loads(ns.ip("-d", "-j", "link", "show", dev))[0]


def expected_for(*ls: Lease) -> tuple[set[str], set[str], set[str]]:
    r, n, f = set(), set(), set()
    for lz in ls:
        mac = json.loads(lz.attrs.backend_data or "{}")["VtepMAC"]
        g = lz.subnet.network_address  # type: ignore[union-attr]
        r.add(f"{lz.subnet} via {g} dev flannel.1 onlink")
        n.add(f"{g} {mac} PERMANENT")
        f.add(f"{mac} {lz.attrs.public_ip} permanent")
    return r, n, f


def state(ns: NetNS) -> tuple[set[str], set[str], set[str]]:
    return routes(ns), neighs(ns), fdbs(ns)


@pytest.fixture
def ns(ns_prefix):
    n = make_ns(ns_prefix)
    yield n
    n.delete()


CFG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'


# ---- tests ---------------------------------------------------------------------------------

def test_device_attributes(ns):
    leases = FakeLeases("10.5.1.0/24")
    cfg = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":7,"Port":4789,"GBP":true}}'
    agent = Agent(ns, VXLANBackend(ext_of(ns)), cfg, leases).start()
    try:
        ln = link(ns, "flannel.7")
        info = ln["linkinfo"]["info_data"]
        assert ln["linkinfo"]["info_kind"] == "vxlan"
        assert info["id"] == 7 and info["port"] == 4789 and info["local"] == LOCAL and info["gbp"] is True
        assert info["learning"] is False
        assert info["link"] == "eth0"
        assert ln["mtu"] == 1450
        assert "UP" in ln["flags"]
        addrs = json.loads(ns.ip("-j", "addr", "show", "flannel.7"))[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [("10.5.1.0", 32)]
        assert leases.attrs is not None and leases.attrs.backend_type == "vxlan"
        assert leases.attrs.backend_data == f'{{"VNI":7,"VtepMAC":"{ln["address"]}"}}'
        assert agent.net.mtu == 1450
        mac = ln["address"]
        assert int(mac[:2], 16) & 3 == 2   # unicast, locally administered
    finally:
        agent.stop()
    # default port: attribute not sent → kernel's 8472; Learning and MTU from options
    ns.ip("link", "del", "flannel.7")
    agent = Agent(ns, VXLANBackend(ext_of(ns)),
                  '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":1400,"Learning":true}}',
                  FakeLeases("10.5.1.0/24")).start()
    try:
        info = link(ns)["linkinfo"]["info_data"]
        assert info["port"] == 8472 and info["learning"] is True and link(ns)["mtu"] == 1350
    finally:
        agent.stop()


def test_add_and_remove_peers_exactly(ns, caplog):
    caplog.set_level(logging.INFO)
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2, p3 = vx_lease(2), vx_lease(3)
        other = vx_lease(4, typ="host-gw", data=None)
        bad = vx_lease(5, data='{"VNI":1,"VtepMAC":"nope"}')
        agent.send(*added(p2, p3, other, bad), synced=True)
        want = expected_for(p2, p3)
        wait_for(lambda: state(ns) == want, what="peers 2 and 3 programmed")
        assert "ignoring non-vxlan subnet 10.5.4.0/24" in caplog.text
        assert "VtepMAC" in caplog.text and "10.5.5.0/24" not in " ".join(routes(ns))
        agent.send(*removed(p3))
        want = expected_for(p2)
        wait_for(lambda: state(ns) == want, what="peer 3 removed")
        # a peer changes its VTEP MAC (re-created device): replaced, not duplicated
        p2b = vx_lease(2, mac="02:00:00:00:02:22")
        agent.send(*added(p2b))
        want = expected_for(p2b)
        wait_for(lambda: state(ns) == want, what="peer 2 new MAC")
    finally:
        agent.stop()


class Monitor:
    """``ip monitor route neigh`` + ``bridge monitor fdb`` in the namespace, ready when a canary shows up."""

    def __init__(self, ns: NetNS) -> None:
        self.ns = ns
        self.procs = [subprocess.Popen(["ip", "-n", ns.name, "monitor", "route", "neigh"],
                                       stdout=subprocess.PIPE, text=True),
                      subprocess.Popen(["bridge", "-n", ns.name, "monitor", "fdb"], stdout=subprocess.PIPE, text=True)]
        self.lines: list[str] = []
        self.threads = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in self.procs]
        for t in self.threads:
            t.start()
        # canaries: one route and one fdb change that each monitor must report before we trust it.
        # Each poke deletes and re-adds them: an identical replace makes no notification, so a
        # monitor that was not yet listening at the first poke would otherwise never see one.
        def poke() -> bool:
            ns.ip("route", "del", "203.0.113.0/24", "dev", "eth1", check=False)
            ns.ip("route", "add", "203.0.113.0/24", "dev", "eth1")
            ns.exec("bridge", "fdb", "del", "02:99:00:00:00:01", "dev", "eth1", "self", check=False)
            ns.exec("bridge", "fdb", "add", "02:99:00:00:00:01", "dev", "eth1", "self", "permanent", check=False)
            return (any("203.0.113.0/24" in ln for ln in self.lines)
                    and any("02:99:00:00:00:01" in ln for ln in self.lines))
        wait_for(poke, "ip/bridge monitor ready", timeout=30)

    def _read(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            self.lines.append(line.strip())

    def stop(self) -> list[str]:
        for p in self.procs:
            p.terminate()
            p.wait(5)
        return [ln for ln in self.lines if "203.0.113.0" not in ln and "02:99:00:00:00:01" not in ln]


def test_restart_reconciles_without_touching_good_entries(ns):
    p2, p3 = vx_lease(2), vx_lease(3)
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        agent.send(*added(p2, p3), synced=True)
        wait_for(lambda: state(ns) == expected_for(p2, p3), what="initial peers")
    finally:
        agent.stop()
    before = link(ns)
    # stale entries no lease justifies (a peer that left while we were down) + one outside our scope
    ns.ip("route", "add", "10.5.9.0/24", "via", "10.5.9.0", "dev", "flannel.1", "onlink")
    ns.ip("neigh", "add", "10.5.9.0", "lladdr", "02:00:00:00:00:09", "dev", "flannel.1", "nud", "permanent")
    ns.exec("bridge", "fdb", "append", "02:00:00:00:00:09", "dev", "flannel.1", "dst", "198.18.0.9",
            "self", "permanent")
    ns.ip("route", "add", "192.0.2.0/24", "via", "10.5.9.0", "dev", "flannel.1", "onlink")
    mon = Monitor(ns)
    plans: list[Any] = []

    def record(net: Any) -> None:  # also see every write the backend issues
        orig = net.nl.apply
        net.nl.apply = lambda p: (plans.append(p), orig(p))[1]

    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24"), tweak=record).start()
    try:
        # a snapshot delivered in two batches: only the synced one may touch the kernel
        agent.send(*added(p2))
        agent.send(*added(p3), synced=True)
        r2, n2, f2 = expected_for(p2, p3)
        wait_for(lambda: state(ns) == (r2 | {"192.0.2.0/24 via 10.5.9.0 dev flannel.1 onlink"}, n2, f2),
                 what="stale entries removed")
    finally:
        agent.stop()
        events = mon.stop()
    after = link(ns)
    assert after["ifindex"] == before["ifindex"] and after["address"] == before["address"]  # device and MAC reused
    assert any(ev.startswith("Deleted 10.5.9.0/24 via 10.5.9.0") for ev in events), events
    assert any(ev.startswith("Deleted") and "02:00:00:00:00:09" in ev for ev in events), events
    writes = [str(e) for p in plans
              for part in (p.set_routes, p.set_neighs, p.set_fdbs, p.del_routes, p.del_neighs, p.del_fdbs)
              for e in part]
    assert writes and all("10.5.9.0" in w or "02:00:00:00:00:09" in w for w in writes), writes
    # an identical replace makes no netlink notification, so the monitor alone cannot see it: both checks
    touched = [ev for ev in events if "10.5.2.0" in ev or "10.5.3.0" in ev or ":02 " in ev or ":03 " in ev]
    assert touched == [], f"good entries were re-created or deleted: {touched}"


def test_device_deleted_under_running_agent_comes_back_with_all_peers(ns):
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        peers = [vx_lease(i) for i in range(2, 6)]
        agent.send(*added(*peers), synced=True)
        want = expected_for(*peers)
        wait_for(lambda: state(ns) == want, what="peers programmed")
        mac = link(ns)["address"]
        ns.ip("link", "del", "flannel.1")
        wait_for(lambda: "flannel.1" in ns.ip("link", "show"), what="device re-created")
        wait_for(lambda: state(ns) == want, what="peers re-programmed")
        ln = link(ns)
        assert ln["address"] == mac and "UP" in ln["flags"]
        assert "10.5.1.0/32" in ns.ip("addr", "show", "flannel.1")
    finally:
        agent.stop()


def test_lease_events_after_the_device_was_re_created_program_the_new_device(ns):
    """Lease events find the device's index without asking the kernel each time (``Netlink.apply``
    keeps what it found): after the device is deleted and re-created under a new index, the next
    events still program the new device, and removals leave nothing behind."""
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        peers = [vx_lease(i) for i in range(2, 5)]
        agent.send(*added(*peers), synced=True)
        agent.send(*added(vx_lease(5)))                     # an incremental apply: the index is now known
        wait_for(lambda: state(ns) == expected_for(*peers, vx_lease(5)), what="peers programmed")
        old = link(ns)["ifindex"]
        ns.ip("link", "del", "flannel.1")
        wait_for(lambda: "flannel.1" in ns.ip("link", "show") and link(ns)["ifindex"] != old,
                 what="device re-created under a new index")
        wait_for(lambda: state(ns) == expected_for(*peers, vx_lease(5)), what="peers re-programmed")
        agent.send(*added(vx_lease(6)))
        agent.send(*removed(vx_lease(2)))
        wait_for(lambda: state(ns) == expected_for(*peers[1:], vx_lease(5), vx_lease(6)), what="events applied")
    finally:
        agent.stop()


def test_config_change_updates_device_in_place(ns):
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    agent.stop()
    before = link(ns)
    assert before["mtu"] == 1450 and before["linkinfo"]["info_data"]["learning"] is False
    cfg = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":1300,"Learning":true}}'
    agent = Agent(ns, VXLANBackend(ext_of(ns)), cfg, FakeLeases("10.5.1.0/24")).start()
    try:
        after = link(ns)
        assert after["ifindex"] == before["ifindex"] and after["address"] == before["address"]
        assert after["mtu"] == 1250 and after["linkinfo"]["info_data"]["learning"] is True
        assert agent.net.mtu == 1250
    finally:
        agent.stop()


def test_incompatible_device_is_replaced_and_stored_mac_is_used(ns):
    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "4789", "local", LOCAL, "dev", "eth0")
    old_idx = link(ns)["ifindex"]
    stored = '{"VNI":1,"VtepMAC":"02:12:34:56:78:9a"}'
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24", stored=stored)).start()
    try:
        ln = link(ns)
        assert ln["ifindex"] != old_idx and ln["linkinfo"]["info_data"]["port"] == 8472
        assert ln["address"] == "02:12:34:56:78:9a"
    finally:
        agent.stop()


def test_direct_routing(ns):
    cfg = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}'
    agent = Agent(ns, VXLANBackend(ext_of(ns)), cfg, FakeLeases("10.5.1.0/24")).start()
    try:
        near, far = vx_lease(2), vx_lease(3, ip="198.19.3.3")
        agent.send(*added(near, far), synced=True)
        r, n, f = expected_for(far)
        wait_for(lambda: state(ns) == (r | {"10.5.2.0/24 via 198.18.0.2 dev eth0"}, n, f), what="direct + vxlan routes")
        agent.send(*removed(near))
        wait_for(lambda: state(ns) == (r, n, f), what="direct route removed")
    finally:
        agent.stop()


def test_large_snapshot_uses_batch_path_and_converges(ns):
    """200 peers (above the batch threshold) from a cold start, then a reconcile removing half."""
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        peers = [Lease(N(f"10.5.{i}.0/24"), LeaseAttrs(public_ip=A(f"198.19.{i}.1"), backend_type="vxlan",
                       backend_data=f'{{"VNI":1,"VtepMAC":"02:00:00:00:{i // 256:02x}:{i % 256:02x}"}}'))
                 for i in range(2, 202)]
        agent.send(*added(*peers), synced=True)
        want = expected_for(*peers)
        wait_for(lambda: state(ns) == want, "200 peers programmed", timeout=30)
        agent.send(*removed(*peers[100:]))
        want = expected_for(*peers[:100])
        wait_for(lambda: state(ns) == want, "100 peers removed", timeout=30)
    finally:
        agent.stop()


def test_register_rejects_bad_option_without_touching_kernel(ns):
    with pytest.raises(errors.ConfigError, match="VNI"):
        Agent(ns, VXLANBackend(ext_of(ns)), '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":"x"}}',
              FakeLeases("10.5.1.0/24")).start()
    assert "flannel." not in ns.ip("link", "show")


def test_two_hosts_reach_each_other_through_the_overlay(ns_prefix):
    """Data-plane sanity: two hosts on the test underlay, each running the backend, ping over vxlan."""
    from flannel.lab.topology import Underlay, ping

    with Underlay(ns_prefix + "u") as u:
        hosts = [u.add_host("h1"), u.add_host("h2")]
        agents = []
        try:
            for i, h in enumerate(hosts, start=1):
                idx = int(json.loads(h.ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
                ext = ExternalInterface("eth0", idx, 1500, h.ip, h.ip)
                agents.append(Agent(h.ns, VXLANBackend(ext), CFG, FakeLeases(f"10.5.{i}.0/24")).start())
            own = [Lease(N(f"10.5.{i}.0/24"), a.leases.attrs) for i, a in enumerate(agents, start=1)]  # type: ignore[arg-type]
            agents[0].send(*added(own[1]), synced=True)
            agents[1].send(*added(own[0]), synced=True)
            wait_for(lambda: ping(hosts[0].ns, "10.5.2.0", src="10.5.1.0"), "h1 → h2 over vxlan", timeout=10)
            assert ping(hosts[1].ns, "10.5.1.0", src="10.5.2.0")
        finally:
            for a in agents:
                a.stop()


def test_entries_deleted_by_someone_else_are_restored_from_notifications(ns):
    """No polling: the deletion notifications alone bring the entries back (no full reconcile)."""
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2 = vx_lease(2)
        agent.send(*added(p2), synced=True)
        want = expected_for(p2)
        wait_for(lambda: state(ns) == want, what="peer programmed")
        fulls = agent.net.stats["full_reconciles"]
        ns.ip("route", "del", "10.5.2.0/24")
        ns.exec("bridge", "fdb", "del", "02:00:00:00:00:02", "dev", "flannel.1", "dst", "198.18.0.2", "self")
        ns.ip("neigh", "del", "10.5.2.0", "dev", "flannel.1")
        wait_for(lambda: agent.net.stats["repairs"] >= 3 and state(ns) == want, what="route, neigh and fdb restored")
        assert agent.net.stats["full_reconciles"] == fulls
    finally:
        agent.stop()


def test_our_own_fdb_deletions_do_not_wake_the_loop_and_others_deletions_still_do(ns):
    """vxlan reports every fdb deletion, and the kernel a neighbour's final removal, with port id
    0, ours included; the monitor thread drops the echoes of ours (no second wake-up per lease
    removal). Someone else deleting an fdb entry or neighbour of a live peer -- also one we had
    deleted and written again -- is still repaired."""
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2, p3 = vx_lease(2), vx_lease(3)
        agent.send(*added(p2, p3), synced=True)
        wait_for(lambda: state(ns) == expected_for(p2, p3), what="peers programmed")
        agent.send(*removed(p2))
        wait_for(lambda: state(ns) == expected_for(p3) and agent.net.echoes_dropped >= 2,
                 what="peer 2 removed, the echoes of its fdb and neighbour deletions dropped")
        assert agent.net.stats["repairs"] == 0
        agent.send(*added(p2))
        wait_for(lambda: state(ns) == expected_for(p2, p3), what="peer 2 back")
        for i in (2, 3):
            ns.exec("bridge", "fdb", "del", f"02:00:00:00:00:0{i}", "dev", "flannel.1", "dst", f"198.18.0.{i}", "self")
            ns.ip("neigh", "del", f"10.5.{i}.0", "dev", "flannel.1")
        wait_for(lambda: agent.net.stats["repairs"] >= 4 and state(ns) == expected_for(p2, p3),
                 what="both fdb entries and neighbours restored")
    finally:
        agent.stop()


def test_entries_deleted_by_someone_else_are_repaired_by_the_resync_without_notifications(ns):
    def polling(net: Any) -> None:
        net.nl.monitor = lambda: (_ for _ in ()).throw(errors.BackendError("no notifications in this test"))
        net.poll_interval = 0.2
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24"), tweak=polling).start()
    try:
        p2 = vx_lease(2)
        agent.send(*added(p2), synced=True)
        want = expected_for(p2)
        wait_for(lambda: state(ns) == want, what="peer programmed")
        ns.ip("route", "del", "10.5.2.0/24")
        ns.exec("bridge", "fdb", "del", "02:00:00:00:00:02", "dev", "flannel.1", "dst", "198.18.0.2", "self")
        wait_for(lambda: state(ns) == want, what="route and fdb repaired")
        assert agent.net.stats["repairs"] == 0 and agent.net.stats["full_reconciles"] >= 2
    finally:
        agent.stop()


def test_dump_reads_ours_and_foreign_routes_as_iproute2_wrote_them(ns):
    """The raw-netlink dump classifies what iproute2 wrote: ours (proto 152, or Go flannel's vxlan
    shape with proto boot), foreign (everything else inside the network), nothing outside it."""
    from flannel.backends.routed import model as rm
    from flannel.backends.routed.netlink import Netlink, Scope

    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", LOCAL, "dev", "eth0", "nolearning")
    ns.ip("link", "set", "flannel.1", "up")
    ns.ip("route", "add", "10.5.2.0/24", "via", "10.5.2.0", "dev", "flannel.1", "onlink", "proto", "152")
    ns.ip("route", "add", "10.5.3.0/24", "via", "10.5.3.0", "dev", "flannel.1", "onlink")   # Go flannel: proto boot
    ns.ip("route", "add", "10.5.3.3/32", "via", "10.5.3.3", "dev", "flannel.1", "onlink", "proto", "static")
    ns.ip("route", "add", "10.5.4.0/24", "via", "198.18.0.4", "dev", "eth0", "proto", "152")  # direct route: ours
    ns.ip("route", "add", "10.5.7.0/24", "via", "198.18.0.7", "dev", "eth0")                   # operator or Go host-gw
    ns.ip("route", "add", "10.5.1.0/24", "via", "198.18.0.9", "dev", "eth0")          # own subnet: not looked at
    ns.ip("route", "add", "192.0.2.0/24", "via", "198.18.0.9", "dev", "eth0", "proto", "152")  # outside Network
    ns.ip("route", "add", "blackhole", "10.5.5.0/24")
    ns.ip("-6", "route", "add", "fd00::/64", "dev", "eth0")                            # IPv6 off in this scope
    ns.ip("neigh", "add", "10.5.2.0", "lladdr", "02:00:00:00:00:02", "dev", "flannel.1", "nud", "permanent")
    ns.ip("neigh", "add", "10.5.6.0", "lladdr", "02:00:00:00:00:06", "dev", "flannel.1",
          "nud", "stale")  # not permanent
    ns.exec("bridge", "fdb", "append", "02:00:00:00:00:02", "dev", "flannel.1", "dst", "198.18.0.2",
            "self", "permanent")
    ns.exec("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "flannel.1", "dst", "198.18.0.7",
            "self", "permanent")
    scope = Scope(network=N("10.5.0.0/16"), devs=("flannel.1", "eth0"), overlay_dev="flannel.1",
                  exclude=N("10.5.1.0/24"))

    def dump() -> Any:
        nl = Netlink()
        try:
            return nl.dump(scope)
        finally:
            nl.close()
    got = in_ns(ns, dump)
    assert got.routes == {rm.Route(N("10.5.2.0/24"), A("10.5.2.0"), "flannel.1", True),
                          rm.Route(N("10.5.3.0/24"), A("10.5.3.0"), "flannel.1", True),
                          rm.Route(N("10.5.4.0/24"), A("198.18.0.4"), "eth0", False)}
    assert {r.dst: r.proto for r in got.routes} == {N("10.5.2.0/24"): 152, N("10.5.3.0/24"): 3, N("10.5.4.0/24"): 152}
    assert got.foreign == {rm.ForeignRoute(N("10.5.3.3/32"), "flannel.1", A("10.5.3.3"), 4),
                           rm.ForeignRoute(N("10.5.7.0/24"), "eth0", A("198.18.0.7"), 3),
                           rm.ForeignRoute(N("10.5.5.0/24"), None, None, 3, "blackhole")}
    assert got.neighs == {rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:02", "flannel.1")}
    assert got.fdbs == {rm.Fdb("02:00:00:00:00:02", A("198.18.0.2"), "flannel.1")}


def test_dump_given_an_expectation_reads_exactly_what_it_reads_without_one(ns):
    """A full reconcile hands the dump what it expects (the desired state) so that messages that
    are exactly an expected entry are not parsed. That must never change the result: an expected
    route the kernel holds with Go flannel's protocol comes back with that protocol; one the
    kernel holds with another protocol, via another device, in our own subnet or outside the
    network is foreign or nothing, as without the expectation; a neighbour whose MAC the lease
    spells in capitals, one that is not permanent, the all-zero fdb entry and entries of another
    device are read as the kernel holds them; what the kernel does not hold is not invented."""
    from flannel.backends.routed import model as rm
    from flannel.backends.routed.netlink import Netlink, Scope

    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", LOCAL, "dev", "eth0", "nolearning")
    ns.ip("link", "set", "flannel.1", "up")
    ns.ip("route", "add", "10.5.2.0/24", "via", "10.5.2.0", "dev", "flannel.1", "onlink", "proto", "152")
    ns.ip("route", "add", "10.5.3.0/24", "via", "10.5.3.0", "dev", "flannel.1", "onlink")   # Go flannel: proto boot
    ns.ip("route", "add", "10.5.3.3/32", "via", "10.5.3.3", "dev", "flannel.1", "onlink", "proto", "static")
    ns.ip("route", "add", "10.5.4.0/24", "via", "198.18.0.4", "dev", "eth0", "proto", "152")
    ns.ip("route", "add", "10.5.7.0/24", "via", "198.18.0.7", "dev", "eth0")
    ns.ip("route", "add", "10.5.1.0/24", "via", "198.18.0.9", "dev", "eth0", "proto", "152")   # own subnet
    ns.ip("route", "add", "192.0.2.0/24", "via", "198.18.0.9", "dev", "eth0", "proto", "152")  # outside Network
    ns.ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
    ns.ip("link", "set", "other0", "up")
    ns.ip("route", "add", "10.5.10.0/24", "via", "10.5.10.0", "dev", "other0", "onlink", "proto", "152")
    for ip, mac, nud in (("10.5.2.0", "02:00:00:00:00:02", "permanent"), ("10.5.8.0", "02:00:00:00:00:0a", "permanent"),
                         ("10.5.6.0", "02:00:00:00:00:06", "stale")):
        ns.ip("neigh", "add", ip, "lladdr", mac, "dev", "flannel.1", "nud", nud)
    ns.ip("neigh", "add", "10.5.2.0", "lladdr", "02:00:00:00:00:02", "dev", "other0", "nud", "permanent")
    for mac, dst in (("02:00:00:00:00:02", "198.18.0.2"), ("00:00:00:00:00:00", "198.18.0.7"),
                     ("02:00:00:00:00:0a", "198.18.0.8")):
        ns.exec("bridge", "fdb", "append", mac, "dev", "flannel.1", "dst", dst, "self", "permanent")
    scope = Scope(network=N("10.5.0.0/16"), devs=("flannel.1", "eth0"), overlay_dev="flannel.1",
                  exclude=N("10.5.1.0/24"))
    r2 = rm.Route(N("10.5.2.0/24"), A("10.5.2.0"), "flannel.1", True)
    n2 = rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:02", "flannel.1")
    f2 = rm.Fdb("02:00:00:00:00:02", A("198.18.0.2"), "flannel.1")
    expect = rm.KernelState(
        routes=frozenset({r2, rm.Route(N("10.5.3.0/24"), A("10.5.3.0"), "flannel.1", True),
                          rm.Route(N("10.5.3.3/32"), A("10.5.3.3"), "flannel.1", True),
                          rm.Route(N("10.5.4.0/24"), A("198.18.0.4"), "eth0"),
                          rm.Route(N("10.5.7.0/24"), A("198.18.0.7"), "eth0"),
                          rm.Route(N("10.5.1.0/24"), A("198.18.0.9"), "eth0"),
                          rm.Route(N("192.0.2.0/24"), A("198.18.0.9"), "eth0"),
                          rm.Route(N("10.5.10.0/24"), A("10.5.10.0"), "other0", True),
                          rm.Route(N("10.5.9.0/24"), A("10.5.9.0"), "flannel.1", True)}),
        neighs=frozenset({n2, rm.Neigh(A("10.5.8.0"), "02:00:00:00:00:0A", "flannel.1"),
                          rm.Neigh(A("10.5.6.0"), "02:00:00:00:00:06", "flannel.1"),
                          rm.Neigh(A("10.5.2.0"), "02:00:00:00:00:02", "other0"),
                          rm.Neigh(A("10.5.9.0"), "02:00:00:00:00:09", "flannel.1")}),
        fdbs=frozenset({f2, rm.Fdb("00:00:00:00:00:00", A("198.18.0.7"), "flannel.1"),
                        rm.Fdb("02:00:00:00:00:0A", A("198.18.0.8"), "flannel.1"),
                        rm.Fdb("02:00:00:00:00:09", A("198.18.0.9"), "flannel.1")}))

    def dumps() -> Any:
        nl = Netlink()
        try:
            return nl.dump(scope), nl.dump(scope, expect)
        finally:
            nl.close()
    plain, got = in_ns(ns, dumps)
    assert got == plain
    assert {(r, r.proto) for r in got.routes} == {(r, r.proto) for r in plain.routes}
    assert {str(r) for r in got.routes} == {"10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink",
                                           "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
                                           "10.5.4.0/24 via 198.18.0.4 dev eth0",
                                           "10.5.10.0/24 via 10.5.10.0 dev other0 onlink"}   # our protocol
    assert {r.dst: r.proto for r in got.routes}[N("10.5.3.0/24")] == 3
    assert {str(f) for f in got.foreign} == {"10.5.3.3/32 via 10.5.3.3 dev flannel.1 proto 4",
                                            "10.5.7.0/24 via 198.18.0.7 dev eth0 proto 3"}
    assert {str(n) for n in got.neighs} == {"neigh 10.5.2.0 lladdr 02:00:00:00:00:02 dev flannel.1",
                                           "neigh 10.5.8.0 lladdr 02:00:00:00:00:0a dev flannel.1"}
    assert {str(f) for f in got.fdbs} == {"fdb 02:00:00:00:00:02 dst 198.18.0.2 dev flannel.1",
                                         "fdb 02:00:00:00:00:0a dst 198.18.0.8 dev flannel.1"}
    # the expected entries the kernel holds exactly were taken as they are, not parsed
    assert any(r is r2 for r in got.routes) and any(n is n2 for n in got.neighs) and any(f is f2 for f in got.fdbs)


def test_apply_attributes_each_refused_entry_and_applies_the_others(ns):
    """600 routes in several chunks, two of them refused by the kernel (gateway not on-link): exactly
    those two come back, with the kernel's reason; the other 598 are in the kernel."""
    from flannel.backends.routed import model as rm
    from flannel.backends.routed.netlink import Netlink

    good = [rm.Route(N(f"10.{7 + i // 250}.{i % 250}.0/24"), A(f"198.18.0.{2 + i % 200}"), "eth0") for i in range(600)]
    bad = {7: rm.Route(N("10.5.7.0/24"), A("203.0.113.7"), "eth0"),
           450: rm.Route(N("10.5.45.0/24"), A("203.0.113.45"), "eth0")}
    routes_ = [bad.get(i, r) for i, r in enumerate(good)]

    def apply_then_delete() -> Any:
        nl = Netlink()
        try:
            return nl.apply(rm.Plan(set_routes=tuple(routes_))), nl.apply(rm.Plan(del_routes=tuple(routes_)))
        finally:
            nl.close()
    failed, again = in_ns(ns, apply_then_delete)
    assert [e for e, _ in failed] == [bad[7], bad[450]]
    assert all("gateway" in msg.lower() or "unreachable" in msg.lower() for _, msg in failed), failed
    assert again == []                       # deleting what is not there is not a failure
    assert routes(ns) == set()


# ---- dual stack (IPv6 underlay in 2001:2::/48, the IPv6 benchmarking range; pods in ULA) -------

LOCAL6 = "2001:2::1"
CFG_DS = ('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:5::/48",'
          '"Backend":{"Type":"vxlan"}}')


def make_ns_ds(prefix: str) -> NetNS:
    ns = make_ns(prefix)
    ns.ip("-6", "addr", "add", f"{LOCAL6}/64", "dev", "eth0", "nodad")
    return ns


def ext_ds(ns: NetNS) -> ExternalInterface:
    idx = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
    from ipaddress import IPv6Address
    return ExternalInterface("eth0", idx, 1500, A(LOCAL), A(LOCAL), IPv6Address(LOCAL6), IPv6Address(LOCAL6))


class FakeLeasesDS(FakeLeases):
    def __init__(self, subnet: str, subnet6: str, stored6: str | None = None) -> None:
        super().__init__(subnet)
        from ipaddress import IPv6Network
        self.subnet6 = IPv6Network(subnet6)
        self.stored6 = stored6

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        self.attrs = attrs
        return Lease(self.subnet, attrs, ipv6_subnet=self.subnet6)

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        return (self.stored, self.stored6)


def ds_lease(i: int) -> Lease:
    from ipaddress import IPv6Address, IPv6Network
    return Lease(N(f"10.5.{i}.0/24"),
                 LeaseAttrs(public_ip=A(f"198.18.0.{i}"), public_ipv6=IPv6Address(f"2001:2::{i:x}"),
                            backend_type="vxlan",
                            backend_data=f'{{"VNI":1,"VtepMAC":"02:00:00:00:00:{i:02x}"}}',
                            backend_v6_data=f'{{"VNI":1,"VtepMAC":"02:00:00:00:06:{i:02x}"}}'),
                 ipv6_subnet=IPv6Network(f"fd00:10:5:{i:x}::/64"))


def state6(ns: NetNS) -> tuple[set[str], set[str], set[str]]:
    r = set()
    for x in json.loads(ns.ip("-6", "-j", "route", "show", "table", "main") or "[]"):
        if x.get("gateway"):
            r.add(f"{x['dst']} via {x['gateway']} dev {x['dev']}{' onlink' if 'onlink' in x.get('flags', []) else ''}")
    n = {f"{x['dst']} {x['lladdr']} {'/'.join(x.get('state', []))}"
         for x in json.loads(ns.ip("-6", "-j", "neigh", "show", "dev", "flannel-v6.1") or "[]") if "lladdr" in x}
    f = {f"{x['mac']} {x['dst']} {x.get('state', '')}"
         for x in json.loads(ns.exec("bridge", "-j", "fdb", "show", "dev", "flannel-v6.1") or "[]") if x.get("dst")}
    return r, n, f


def expected6(*ls: Lease) -> tuple[set[str], set[str], set[str]]:
    r, n, f = set(), set(), set()
    for lz in ls:
        mac = json.loads(lz.attrs.backend_v6_data or "{}")["VtepMAC"]
        g = lz.ipv6_subnet.network_address  # type: ignore[union-attr]
        r.add(f"{lz.ipv6_subnet} via {g} dev flannel-v6.1 onlink")
        n.add(f"{g} {mac} PERMANENT")
        f.add(f"{mac} {lz.attrs.public_ipv6} permanent")
    return r, n, f


@pytest.fixture
def ns_ds(ns_prefix):
    n = make_ns_ds(ns_prefix)
    yield n
    n.delete()


def test_dual_stack_devices_and_peers(ns_ds):
    ns = ns_ds
    leases = FakeLeasesDS("10.5.1.0/24", "fd00:10:5:1::/64", stored6='{"VNI":1,"VtepMAC":"02:66:00:00:00:01"}')
    agent = Agent(ns, VXLANBackend(ext_ds(ns)), CFG_DS, leases).start()
    try:
        ln6 = link(ns, "flannel-v6.1")
        info6 = ln6["linkinfo"]["info_data"]
        assert info6["id"] == 1 and info6["local6"] == LOCAL6 and info6["link"] == "eth0" and info6["learning"] is False
        assert ln6["mtu"] == 1430                       # 1500 - 70 over the IPv6 underlay
        assert ln6["address"] == "02:66:00:00:00:01"    # the stored MAC
        assert link(ns)["mtu"] == 1450 and agent.net.mtu == 1430
        addrs = json.loads(ns.ip("-j", "addr", "show", "flannel-v6.1"))[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet6" and a["scope"] == "global"] == \
            [("fd00:10:5:1::", 128)]
        assert leases.attrs is not None and str(leases.attrs.public_ipv6) == LOCAL6
        assert leases.attrs.backend_v6_data == '{"VNI":1,"VtepMAC":"02:66:00:00:00:01"}'
        p2, p3 = ds_lease(2), ds_lease(3)
        v4only = vx_lease(4)                           # an IPv4-only peer: its IPv4 part only
        agent.send(*added(p2, p3, v4only), synced=True)
        wait_for(lambda: state6(ns) == expected6(p2, p3), what="IPv6 entries")
        wait_for(lambda: state(ns) == expected_for(p2, p3, v4only), what="IPv4 entries")
        agent.send(*removed(p3))
        wait_for(lambda: state6(ns) == expected6(p2) and state(ns) == expected_for(p2, v4only), what="peer 3 removed")
        ns.ip("link", "del", "flannel-v6.1")
        wait_for(lambda: state6(ns) == expected6(p2) if "flannel-v6.1" in ns.ip("link", "show") else False,
                 what="IPv6 device re-created with its peers")
        assert link(ns, "flannel-v6.1")["address"] == "02:66:00:00:00:01"
    finally:
        agent.stop()


def test_two_dual_stack_hosts_ping_over_both_overlays(ns_prefix):
    from ipaddress import IPv6Address

    from flannel.lab.topology import Underlay, ping

    with Underlay(ns_prefix + "u") as u:
        hosts = [u.add_host("h1"), u.add_host("h2")]
        agents = []
        try:
            for i, h in enumerate(hosts, start=1):
                h.ns.ip("-6", "addr", "add", f"2001:2::{i}/64", "dev", "eth0", "nodad")
                idx = int(json.loads(h.ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
                v6 = IPv6Address(f"2001:2::{i}")
                ext = ExternalInterface("eth0", idx, 1500, h.ip, h.ip, v6, v6)
                agents.append(Agent(h.ns, VXLANBackend(ext), CFG_DS,
                                    FakeLeasesDS(f"10.5.{i}.0/24", f"fd00:10:5:{i}::/64")).start())
            own = [a.leases.acquire_lease(a.config, a.leases.attrs) for a in agents]  # type: ignore[arg-type]
            agents[0].send(*added(own[1]), synced=True)
            agents[1].send(*added(own[0]), synced=True)
            wait_for(lambda: ping(hosts[0].ns, "fd00:10:5:2::", src="fd00:10:5:1::"), "h1 → h2 over IPv6 vxlan",
                     timeout=10)
            assert ping(hosts[0].ns, "10.5.2.0", src="10.5.1.0")
            assert ping(hosts[1].ns, "fd00:10:5:1::", src="fd00:10:5:2::")
        finally:
            for a in agents:
                a.stop()


# ---- ownership over Go flannel's state, device re-creation (issue 8) ------------------------------

def test_restart_over_go_flannel_state_adopts_it_without_flapping(ns):
    """What Go flannel leaves (its device, routes with proto boot, neighbours, fdb) is taken over
    with no write and no deletion; the route of a peer that then leaves is removed."""
    ns.ip("link", "add", "flannel.1", "address", "02:aa:00:00:00:01", "mtu", "1450", "type", "vxlan", "id", "1",
          "local", LOCAL, "dev", "eth0", "nolearning")
    ns.ip("addr", "add", "10.5.1.0/32", "dev", "flannel.1")
    ns.ip("link", "set", "flannel.1", "up")
    p2, p3 = vx_lease(2), vx_lease(3)
    for lz in (p2, p3):
        g = str(lz.subnet.network_address)  # type: ignore[union-attr]
        mac = json.loads(lz.attrs.backend_data or "{}")["VtepMAC"]
        ns.ip("neigh", "replace", g, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
        ns.exec("bridge", "fdb", "replace", mac, "dev", "flannel.1", "dst", str(lz.attrs.public_ip), "self",
                "permanent")
        ns.ip("route", "replace", str(lz.subnet), "via", g, "dev", "flannel.1", "onlink")   # proto boot
    assert "proto boot" in ns.ip("-d", "route", "show", "10.5.2.0/24")
    mon = Monitor(ns)
    plans: list[Any] = []

    def record(net: Any) -> None:
        orig = net.nl.apply
        net.nl.apply = lambda p: (plans.append(p), orig(p))[1]

    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24"), tweak=record).start()
    try:
        agent.send(*added(p2, p3), synced=True)
        wait_for(lambda: agent.net.stats["full_reconciles"] >= 1, what="first reconcile")
        assert state(ns) == expected_for(p2, p3) and plans == []
        agent.send(*removed(p3))
        wait_for(lambda: state(ns) == expected_for(p2), what="departed peer's Go flannel entries removed")
    finally:
        agent.stop()
        events = mon.stop()
    assert not [ev for ev in events if "10.5.2.0" in ev or "02:00:00:00:00:02" in ev], events
    assert link(ns)["address"] == "02:aa:00:00:00:01"        # Go flannel's device and MAC reused


def test_recreated_device_uses_the_interface_address_of_now(ns, caplog):
    """Issue 8 item 5: eth0's address changes while flannel.1 is gone; the new device's tunnel
    source is the new address (and the stale lease PublicIP is logged)."""
    caplog.set_level(logging.INFO)
    agent = Agent(ns, VXLANBackend(ext_of(ns)), CFG, FakeLeases("10.5.1.0/24")).start()
    try:
        p2 = vx_lease(2)
        agent.send(*added(p2), synced=True)
        wait_for(lambda: state(ns) == expected_for(p2), what="peer programmed")
        assert link(ns)["linkinfo"]["info_data"]["local"] == LOCAL
        ns.ip("addr", "add", "198.18.1.51/24", "dev", "eth0")   # another subnet: deleting the old primary keeps it
        ns.ip("addr", "del", f"{LOCAL}/24", "dev", "eth0")
        ns.ip("link", "del", "flannel.1")
        wait_for(lambda: "flannel.1" in ns.ip("link", "show") and state(ns) == expected_for(p2),
                 what="device re-created with its peers")
        assert link(ns)["linkinfo"]["info_data"]["local"] == "198.18.1.51"
        assert "no longer has 198.18.0.1" in caplog.text and "still advertises PublicIP 198.18.0.1" in caplog.text
    finally:
        agent.stop()


# ---- incremental == full on a real kernel (issue 9 item 1) -----------------------------------------

class NsWorker:
    """A thread living in a namespace that runs what it is given (netlink calls must come from a
    thread in the namespace: interface lookups are per thread)."""

    def __init__(self, ns: NetNS) -> None:
        import queue as q
        self.jobs: q.Queue[Any] = q.Queue()
        self.thread = threading.Thread(target=self._main, args=(ns.name,), daemon=True)
        self.thread.start()

    def _main(self, name: str) -> None:
        with in_netns(name):
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                fn, box, done = job
                try:
                    box.append(fn())
                except BaseException as e:   # handed to the caller
                    box.append(e)
                done.set()

    def call(self, fn: Any) -> Any:
        box: list[Any] = []
        done = threading.Event()
        self.jobs.put((fn, box, done))
        assert done.wait(60), "namespace worker stuck"
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(10)


def seed_ns(ns: NetNS) -> None:
    """Foreign, stale and Go flannel entries, as in the unit property test."""
    ns.ip("link", "add", "docker0", "type", "bridge")
    ns.ip("link", "set", "docker0", "up")
    ns.ip("addr", "add", "10.5.6.1/24", "dev", "docker0")                          # foreign: blocks lease 6
    ns.ip("route", "add", "10.5.9.0/24", "via", "198.18.0.9", "dev", "eth0")       # operator's: kept
    ns.ip("route", "add", "10.5.7.0/24", "via", "198.18.0.7", "dev", "eth0")       # Go host-gw style: adoptable


def kernel_view(ns: NetNS) -> tuple[Any, ...]:
    """Routes with their protocol, neighbours and fdb entries, read with iproute2."""
    r = set()
    for x in json.loads(ns.ip("-d", "-j", "route", "show", "table", "main") or "[]"):
        r.add((x["dst"], x.get("gateway"), x.get("dev"), "onlink" in x.get("flags", []), x.get("protocol")))
    nhs = sorted((n.get("gateway", ""), n.get("dev", ""), "onlink" in n.get("flags", []), str(n.get("protocol")))
                 for n in json.loads(ns.ip("-j", "nexthop", "show") or "[]"))   # ids may differ; leftovers may not
    return frozenset(r), frozenset(neighs(ns)), frozenset(fdbs(ns)), tuple(nhs)


@pytest.mark.timeout(600)
def test_incremental_apply_equals_full_reconcile_in_a_real_kernel(ns_prefix):
    from hypothesis import HealthCheck, given, settings

    from flannel.lease import Batch
    from tests.support import lease_ops

    counter = iter(range(10 ** 6))

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batches=lease_ops())
    def check(batches: list[list[Any]]) -> None:
        n = next(counter)
        spaces = [make_ns(f"{ns_prefix}{n}{side}") for side in "ab"]
        workers = [NsWorker(s) for s in spaces]
        nets: list[Any] = []
        try:
            for s, w in zip(spaces, workers):
                seed_ns(s)
                nets.append(w.call(lambda s=s: VXLANBackend(ext_of(s)).register_network(
                    config=__import__("flannel.config").config.parse_network_config(CFG),
                    leases=FakeLeases("10.5.1.0/24"))))
            for i, b in enumerate(batches):
                batch = Batch(tuple(b), synced=i == 0)
                workers[0].call(lambda batch=batch: nets[0].step(batch))
                workers[1].call(lambda batch=batch: (nets[1].step(batch), nets[1].sync_full()))
                assert kernel_view(spaces[0]) == kernel_view(spaces[1]), f"after batch {i}"
            assert "10.5.9.0/24 via 198.18.0.9 dev eth0" in routes(spaces[0])
            assert "10.5.6.0/24 dev docker0" in spaces[0].ip("route", "show", "table", "main")
        finally:
            for w, net in zip(workers, nets):
                w.call(net.close)
            for w in workers:
                w.stop()
            for s in spaces:
                s.delete()

    check()
