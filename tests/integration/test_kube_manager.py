"""KubeSubnetManager against the stand-in API server, through the kube client (our own transport;
the ``kubernetes`` package only for the configurations it alone implements).

Managers run in-process in the root namespace and talk to the stand-in on 127.0.0.1 (no kernel
state is touched, so no namespace is needed). The watch output goes through the real
LeaseWatcher, so ``Follower.peers()`` is exactly what a backend would have programmed.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from ipaddress import IPv4Address, IPv6Address

import pytest

from flannel import errors
from flannel.lab.kubeapi import KubeAPIServer
from flannel.lease import EventType, LeaseAttrs
from flannel.subnet_managers.kube import KubeSubnetManager
from tests.support import Follower, acquire, make_env, wait_for, wakeups

P = "flannel.alpha.coreos.com/"
TOKEN = "s3cr3t-token"


def vxlan_attrs(i: int, *, v6: bool = False) -> LeaseAttrs:
    bd = json.dumps({"VNI": 1, "VtepMAC": f"aa:bb:cc:00:00:{i:02x}"}, separators=(",", ":"))
    if not v6:
        return LeaseAttrs(public_ip=IPv4Address(f"198.18.0.{i}"), backend_type="vxlan", backend_data=bd)
    bd6 = json.dumps({"VNI": 1, "VtepMAC": f"aa:bb:cc:00:01:{i:02x}"}, separators=(",", ":"))
    return LeaseAttrs(public_ip=IPv4Address(f"198.18.0.{i}"), public_ipv6=IPv6Address(f"fd00:18::{i}"),
                      backend_type="vxlan", backend_data=bd, backend_v6_data=bd6)


def remote_annotations(i: int, *, v6: bool = False) -> dict[str, str]:
    """What another node's agent would have published."""
    a = vxlan_attrs(i, v6=v6)
    out = {P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "backend-data": a.backend_data,
           P + "public-ip": str(a.public_ip)}
    if v6:
        out.update({P + "backend-v6-data": a.backend_v6_data, P + "public-ipv6": str(a.public_ipv6)})
    return out


class Completer:
    """``complete_lease`` on a thread, as the daemon runs it, recording what it hands to ``on_lease``."""

    def __init__(self, manager: KubeSubnetManager, own) -> None:
        self.moved: list = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(manager, own), daemon=True)
        self.thread.start()

    def _run(self, manager, own) -> None:
        try:
            manager.complete_lease(manager.get_network_config(), own, self.stop, on_lease=self.moved.append)
        except BaseException as e:
            self.error = e


@pytest.fixture
def server():
    srv = KubeAPIServer(token=TOKEN, bookmark_interval=1.0).start()
    yield srv
    srv.stop()


@pytest.fixture
def env(server, tmp_path):
    return make_env(server, str(tmp_path))


@pytest.fixture
def managers():
    made: list[KubeSubnetManager] = []
    followers: list[Follower] = []

    class Factory:
        def __call__(self, env, node: str, **opts) -> KubeSubnetManager:
            m = KubeSubnetManager(env.options(**opts), node_name=node)
            made.append(m)
            return m

        def follow(self, manager, own) -> Follower:
            f = Follower(manager, own).start()
            followers.append(f)
            return f

        def complete(self, manager, own) -> Completer:
            c = Completer(manager, own)
            completers.append(c)
            return c

    completers: list[Completer] = []
    yield Factory()
    for c in completers:
        c.stop.set()
    for f in followers:
        f.stop.set()
    for f in followers:
        assert f.close(), "watch_leases did not honour stop"
    for c in completers:
        c.thread.join(5)
        assert not c.thread.is_alive(), "complete_lease did not honour stop"
        assert c.error is None, f"complete_lease raised {c.error!r}"
    for m in made:
        m.close()


