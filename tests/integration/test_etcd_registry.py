"""registry.py against a real etcd: flannel's exact keys and bytes, create-if-absent, reservations,
watches, error conversion, username/password auth and TLS with client certificates."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.request
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from grpc._cython import cygrpc

from flannel import errors
from flannel.lab.etcd import EtcdServer
from flannel.lease import EventType, LeaseAttrs
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager, grpcwait
from flannel.subnet_managers.etcd import registry as registry_mod
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from tests.support import acquire, make_pki, read_watch, short_token_etcd, wait_for, wakeups

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = '{ "Network": "10.1.0.0/16", "Backend": { "Type": "host-gw" } }'
SN = IPv4Network("10.1.5.0/24")


def registry(srv: EtcdServer, **kw: str) -> EtcdRegistry:
    return EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, **kw)


def collect(handle, want: int, timeout: float = 10.0) -> list:  # type: ignore[no-untyped-def]
    chunks = read_watch(handle, lambda chunks: sum(len(c.events) for c in chunks) >= want, timeout=timeout)
    return [e for c in chunks for e in c.events]


def test_round_trip_exact_bytes(etcd_server):
    reg = registry(etcd_server)
    try:
        with pytest.raises(errors.ConfigNotFound, match="Did you create your config using etcdv3 API"):
            reg.get_config()
        reg.put_config(CONFIG)
        assert reg.get_config() == CONFIG
        assert etcd_server.etcdctl("get", "--print-value-only", f"{PREFIX}/config") == CONFIG + "\n"

        rev0 = reg.list_leases().revision
        lease = reg.create_lease(SN, None, LeaseAttrs(public_ip=IPv4Address("1.2.3.4")), 86400)
        assert lease.expiration is not None and lease.expiration > time.time() + 86000
        out = etcd_server.etcdctl("get", "--prefix", f"{PREFIX}/subnets/")
        assert out == f"{PREFIX}/subnets/10.1.5.0-24\n" + '{"PublicIP":"1.2.3.4","PublicIPv6":null}\n'

        leases = reg.list_leases(ttl=True).leases
        assert [(x.subnet, x.attrs.public_ip) for x in leases] == [(SN, IPv4Address("1.2.3.4"))]
        assert leases[0].expiration is not None and leases[0].expiration > time.time() + 86000
        got = reg.get_lease(SN, None)
        assert got.lease == lease and got.exists and got.mod_revision > rev0

        reg.delete_lease(SN, None)
        assert etcd_server.etcdctl("get", "--prefix", f"{PREFIX}/subnets/") == ""
        gone = reg.get_lease(SN, None)
        assert gone.lease is None and not gone.exists

        handle = reg.watch_leases(rev0 + 1)
        try:
            events = collect(handle, 2)
            assert [(e.type, e.lease.subnet) for e in events] == [(EventType.ADDED, SN), (EventType.REMOVED, SN)]
            assert events[0].lease.attrs.public_ip == IPv4Address("1.2.3.4")
            assert read_watch(handle, bool, timeout=0.5) == []  # exactly one Added and one Removed
        finally:
            handle.cancel()
    finally:
        reg.close()


def test_create_is_create_if_absent(etcd_server):
    reg = registry(etcd_server)
    try:
        reg.create_lease(SN, None, LeaseAttrs(public_ip=IPv4Address("1.1.1.1")), 600)
        with pytest.raises(errors.LeaseConflict, match=r"10.1.5.0/24"):
            reg.create_lease(SN, None, LeaseAttrs(public_ip=IPv4Address("2.2.2.2")), 600)
        assert "1.1.1.1" in etcd_server.etcdctl("get", "--print-value-only", f"{PREFIX}/subnets/10.1.5.0-24")
    finally:
        reg.close()


def test_reservation_has_no_etcd_lease(etcd_server):
    reg = registry(etcd_server)
    try:
        got = reg.update_lease(SN, None, LeaseAttrs(public_ip=IPv4Address("1.2.3.4")), None)
        assert got.expiration is None
        kv = json.loads(etcd_server.etcdctl("get", "-w", "json", f"{PREFIX}/subnets/10.1.5.0-24"))["kvs"][0]
        assert kv.get("lease", 0) == 0
        leases = reg.list_leases(ttl=True).leases
        assert leases[0].expiration is None
    finally:
        reg.close()


def test_stray_and_garbage_records_are_skipped_and_logged(etcd_server, caplog):
    caplog.set_level(logging.WARNING)
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.1.7.0-24", '{"PublicIP":"1.1.1.7","PublicIPv6":null}')
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.1.8.0-24", "garbage{")
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/junk", "{}")
    etcd_server.etcdctl("put", f"{PREFIX}/subnets/10.1.9.0-24/deeper", "{}")
    etcd_server.etcdctl("put", f"{PREFIX}/subnetsX/10.1.10.0-24", '{"PublicIP":"1.1.1.10"}')
    reg = registry(etcd_server)
    try:
        listing = reg.list_leases()
        assert [x.subnet for x in listing.leases] == [IPv4Network("10.1.7.0/24")]
        assert listing.occupied == ((IPv4Network("10.1.8.0/24"), None),)  # its key exists: not free
        text = caplog.text
        assert f"{PREFIX}/subnets/10.1.8.0-24" in text and "not JSON" in text
        assert f"{PREFIX}/subnets/junk" in text and f"{PREFIX}/subnets/10.1.9.0-24/deeper" in text
    finally:
        reg.close()


def test_unreachable_etcd_is_store_unavailable():
    from flannel.lab.etcd import free_port
    reg = EtcdRegistry(endpoints=[f"http://127.0.0.1:{free_port()}"], prefix=PREFIX, timeout=2)
    try:
        with pytest.raises(errors.StoreUnavailable):
            reg.get_config()
    finally:
        reg.close()


def test_username_password_auth(etcd_server, caplog):
    caplog.set_level(logging.DEBUG)
    etcd_server.etcdctl("put", f"{PREFIX}/config", CONFIG)
    etcd_server.etcdctl("user", "add", "root:s3cret-pw")
    etcd_server.etcdctl("auth", "enable")
    base = {"etcd_endpoints": (etcd_server.endpoint,), "subnet_file": "/nonexistent/subnet.env"}
    good = EtcdSubnetManager(AgentOptions(etcd_username="root", etcd_password="s3cret-pw", **base))
    try:
        assert str(good.get_network_config().network) == "10.1.0.0/16"
        lease = acquire(good, LeaseAttrs(public_ip=IPv4Address("1.2.3.4")))
        assert lease.subnet is not None and lease.subnet.subnet_of(IPv4Network("10.1.0.0/16"))
        assert "s3cret-pw" not in good.name
    finally:
        good.close()
    bad = EtcdSubnetManager(AgentOptions(etcd_username="root", etcd_password="wrong-pw", **base))
    try:
        with pytest.raises(errors.PermissionDenied, match="authentication failed for user 'root'"):
            bad.get_network_config()
    finally:
        bad.close()
    anon = EtcdSubnetManager(AgentOptions(**base))
    try:
        with pytest.raises(errors.PermissionDenied, match="--etcd-username"):
            anon.get_network_config()
    finally:
        anon.close()
    assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text


# -- TLS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Made by openssl: a CA with a server cert for 127.0.0.1 and a client cert; a server cert for
    another name (etcd.example.com); another CA with its own client cert."""
    return make_pki(tmp_path_factory.mktemp("pki"), (
        ("server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "ca", "extendedKeyUsage=clientAuth"),
        ("wrong-name", "ca", "subjectAltName=DNS:etcd.example.com\nextendedKeyUsage=serverAuth"),
        ("other-client", "other-ca", "extendedKeyUsage=clientAuth"),
    ))


def tls_etcd(pki: Path, tmp_path: Path, server: str = "server") -> TLSEtcdServer:
    """A real etcd that requires client certificates (--client-cert-auth) signed by pki's CA."""
    srv = TLSEtcdServer(str(tmp_path / f"etcd-{server}"), extra_args=[
        "--cert-file", str(pki / f"{server}.crt"), "--key-file", str(pki / f"{server}.key"),
        "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth"])
    srv.pki = pki
    return srv


class TLSEtcdServer(EtcdServer):
    @property
    def endpoint(self) -> str:
        return f"https://{self.host}:{self.client_port}"

    def healthy(self) -> bool:
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "client.crt"), str(self.pki / "client.key"))
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=1, context=ctx) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    pki: Path


