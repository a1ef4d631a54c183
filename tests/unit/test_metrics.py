"""flannel.metrics against fakes: what the scrape-time collector reads from live objects, the hooks
other modules call (and which agent's registry they count into), and that metrics never break
the agent. The real agents are scraped in tests/integration/test_metrics.py and
tests/e2e/test_lab_metrics.py."""

from __future__ import annotations

import errno
import logging
import threading
import time
import urllib.request
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from typing import Any

import pytest
from prometheus_client import generate_latest

from flannel import daemon, errors, health, metrics
from flannel.backends.base import ExternalInterface
from flannel.backends.routed import model as rm
from flannel.backends.routed import netlink
from flannel.backends.routed import reconcile as routed
from flannel.backends.vxlan import network as vx
from flannel.backends.wireguard.backend import PeerReport
from flannel.config import parse_network_config
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent, WatchResult
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from flannel.subnet_managers.etcd.store import WatchChunk
from flannel.subnet_managers.kube import KubeSubnetManager
from flannel.subnet_managers.kube.annotations import AnnotationNames
from flannel.subnet_managers.kube.tracker import NodeTracker
from tests.support import (
    FakeKernel,
    FakeUdpNetwork,
    FakeWireguardNetwork,
    Samples,
    ScriptedClient,
    ScriptedWatchRegistry,
    added,
    removed,
)

