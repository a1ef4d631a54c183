"""wireguard backend with real wireguard-go devices, two "hosts" (namespaces on a veth underlay).

Each host's wireguard-go gets its own UAPI directory (a private mount namespace, see
``flannel.backends.wireguard.device``), so the two ``flannel-wg`` devices never share a socket.
Traffic is the hosts' own flannel-wg addresses pinging each other through the tunnel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import time
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from ipaddress import IPv6Address as A6
from ipaddress import IPv6Network as N6
from pathlib import Path

import pytest

from flannel.backends.base import ExternalInterface
from flannel.backends.wireguard import WireGuardBackend, keys
from flannel.backends.wireguard import device as wgdev
from flannel.backends.wireguard.model import Endpoint, PeerConfig, SetRequest
from flannel.lab.netns import NetNS, in_netns, veth_pair
from flannel.lease import Lease, LeaseAttrs
from tests.support import Agent, FakeLeases, added, removed, wait_for, wakeups

pytestmark = [pytest.mark.root, pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed "
                                 "(run scripts/setup)")]

NET = "10.7.0.0/16"
PSK_A = keys.encode_key(bytes(range(32)))
PSK_B = keys.encode_key(bytes(range(1, 33)))


def cfg(psk: str | None = None, **extra: object) -> str:
    backend: dict[str, object] = {"Type": "wireguard", **extra}
    if psk:
        backend["PSK"] = psk
    return json.dumps({"Network": NET, "Backend": backend})


class Host:
    def __init__(self, ns: NetNS, i: int, tmp: Path) -> None:
        self.ns, self.i = ns, i
        self.ip = A(f"198.18.0.{i}")
        self.dir = tmp / f"h{i}"
        self.dir.mkdir(exist_ok=True)
        self.key_file = str(self.dir / "wgkey")
        self.uapi_dir = str(self.dir / "wg")
        self.agent: Agent | None = None
        self.leases: FakeLeases | None = None

    @property
    def subnet(self) -> N:
        return N(f"10.7.{self.i}.0/24")

    def ext(self) -> ExternalInterface:
        idx = int(json.loads(self.ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
        return ExternalInterface("eth0", idx, 1500, self.ip, self.ip)

    def start(self, config: str) -> Agent:
        self.leases = FakeLeases(str(self.subnet))
        backend = WireGuardBackend(self.ext(), key_file=self.key_file, impl="wireguard-go", uapi_dir=self.uapi_dir)
        self.agent = Agent(self.ns, backend, config, self.leases).start()
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def lease(self) -> Lease:
        assert self.leases is not None and self.leases.attrs is not None
        return Lease(self.subnet, self.leases.attrs)

    def status(self):  # type: ignore[no-untyped-def]
        return wgdev.read_status("flannel-wg", uapi_dir=self.uapi_dir)

    def ping(self, dst: str, count: int = 1, timeout: int = 2) -> bool:
        res = subprocess.run(["ip", "netns", "exec", self.ns.name, "ping", "-c", str(count), "-W", str(timeout), dst],
                             capture_output=True, text=True)
        return res.returncode == 0


@pytest.fixture
def hosts(ns_prefix, tmp_path):
    hub = NetNS(ns_prefix + "hub")
    hub.ip("link", "add", "br0", "type", "bridge")
    hub.ip("link", "set", "br0", "up")
    made = []
    try:
        for i in (1, 2, 3):
            ns = NetNS(f"{ns_prefix}h{i}")
            veth_pair(ns, "eth0", hub, f"p{i}")
            hub.ip("link", "set", f"p{i}", "master", "br0")
            ns.ip("addr", "add", f"198.18.0.{i}/24", "dev", "eth0")
            made.append(Host(ns, i, tmp_path))
        yield made
    finally:
        for h in made:
            try:
                h.stop()
            except AssertionError:
                pass
            h.ns.delete()
        hub.delete()


def test_two_hosts_talk_through_wireguard_go_and_peers_follow_the_store(hosts, caplog):
    caplog.set_level(logging.INFO)
    h1, h2, h3 = hosts
    a1, a2 = h1.start(cfg()), h2.start(cfg())
    # lease golden: flannel's exact BackendData
    pub1 = keys.public_key(Path(h1.key_file).read_text())
    assert h1.leases is not None and h1.leases.attrs is not None
    assert h1.leases.attrs.backend_type == "wireguard"
    assert h1.leases.attrs.backend_data == f'{{"PublicKey":"{pub1}","Port":51820}}'
    assert h1.leases.attrs.backend_v6_data is None
    # key file: generated 0400, 44 characters, no newline
    st = os.stat(h1.key_file)
    assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_size == 44
    # device: MTU C-80, address, route, implementation logged
    link = json.loads(h1.ns.ip("-j", "-d", "link", "show", "flannel-wg"))[0]
    assert link["mtu"] == 1420
    assert "10.7.1.0/32" in h1.ns.ip("-4", "addr", "show", "dev", "flannel-wg")
    assert "10.7.0.0/16 dev flannel-wg proto 152 scope link" in h1.ns.ip("route", "show", "10.7.0.0/16")
    assert "flannel-wg is wireguard-go" in caplog.text
    assert a1.net.implementation == "wireguard-go"

    a1.send(*added(h2.lease()), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="h1 -> h2 over wireguard", timeout=30)
    st1 = h1.status()
    peer = st1.peer(keys.public_key(Path(h2.key_file).read_text()))
    assert peer is not None
    assert peer.endpoint == Endpoint(A("198.18.0.2"), 51820)
    assert peer.allowed_ips == frozenset({N("10.7.2.0/24")})
    assert peer.last_handshake is not None
    reports = a1.net.peer_report()
    assert [(r.device, r.allowed_ips) for r in reports] == [("flannel-wg", ("10.7.2.0/24",))]
    assert reports[0].last_handshake_age is not None and reports[0].last_handshake_age < 300

    # a third host joins: one incremental transaction, nobody else touched
    a3 = h3.start(cfg())
    before = a1.net.transactions
    a1.send(*added(h3.lease()))
    a3.send(*added(h1.lease(), h2.lease()), synced=True)
    a2.send(*added(h3.lease()))
    wait_for(lambda: h1.ping("10.7.3.0") and h2.ping("10.7.3.0"), what="h3 reachable", timeout=30)
    assert a1.net.transactions == before + 1

    # the store drops h3: its peer leaves h1's device, h2 stays
    a1.send(*removed(h3.lease()))
    k3 = keys.public_key(Path(h3.key_file).read_text())
    wait_for(lambda: h1.status().peer(k3) is None, what="h3's peer removed from h1")
    assert {p.allowed_ips for p in h1.status().peers} == {frozenset({N("10.7.2.0/24")})}
    assert h1.ping("10.7.2.0")

    # shutdown deletes the device (and wireguard-go exits with it)
    h1.stop()
    assert "flannel-wg" not in h1.ns.ip("link", "show")
    assert "removed device flannel-wg" in caplog.text


def test_bad_backend_data_is_skipped_and_others_keep_working(hosts, caplog):
    caplog.set_level(logging.INFO)
    h1, h2, _ = hosts
    a1, a2 = h1.start(cfg()), h2.start(cfg())
    bad = Lease(N("10.7.9.0/24"), LeaseAttrs(public_ip=A("198.18.0.9"), backend_type="wireguard",
                                             backend_data='{"PublicKey":"not-a-key","Port":51820}'))
    nodata = Lease(N("10.7.8.0/24"), LeaseAttrs(public_ip=A("198.18.0.8"), backend_type="wireguard"))
    a1.send(*added(bad, h2.lease(), nodata), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="good peer works next to bad ones", timeout=30)
    assert "BackendData.PublicKey must be 44 base64 characters" in caplog.text
    assert "no BackendData" in caplog.text
    assert len(h1.status().peers) == 1
    # a later bad event for a working peer's slot does not remove anything else
    a1.send(*added(Lease(N("10.7.9.0/24"), LeaseAttrs(public_ip=A("198.18.0.9"), backend_type="wireguard",
                                                       backend_data="[]"))))
    wait_for(lambda: "BackendData must be a JSON object" in caplog.text, what="bad update logged")
    assert h1.ping("10.7.2.0")


def test_restart_keeps_the_key_so_peers_need_no_change(hosts):
    h1, h2, _ = hosts
    a1, a2 = h1.start(cfg()), h2.start(cfg())
    data_before = h1.lease().attrs.backend_data
    a1.send(*added(h2.lease()), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="tunnel up", timeout=30)
    peer_on_h2 = h2.status().peers

    h1.stop()
    a1 = h1.start(cfg())
    assert h1.lease().attrs.backend_data == data_before          # same public key and port published
    a1.send(*added(h2.lease()), synced=True)
    # h2 got no event at all: its peer entry for h1 is still right
    wait_for(lambda: h2.ping("10.7.1.0"), what="h2 -> restarted h1 without reconfiguring h2", timeout=30)
    assert [p.config() for p in h2.status().peers] == [p.config() for p in peer_on_h2]


def test_psk_mismatch_fails_closed(hosts):
    h1, h2, _ = hosts
    a1, a2 = h1.start(cfg(PSK_A)), h2.start(cfg(PSK_B))
    a1.send(*added(h2.lease()), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.status().peers and h2.status().peers, what="peers configured")
    assert h1.status().peers[0].preshared_key == PSK_A
    # wireguard retries handshakes every 5 s; three pings over 6 s span more than one attempt
    assert not h1.ping("10.7.2.0", count=3, timeout=2)
    assert all(p.last_handshake is None for p in h1.status().peers + h2.status().peers)
    # same PSK on both sides: works (so the failure above was the PSK, not the rig)
    h2.stop()
    a2 = h2.start(cfg(PSK_A))
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="matching PSK works", timeout=30)


def test_relist_removes_a_stranger_and_keeps_correct_peers(hosts):
    h1, h2, _ = hosts
    a1, a2 = h1.start(cfg()), h2.start(cfg())
    a1.send(*added(h2.lease()), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="tunnel up", timeout=30)
    stranger = keys.public_key(keys.generate_private_key())
    wgdev.UAPIClient(wgdev.socket_path("flannel-wg", h1.uapi_dir), "flannel-wg").set(SetRequest(upsert=(
        PeerConfig(stranger, Endpoint(A("198.18.0.99"), 51820), frozenset({N("10.7.99.0/24")})),)))
    good_before = h1.status().peer(keys.public_key(Path(h2.key_file).read_text()))
    assert good_before is not None and good_before.last_handshake is not None
    a1.send(*added(h2.lease()), synced=True)                     # a relist: full resync against the device
    wait_for(lambda: h1.status().peer(stranger) is None, what="stranger removed by the resync")
    good = h1.status().peer(good_before.public_key)
    assert good is not None and good.config() == good_before.config()
    assert good.last_handshake == good_before.last_handshake   # untouched: no new handshake was forced
    assert h1.ping("10.7.2.0")


def test_device_deleted_behind_our_back_is_recreated_with_its_peers(hosts, caplog):
    caplog.set_level(logging.INFO)
    h1, h2, _ = hosts
    a1, a2 = h1.start(cfg()), h2.start(cfg())
    a1.send(*added(h2.lease()), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="tunnel up", timeout=30)
    h1.ns.ip("link", "del", "flannel-wg")
    wait_for(lambda: h1.ping("10.7.2.0"), what="tunnel back after re-creation", timeout=60)
    assert "device flannel-wg is gone" in caplog.text
    assert "10.7.0.0/16 dev flannel-wg" in h1.ns.ip("route", "show")


def test_an_idle_loop_sleeps_and_a_dead_wireguard_go_wakes_it(hosts, caplog):
    """Issue 9 (idle CPU): between batches the run loop sleeps until its next resync instead of
    looking up the devices every second; the kernel's link deletion (wireguard-go's TUN goes
    with the process) wakes it, and the device comes back with its peers."""
    caplog.set_level(logging.INFO)
    h1, h2, _ = hosts
    a1, a2 = h1.start(cfg()), h2.start(cfg())
    a1.send(*added(h2.lease()), synced=True)
    a2.send(*added(h1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0"), what="tunnel up", timeout=30)
    wait_for(lambda: a1.net.transactions >= 1 and a1.q.empty(), what="first sync applied")
    before = wakeups(a1.thread)
    time.sleep(2.5)   # the measuring window: a 1 s device poll would wake the loop twice or more
    assert wakeups(a1.thread) - before == 0
    dev = a1.net.devices["flannel-wg"]
    dev.proc.kill()
    wait_for(lambda: a1.net.devices["flannel-wg"] is not dev, what="device re-created after wireguard-go died")
    assert "device flannel-wg is gone (wireguard-go exited)" in caplog.text
    assert a1.net._watch is not None and a1.net._watch.wakes >= 1
    wait_for(lambda: h1.ping("10.7.2.0"), what="tunnel back after re-creation", timeout=60)


def test_kernel_path_wg_tool_configures_a_device(hosts, tmp_path):
    """KernelDevice's configuration path (`wg set` / `wg show dump`) against a wireguard-go device:
    `wg` reaches it through the same private UAPI directory (this kernel has no WireGuard)."""
    if shutil.which("wg") is None:
        pytest.skip("wg (wireguard-tools) not installed (run scripts/setup)")
    h1 = hosts[0]
    uapi_dir = str(tmp_path / "uapi")
    with in_netns(h1.ns.name):
        from flannel.backends.routed.netlink import Netlink

        nl = Netlink()
        try:
            go = wgdev.UserspaceDevice.start("flannel-wg", nl, uapi_dir=uapi_dir)
            try:
                wrapper = ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                           'mount --bind "$1" /var/run/wireguard && shift && exec "$@"', "sh", uapi_dir, "wg"]
                kdev = wgdev.KernelDevice("flannel-wg", nl, wgdev.WgTool(wrapper))
                priv = keys.generate_private_key()
                other = keys.public_key(keys.generate_private_key())
                stale = keys.public_key(keys.generate_private_key())
                kdev.set(SetRequest(private_key=priv, listen_port=51999, upsert=(
                    PeerConfig(stale, None, frozenset({N("10.7.5.0/24")})),)))
                want = PeerConfig(other, Endpoint(A("198.18.0.7"), 51820), frozenset({N("10.7.7.0/24")}),
                                  preshared_key=PSK_A, keepalive=25)
                kdev.set(SetRequest(replace_peers=True, upsert=(want,)))
                st = kdev.status()
                assert st.listen_port == 51999 and st.public_key == keys.public_key(priv)
                assert [p.config() for p in st.peers] == [want]
                via_uapi = go.status()       # the same device read over UAPI agrees
                assert via_uapi.public_key == st.public_key and [p.config() for p in via_uapi.peers] == [want]
            finally:
                go.close()
            assert not go.alive()
        finally:
            nl.close()


class DualLeases:
    """A LeaseSource handing out an IPv4 and an IPv6 subnet."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.attrs: LeaseAttrs | None = None

    def acquire_lease(self, config: object, attrs: LeaseAttrs) -> Lease:
        self.attrs = attrs
        return self.lease()

    def lease(self) -> Lease:
        assert self.attrs is not None
        return Lease(N(f"10.7.{self.i}.0/24"), self.attrs, N6(f"fd07:0:0:{self.i}::/64"))

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        return (None, None)