def test_three_nodes_exchange_annotations_and_see_each_other(server, env, managers):
    for i in (1, 2, 3):
        server.add_node(f"node{i}", [f"10.244.{i}.0/24"])
    ms = [managers(env, f"node{i}") for i in (1, 2, 3)]
    leases = [acquire(m, vxlan_attrs(i)) for i, m in zip((1, 2, 3), ms)]
    assert [str(lease.subnet) for lease in leases] == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    # the annotations on the node objects are flannel's (reference §17)
    ann = server.get_node("node2")["metadata"]["annotations"]
    assert ann == {P + "backend-type": "vxlan", P + "backend-data": '{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"}',
                   P + "public-ip": "198.18.0.2", P + "kube-subnet-manager": "true"}
    followers = [managers.follow(m, lease) for m, lease in zip(ms, leases)]
    for i, f in zip((1, 2, 3), followers):
        others = {f"10.244.{j}.0/24" for j in (1, 2, 3) if j != i}
        peers = f.wait_peers(lambda p, o=others: set(p) == o, f"node{i} to see {others}")
        for j in (1, 2, 3):
            if j != i:
                assert peers[f"10.244.{j}.0/24"].attrs == vxlan_attrs(j)
        assert f.batches[0].synced, "the first batch must end the initial snapshot"


def test_acquire_again_does_not_patch_when_nothing_changed(server, env, managers):
    server.add_node("node1", ["10.244.1.0/24"])
    acquire(managers(env, "node1"), vxlan_attrs(1))
    rv = server.get_node("node1")["metadata"]["resourceVersion"]
    acquire(managers(env, "node1"), vxlan_attrs(1))
    assert server.get_node("node1")["metadata"]["resourceVersion"] == rv
    # a changed address patches exactly that key
    acquire(managers(env, "node1"), dataclasses.replace(vxlan_attrs(1), public_ip=IPv4Address("198.18.0.77")))
    node = server.get_node("node1")
    assert node["metadata"]["resourceVersion"] != rv
    assert node["metadata"]["annotations"][P + "public-ip"] == "198.18.0.77"


def test_nodes_added_changed_in_either_family_and_deleted(server, tmp_path, managers):
    env = make_env(server, str(tmp_path), net_conf={
        "Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10::/48", "Backend": {"Type": "vxlan"}})
    server.add_node("me", ["10.244.1.0/24", "fd00:10:0:1::/64"])
    m = managers(env, "me")
    own = acquire(m, vxlan_attrs(1, v6=True))
    assert own.ipv6_subnet is not None and str(own.ipv6_subnet) == "fd00:10:0:1::/64"
    f = managers.follow(m, own)
    wait_for(lambda: f.batches, what="initial snapshot")

    server.add_node("peer", ["10.244.2.0/24", "fd00:10:0:2::/64"], annotations=remote_annotations(2, v6=True))
    peer = f.wait_peers(lambda p: "10.244.2.0/24" in p, "peer added")["10.244.2.0/24"]
    assert peer.attrs == vxlan_attrs(2, v6=True) and str(peer.ipv6_subnet) == "fd00:10:0:2::/64"

    # a change confined to the IPv6 annotations is applied (flannel ignored it, §14.9)
    server.set_annotations("peer", {P + "backend-v6-data": '{"VNI":1,"VtepMAC":"aa:bb:cc:00:09:09"}'})
    f.wait_peers(lambda p: p["10.244.2.0/24"].attrs.backend_v6_data == '{"VNI":1,"VtepMAC":"aa:bb:cc:00:09:09"}',
                 "v6-only change applied")
    # ... and one confined to IPv4
    server.set_annotations("peer", {P + "public-ip": "198.18.0.22"})
    f.wait_peers(lambda p: p["10.244.2.0/24"].attrs.public_ip == IPv4Address("198.18.0.22"), "v4-only change applied")

    # kubelet heartbeats and broken annotations change nothing a backend sees
    n_events = len(f.events())
    server.heartbeat("peer")
    server.set_annotations("peer", {P + "public-ipv6": "not-an-address"})
    server.add_node("bare", ["10.244.3.0/24"])  # no annotations at all (§14.11)
    server.add_node("broken", ["10.244.4.0/24"], annotations={P + "kube-subnet-manager": "true"})
    server.add_node("marker", ["10.244.5.0/24", "fd00:10:0:5::/64"], annotations=remote_annotations(5, v6=True))
    f.wait_peers(lambda p: "10.244.5.0/24" in p, "a later node arrives (so the earlier events were processed)")
    assert set(f.peers()) == {"10.244.2.0/24", "10.244.5.0/24"}
    assert f.peers()["10.244.2.0/24"].attrs.public_ip == IPv4Address("198.18.0.22")
    assert len(f.events()) == n_events + 1

    server.delete_node("peer")
    f.wait_peers(lambda p: set(p) == {"10.244.5.0/24"}, "peer removed")
    removed = [lease for t, lease in f.events() if t is EventType.REMOVED]
    assert [str(lease.subnet) for lease in removed] == ["10.244.2.0/24"]
    assert removed[0].attrs.backend_data == vxlan_attrs(2).backend_data  # carries its attributes


