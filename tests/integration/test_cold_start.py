"""Cold start against a real etcd (issue 9): the daemon lists the leases once, and programs peers
while the traffic rules go in.

The daemon runs in-process with the real etcd subnet manager and the ``alloc`` backend (its
network keeps a peer table: what it was told is what a kernel backend would program), in the root
namespace with a fake external interface. Traffic rules: off, or (the failure test) a fake ``nft``
as the only tool on PATH, so no real tool touches this namespace. The registry is the real
``EtcdRegistry`` with its ``list_leases`` counted, and a hook run right after a listing returns:
that is the window between the acquisition's listing and the watch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flannel import daemon, errors
from flannel.lab.etcd import EtcdServer
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd import manager as etcd_manager
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from flannel.subnet_managers.etcd.store import Listing
from tests.support import fake_iface, wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.9.0.0/16", "Backend": {"Type": "alloc"}}'
DEADLINE = 20.0
#: fake peers: 10.9.100.0/24 and up (our lease is allocated among the first free subnets)
PEERS = 40


def key_of(net: str) -> str:
    return f"{PREFIX}/subnets/{net.replace('/', '-')}"


def peer_net(i: int) -> str:
    return f"10.9.{100 + i}.0/24"


def put_peer(srv: EtcdServer, net: str, ip: str) -> None:
    value = json.dumps({"PublicIP": ip, "PublicIPv6": None, "BackendType": "alloc"}, separators=(",", ":"))
    srv.etcdctl("put", key_of(net), value)


class CountingRegistry(EtcdRegistry):
    """The real registry; counts listings and runs ``after_list`` (once) when one returns."""

    def __init__(self, srv: EtcdServer) -> None:
        super().__init__(endpoints=[srv.endpoint], prefix=PREFIX, warn_insecure=False)
        self.lists: list[int] = []    # revision of each listing
        self.after_list: Callable[[Listing], None] | None = None

    def list_leases(self, *, ttl: bool = False) -> Listing:
        listing = super().list_leases(ttl=ttl)
        self.lists.append(listing.revision)
        hook, self.after_list = self.after_list, None
        if hook is not None:
            hook(listing)
        return listing


class Agent:
    """``daemon.Daemon`` on a thread; ``result`` is None (clean) or what ``run`` raised."""

    def __init__(self, opts: AgentOptions, manager: EtcdSubnetManager) -> None:
        self.d = daemon.Daemon(opts, manager=manager, select_interface=fake_iface)
        self.result: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.d.run()
        except BaseException as e:
            self.result = e
        finally:
            self.finished.set()

    def peers(self) -> set[str]:
        net = self.d.network
        return {str(lease.subnet) for lease in getattr(net, "peers", {}).values()}

    def end(self) -> BaseException | None:
        self.d.stop.set()
        assert self.finished.wait(DEADLINE), "the daemon did not stop"
        return self.result


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> EtcdServer:
    etcd_server.etcdctl("put", f"{PREFIX}/config", CONFIG)
    for i in range(PEERS):
        put_peer(etcd_server, peer_net(i), f"198.18.1.{i + 1}")
    return etcd_server


@pytest.fixture
def opts(tmp_path: Path) -> AgentOptions:
    return AgentOptions(subnet_file=str(tmp_path / "subnet.env"), iptables_forward_rules=False)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    running: list[Agent] = []
    yield running
    for a in running:
        a.end()


def start(agents: list[Agent], opts: AgentOptions, reg: CountingRegistry) -> Agent:
    a = Agent(opts, EtcdSubnetManager(opts, registry=reg))
    agents.append(a)
    return a


def relists(a: Agent) -> float | None:
    return a.d.metrics.registry.get_sample_value("flannel_store_relists_total", {"store": "etcd"})


def all_peers() -> set[str]:
    return {peer_net(i) for i in range(PEERS)}


def test_the_agent_lists_the_leases_once_at_startup(etcd: EtcdServer, opts: AgentOptions,
                                                    agents: list[Agent]) -> None:
    """The acquisition's listing is the watch's first snapshot: one listing of every lease, and
    every peer reaches the backend."""
    reg = CountingRegistry(etcd)
    a = start(agents, opts, reg)
    wait_for(lambda: a.finished.is_set() or a.peers() == all_peers(), "every peer in the backend",
             timeout=DEADLINE, on_timeout=lambda: f"result {a.result!r}, peers {len(a.peers())}")
    assert not a.finished.is_set(), a.result
    wait_for(a.d.ready.is_set, "ready", timeout=DEADLINE)
    # the watch runs: a later lease arrives as an event. Not peer_net(PEERS) (10.9.140.0/24): the
    # agent picks its own lease at random among the first 100 free subnets, which reach up to it
    later = "10.9.252.0/24"
    put_peer(etcd, later, "198.18.2.1")
    wait_for(lambda: later in a.peers(), "the later peer", timeout=DEADLINE)
    assert len(reg.lists) == 1, f"listings at revisions {reg.lists}"
    assert relists(a) == 0
    assert a.end() is None


def test_a_lease_written_between_the_acquisition_listing_and_the_watch_is_not_lost(
        etcd: EtcdServer, opts: AgentOptions, agents: list[Agent]) -> None:
    """The watch goes on from the listing's revision + 1, so a lease put right after the listing
    (before the watch exists) arrives as an event, and one deleted meanwhile goes."""
    reg = CountingRegistry(etcd)
    late = "10.9.250.0/24"

    def meanwhile(listing: Listing) -> None:
        put_peer(etcd, late, "198.18.3.1")
        etcd.etcdctl("del", key_of(peer_net(0)))
    reg.after_list = meanwhile
    a = start(agents, opts, reg)
    want = (all_peers() - {peer_net(0)}) | {late}
    wait_for(lambda: a.finished.is_set() or a.peers() == want, "the late peer in, the deleted one out",
             timeout=DEADLINE, on_timeout=lambda: f"result {a.result!r}, peers {sorted(a.peers())}")
    assert len(reg.lists) == 1, f"listings at revisions {reg.lists}"
    assert relists(a) == 0
    assert a.end() is None


def test_a_compaction_between_the_acquisition_listing_and_the_watch_relists(
        etcd: EtcdServer, opts: AgentOptions, agents: list[Agent]) -> None:
    """The listing's revision is compacted before the watch starts: the watch cannot go on from
    it, so the agent lists again, and that second listing (only it) counts as a relist."""
    reg = CountingRegistry(etcd)
    late = "10.9.251.0/24"
    compacted: list[int] = []

    def meanwhile(listing: Listing) -> None:
        put_peer(etcd, late, "198.18.3.2")
        etcd.etcdctl("put", f"{PREFIX}/unrelated", "x")   # one more revision past the late peer
        rev = int(json.loads(etcd.etcdctl("get", f"{PREFIX}/unrelated", "-w", "json"))["header"]["revision"])
        etcd.etcdctl("compact", str(rev))
        compacted.append(rev)
    reg.after_list = meanwhile
    a = start(agents, opts, reg)
    want = all_peers() | {late}
    wait_for(lambda: a.finished.is_set() or a.peers() == want, "every peer, the late one included",
             timeout=DEADLINE, on_timeout=lambda: f"result {a.result!r}, peers {sorted(a.peers())}")
    assert not a.finished.is_set(), a.result
    # the acquisition's listing, then the relist at or after the compacted revision
    assert len(reg.lists) == 2 and reg.lists[1] >= compacted[0] > reg.lists[0], (reg.lists, compacted)
    assert relists(a) == 1
    assert a.end() is None


def test_a_stale_acquisition_listing_is_not_used(etcd: EtcdServer, opts: AgentOptions, agents: list[Agent],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FIRST_SNAPSHOT_MAX_AGE the watch lists again instead of replaying from an old revision;
    that listing is the first snapshot, not a relist."""
    monkeypatch.setattr(etcd_manager, "FIRST_SNAPSHOT_MAX_AGE", -1.0)
    reg = CountingRegistry(etcd)
    a = start(agents, opts, reg)
    wait_for(lambda: a.finished.is_set() or a.peers() == all_peers(), "every peer in the backend",
             timeout=DEADLINE, on_timeout=lambda: f"result {a.result!r}, peers {len(a.peers())}")
    # the listing read ahead (prefetch_leases: too old as well, so the acquisition lists itself), the
    # acquisition's, and the watch's own
    assert len(reg.lists) == 3
    assert relists(a) == 0
    assert a.end() is None