def _dual_agent(h: Host, mode: str) -> tuple[Agent, DualLeases]:
    h.ns.ip("-6", "addr", "add", f"fd18::{h.i}/64", "dev", "eth0", "nodad")
    idx = int(json.loads(h.ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
    ext = ExternalInterface("eth0", idx, 1500, h.ip, h.ip, iface_v6_addr=A6(f"fd18::{h.i}"),
                            ext_v6_addr=A6(f"fd18::{h.i}"))
    leases = DualLeases(h.i)
    conf = json.dumps({"Network": NET, "EnableIPv6": True, "IPv6Network": "fd07::/48",
                       "Backend": {"Type": "wireguard", "Mode": mode}})
    backend = WireGuardBackend(ext, key_file=h.key_file, impl="wireguard-go", uapi_dir=h.uapi_dir)
    agent = Agent(h.ns, backend, conf, leases).start()   # type: ignore[arg-type]
    h.agent = agent
    return agent, leases


@pytest.mark.parametrize("mode", ["separate", "ipv6"])
def test_dual_stack(hosts, mode):
    h1, h2, _ = hosts
    (a1, l1), (a2, l2) = _dual_agent(h1, mode), _dual_agent(h2, mode)
    a1.send(*added(l2.lease()), synced=True)
    a2.send(*added(l1.lease()), synced=True)
    wait_for(lambda: h1.ping("10.7.2.0") and h1.ping("fd07:0:0:2::"), what=f"{mode}: v4 and v6 over wireguard",
             timeout=30)
    pub = keys.public_key(Path(h1.key_file).read_text())
    v6dev = "flannel-wg-v6" if mode == "separate" else "flannel-wg"
    assert "fd07:0:0:1::/128" in h1.ns.ip("-6", "addr", "show", "dev", v6dev)
    assert "fd07::/48 dev " + v6dev in h1.ns.ip("-6", "route", "show")
    assert "10.7.0.0/16 dev flannel-wg" in h1.ns.ip("route", "show")
    assert l1.attrs is not None
    if mode == "separate":
        assert l1.attrs.backend_v6_data == f'{{"PublicKey":"{pub}","Port":51821}}'
        v6 = wgdev.read_status("flannel-wg-v6", uapi_dir=h2.uapi_dir)
        assert v6.listen_port == 51821
        assert [(p.endpoint, p.allowed_ips) for p in v6.peers] == \
            [(Endpoint(A6("fd18::1"), 51821), frozenset({N6("fd07:0:0:1::/64")}))]
    else:
        # one device, one peer with both subnets, reached over IPv6 on the port the device listens on
        assert l1.attrs.backend_v6_data == f'{{"PublicKey":"{pub}","Port":51820}}'
        st = h2.status()
        assert [(p.endpoint, p.allowed_ips) for p in st.peers] == \
            [(Endpoint(A6("fd18::1"), 51820), frozenset({N("10.7.1.0/24"), N6("fd07:0:0:1::/64")}))]
        assert "flannel-wg-v6" not in h1.ns.ip("link", "show")