def assert_watch_works(reg: EtcdRegistry, n: int, transport: str) -> None:
    """A watch (through etcd's JSON gateway: TLS with the same files, the token if any) delivers a lease."""
    handle = reg.watch_leases(reg.list_leases().revision + 1)
    try:
        assert type(handle).__name__ == transport
        sn = IPv4Network(f"10.1.{n}.0/24")
        reg.update_lease(sn, None, LeaseAttrs(public_ip=IPv4Address(f"1.2.3.{n}")), None)
        assert [e.lease.subnet for e in collect(handle, 1)] == [sn]
    finally:
        handle.cancel()


def test_tls_with_client_certificate(pki, tmp_path):
    srv = tls_etcd(pki, tmp_path)
    srv.start()
    try:
        tls = {"cafile": str(pki / "ca.crt"), "certfile": str(pki / "client.crt"), "keyfile": str(pki / "client.key")}
        reg = registry(srv, **tls)
        try:
            reg.put_config(CONFIG)
            assert reg.get_config() == CONFIG
            assert_watch_works(reg, 5, "_GatewayStream")
        finally:
            reg.close()
        opts = AgentOptions(etcd_endpoints=(srv.endpoint,), etcd_cafile=tls["cafile"], etcd_certfile=tls["certfile"],
                            etcd_keyfile=tls["keyfile"], subnet_file=str(tmp_path / "subnet.env"))
        m = EtcdSubnetManager(opts)
        try:
            lease = acquire(m, LeaseAttrs(public_ip=IPv4Address("1.2.3.4")))
            assert lease.subnet is not None and lease.subnet.subnet_of(IPv4Network("10.1.0.0/16"))
        finally:
            m.close()
        # TLS and username/password together
        certs = ("--cacert", tls["cafile"], "--cert", tls["certfile"], "--key", tls["keyfile"])
        srv.etcdctl(*certs, "user", "add", "root:tls-pw")
        srv.etcdctl(*certs, "auth", "enable")
        both = registry(srv, username="root", password="tls-pw", **tls)
        try:
            assert both.get_config() == CONFIG
            # etcd refuses gateway requests with a client certificate once auth is on ("CommonName
            # of client sending a request against gateway will be ignored"): the watch uses gRPC
            assert_watch_works(both, 6, "_Stream")
        finally:
            both.close()
    finally:
        srv.close()