# Blocks until the test lets it go (at most ~60 s, should the test die), then fails as nft does
# when it cannot apply a script.
FAKE_NFT = """#!/bin/sh
echo "$@" >> {dir}/nft.calls
n=0
while [ ! -e {dir}/go ] && [ $n -lt 1200 ]; do /bin/sleep 0.05; n=$((n + 1)); done
echo "Error: Could not process rule: Operation not permitted (fake nft)" >&2
exit 1
"""


def test_a_rules_failure_while_peers_are_programmed_stops_the_agent_cleanly(
        etcd: EtcdServer, tmp_path: Path, agents: list[Agent], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline runs while the rules go in: the backend has every peer and the agent is not
    ready while ``nft`` hangs; when ``nft`` fails, the agent stops with that error (exit 1 in
    the CLI), subnet.env is never written, and the watch and network threads are joined."""
    etcd.etcdctl("put", f"{PREFIX}/config", json.dumps({**json.loads(CONFIG), "EnableNFTables": True}))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").write_text(FAKE_NFT.format(dir=bindir))
    (bindir / "nft").chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    opts = AgentOptions(subnet_file=str(tmp_path / "subnet.env"), iptables_forward_rules=True)
    a = start(agents, opts, CountingRegistry(etcd))
    wait_for(lambda: a.finished.is_set() or ((bindir / "nft.calls").exists() and a.peers() == all_peers()),
             "nft running and every peer in the backend", timeout=DEADLINE,
             on_timeout=lambda: f"result {a.result!r}, peers {len(a.peers())}")
    assert not a.finished.is_set(), a.result
    assert not a.d.ready.is_set() and not Path(opts.subnet_file).exists()
    pipeline = [t for t in threading.enumerate() if t.name in ("watch", "network") and t in a.d._threads]
    assert len(pipeline) == 2 and all(t.is_alive() for t in pipeline)
    (bindir / "go").touch()
    assert a.finished.wait(DEADLINE), "the agent did not stop after the rules failed"
    assert isinstance(a.result, errors.BackendError), repr(a.result)
    assert "fake nft" in str(a.result)
    assert not any(t.is_alive() for t in pipeline)
    assert not a.d.ready.is_set() and not Path(opts.subnet_file).exists()


# --- a real agent (vxlan, its own namespace) whose rules fail while it programs 500 peers -------------

VXLAN_PEERS = 500


@pytest.mark.root
def test_a_real_vxlan_agent_whose_rules_fail_while_it_programs_peers_exits_1_cleanly(tmp_path: Path) -> None:
    """``python -m flannel`` with the vxlan backend in a host namespace of a lab underlay, etcd in
    the hub, 500 peers (198.19.x.y, never answered). ``nft`` (the only fake on PATH; everything else
    is real, inside the host namespace) hangs until the kernel holds peer routes, then fails: the
    agent exits 1 naming the failure, within the shutdown grace, without a thread left behind,
    and never wrote subnet.env."""
    import os

    from flannel.lab.agent import AgentProcess
    from flannel.lab.etcd import b64
    from flannel.lab.netns import cleanup_prefix, run_prefix
    from flannel.lab.topology import Underlay

    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces)")
    prefix = run_prefix()
    underlay = Underlay(prefix)
    etcd = EtcdServer(str(tmp_path / "etcd"), host=str(underlay.hub_ip), netns=underlay.hub.name)
    agent: AgentProcess | None = None
    try:
        etcd.start()
        config = {"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}, "EnableNFTables": True}
        etcd.etcdctl("put", f"{PREFIX}/config", json.dumps(config))
        puts = []
        for i in range(VXLAN_PEERS):
            net = f"10.{1 + i // 250}.{i % 250}.0/24"
            value = json.dumps({"PublicIP": f"198.19.{i // 250}.{1 + i % 250}", "BackendType": "vxlan",
                                "BackendData": {"VNI": 1, "VtepMAC": f"02:00:00:00:{i // 256:02x}:{i % 256:02x}"}})
            puts.append({"request_put": {"key": b64(key_of(net)), "value": b64(value)}})
        for i in range(0, len(puts), 100):   # etcd takes at most 128 operations per transaction
            etcd.v3("/v3/kv/txn", {"success": puts[i:i + 100]})
        host = underlay.add_host("cold")
        bindir = tmp_path / "bin"
        bindir.mkdir()
        (bindir / "nft").write_text(FAKE_NFT.format(dir=bindir))
        (bindir / "nft").chmod(0o755)
        agent = AgentProcess("cold", netns=host.ns.name, workdir=tmp_path,
                             env={"PATH": f"{bindir}:{os.environ['PATH']}"},
                             args=["--etcd-endpoints", etcd.endpoint, "--etcd-prefix", PREFIX, "--iface", "eth0"])
        agent.start()

        def peer_routes() -> int:
            return len(host.ns.exec("ip", "route", "show", "dev", "flannel.1", check=False).splitlines())
        wait_for(lambda: not agent.running or ((bindir / "nft.calls").exists() and peer_routes() >= 1),
                 "nft running and peer routes in the kernel", timeout=60, on_timeout=agent.log_tail)
        assert agent.running, agent.log_tail()
        assert not agent.subnet_file.exists()
        (bindir / "go").touch()
        assert agent.wait_exit(timeout=20) == 1, agent.log_tail()
        log = agent.log_text()
        assert "fake nft" in log, agent.log_tail()
        assert "did not stop within" not in log and "did not finish within" not in log, agent.log_tail()
        assert not agent.subnet_file.exists()
    finally:
        if agent is not None:
            agent.kill()
        etcd.close()
        underlay.close()
        cleanup_prefix(prefix)
