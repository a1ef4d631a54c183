"""Production trust for the etcd store, against a real etcd (in-process managers, no agents, no
packets): the garbage set written while a watch runs, allocation around unreadable keys, a stray
lease with our public IP at restart, resuming a watch mid catch-up, ambiguous write failures, a
config change while running, and a watch whose server vanished without a reset."""

from __future__ import annotations

import json
import logging
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from flannel import errors, wire
from flannel.lease import EventType, LeaseAttrs
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager, gateway, h2grpc
from flannel.subnet_managers.etcd import registry as registry_mod
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from tests.support import Follower, FreezableProxy, acquire, read_watch, wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
SUBNETS = f"{PREFIX}/subnets/"
CONFIG = '{"Network": "10.8.0.0/16", "SubnetMax": "10.8.50.0", "Backend": {"Type": "vxlan"}}'


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


#: The garbage set of issue 8 item 1, as (key name under subnets/, value). Subnet-shaped keys lie
#: outside our managers' range (10.8.1-50.0); the restart allocates around 10.8.57.0 and 10.8.58.0.
GARBAGE: list[tuple[bytes, bytes]] = [
    (b"10.8.60.0-24", deep(5000)),
    (b"10.8.61.0-24", deep(100_000)),
    (b"10.8.62.0-24", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    (b"10.8.63.0-24", b'{"PublicIP":"198.18.0.63","BackendData":' + deep(5000) + b"}"),
    (b"10.8.64.0-24", json.dumps({"PublicIP": "198.18.0.64", "BackendData": {"x": "a" * 1_000_000}}).encode()),
    (b"10.8.65.0-24", b"\xff\xfe" * 1000),
    (b"10.8.66.0-24", b'{"PublicIP":"198.18.0.66","BackendType":"\xff"}'),
    (b"10.8.67.0-24", b'{"PublicIP":7}'),
    (b"10.8.68.0-24", b'{"PublicIP":"198.18.0.68","BackendData":[1]}'),
    (b"10.8.69.0-24", b'["198.18.0.69"]'),
    (b"10.8.70.0-24", b'{"PublicIP":"198.18.0.70","BackendData":{"k":"\\ud800"}}'),
    (b"10.8.71.0-24", b'{"PublicIP":"198.18.0.71","BackendType":{"x":1}}'),
    (b"10.8.79.0-24", b'{"PublicIP":"fd00::79"}'),
    (b"10.8.57.0-24", b"not json"),
    (b"10.8.58.0-24", b'{"PublicIP":null}'),
    (b"junk", b"{}"),
    (b"10.8.72.0-24\xff", b'{"PublicIP":"198.18.0.72"}'),
    (b"10.8.73.0-32", b'{"PublicIP":"198.18.0.73"}'),
    (b"10.8.74.7-24", b'{"PublicIP":"198.18.0.74"}'),
    (b"10.8.75.0-24/deeper", b'{"PublicIP":"198.18.0.75"}'),
    ("10.8.76.0-٢٤".encode(), b'{"PublicIP":"198.18.0.76"}'),
    (b"1" * 100_000, b'{"PublicIP":"198.18.0.77"}'),
]


def attrs(ip: str) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan", backend_data='{"VNI":1}')


def peer(ip: str) -> bytes:
    return wire.encode_attrs(attrs(ip)).encode()


@pytest.fixture
def reg(etcd_server):  # type: ignore[no-untyped-def]
    r = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    r.put_config(CONFIG)
    yield r
    r.close()


def raw_put(reg: EtcdRegistry, key: bytes, value: bytes) -> None:
    reg._call("test put", lambda c: c.put(key, value))


def raw_get(reg: EtcdRegistry, key: str) -> bytes:
    resp = reg._call("test get", lambda c: c.range(key.encode(), b""))
    return bytes(resp.kvs[0].value)


@pytest.fixture
def make_manager(etcd_server, tmp_path):  # type: ignore[no-untyped-def]
    managers: list[EtcdSubnetManager] = []

    def make(subnet_file: str | None = None, **kw: Any) -> EtcdSubnetManager:
        m = EtcdSubnetManager(AgentOptions(etcd_endpoints=(kw.pop("endpoint", etcd_server.endpoint),),
                                           subnet_file=subnet_file or str(tmp_path / "subnet.env"), **kw))
        managers.append(m)
        return m
    yield make
    for m in managers:
        m.close()


def test_garbage_written_while_a_watch_runs(reg, make_manager, caplog):
    """Every kind of bad record arrives through a running watch: each is skipped with a line naming
    its key and counted; no peer is removed, the watch goes on, and a good lease written after the
    garbage arrives. Then a restarted agent lists the same garbage and still gets a lease."""
    caplog.set_level(logging.WARNING)
    raw_put(reg, SUBNETS.encode() + b"10.8.100.0-24", peer("198.18.0.100"))
    m = make_manager()
    own = acquire(m, attrs("192.0.2.1"))
    follower = Follower(m, own).start()
    try:
        follower.wait_peers(lambda p: "10.8.100.0/24" in p, "the first peer")
        for key, value in GARBAGE:
            raw_put(reg, SUBNETS.encode() + key, value)
        raw_put(reg, b"/coreos.com/network/subnetsX/10.8.78.0-24", peer("198.18.0.78"))  # not under subnets/
        raw_put(reg, SUBNETS.encode() + b"10.8.101.0-24", peer("198.18.0.101"))
        peers = follower.wait_peers(lambda p: "10.8.101.0/24" in p, "the good lease written after the garbage")
        assert set(peers) == {"10.8.100.0/24", "10.8.101.0/24"}
        assert follower.error is None and follower.thread.is_alive()
        assert follower.snapshots == 1
        assert [e for e in follower.events() if e[0] is EventType.REMOVED] == []
        skipped = m.skipped
        assert skipped.total == len(GARBAGE)
        assert {"depth", "size", "encoding", "type", "json", "address", "key"} <= set(skipped.counts)
        shaped = [key.decode() for key, _ in GARBAGE if wire.parse_subnet_key(key.decode("utf-8", "replace"))]
        assert len(shaped) == 15
        for key in shaped:  # each is named in a log line (they come first: within the 20-line burst)
            assert (SUBNETS + key) in caplog.text
    finally:
        assert follower.close()

    # a restart with the garbage present: listing skips it, and allocation goes around the
    # unreadable keys (a tiny range where only 10.8.59.0 is free besides them)
    caplog.clear()
    reg.put_config('{"Network": "10.8.0.0/16", "SubnetMin": "10.8.57.0", "SubnetMax": "10.8.59.0", '
                   '"Backend": {"Type": "vxlan"}}')
    fresh = make_manager(subnet_file="/nonexistent/subnet.env")
    lease = acquire(fresh, attrs("192.0.2.2"))
    assert lease.subnet == IPv4Network("10.8.59.0/24")
    assert fresh.skipped.total >= len(GARBAGE)


def test_hint_on_an_unreadable_key_does_not_crash_loop(reg, make_manager, tmp_path):
    raw_put(reg, SUBNETS.encode() + b"10.8.7.0-24", deep(5000))
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.8.0.0/16\nFLANNEL_SUBNET=10.8.7.1/24\n")
    for _ in range(2):  # the first start and a restart: both get a lease, neither tries the key twice
        lease = acquire(make_manager(subnet_file=str(env)), attrs("192.0.2.1"))
        assert lease.subnet is not None and lease.subnet != IPv4Network("10.8.7.0/24")
    assert raw_get(reg, SUBNETS + "10.8.7.0-24") == deep(5000)  # left alone


def test_a_stray_lease_with_our_ip_does_not_take_over_on_restart(reg, make_manager, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    env = tmp_path / "subnet.env"
    first = acquire(make_manager(subnet_file=str(env)), attrs("192.0.2.1"))
    assert first.subnet is not None
    env.write_text(f"FLANNEL_NETWORK=10.8.0.0/16\nFLANNEL_SUBNET={first.subnet.network_address + 1}/24\n")
    stray_key = SUBNETS + "10.8.0.0-24"  # sorts before every allocatable subnet
    raw_put(reg, stray_key.encode(), peer("192.0.2.1"))
    again = acquire(make_manager(subnet_file=str(env)), attrs("192.0.2.1"))
    assert again.subnet == first.subnet
    assert raw_get(reg, stray_key) == peer("192.0.2.1")  # not deleted, not rewritten
    assert "2 leases carry our public IP 192.0.2.1" in caplog.text and "10.8.0.0/24" in caplog.text


def test_watch_resumes_after_the_last_delivered_event_during_catch_up(reg, etcd_server):
    """etcd delivers a long catch-up in several responses whose header revision is the store's
    current one. A watch broken after the first response must resume after that response's last
    event, or the events in between are lost until the next relist."""
    start = reg.list_leases().revision + 1
    n = 1500  # etcd sends at most 1000 revisions per catch-up response
    keys = [SUBNETS + f"10.{8 + i // 250}.{i % 250}.0-24" for i in range(n)]

    def put_all(c: Any) -> None:
        for k in keys:
            c.put(k.encode(), peer("198.18.0.1"))
    reg._call("bulk put", put_all)
    handle = reg.watch_leases(start)
    try:
        first = read_watch(handle, lambda chunks: len(chunks) == 1, timeout=30)[0]
    finally:
        handle.cancel()
    assert 0 < len(first.events) < n  # the catch-up came in pieces: this is the case that matters
    assert first.revision == start + len(first.events) - 1
    seen = [e.lease.subnet for e in first.events]
    handle = reg.watch_leases(first.revision + 1)  # "the watch broke": resume as the manager does
    try:
        for chunk in read_watch(handle, lambda chunks: len(seen) + sum(len(c.events) for c in chunks) >= n,
                                timeout=30):
            seen.extend(e.lease.subnet for e in chunk.events)
    finally:
        handle.cancel()
    assert [str(s) for s in seen] == [str(wire.parse_subnet_key(k[len(SUBNETS):])[0]) for k in keys]  # type: ignore[index]


@pytest.mark.parametrize("transport", ["h2", "gateway", "grpc"])
@pytest.mark.parametrize("write", ["update", "renew"])
def test_an_ambiguous_write_failure_never_deletes_our_key(etcd_server, write, transport, monkeypatch, request):
    """The put is applied, then the call times out: flannel revoked the new etcd lease, which
    deleted the key it had just renewed. We leave everything as it is; the caller re-reads."""
    import grpc
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, transport)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    request.addfinalizer(reg.close)
    sn = IPv4Network("10.8.5.0/24")
    lease = reg.create_lease(sn, None, attrs("192.0.2.1"), 600)
    mod = reg.get_lease(sn, None).mod_revision
    if transport == "h2":
        real_h2_call = h2grpc.Unary.call

        def h2_call_then_time_out(self: h2grpc.Unary, method: str, *a: Any) -> Any:
            answer = real_h2_call(self, method, *a)
            if method in (h2grpc.PUT, h2grpc.TXN):
                raise errors.StoreUnavailable("timed out")   # what Unary.call raises when the answer is late
            return answer
        monkeypatch.setattr(h2grpc.Unary, "call", h2_call_then_time_out)
    elif transport == "gateway":
        real_call = gateway.Unary.call

        def call_then_time_out(self: gateway.Unary, path: str, *a: Any) -> Any:
            answer = real_call(self, path, *a)
            if path in (gateway.PUT_PATH, gateway.TXN_PATH):
                raise errors.StoreUnavailable("timed out")   # what Unary.call raises when the answer is late
            return answer
        monkeypatch.setattr(gateway.Unary, "call", call_then_time_out)
    else:
        class Timeout(grpc.RpcError):  # type: ignore[misc]
            """What a write whose answer was lost looks like: it may have been applied."""

            def code(self) -> Any:
                return grpc.StatusCode.DEADLINE_EXCEEDED

            def details(self) -> str:
                return "Deadline Exceeded"
        reg._mode = "grpc"
        client = reg._connect()
        real_put, real_txn = client.put, client.transaction

        def put_then_time_out(*a: Any, **k: Any) -> Any:
            real_put(*a, **k)
            raise Timeout()

        def txn_then_time_out(*a: Any, **k: Any) -> Any:
            real_txn(*a, **k)
            raise Timeout()
        monkeypatch.setattr(client, "put", put_then_time_out)
        monkeypatch.setattr(client, "transaction", txn_then_time_out)
    with pytest.raises(errors.StoreUnavailable):
        if write == "update":
            reg.update_lease(sn, None, lease.attrs, 600)
        else:
            reg.renew_lease(sn, None, lease.attrs, 600, mod_revision=mod)
    monkeypatch.undo()
    stored = reg.get_lease(sn, None)
    assert stored.exists and stored.lease is not None and stored.lease.attrs == lease.attrs
    assert stored.mod_revision > mod  # the write did happen ...
    time.sleep(0.5)  # ... and nothing revokes it afterwards (a revoke is immediate; give it a moment)
    assert reg.get_lease(sn, None).exists


def test_renewal_compares_on_the_mod_revision(reg):
    sn = IPv4Network("10.8.5.0/24")
    reg.create_lease(sn, None, attrs("192.0.2.1"), 600)
    mod = reg.get_lease(sn, None).mod_revision
    renewed = reg.renew_lease(sn, None, attrs("192.0.2.1"), 600, mod_revision=mod)
    assert renewed.expiration is not None
    with pytest.raises(registry_mod.KeyChanged):  # the revision moved on with our own renewal
        reg.renew_lease(sn, None, attrs("192.0.2.1"), 600, mod_revision=mod)
    reg.delete_lease(sn, None)
    with pytest.raises(registry_mod.KeyChanged):  # never resurrects a deleted key
        reg.renew_lease(sn, None, attrs("192.0.2.1"), 600, mod_revision=mod)
    assert not reg.get_lease(sn, None).exists


def test_a_changed_network_ends_the_watch_with_config_changed(reg, make_manager, caplog):
    caplog.set_level(logging.WARNING)
    m = make_manager()
    own = acquire(m, attrs("192.0.2.1"))
    follower = Follower(m, own).start()
    try:
        raw_put(reg, SUBNETS.encode() + b"10.8.100.0-24", peer("198.18.0.100"))
        follower.wait_peers(lambda p: "10.8.100.0/24" in p, "the watch is established")
        reg.put_config('{"Network": "10.8.0.0/16", "SubnetMax": "10.8.40.0", "Backend": {"Type": "vxlan"}}')
        wait_for(lambda: "SubnetMax 10.8.50.0 → 10.8.40.0" in caplog.text, "the deferred change logged")
        assert follower.error is None and follower.thread.is_alive()
        reg.put_config('{"Network": "10.9.0.0/16", "Backend": {"Type": "vxlan"}}')
        wait_for(lambda: not follower.thread.is_alive(), "the watch to end")
    finally:
        follower.stop.set()
        follower.thread.join(5)
    assert isinstance(follower.error, errors.ConfigChanged)
    assert "Network 10.8.0.0/16 → 10.9.0.0/16" in str(follower.error)


def test_a_watch_whose_server_vanished_without_a_reset_is_noticed(reg, make_manager, monkeypatch, etcd_server):
    """The connection to etcd goes silent (no FIN, no RST: a crashed host, a failover, dropped
    packets). gRPC keepalive pings go unanswered, the channel is closed, the watch re-established
    on a new connection and resumed: a lease written meanwhile arrives. Keepalive is shortened with
    the documented knobs (etcd refuses pings more often than every 5 s). gRPC watches (the
    fallback): the proxy's kernel still answers TCP, which only gRPC's pings see through; gateway
    watches are covered in test_etcd_gateway.py (TCP keepalive, the silence limit)."""
    monkeypatch.setenv(registry_mod.WATCH_ENV, "grpc")
    monkeypatch.setenv(registry_mod.KEEPALIVE_TIME_ENV, "5")
    monkeypatch.setenv(registry_mod.KEEPALIVE_TIMEOUT_ENV, "2")
    host, port, _ = registry_mod._split_endpoint(etcd_server.endpoint)
    proxy = FreezableProxy(host, port)
    try:
        m = make_manager(endpoint=proxy.endpoint)
        own = acquire(m, attrs("192.0.2.1"))
        follower = Follower(m, own).start()
        try:
            raw_put(reg, SUBNETS.encode() + b"10.8.100.0-24", peer("198.18.0.100"))
            follower.wait_peers(lambda p: "10.8.100.0/24" in p, "the watch is established")
            # stay idle long enough for several keepalive pings without data: gRPC stops pinging
            # after two of them unless told otherwise (grpc.http2.max_pings_without_data)
            time.sleep(16)
            assert proxy.freeze() >= 1
            accepted = proxy.accepted
            raw_put(reg, SUBNETS.encode() + b"10.8.101.0-24", peer("198.18.0.101"))
            follower.wait_peers(lambda p: "10.8.101.0/24" in p, "the lease written while the connection was dead",
                                timeout=45)
            assert proxy.accepted > accepted  # it came over a new connection
        finally:
            assert follower.close()
    finally:
        proxy.close()


def test_keepalive_knobs_are_validated(monkeypatch):
    monkeypatch.setenv(registry_mod.KEEPALIVE_TIME_ENV, "soon")
    with pytest.raises(errors.UsageError, match="FLANNEL_ETCD_KEEPALIVE_TIME"):
        registry_mod.grpc_options()
    monkeypatch.setenv(registry_mod.KEEPALIVE_TIME_ENV, "12")
    assert ("grpc.keepalive_time_ms", 12000) in registry_mod.grpc_options()


def test_the_agent_exits_with_the_reason_when_the_network_changes(reg, etcd_server, tmp_path):
    """The whole daemon (alloc backend: no kernel state, no rules) against real etcd: a changed
    Network ends the run with ConfigChanged (the CLI's exit 1), naming what changed."""
    import threading

    from flannel import daemon
    from tests.support import fake_iface
    reg.put_config('{"Network": "10.8.0.0/16", "Backend": {"Type": "alloc"}}')
    opts = AgentOptions(etcd_endpoints=(etcd_server.endpoint,), subnet_file=str(tmp_path / "subnet.env"),
                        iptables_forward_rules=False, public_ip="198.18.0.1")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            daemon.run(opts, select_interface=fake_iface)
            outcome.append(None)
        except BaseException as e:  # checked below
            outcome.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_for((tmp_path / "subnet.env").exists, "the agent is ready")
        reg.put_config('{"Network": "10.9.0.0/16", "Backend": {"Type": "alloc"}}')
        wait_for(lambda: outcome, "the agent to exit", timeout=30)
    finally:
        t.join(15)
    assert isinstance(outcome[0], errors.ConfigChanged), outcome
    assert "Network 10.8.0.0/16 → 10.9.0.0/16" in str(outcome[0])


def big_peer(i: int, size: int = 60_000) -> bytes:
    """A valid vxlan lease value of about ``size`` bytes (under the 64 KiB record limit)."""
    value = wire.encode_attrs(LeaseAttrs(public_ip=IPv4Address(f"198.18.1.{i}"), backend_type="vxlan",
                                         backend_data=json.dumps({"VNI": 1, "Pad": "p" * size})))
    return value.encode()


def test_records_larger_than_grpcs_receive_limit_in_total_are_listed_and_watched(reg, make_manager):
    """~80 leases of 60 KB and a few 1 MB garbage values: one range response would be ~9 MB, over
    gRPC's default 4 MB receive limit, and so would a watch catch-up over them. The listing is read
    in pages at one revision, the watch in fragments: the agent lists, allocates and watches;
    nothing fails forever."""
    n = 80
    start = reg.list_leases().revision + 1
    for i in range(1, n + 1):
        raw_put(reg, SUBNETS.encode() + f"10.8.{100 + i}.0-24".encode(), big_peer(i))
    for i in range(5):  # garbage: 1 MB each (etcd's default request limit is 1.5 MiB)
        raw_put(reg, SUBNETS.encode() + f"10.8.{90 + i}.0-24".encode(), b"x" * 1_000_000)
    listing = reg.list_leases()
    assert len(listing.leases) == n
    assert {str(lease.subnet) for lease in listing.leases} == {f"10.8.{100 + i}.0/24" for i in range(1, n + 1)}
    assert len(listing.occupied) == 5  # the garbage keys are skipped (too large) but occupy their subnets
    m = make_manager()
    own = acquire(m, attrs("192.0.2.1"))  # allocation lists too
    follower = Follower(m, own).start()
    try:
        peers = follower.wait_peers(lambda p: len(p) == n, "the snapshot of every big lease", timeout=60)
        assert set(peers) == {f"10.8.{100 + i}.0/24" for i in range(1, n + 1)}
    finally:
        assert follower.close()
    handle = reg.watch_leases(start)  # a catch-up over all of it: far more than 4 MB of events
    try:
        chunks = read_watch(handle, lambda chunks: sum(len(c.events) for c in chunks) >= n, timeout=60)
    finally:
        handle.cancel()
    seen = [str(e.lease.subnet) for c in chunks for e in c.events if e.lease.subnet != own.subnet]
    assert seen == [f"10.8.{100 + i}.0/24" for i in range(1, n + 1)]


def test_with_a_small_receive_limit_pages_shrink_and_a_too_large_catch_up_relists(etcd_server, make_manager,
                                                                                  monkeypatch):
    """The same mechanisms at a receive limit of 1 MiB (so that a few MB of data exercise them):
    pages shrink until they fit, a single value over the limit is skipped but still occupies its
    subnet (read, and our own key read, without its value), and a watch catch-up over the limit
    ends in a relist, not a watch that fails for ever."""
    monkeypatch.setattr(registry_mod, "MAX_RECEIVE_BYTES", 1 << 20)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        reg.put_config(CONFIG)
        m = make_manager()
        own = acquire(m, attrs("192.0.2.1"))  # the watch's first snapshot: this listing, before the writes
        n = 40
        for i in range(1, n + 1):
            raw_put(reg, SUBNETS.encode() + f"10.8.{100 + i}.0-24".encode(), big_peer(i))
        raw_put(reg, SUBNETS.encode() + b"10.8.90.0-24", b"x" * 1_400_000)  # alone over the limit
        listing = reg.list_leases()
        assert len(listing.leases) == n + 1  # the 40 and ours
        assert listing.occupied == ((IPv4Network("10.8.90.0/24"), None),)
        assert reg.skipped.counts.get("size") == 1
        stored = reg.get_lease(IPv4Network("10.8.90.0/24"), None)
        assert stored.exists and stored.lease is None and stored.mod_revision > 0
        follower = Follower(m, own).start()
        try:
            peers = follower.wait_peers(lambda p: len(p) == n, "every big lease, after a relist", timeout=60)
            assert set(peers) == {f"10.8.{100 + i}.0/24" for i in range(1, n + 1)}
            assert follower.snapshots == 2  # the acquisition's listing, then the relist
        finally:
            assert follower.close()
    finally:
        reg.close()