P = "flannel.alpha.coreos.com/"
VX_CFG = parse_network_config('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
EXT = ExternalInterface("eth0", 2, 1500, A("198.18.0.1"), A("198.18.0.1"))


def lease(i: int, btype: str = "vxlan", *, expiration: float | None = None) -> Lease:
    data = f'{{"VNI":1,"VtepMAC":"02:00:00:00:00:{i:02x}"}}' if btype == "vxlan" else None
    return Lease(N(f"10.5.{i}.0/24"), LeaseAttrs(public_ip=A(f"198.18.0.{i}"), backend_type=btype, backend_data=data),
                 expiration=expiration)


def scrape(m: metrics.Metrics) -> Samples:
    return Samples(generate_latest(m.registry).decode())


def attached(**sources: Any) -> tuple[metrics.Metrics, metrics.StateCollector]:
    m = metrics.Metrics()
    return m, m.attach(metrics.Sources(**sources))


# ---- the scrape-time collector ---------------------------------------------------------------------

def test_remote_leases_by_backend_type_and_our_lease_expiry() -> None:
    remote = [lease(2), lease(3), lease(4, "host-gw"), lease(5, "")]
    own = lease(1, expiration=1_900_000_000.0)
    m, _ = attached(remote_leases=lambda: remote, own_lease=lambda: own)
    s = scrape(m)
    assert s.value("flannel_remote_leases", backend_type="vxlan") == 2
    assert s.value("flannel_remote_leases", backend_type="host-gw") == 1
    assert s.value("flannel_remote_leases", backend_type="none") == 1   # udp/alloc leases have no type
    assert s.value("flannel_own_lease_expiry_timestamp_seconds") == 1_900_000_000.0
    assert s.value("flannel_own_lease_info", subnet="10.5.1.0/24", ipv6_subnet="", public_ip="198.18.0.1",
                   backend_type="vxlan") == 1
    remote.pop(0)   # read live on every scrape
    assert scrape(m).value("flannel_remote_leases", backend_type="vxlan") == 1


@pytest.mark.parametrize("expiration", [None, 0.0], ids=["never-expires", "ttl-not-looked-up"])
def test_a_lease_without_an_expiry_time_has_no_expiry_series(expiration: float | None) -> None:
    m, _ = attached(own_lease=lambda: lease(1, expiration=expiration))
    s = scrape(m)
    assert "flannel_own_lease_expiry_timestamp_seconds" not in s.names()
    assert s.total("flannel_own_lease_info") == 1


def test_before_startup_there_is_no_lease_and_no_backend_section() -> None:
    m, _ = attached()
    s = scrape(m)
    assert not s.matching("flannel_remote_leases") and "flannel_own_lease_info" not in s.names()
    assert not any(n.startswith(("flannel_udp_", "flannel_wireguard_")) for n in s.names())
    assert s.value("flannel_build_info", version=__import__("flannel").__version__) == 1


def test_workers_and_readiness() -> None:
    ready = threading.Event()
    m, _ = attached(worker_restarts=lambda: {"watch": 2, "network": 0}, ready=ready.is_set)
    s = scrape(m)
    assert s.value("flannel_worker_restarts_total", worker="watch") == 2
    assert s.value("flannel_worker_restarts_total", worker="network") == 0
    assert s.value("flannel_ready") == 0
    ready.set()
    assert scrape(m).value("flannel_ready") == 1


def test_udp_counters_become_packets_bytes_and_drops_by_reason() -> None:
    net = FakeUdpNetwork({"tun_rx_packets": 11, "tx_packets": 10, "tx_bytes": 840, "rx_packets": 9,
                          "tun_tx_packets": 7, "tun_tx_bytes": 588, "drop_unknown_peer": 2, "drop_no_route": 1,
                          "icmp_unreachable": 1, "send_errors": 3, "tun_write_errors": 0,
                          "drop_brand_new": 5, "queue_restarts": 4})
    m, _ = attached(network=lambda: net)
    s = scrape(m)
    assert s.value("flannel_udp_tun_read_packets_total") == 11
    assert s.value("flannel_udp_sent_packets_total") == 10
    assert s.value("flannel_udp_sent_bytes_total") == 840
    assert s.value("flannel_udp_received_packets_total") == 9
    assert s.value("flannel_udp_tun_written_packets_total") == 7
    assert s.value("flannel_udp_tun_written_bytes_total") == 588
    assert s.value("flannel_udp_icmp_unreachable_sent_total") == 1
    drops = {lbl["reason"]: v for lbl, v in s.matching("flannel_udp_dropped_packets_total")}
    assert drops == {"unknown_peer": 2, "no_route": 1, "send_error": 3, "tun_write_error": 0, "brand_new": 5}
    # a counter the data path grew later is still exported, under a generic name
    assert s.value("flannel_udp_other_total", counter="queue_restarts") == 4
    net.values["tx_packets"] = 15
    assert scrape(m).value("flannel_udp_sent_packets_total") == 15


def test_wireguard_peers_and_handshake_ages() -> None:
    reports = [
        PeerReport("flannel-wg", "KEY2=", "198.18.0.2:51820", ("10.5.2.0/24",), 12.5, 100, 200),
        PeerReport("flannel-wg", "KEY3=", "198.18.0.3:51820", ("10.5.3.0/24",), None, 0, 148),
        PeerReport("flannel-wg-v6", "KEY2=", "[fd00::2]:51821", ("fd10:5:2::/64",), 3.0, 0, 0),
    ]
    net = FakeWireguardNetwork(reports, devices=("flannel-wg", "flannel-wg-v6", "flannel-wg-spare"))
    m, _ = attached(network=lambda: net)
    s = scrape(m)
    assert s.value("flannel_wireguard_peers", device="flannel-wg") == 2
    assert s.value("flannel_wireguard_peers", device="flannel-wg-v6") == 1
    assert s.value("flannel_wireguard_peers", device="flannel-wg-spare") == 0   # a device without peers: 0
    assert s.value("flannel_wireguard_peers_without_handshake", device="flannel-wg") == 1
    assert s.value("flannel_wireguard_peers_without_handshake", device="flannel-wg-v6") == 0
    assert s.value("flannel_wireguard_peer_last_handshake_age_seconds", device="flannel-wg", public_key="KEY2=",
                   allowed_ips="10.5.2.0/24") == 12.5
    assert s.value("flannel_wireguard_peer_last_handshake_age_seconds", device="flannel-wg-v6", public_key="KEY2=",
                   allowed_ips="fd10:5:2::/64") == 3.0
    # never handshaken: no age sample (counted above instead)
    assert not s.matching("flannel_wireguard_peer_last_handshake_age_seconds", public_key="KEY3=")


def test_a_failing_section_is_logged_rate_limited_counted_and_the_rest_is_served(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="flannel.metrics")
    net = FakeWireguardNetwork([])
    net.fail = errors.BackendError("UAPI get failed: connection refused")
    now = [1000.0]
    m = metrics.Metrics()
    m.registry.register(metrics.StateCollector(
        metrics.Sources(remote_leases=lambda: [lease(2)], network=lambda: net), clock=lambda: now[0]))
    s = scrape(m)
    assert s.value("flannel_remote_leases", backend_type="vxlan") == 1     # other sections are served
    assert "flannel_wireguard_peers" not in s.names()
    assert "metrics: could not collect wireguard: BackendError: UAPI get failed" in caplog.text
    for _ in range(3):
        scrape(m)
    assert caplog.text.count("could not collect wireguard") == 1          # not once per scrape
    assert scrape(m).value("flannel_metrics_collect_errors_total", section="wireguard") == 5
    now[0] += metrics.LOG_EVERY_SECONDS
    scrape(m)
    assert caplog.text.count("could not collect wireguard") == 2
    net.fail = None
    assert scrape(m).value("flannel_wireguard_peers", device="flannel-wg") == 0


def test_a_collector_raising_anything_never_reaches_the_scraper() -> None:
    def broken() -> list[Lease]:
        raise RecursionError("maximum recursion depth exceeded")
    m, _ = attached(remote_leases=broken, own_lease=lambda: lease(1))
    s = scrape(m)
    assert s.value("flannel_metrics_collect_errors_total", section="leases") == 1   # in the same scrape
    assert "flannel_own_lease_info" not in s.names()     # the section is all or nothing
    assert s.total("flannel_build_info") == 1 and s.value("flannel_apply_failures_total") == 0


# ---- the hooks and the thread binding ---------------------------------------------------------------

def test_hooks_count_into_the_metrics_bound_to_the_calling_thread() -> None:
    a, b = metrics.Metrics(), metrics.Metrics()
    before_default = metrics.default().sample_value("flannel_netlink_errors_total", {"operation": "set_route"}) or 0

    def work(m: metrics.Metrics, n: int) -> None:
        with metrics.bound(m):
            for _ in range(n):
                metrics.netlink_error("set_route")
    threads = [threading.Thread(target=work, args=(a, 3)), threading.Thread(target=work, args=(b, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.sample_value("flannel_netlink_errors_total", {"operation": "set_route"}) == 3
    assert b.sample_value("flannel_netlink_errors_total", {"operation": "set_route"}) == 5
    metrics.netlink_error("set_route")   # this thread is not bound: the process default counts it
    assert metrics.default().sample_value("flannel_netlink_errors_total",
                                          {"operation": "set_route"}) == before_default + 1
    assert a.sample_value("flannel_netlink_errors_total", {"operation": "set_route"}) == 3


def test_label_values_are_bounded_slugs() -> None:
    m = metrics.Metrics()
    with metrics.bound(m):
        metrics.record_skipped("etcd", "Bad Value: {'x': 1}")
        metrics.record_skipped("etcd", "x" * 200)
        metrics.netlink_error("")
    s = scrape(m)
    reasons = {lbl["reason"] for lbl, _ in s.matching("flannel_store_records_skipped_total")}
    assert reasons == {"bad_value_x_1", "x" * 48}
    assert s.value("flannel_netlink_errors_total", operation="unknown") == 1


def test_a_failing_hook_never_raises_into_the_code_that_counts(monkeypatch) -> None:
    def boom(self: metrics.Metrics, *a: Any) -> None:
        raise ValueError("broken metric")
    for name in ("netlink_error", "record_skipped", "store_reconnected", "lease_events_applied"):
        monkeypatch.setattr(metrics.Metrics, name, boom)
    metrics.netlink_error("set_route")
    metrics.record_skipped("etcd", "bad_value")
    metrics.store_reconnected("etcd")
    metrics.lease_events_applied(added(lease(2)))


def test_timed_apply_observes_also_when_the_block_raises_and_keeps_the_exception() -> None:
    m = metrics.Metrics()
    with metrics.bound(m), pytest.raises(errors.BackendError, match="boom"), metrics.timed_apply(full=True):
        raise errors.BackendError("boom")
    with metrics.bound(m), metrics.timed_apply(full=False):
        time.sleep(0.01)
    assert m.sample_value("flannel_full_reconcile_duration_seconds_count") == 1
    assert m.sample_value("flannel_apply_duration_seconds_count") == 1
    assert (m.sample_value("flannel_apply_duration_seconds_sum") or 0) >= 0.01


# ---- the hooks at their call sites -------------------------------------------------------------------

def make_routed(kernel: FakeKernel) -> routed.RoutedNetwork:
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0")

    class Net(routed.RoutedNetwork):
        def overlay_dev(self) -> str | None:
            return "flannel.1"

        def route_devs(self) -> tuple[str, ...]:
            return ("flannel.1", "eth0")

    return Net(lease=Lease(N("10.5.1.0/24"), LeaseAttrs()), mtu=1450, nl=kernel, ctx=ctx,  # type: ignore[arg-type]
               config=VX_CFG, translate=vx.vxlan_entries, ext_iface=EXT)


def test_routed_network_counts_applied_events_apply_and_full_reconcile_times_and_failures(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(routed.time, "monotonic", lambda: now[0])
    m = metrics.Metrics()
    kernel = FakeKernel()
    net = make_routed(kernel)
    with metrics.bound(m):
        net.step(Batch(added(lease(2), lease(3)), synced=True))          # first snapshot: a full reconcile
        assert m.sample_value("flannel_full_reconcile_duration_seconds_count") == 1
        assert m.sample_value("flannel_apply_duration_seconds_count") == 0
        net.step(Batch(removed(lease(3))))                                  # an increment
        assert m.sample_value("flannel_apply_duration_seconds_count") == 1
        kernel.bad = set(make_state(lease(4)).routes)                       # the kernel refuses the route
        net.step(Batch(added(lease(4))))
        assert m.sample_value("flannel_apply_failures_total") == 1
        kernel.bad = set()
        now[0] += 2
        net.step(None)                                                      # the refused route, retried alone
    assert m.sample_value("flannel_lease_events_applied_total", {"type": "added"}) == 3
    assert m.sample_value("flannel_lease_events_applied_total", {"type": "removed"}) == 1
    assert m.sample_value("flannel_full_reconcile_duration_seconds_count") == 1
    assert m.sample_value("flannel_apply_duration_seconds_count") == 3
    assert make_state(lease(4)).routes <= set(net.nl.dump(net.scope()).routes)


def make_state(*leases: Lease) -> rm.KernelState:
    ctx = rm.Context(backend_type="vxlan", dev="flannel.1", ext_dev="eth0")
    return rm.desired_state(leases, ctx, vx.vxlan_entries).state


def test_netlink_errors_are_counted_by_operation() -> None:
    m = metrics.Metrics()

    @netlink._boundary
    def set_mtu() -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    class Refusing:
        """The entry socket: the kernel refuses every route; deleting a gone neighbour is ENOENT."""

        def send(self, items: Any) -> list[tuple[object, int, str]]:
            return [(tagged, errno.ENOENT if tagged[1] else errno.EINVAL, "refused") for tagged, *_msg in items]

        def ifindex(self, name: str) -> int:
            return 7

    port = netlink.Netlink.__new__(netlink.Netlink)
    port._rt = Refusing()  # type: ignore[assignment]
    port._init_nexthops()
    port._nh_ok = False          # this fake socket dumps no nexthop objects: plain routes
    plan = rm.plan(make_state(lease(2)), rm.KernelState(frozenset(), make_state(lease(3)).neighs, frozenset()))
    with metrics.bound(m):
        with pytest.raises(errors.BackendError, match="netlink set_mtu"):
            set_mtu()
        failed = port.apply(rm.Plan(del_neighs=plan.del_neighs, set_routes=plan.set_routes))
    assert len(failed) == 1
    assert m.sample_value("flannel_netlink_errors_total", {"operation": "set_mtu"}) == 1
    assert m.sample_value("flannel_netlink_errors_total", {"operation": "set_route"}) == 1
    assert m.sample_value("flannel_netlink_errors_total", {"operation": "delete_neigh"}) is None


def test_etcd_records_skipped_by_reason() -> None:
    m = metrics.Metrics()
    reg = EtcdRegistry(endpoints=["http://127.0.0.1:1"], prefix="/test/network")   # no I/O: no client is made
    with metrics.bound(m):
        assert reg._record(b"/test/network/subnets/10.5.2.0-24",
                           b'{"PublicIP":"198.18.0.2","BackendType":"vxlan"}')[0] is not None
        assert reg._record(b"/test/network/subnets/garbage", b"{}")[0] is None
        assert reg._record(b"/test/network/subnets/10.5.3.0-24", b"not json")[0] is None
        assert reg._record(b"/test/network/subnets/10.5.4.0-24", b"\xff\xfe")[0] is None
        assert reg._record(b"/elsewhere/10.5.5.0-24", b"{}")[0] is None
    s = scrape(m)
    got = {lbl["reason"]: v for lbl, v in s.matching("flannel_store_records_skipped_total", store="etcd")}
    assert got == {"key": 2, "json": 1, "encoding": 1}


def node(name: str, i: int, **annotations: str) -> dict[str, Any]:
    ann = {P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "backend-data": '{"VNI":1}',
           P + "public-ip": f"198.18.0.{i}"}
    ann.update({P + k: v for k, v in annotations.items()})
    return {"metadata": {"name": name, "resourceVersion": str(i), "annotations": ann},
            "spec": {"podCIDR": f"10.244.{i}.0/24"}}


def test_kube_nodes_skipped_are_counted() -> None:
    m = metrics.Metrics()
    tracker = NodeTracker(AnnotationNames.for_prefix("flannel.alpha.coreos.com"),
                          parse_network_config('{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'))
    with metrics.bound(m):
        assert len(tracker.reset([node("a", 1), node("b", 2, **{"public-ip": "not-an-ip"})])) == 1
        assert tracker.apply("MODIFIED", node("b", 2, **{"public-ip": "still-not"})) == []
    assert m.sample_value("flannel_store_records_skipped_total", {"store": "kube", "reason": "bad_public_ip"}) == 2


def test_etcd_watch_break_counts_a_reconnect(tmp_path) -> None:
    b = lease(2)
    reg = ScriptedWatchRegistry('{"Network": "10.5.0.0/16"}', [lease(1)], [
        [errors.StoreUnavailable("connection reset")],
        [WatchChunk(12, (LeaseEvent(EventType.ADDED, b),))],
    ])
    manager = EtcdSubnetManager(AgentOptions(subnet_file=str(tmp_path / "subnet.env")), registry=reg)  # type: ignore[arg-type]
    m, stop = metrics.Metrics(), threading.Event()
    with metrics.bound(m):
        gen = manager.watch_leases(manager.get_network_config(), stop)
        assert next(gen).snapshot is not None
        assert [e.lease for e in next(gen).events] == [b]     # after the break
        stop.set()
        assert list(gen) == []
    assert m.sample_value("flannel_store_reconnects_total", {"store": "etcd"}) == 1


def test_kube_watch_break_counts_a_reconnect(tmp_path) -> None:
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    m, stop = metrics.Metrics(), threading.Event()
    client = ScriptedClient([([node("a", 1)], "10")],
                            [[errors.StoreUnavailable("connection reset")], [("ADDED", node("b", 2))]], stop)
    manager = KubeSubnetManager(AgentOptions(subnet_manager="kube", net_config_path=str(conf)), client=client,  # type: ignore[arg-type]
                                node_name="me")
    with metrics.bound(m):
        results = list(manager.watch_leases(manager.get_network_config(), stop))
    assert results[0].snapshot is not None
    assert [str(e.lease.subnet) for r in results[1:] for e in r.events] == ["10.244.2.0/24"]   # after the break
    assert m.sample_value("flannel_store_reconnects_total", {"store": "kube"}) == 1


def test_daemon_counts_received_events_and_every_snapshot_after_the_first_as_a_relist() -> None:
    d = daemon.Daemon(AgentOptions(subnet_manager="etcd"))
    d._count(WatchResult.of_snapshot([lease(2)]))
    d._count(WatchResult.of_events(added(lease(3)) + removed(lease(2))))
    d._count(WatchResult.of_events(added(lease(4))))
    assert d.metrics.sample_value("flannel_store_relists_total", {"store": "etcd"}) == 0   # exists from the start
    d._count(WatchResult.of_snapshot([lease(3), lease(4)]))
    assert d.metrics.sample_value("flannel_store_relists_total", {"store": "etcd"}) == 1
    assert d.metrics.sample_value("flannel_lease_events_received_total", {"type": "added"}) == 2
    assert d.metrics.sample_value("flannel_lease_events_received_total", {"type": "removed"}) == 1
    assert d.metrics.sample_value("flannel_store_reconnects_total", {"store": "etcd"}) == 0


# ---- served by the health server ----------------------------------------------------------------------

def test_health_server_serves_metrics_text_and_openmetrics_and_a_broken_registry_is_a_500() -> None:
    m, _ = attached(remote_leases=lambda: [lease(2)])
    server = health.HealthServer("127.0.0.1", 0, ready=threading.Event(), metrics=m.registry)
    server.bind()
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert Samples(r.read().decode()).value("flannel_remote_leases", backend_type="vxlan") == 1
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        req = urllib.request.Request(url + "/metrics", headers=accept)
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().rstrip().endswith("# EOF")

        class Broken:
            def collect(self) -> Any:
                raise RuntimeError("a bug in a collector")
        m.registry.register(Broken())  # type: ignore[arg-type]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/metrics", timeout=5)
        assert e.value.code == 500 and "a bug in a collector" in e.value.read().decode()
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:     # health is not affected
            assert (r.status, r.read()) == (200, health.LIVE_BODY)
    finally:
        stop.set()
        t.join(5)
        server.close()


def test_without_a_registry_metrics_is_not_found() -> None:
    server = health.HealthServer("127.0.0.1", 0, ready=threading.Event())
    server.bind()
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    t.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert e.value.code == 404
    finally:
        stop.set()
        t.join(5)
        server.close()


# ---- the docs and the alert rules name metrics that exist -----------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "flannel-alerts.yml"
DOC = ROOT / "docs" / "metrics.md"


def exported_names() -> set[str]:
    """Every metric and sample name an agent can export (udp and wireguard sections included)."""
    import re
    names: set[str] = set()
    reports = [PeerReport("flannel-wg", "KEY2=", None, ("10.5.2.0/24",), 1.0, 0, 0)]
    for net in (FakeUdpNetwork({"tx_packets": 1, "drop_spoofed": 0, "tun_rx_packets": 0, "tx_bytes": 0,
                                "rx_packets": 0, "tun_tx_packets": 0, "tun_tx_bytes": 0, "icmp_unreachable": 0}),
                FakeWireguardNetwork(reports)):
        m, _ = attached(remote_leases=lambda: [lease(2)], own_lease=lambda: lease(1, expiration=1e9),
                        network=lambda net=net: net, worker_restarts=lambda: {"watch": 0}, ready=lambda: True)
        text = generate_latest(m.registry).decode()
        names |= set(re.findall(r"^# TYPE (\S+)", text, re.M)) | Samples(text).names()
    return names


def test_the_alert_rules_and_the_docs_name_only_exported_metrics() -> None:
    import re
    import shutil
    import subprocess

    import yaml
    exported = exported_names()
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) == 3
    for text, where in [(" ".join(exprs), RULES.name), (DOC.read_text(), DOC.name)]:
        used = set(re.findall(r"\bflannel_[a-z0-9_]*[a-z0-9]", text))
        assert used and used <= exported, f"{where} names metrics that do not exist: {sorted(used - exported)}"
    # the docs show the rules file as it is
    assert RULES.read_text().rstrip() in DOC.read_text()
    promtool = shutil.which("promtool")
    if promtool:   # not installed by scripts/setup; the checks above run regardless
        res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