TLS_FAILURES = [
    # (what the client uses, the message that names the likely cause)
    ({"cafile": "ca.crt"}, "etcd requires a client certificate and none was sent: set --etcd-certfile and "
                           "--etcd-keyfile"),
    ({"cafile": "ca.crt", "certfile": "other-client.crt", "keyfile": "other-client.key"},
     "etcd rejected our client certificate"),
    ({"cafile": "other-ca.crt", "certfile": "client.crt", "keyfile": "client.key"},
     "etcd's server certificate is not signed by a CA in --etcd-cafile"),
    ({"certfile": "client.crt", "keyfile": "client.key"},
     "is not signed by a CA in the system CA bundle (no --etcd-cafile given)"),
]


def test_tls_failures_name_the_likely_cause(pki, tmp_path):
    """Instead of retrying forever with "Unwrap failed (TSI_DATA_CORRUPTED)": a StoreTLSError (a
    ConfigError, so fatal at startup) that says what to fix."""
    srv = tls_etcd(pki, tmp_path)
    srv.start()
    try:
        for files, message in TLS_FAILURES:
            reg = registry(srv, **{k: str(pki / v) for k, v in files.items()})
            try:
                with pytest.raises(errors.StoreTLSError) as exc:
                    reg.get_config()
                assert message in str(exc.value), files
                assert isinstance(exc.value, errors.ConfigError)
            finally:
                reg.close()
    finally:
        srv.close()


def test_tls_wrong_server_name(pki, tmp_path):
    srv = tls_etcd(pki, tmp_path, server="wrong-name")
    srv.healthy = lambda: True  # type: ignore[method-assign]  # its certificate does not name 127.0.0.1
    srv.start()
    try:
        from flannel.subnet_managers.etcd.registry import _split_endpoint
        host, _, _ = _split_endpoint(srv.endpoint)
        deadline = time.monotonic() + 20
        while True:  # etcd is up once the TLS handshake gets as far as the name check
            reg = registry(srv, cafile=str(pki / "ca.crt"), certfile=str(pki / "client.crt"),
                           keyfile=str(pki / "client.key"))
            try:
                reg.get_config()
                raise AssertionError("connected although the certificate names another host")
            except errors.StoreTLSError as e:
                assert "wrong server name" in str(e) and host in str(e)
                break
            except errors.StoreUnavailable:
                assert time.monotonic() < deadline, "etcd did not come up"
                time.sleep(0.2)
            finally:
                reg.close()
    finally:
        srv.close()