def test_watch_cut_and_410_gone_mid_run_miss_nothing(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    own = acquire(m, vxlan_attrs(1))
    for i in (2, 3):
        server.add_node(f"n{i}", [f"10.244.{i}.0/24"], annotations=remote_annotations(i))
    f = managers.follow(m, own)
    f.wait_peers(lambda p: set(p) == {"10.244.2.0/24", "10.244.3.0/24"}, "initial peers")

    # 1) the connection drops; changes made meanwhile are replayed from the resourceVersion
    server.cut_watches()
    server.add_node("n4", ["10.244.4.0/24"], annotations=remote_annotations(4))
    server.set_annotations("n2", {P + "public-ip": "198.18.0.102"})
    f.wait_peers(lambda p: "10.244.4.0/24" in p and p["10.244.2.0/24"].attrs.public_ip == IPv4Address("198.18.0.102"),
                 "changes across a dropped watch")
    assert f.snapshots == 1, "a dropped connection must re-watch, not relist"

    # 2) history compacted while the watch is down: 410 → relist → the diff has everything
    server.cut_watches()
    server.delete_node("n3")
    server.add_node("n5", ["10.244.5.0/24"], annotations=remote_annotations(5))
    server.set_annotations("n4", {P + "backend-data": '{"VNI":1,"VtepMAC":"aa:bb:cc:00:04:44"}'})
    server.compact()
    server.cut_watches()
    peers = f.wait_peers(lambda p: set(p) == {"10.244.2.0/24", "10.244.4.0/24", "10.244.5.0/24"}
                         and p["10.244.4.0/24"].attrs.backend_data == '{"VNI":1,"VtepMAC":"aa:bb:cc:00:04:44"}',
                         "state after compaction")
    assert peers["10.244.5.0/24"].attrs == vxlan_attrs(5)
    wait_for(lambda: f.snapshots >= 2, what="a relist after 410")

    # 3) and the watch keeps working afterwards
    server.set_annotations("n5", {P + "public-ip": "198.18.0.105"})
    f.wait_peers(lambda p: p["10.244.5.0/24"].attrs.public_ip == IPv4Address("198.18.0.105"), "events after relist")


def test_api_server_down_for_10s_manager_survives_and_catches_up(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    server.add_node("n2", ["10.244.2.0/24"], annotations=remote_annotations(2))
    m = managers(env, "me")
    own = acquire(m, vxlan_attrs(1))
    f = managers.follow(m, own)
    f.wait_peers(lambda p: set(p) == {"10.244.2.0/24"}, "initial peer")

    server.stop()
    # the cluster changes while this agent cannot see it (another API server replica took the
    # writes); the history it would need is gone by the time it reconnects
    server.add_node("n3", ["10.244.3.0/24"], annotations=remote_annotations(3))
    server.delete_node("n2")
    server.compact()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert f.thread.is_alive(), "the watch thread died while the API server was down"
        time.sleep(0.5)
    assert set(f.peers()) == {"10.244.2.0/24"}, "nothing may be removed while the server is unreachable"
    server.start()
    f.wait_peers(lambda p: set(p) == {"10.244.3.0/24"}, "caught up after the outage", timeout=20)


def test_acquire_waits_for_the_api_server(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    server.stop()
    result: list = []
    t = threading.Thread(target=lambda: result.append(acquire(m, vxlan_attrs(1))), daemon=True)
    t.start()
    time.sleep(1.0)  # let it fail at least once against the closed port
    assert not result
    server.start()
    t.join(20)
    assert result and str(result[0].subnet) == "10.244.1.0/24"
    assert server.get_node("me")["metadata"]["annotations"][P + "public-ip"] == "198.18.0.1"


def test_403_on_patch_names_the_missing_permission(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    server.deny("patch", "nodes/status")
    with pytest.raises(errors.PermissionDenied) as exc:
        acquire(managers(env, "me"), vxlan_attrs(1))
    msg = str(exc.value)
    assert 'verb "patch"' in msg and 'resource "nodes/status"' in msg and "ClusterRole" in msg


def test_wrong_token_is_a_clear_permission_error(server, env, managers, tmp_path):
    from flannel.lab.kubeapi.kubeconfig import write_kubeconfig

    server.add_node("me", ["10.244.1.0/24"])
    write_kubeconfig(env.kubeconfig, server.url, "wrong-token")
    with pytest.raises(errors.PermissionDenied, match="401"):
        acquire(managers(env, "me"), vxlan_attrs(1))


def test_network_unavailable_condition_is_set_once(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    own = acquire(m, vxlan_attrs(1))
    stop = threading.Event()
    t = threading.Thread(target=m.complete_lease, args=(m.get_network_config(), own, stop), daemon=True)
    t.start()

    def condition():
        conds = {c["type"]: c for c in server.get_node("me")["status"]["conditions"]}
        return conds.get("NetworkUnavailable")

    cond = wait_for(condition, what="NetworkUnavailable condition")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "FlannelIsUp",
                                                                  "Flannel is running on this node")
    assert "Ready" in {c["type"] for c in server.get_node("me")["status"]["conditions"]}, "conditions merge by type"
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_network_unavailable_not_touched_when_disabled(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me", set_node_network_unavailable=False)
    own = acquire(m, vxlan_attrs(1))
    stop = threading.Event()
    stop.set()
    m.complete_lease(m.get_network_config(), own, stop)
    assert "NetworkUnavailable" not in {c["type"] for c in server.get_node("me")["status"]["conditions"]}


def test_pod_cidr_outside_network_is_a_config_error(server, env, managers):
    server.add_node("me", ["10.99.0.0/24"])
    with pytest.raises(errors.ConfigError, match=r"""doesn't contain "10.99.0.0/24" PodCIDR of the "me" node"""):
        acquire(managers(env, "me"), vxlan_attrs(1))


def test_node_name_from_the_pod_spec(server, env, monkeypatch):
    server.add_node("worker-7", ["10.244.7.0/24"])
    server.add_pod("kube-flannel", "kube-flannel-ds-abcde", "worker-7")
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.setenv("POD_NAME", "kube-flannel-ds-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "kube-flannel")
    m = KubeSubnetManager(env.options())
    try:
        assert str(acquire(m, vxlan_attrs(7)).subnet) == "10.244.7.0/24"
        assert "worker-7" in m.name
    finally:
        m.close()
    monkeypatch.setenv("POD_NAME", "no-such-pod")
    m2 = KubeSubnetManager(env.options())
    with pytest.raises(errors.ConfigError, match="error retrieving pod spec for 'kube-flannel/no-such-pod'"):
        m2.node_name()
    m2.close()


def test_public_ip_overwrite_and_node_public_ip(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"], annotations={P + "public-ip-overwrite": "203.0.113.9",
                                                          P + "node-public-ip": "198.18.0.50"})
    m = managers(env, "me")
    assert m.stored_public_ips() == ("198.18.0.50", None)
    lease = acquire(m, vxlan_attrs(1))
    assert lease.attrs.public_ip == IPv4Address("198.18.0.1")  # the lease keeps the detected address
    assert server.get_node("me")["metadata"]["annotations"][P + "public-ip"] == "203.0.113.9"


def test_vxlan_mac_survives_a_restart_through_the_annotation(server, tmp_path, managers):
    env = make_env(server, str(tmp_path))
    server.add_node("me", ["10.244.1.0/24"])
    first = managers(env, "me", kube_annotation_prefix="example.com/pfx")  # a prefix with a slash (§14.10)
    assert first.stored_backend_data() == (None, None)
    acquire(first, vxlan_attrs(1))
    assert "example.com/pfx-backend-data" in server.get_node("me")["metadata"]["annotations"]
    again = managers(env, "me", kube_annotation_prefix="example.com/pfx")
    assert again.stored_backend_data() == ('{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:01"}', None)


def test_our_annotations_are_restored_if_someone_removes_them(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    own = acquire(m, vxlan_attrs(1))
    f = managers.follow(m, own)
    managers.complete(m, own)
    wait_for(lambda: f.batches, what="initial snapshot")
    server.set_annotations("me", {P + "public-ip": None, P + "kube-subnet-manager": None})
    wait_for(lambda: server.get_node("me")["metadata"]["annotations"].get(P + "public-ip") == "198.18.0.1",
               what="annotations restored")


def own_subnets_seen(f: Follower, *subnets: str) -> list[str]:
    """Every lease event (or current peer) that names one of our own subnets."""
    seen = [f"{t.value} {lease.subnet}" for t, lease in f.events() if str(lease.subnet) in subnets]
    return seen + [f"peer {p}" for p in f.peers() if p in subnets]


def test_our_node_changing_its_pod_cidr_is_never_a_peer_and_the_new_lease_goes_to_the_daemon(server, env, managers):
    """Issue 8 item 5: the re-registered node with a new podCIDR was routed to as a remote peer."""
    server.add_node("me", ["10.244.1.0/24"])
    server.add_node("n2", ["10.244.2.0/24"], annotations=remote_annotations(2))
    m = managers(env, "me")
    own = m.acquire_lease(m.get_network_config(), vxlan_attrs(1))
    f = managers.follow(m, own)
    c = managers.complete(m, own)
    f.wait_peers(lambda p: set(p) == {"10.244.2.0/24"}, "initial peer")
    changed = server.modify_node("me", {"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}})
    # one more event after ours, so we know the watch has handled ours
    server.add_node("n3", ["10.244.3.0/24"], annotations=remote_annotations(3))
    f.wait_peers(lambda p: "10.244.3.0/24" in p, "a later peer")
    assert own_subnets_seen(f, "10.244.1.0/24", "10.244.9.0/24") == [], "our own node came out as a peer"
    assert set(f.peers()) == {"10.244.2.0/24", "10.244.3.0/24"}
    moved = wait_for(lambda: c.moved, what="on_lease with the new lease")
    assert [str(lease.subnet) for lease in moved] == ["10.244.9.0/24"]
    assert moved[0].attrs == vxlan_attrs(1)
    c.thread.join(5)
    assert not c.thread.is_alive(), "complete_lease returns once the daemon was told (it exits 1)"
    assert server.get_node("me")["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"], \
        "nothing is published for the new CIDR before the restart"


def test_our_node_deleted_and_registered_again_with_the_same_cidr_is_released_in_place(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    own = m.acquire_lease(m.get_network_config(), vxlan_attrs(1))
    f = managers.follow(m, own)
    c = managers.complete(m, own)
    wait_for(lambda: "NetworkUnavailable" in {x["type"] for x in server.get_node("me")["status"]["conditions"]},
             what="NetworkUnavailable set at start")
    server.delete_node("me")
    server.add_node("me")  # the kubelet registers it again: no annotations, no condition, no podCIDR yet
    server.modify_node("me", {"spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}})

    def republished():
        node = server.get_node("me")
        conds = {x["type"]: x for x in node["status"].get("conditions", [])}
        return (node["metadata"].get("annotations", {}).get(P + "backend-data") == vxlan_attrs(1).backend_data
                and conds.get("NetworkUnavailable", {}).get("status") == "False")

    wait_for(republished, what="annotations and NetworkUnavailable=False published again")
    assert c.moved == [] and c.thread.is_alive()
    assert server.get_node("me")["metadata"]["annotations"] == {
        P + "backend-type": "vxlan", P + "backend-data": vxlan_attrs(1).backend_data, P + "public-ip": "198.18.0.1",
        P + "kube-subnet-manager": "true"}
    server.add_node("n3", ["10.244.3.0/24"], annotations=remote_annotations(3))
    f.wait_peers(lambda p: set(p) == {"10.244.3.0/24"}, "a later peer")
    assert own_subnets_seen(f, "10.244.1.0/24") == []


def test_our_node_registered_again_with_another_cidr_hands_on_the_new_lease(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    own = m.acquire_lease(m.get_network_config(), vxlan_attrs(1))
    f = managers.follow(m, own)
    c = managers.complete(m, own)
    wait_for(lambda: f.batches, what="initial snapshot")
    server.delete_node("me")
    server.add_node("me")  # registered again; the node IPAM controller assigns a CIDR a moment later
    server.modify_node("me", {"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}})
    moved = wait_for(lambda: c.moved, what="on_lease with the new lease")
    assert [str(lease.subnet) for lease in moved] == ["10.244.9.0/24"]
    assert P + "kube-subnet-manager" not in server.get_node("me")["metadata"].get("annotations", {}), \
        "nothing is published for the new CIDR before the restart"
    server.add_node("n3", ["10.244.3.0/24"], annotations=remote_annotations(3))
    f.wait_peers(lambda p: set(p) == {"10.244.3.0/24"}, "a later peer")
    assert own_subnets_seen(f, "10.244.1.0/24", "10.244.9.0/24") == []


def test_missing_net_conf_is_a_config_error(server, env, managers, tmp_path):
    m = managers(env, "me", net_config_path=str(tmp_path / "nope.json"))
    with pytest.raises(errors.ConfigError, match="failed to read net conf"):
        m.get_network_config()


def test_acquire_waits_for_the_node_and_its_pod_cidr(server, env, managers, monkeypatch):
    from flannel.subnet_managers.kube import manager as manager_mod

    monkeypatch.setattr(manager_mod, "NODE_POLL_SECONDS", 0.1)
    monkeypatch.setattr(manager_mod, "NODE_WAIT_SECONDS", 10.0)
    m = managers(env, "late")
    result: list = []
    t = threading.Thread(target=lambda: result.append(acquire(m, vxlan_attrs(1))), daemon=True)
    t.start()
    server.add_node("late")  # registered by the kubelet, no podCIDR yet
    server.modify_node("late", {"spec": {"podCIDR": "10.244.8.0/24", "podCIDRs": ["10.244.8.0/24"]}})
    t.join(10)
    assert result and str(result[0].subnet) == "10.244.8.0/24"


def test_acquire_gives_up_on_a_node_that_never_appears(server, env, managers, monkeypatch):
    from flannel.subnet_managers.kube import manager as manager_mod

    monkeypatch.setattr(manager_mod, "NODE_POLL_SECONDS", 0.1)
    monkeypatch.setattr(manager_mod, "NODE_WAIT_SECONDS", 0.5)
    with pytest.raises(errors.ConfigError, match="node 'ghost' not found"):
        acquire(managers(env, "ghost"), vxlan_attrs(1))


def test_stop_is_honoured_while_a_watch_request_hangs(server, env, managers):
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    own = acquire(m, vxlan_attrs(1))
    f = Follower(m, own).start()
    wait_for(lambda: f.batches, what="initial snapshot")
    server.hang_watches.set()
    seen = server.watch_requests
    server.cut_watches()  # the re-watch request now gets no answer at all
    wait_for(lambda: server.watch_requests > seen, what="the re-watch to reach the server")
    try:
        assert f.close(timeout=5.0), "watch_leases did not return after stop while its request hung"
    finally:
        server.hang_watches.clear()


def test_garbage_nodes_and_lines_appear_while_watching_and_good_nodes_still_arrive(server, env, managers):
    """Issue 8 item 1 on the wire: node objects and watch lines nobody should ever send."""
    from flannel.subnet_managers.kube import skips

    server.add_node("me", ["10.244.1.0/24"])
    server.add_node("n2", ["10.244.2.0/24"], annotations=remote_annotations(2))
    server.add_node("bad-at-list", ["10.244.20.0/24"], annotations={
        **remote_annotations(20), P + "backend-data": "[" * 6000 + "]" * 6000})
    m = managers(env, "me")
    own = m.acquire_lease(m.get_network_config(), vxlan_attrs(1))
    before = skips.SKIPPED.snapshot()
    f = managers.follow(m, own)
    f.wait_peers(lambda p: set(p) == {"10.244.2.0/24"}, "the good node of the list")

    deep = '{"VNI":1,"VtepMAC":' + "[" * 5000 + "]" * 5000 + "}"
    garbage = {
        "deep": {**remote_annotations(21), P + "backend-data": deep},
        "huge": {**remote_annotations(22), P + "backend-data": '{"VNI":1,"X":"' + "a" * (1 << 20) + '"}'},
        "typed": {**remote_annotations(23), P + "public-ip": 7},
        "v6-typed": {**remote_annotations(24), P + "backend-v6-data": ["x"], P + "public-ipv6": {"a": 1}},
        "cidr-typed": remote_annotations(25),
    }
    for i, (name, ann) in enumerate(garbage.items(), start=21):
        server.add_node(name, [f"10.244.{i}.0/24"], annotations=ann)
    server.modify_node("cidr-typed", {"spec": {"podCIDRs": [{"not": "a string"}]}})
    server.set_annotations("n2", {P + "public-ip": "not an address"})  # keeps its last good lease
    server.inject_watch_line(b'{"type":"ADDED","object":' + b"[" * 6000 + b"]" * 6000 + b"}")
    server.inject_watch_line(b"\xff\xfe not even utf-8")
    server.inject_watch_line(b'{"type":"MODIFIED","object":"a string"}')
    server.add_node("n3", ["10.244.3.0/24"], annotations=remote_annotations(3))
    server.add_node("n4", ["10.244.4.0/24"], annotations=remote_annotations(4))
    peers = f.wait_peers(lambda p: {"10.244.3.0/24", "10.244.4.0/24"} <= set(p), "good nodes after the garbage")
    assert set(peers) == {"10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24", "10.244.25.0/24"}, \
        "only the good ones, and cidr-typed with the lease it had before it broke"
    assert peers["10.244.2.0/24"].attrs == vxlan_attrs(2), "n2 keeps its last good lease"
    assert f.thread.is_alive() and f.snapshots == 1, "no relist, no dead thread"
    after = skips.SKIPPED.snapshot()
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) > before.get(k, 0)}
    assert grew.get(skips.TOO_DEEP, 0) >= 2 and grew.get(skips.TOO_LARGE, 0) >= 1
    assert grew.get(skips.BAD_ANNOTATIONS, 0) >= 1 and grew.get(skips.BAD_POD_CIDR, 0) >= 1
    assert grew.get(skips.BAD_PUBLIC_IP, 0) >= 1 and grew.get(skips.MALFORMED_EVENT, 0) >= 1
    assert grew.get(skips.UNDECODABLE_LINE, 0) + grew.get(skips.BAD_ENCODING, 0) >= 1


def test_a_wedged_watch_is_reopened_after_the_read_timeout(server, env, managers):
    """Issue 8 item 5/6: a watch that stays connected but silent (no events, no bookmarks) is dead."""
    server.add_node("me", ["10.244.1.0/24"])
    m = managers(env, "me")
    m.watch_read_timeout = 3.0  # production: 90 s (the real server bookmarks every ~60 s)
    own = m.acquire_lease(m.get_network_config(), vxlan_attrs(1))
    f = managers.follow(m, own)
    wait_for(lambda: f.batches and server.watch_requests >= 1, what="watching")
    server.freeze_watches()
    seen = server.watch_requests
    server.add_node("n5", ["10.244.5.0/24"], annotations=remote_annotations(5))
    f.wait_peers(lambda p: "10.244.5.0/24" in p, "the node added while the watch was wedged", timeout=30)
    assert server.watch_requests > seen and f.snapshots == 1, "re-watched from its resourceVersion"


def test_the_list_is_read_in_pages(server, env, managers, monkeypatch):
    from flannel.subnet_managers.kube import client as kc

    monkeypatch.setattr(kc, "LIST_PAGE_SIZE", 50)
    from flannel.lab.kubeapi.generate import realistic_cluster

    server.add_nodes(realistic_cluster(230, start=2))
    server.add_node("me", ["10.1.0.0/24"])
    env.write_net_conf({"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}})
    m = managers(env, "me")
    own = m.acquire_lease(m.get_network_config(), vxlan_attrs(1))
    lists = server.list_requests
    f = managers.follow(m, own)
    peers = f.wait_peers(lambda p: len(p) == 230, "every generated node")
    assert server.list_requests - lists == 5, "230 nodes in pages of 50"
    assert str(peers["10.0.2.0/24"].attrs.public_ip) == "198.19.0.2"



#: an idle stretch long enough for the old 0.5 s stop polls to show
IDLE_WINDOW = 2.5


@pytest.fixture
def quiet_server():
    """The stand-in with bookmarks once every 10 minutes: nothing arrives while a test waits."""
    srv = KubeAPIServer(token=TOKEN, bookmark_interval=600.0).start()
    yield srv
    srv.stop()


def test_idle_watch_and_own_node_loops_do_not_wake_up_and_still_honour_stop(quiet_server, managers, tmp_path):
    """Issue 9 (idle CPU): ``watch_leases`` and ``complete_lease`` sleep until an event or stop
    comes (stop hooks wake them) instead of looking at stop every 0.5 s. The ``managers``
    fixture's teardown checks that both return on stop."""
    server = quiet_server
    env = make_env(server, str(tmp_path))
    server.add_node("node1", ["10.244.1.0/24"])
    server.add_node("node2", ["10.244.2.0/24"], annotations=remote_annotations(2))
    m = managers(env, "node1")
    own = acquire(m, vxlan_attrs(1))
    f = managers.follow(m, own)
    c = managers.complete(m, own)
    f.wait_peers(lambda p: set(p) == {"10.244.2.0/24"}, "node2 as a peer")

    def quiet() -> bool:
        """No wake-up of either thread over one window (our own node's condition patch, and the
        watch event it causes, may still be on their way in the first one)."""
        before = wakeups(f.thread), wakeups(c.thread)
        time.sleep(IDLE_WINDOW)   # the measuring window
        return (wakeups(f.thread), wakeups(c.thread)) == before

    wait_for(quiet, "an idle window without wake-ups of the watch and complete_lease threads", timeout=20)
    server.add_node("node3", ["10.244.3.0/24"], annotations=remote_annotations(3))
    f.wait_peers(lambda p: set(p) == {"10.244.2.0/24", "10.244.3.0/24"}, "node3 as a peer")