@pytest.mark.parametrize("transport", ["h2", "gateway"])
def test_a_kept_tls_connection_closed_by_the_server_is_replaced_not_taken_for_a_refused_certificate(
        pki, tmp_path, monkeypatch, transport):
    """A TLS etcd (--client-cert-auth) behind a TCP proxy that drops the idle kept connection: the
    next unary call asks again on a new TLS connection and succeeds (a close after the handshake on a
    *new* connection is how etcd refuses a certificate; on a kept one it is only a stale connection)."""
    from tests.support import GatewayProxy
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, transport)
    srv = tls_etcd(pki, tmp_path)
    srv.start()
    proxy = GatewayProxy(srv.host, srv.client_port)   # TLS bytes are forwarded as they are
    try:
        reg = EtcdRegistry(endpoints=[f"https://127.0.0.1:{proxy.port}"], prefix=PREFIX, cafile=str(pki / "ca.crt"),
                           certfile=str(pki / "client.crt"), keyfile=str(pki / "client.key"))
        try:
            reg.put_config(CONFIG)
            unary = reg._h2_unary[0] if transport == "h2" else reg._gw_unary[0]
            assert unary.connections == 1
            with proxy._lock:
                socks = list(proxy._socks)
            for s in socks:
                try:
                    s.shutdown(2)
                except OSError:   # already shut down by the proxy (closing one end closes the other)
                    pass
            assert reg.get_config() == CONFIG
            assert unary.connections == 2 and reg._mode == transport
        finally:
            reg.close()
    finally:
        proxy.close()
        srv.close()


def test_the_gateway_watch_probes_a_tls_etcd_with_its_client_certificate(pki, tmp_path, monkeypatch):
    """With --client-cert-auth, the liveness probe's connection must present the same client
    certificate as the watch (etcd refuses the handshake otherwise): a quiet TLS etcd keeps the
    watch across probes; SIGSTOPped, the probe gets no answer and the watch ends."""
    monkeypatch.setenv(registry_mod.KEEPALIVE_TIME_ENV, "2")
    monkeypatch.setenv(registry_mod.KEEPALIVE_TIMEOUT_ENV, "1")
    srv = tls_etcd(pki, tmp_path)
    srv.start()
    try:
        reg = registry(srv, cafile=str(pki / "ca.crt"), certfile=str(pki / "client.crt"),
                       keyfile=str(pki / "client.key"))
        try:
            h = reg.watch_leases(1)
            assert type(h).__name__ == "_GatewayStream"
            ended: list[BaseException] = []

            def read() -> None:
                try:
                    while True:
                        h.next()
                except errors.StoreError as e:
                    ended.append(e)
            t = threading.Thread(target=read, daemon=True)
            t.start()
            wait_for(lambda: h._watch.probes >= 2 or ended, "two liveness probes over TLS", timeout=60)
            assert not ended, f"the watch of a healthy TLS etcd ended: {ended}"
            pid = srv.proc.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                wait_for(lambda: ended, "the hung TLS etcd to be noticed", timeout=30)
                assert "did not answer a liveness probe" in str(ended[0]), ended
            finally:
                os.kill(pid, signal.SIGCONT)
                h.cancel()
                t.join(30)
        finally:
            reg.close()
    finally:
        srv.close()


def test_agent_without_client_certificate_exits_with_the_cause(pki, tmp_path):
    """The daemon does not retry a TLS failure at startup: it fails with the reason (exit 1)."""
    from flannel import daemon
    from tests.support import fake_iface
    srv = tls_etcd(pki, tmp_path)
    srv.start()
    try:
        opts = AgentOptions(etcd_endpoints=(srv.endpoint,), etcd_cafile=str(pki / "ca.crt"),
                            subnet_file=str(tmp_path / "subnet.env"), iptables_forward_rules=False)
        with pytest.raises(errors.StoreTLSError, match="requires a client certificate"):
            daemon.run(opts, select_interface=fake_iface)
    finally:
        srv.close()


def test_expired_auth_token_is_renewed(tmp_path, caplog):
    """etcd's simple tokens expire (here after 1 s): the registry authenticates again by itself."""
    with short_token_etcd(tmp_path / "etcd", f"{PREFIX}/config", CONFIG, ("root:s3cret-pw",)) as srv:
        reg = registry(srv, username="root", password="s3cret-pw")
        try:
            assert reg.get_config() == CONFIG
            rev = reg.list_leases().revision
            time.sleep(2.5)  # let the token expire (no condition to poll: expiry is server-internal)
            caplog.set_level(logging.INFO)
            assert reg.get_config() == CONFIG
            assert "authenticating again" in caplog.text  # the token had expired
            handle = reg.watch_leases(rev + 1)
            try:
                srv.etcdctl("--user", "root:s3cret-pw", "put", f"{PREFIX}/subnets/10.1.6.0-24",
                            '{"PublicIP":"1.2.3.6","PublicIPv6":null}')
                assert [e.lease.subnet for e in collect(handle, 1)] == [IPv4Network("10.1.6.0/24")]
            finally:
                handle.cancel()
        finally:
            reg.close()


def test_calls_failing_as_unavailable_for_a_while_open_a_fresh_connection(etcd_server, caplog, monkeypatch):
    """A gRPC channel left behind by a vanished etcd is not trusted to reconnect by itself: after
    FRESH_CONNECTION_AFTER_SECONDS of nothing but "unavailable", the registry connects afresh, and a
    call made after etcd is back succeeds on the new connection."""
    from flannel.subnet_managers.etcd import registry as registry_mod
    from tests.support import wait_for

    caplog.set_level(logging.INFO, logger=registry_mod.__name__)
    monkeypatch.setattr(registry_mod, "FRESH_CONNECTION_AFTER_SECONDS", 0.5)
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, "grpc")   # about the gRPC channel
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX, timeout=1)
    try:
        reg.put_config(CONFIG)
        first = reg._client
        assert first is not None
        etcd_server.stop()

        def failed_long_enough() -> bool:
            with pytest.raises(errors.StoreUnavailable):
                reg.get_config()
            return "opening a fresh connection" in caplog.text
        wait_for(failed_long_enough, "the registry to give up on its connection", timeout=30, interval=0.1)
        assert reg._client is not first
        etcd_server.start()

        def works() -> bool:
            try:
                return reg.get_config() == CONFIG
            except errors.StoreUnavailable:
                return False
        wait_for(works, "a call after etcd is back", timeout=30, interval=0.2)
        assert reg._client is not None and reg._client is not first
    finally:
        reg.close()


#: an idle stretch long enough for gRPC's default 200 ms signal checks to show
IDLE_WINDOW = 2.5


@pytest.mark.parametrize("mode", ["gateway", "grpc"])
def test_a_blocked_watch_read_sleeps_until_an_event_or_cancel(etcd_server, monkeypatch, mode):
    """Issue 9 (idle CPU): the thread blocked in the watch's ``next()`` does not wake up while
    nothing happens (gateway: it blocks in ``recv``; gRPC: its 200 ms signal-check slices are
    lengthened, see grpcwait), an event still wakes it at once, and ``cancel()`` (the stop hook)
    from another thread still ends the read."""
    monkeypatch.setenv("FLANNEL_ETCD_WATCH", mode)
    reg = registry(etcd_server)
    try:
        reg.put_config(CONFIG)
        handle = reg.watch_leases(reg.list_leases().revision + 1)
        assert type(handle).__name__ == ("_GatewayStream" if mode == "gateway" else "_Stream")
        if mode == "grpc":
            assert grpcwait.signal_check_ms(cygrpc) == grpcwait.SIGNAL_CHECK_MS
        chunks: list = []
        ended: list[BaseException] = []

        def read() -> None:
            try:
                while True:
                    chunks.append(handle.next())
            except errors.StoreUnavailable as e:
                ended.append(e)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def quiet() -> bool:
            before = wakeups(reader)
            time.sleep(IDLE_WINDOW)   # the measuring window
            return wakeups(reader) == before
        wait_for(quiet, "an idle window without wake-ups of the thread blocked in the watch", timeout=20)
        reg.create_lease(SN, None, LeaseAttrs(public_ip=IPv4Address("1.2.3.4")), 86400)
        wait_for(lambda: [e.lease.subnet for c in chunks for e in c.events] == [SN], "the lease event")
        handle.cancel()
        reader.join(5)
        assert not reader.is_alive() and "cancelled" in str(ended[0])
    finally:
        reg.close()


def test_a_listing_runs_without_the_cyclic_collector_and_freezes_the_leases(etcd_server):
    """Listing thousands of leases makes long-lived objects only: a collection in the middle of
    them (a full one walked the whole process: 30-40 ms of a 5000-lease cold start) is wasted. The
    listing runs with the collector paused; the one collection left is the young one at its end."""
    import gc

    reg = registry(etcd_server)
    try:
        for i in range(600):     # ~6 objects each: without the pause, several young collections
            reg.update_lease(IPv4Network(f"10.{1 + i // 250}.{i % 250}.0/24"), None,
                             LeaseAttrs(public_ip=IPv4Address(f"198.18.{i // 250}.{i % 250 + 1}")), None)
        seen: list[int] = []

        def note(phase: str, info: dict) -> None:  # type: ignore[type-arg]
            if phase == "start":
                seen.append(info["generation"])

        gc.callbacks.append(note)
        try:
            listing = reg.list_leases()
        finally:
            gc.callbacks.remove(note)
        assert len(listing.leases) == 600
        assert gc.isenabled()
        assert seen == [1]       # gc_paused's own young collection, after the listing
        gc.unfreeze()
    finally:
        reg.close()
