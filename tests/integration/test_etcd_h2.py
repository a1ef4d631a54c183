"""The registry's unary calls as gRPC over our own HTTP/2 client (h2grpc.Unary, the default
transport), against a real etcd and against small fake servers: one kept connection for every call,
a kept connection closed by the server (EOF or GOAWAY) is replaced within the call, a timeout is
never retried, a failed endpoint is left for the next, a too-large answer is refused at its length
prefix without being buffered, a listing restarts over a compaction, an expired token is renewed,
etcd's gRPC errors keep their meaning, an endpoint without the JSON gateway moves only the watches
to grpcio, and anything that is not etcd's gRPC (junk, HTTP/1.1, a broken HTTP/2 answer) is
StoreUnavailable, never a crash."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from flannel import errors, wire
from flannel.lab.etcd import free_port
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.etcd import etcdpb, gateway, h2grpc
from flannel.subnet_managers.etcd import registry as registry_mod
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from tests.support import FreezableProxy, GatewayProxy, short_token_etcd, wait_for

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
SUBNETS = PREFIX + "/subnets/"
CONFIG = '{ "Network": "10.1.0.0/16", "Backend": { "Type": "host-gw" } }'


@pytest.fixture(autouse=True)
def h2_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default transport, whatever the environment running the tests says."""
    monkeypatch.delenv(registry_mod.TRANSPORT_ENV, raising=False)
    monkeypatch.delenv(registry_mod.WATCH_ENV, raising=False)


def attrs(ip: str) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip))


def raw_put(reg: EtcdRegistry, key: str, value: bytes) -> None:
    reg._call("test put", lambda c: c.put(key.encode(), value))


def shut_down_all(proxy: GatewayProxy) -> None:
    with proxy._lock:
        socks = list(proxy._socks)
    for s in socks:   # the server side goes away (no request in flight)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:   # already shut down by the proxy (closing one end closes the other)
            pass


# -- against a real etcd ----------------------------------------------------------------------------

def test_every_call_goes_over_one_kept_http2_connection(etcd_server, caplog):
    caplog.set_level(logging.WARNING, logger=registry_mod.__name__)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        reg.put_config(CONFIG)
        # flannel's warning for an http:// endpoint, once, whichever transport connects
        assert caplog.text.count("no certificate provided: connecting to etcd with http. This is insecure") == 1
        sn = IPv4Network("10.1.5.0/24")
        reg.create_lease(sn, None, attrs("198.18.0.5"), 600)
        stored = reg.get_lease(sn, None, ttl=True)
        assert stored.lease is not None and stored.lease.expiration is not None
        reg.renew_lease(sn, None, stored.lease.attrs, 600, mod_revision=stored.mod_revision)
        with pytest.raises(errors.LeaseConflict):
            reg.create_lease(sn, None, attrs("198.18.0.6"), 600)
        listing = reg.list_leases(ttl=True)
        assert [str(x.subnet) for x in listing.leases] == ["10.1.5.0/24"]
        reg.delete_lease(sn, None)
        assert not reg.get_lease(sn, None).exists
        assert reg._mode == "h2" and not reg._gw_unary and reg._client is None
        assert reg._h2_unary[0].connections == 1
        assert caplog.text.count("This is insecure") == 1
        assert etcd_server.etcdctl("get", PREFIX + "/config", "--print-value-only").strip() == CONFIG
    finally:
        reg.close()


def test_a_kept_connection_closed_by_the_server_is_replaced_within_the_call(etcd_server):
    proxy = GatewayProxy(*registry_mod._split_endpoint(etcd_server.endpoint)[:2])   # forwards HTTP/2 as is
    reg = EtcdRegistry(endpoints=[proxy.endpoint], prefix=PREFIX)
    try:
        reg.put_config(CONFIG)
        assert reg.get_config() == CONFIG
        unary = reg._h2_unary[0]
        assert unary.connections == 1, "two calls, one kept connection"
        shut_down_all(proxy)
        for _ in range(3):
            assert reg.get_config() == CONFIG
        assert unary.connections == 2
        assert reg._mode == "h2" and reg._client is None
    finally:
        reg.close()
        proxy.close()


def test_a_call_that_times_out_is_not_retried_and_the_next_one_connects_again(etcd_server):
    proxy = FreezableProxy(*registry_mod._split_endpoint(etcd_server.endpoint)[:2])
    reg = EtcdRegistry(endpoints=[proxy.endpoint], prefix=PREFIX, timeout=1)
    try:
        reg.put_config(CONFIG)
        accepted = proxy.accepted
        proxy.freeze()   # the kept connection now drops everything: a hung etcd, a dead path
        with pytest.raises(errors.StoreUnavailable, match="timed out"):
            reg.get_config()
        assert proxy.accepted == accepted, "a timed-out call was retried on a new connection"
        assert reg.get_config() == CONFIG   # the next call connects afresh
        assert proxy.accepted == accepted + 1
    finally:
        reg.close()
        proxy.close()


def test_a_refused_endpoint_is_left_for_the_next_and_the_next_call_starts_there(etcd_server):
    dead = f"http://127.0.0.1:{free_port()}"
    reg = EtcdRegistry(endpoints=[dead, etcd_server.endpoint], prefix=PREFIX, timeout=2)
    try:
        reg.put_config(CONFIG)
        assert reg._gw_next == 1
        assert reg._h2_unary[0].connections == 0 and reg._h2_unary[1].connections == 1
        assert reg.get_config() == CONFIG
        assert reg._h2_unary[1].connections == 1   # straight to the one that worked
    finally:
        reg.close()
    down = EtcdRegistry(endpoints=[dead], prefix=PREFIX, timeout=2)
    try:
        with pytest.raises(errors.StoreUnavailable, match="ConnectionRefused"):
            down.get_config()
    finally:
        down.close()


def test_too_large_answers_are_refused_at_their_prefix_pages_shrink_and_one_value_is_skipped(etcd_server,
                                                                                               monkeypatch):
    """A receive limit of 64 KiB: an answer whose length prefix is over it is refused at once (the
    stream reset, never buffered beyond the first DATA frame), a page over it is asked for again
    with fewer keys, a value over it alone is skipped (counted) but occupies its subnet, and
    get_lease reads it keys-only."""
    limit = 64 * 1024
    monkeypatch.setattr(registry_mod, "MAX_RECEIVE_BYTES", limit)
    buffered: list[int] = []
    refused: list[int] = []
    real_data = h2grpc._Reply.data

    def data(self: Any, chunk: bytes) -> int:
        length = real_data(self, chunk)
        buffered.append(len(self.buf))
        if length > limit:
            refused.append(length)
        return length
    monkeypatch.setattr(h2grpc._Reply, "data", data)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        n = 12
        pad = '{"VNI": 1, "Pad": "' + "p" * 8000 + '"}'
        for i in range(n):
            value = wire.encode_attrs(LeaseAttrs(public_ip=IPv4Address(f"198.18.1.{i + 1}"), backend_type="vxlan",
                                                 backend_data=pad))
            raw_put(reg, SUBNETS + f"10.1.{100 + i}.0-24", value.encode())
        raw_put(reg, SUBNETS + "10.1.90.0-24", b"x" * (limit + 1000))   # alone over the limit
        listing = reg.list_leases()
        assert len(listing.leases) == n
        assert listing.occupied == ((IPv4Network("10.1.90.0/24"), None),)
        assert reg.skipped.counts.get("size") == 1
        stored = reg.get_lease(IPv4Network("10.1.90.0/24"), None)
        assert stored.exists and stored.lease is None and stored.mod_revision > 0
        assert refused, "no answer was over the limit: the test proves nothing"
        assert max(buffered) <= limit, f"buffered {max(buffered)} bytes of an answer over {limit}"
    finally:
        reg.close()


def test_a_listing_whose_revision_is_compacted_between_pages_starts_over(etcd_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=registry_mod.__name__)
    monkeypatch.setattr(registry_mod, "LIST_PAGE_KEYS", 2)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        for i in range(5):
            raw_put(reg, SUBNETS + f"10.1.{i}.0-24", wire.encode_attrs(attrs(f"198.18.0.{i + 1}")).encode())
        real_range = registry_mod._H2KV.range
        pages: list[int] = []

        def range_then_compact(self: Any, key: bytes, range_end: bytes, **kw: Any) -> gateway.RangeResult:
            pages.append(kw.get("revision", 0))
            result = real_range(self, key, range_end, **kw)
            if len(pages) == 1:   # between the first and the second page: a write, and a compaction past it
                etcd_server.etcdctl("put", SUBNETS + "10.1.9.0-24", wire.encode_attrs(attrs("198.18.0.9")))
                rev = real_range(self, b"x", b"").revision
                etcd_server.etcdctl("compact", str(rev))
            return result
        monkeypatch.setattr(registry_mod._H2KV, "range", range_then_compact)
        listing = reg.list_leases()
        assert sorted(str(x.subnet) for x in listing.leases) == sorted([f"10.1.{i}.0/24" for i in (*range(5), 9)])
        assert "listing again" in caplog.text
        assert pages[0] == 0 and pages[1] > 0 and pages[2] == 0, pages
    finally:
        reg.close()


def test_an_expired_token_is_renewed_and_refusals_keep_their_messages(tmp_path, caplog):
    """etcd's simple tokens expire (here after 1 s): the next call is refused (UNAUTHENTICATED),
    authenticates again over h2 and succeeds. A wrong password, a user without a role and no user
    at all are refused with the same messages as through grpcio and the gateway."""
    caplog.set_level(logging.INFO, logger=registry_mod.__name__)
    with short_token_etcd(tmp_path / "etcd", f"{PREFIX}/config", CONFIG, ("root:s3cret-pw", "nobody:pw2")) as srv:
        reg = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, username="root", password="s3cret-pw")
        try:
            assert reg.get_config() == CONFIG
            token = reg._gw_token
            assert token
            time.sleep(2.5)  # let the token expire (no condition to poll: expiry is server-internal; a use renews it)
            assert reg.get_config() == CONFIG
            assert "authenticating again" in caplog.text
            assert reg._gw_token and reg._gw_token != token
            assert reg._mode == "h2" and reg._client is None
        finally:
            reg.close()
        for user, password, message in (("root", "wrong", "authentication failed for user 'root'"),
                                         ("nobody", "pw2", "permission denied"),
                                         ("", "", "--etcd-username")):
            bad = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, username=user, password=password)
            try:
                with pytest.raises(errors.PermissionDenied, match=message):
                    bad.get_config()
            finally:
                bad.close()
        assert "s3cret-pw" not in caplog.text


def test_an_endpoint_without_the_gateway_moves_only_the_watches_to_grpc(etcd_server, caplog):
    """Unary calls are gRPC already: a 404 from the JSON gateway (to a watch) moves the watches to
    grpcio, said once; unary calls stay on h2."""
    caplog.set_level(logging.INFO, logger=registry_mod.__name__)
    proxy = GatewayProxy(*registry_mod._split_endpoint(etcd_server.endpoint)[:2], mode="404")
    reg = EtcdRegistry(endpoints=[proxy.endpoint], prefix=PREFIX)
    try:
        reg.put_config(CONFIG)
        assert proxy.http_requests == 0   # unary calls never touch HTTP/1.1
        h = reg.watch_leases(1)
        h.cancel()
        assert type(h).__name__ == "_Stream"
        assert reg.get_config() == CONFIG
        assert reg._mode == "h2" and reg._watch_grpc
        h = reg.watch_leases(1)
        h.cancel()
        assert proxy.http_requests == 1, "the gateway was tried again after falling back"
        falls = [r.getMessage() for r in caplog.records if "does not serve its JSON gateway" in r.getMessage()]
        assert len(falls) == 1 and falls[0].endswith("using gRPC for its watches")
    finally:
        reg.close()
        proxy.close()


# -- against servers that are not etcd --------------------------------------------------------------

Answer = Callable[[h2.connection.H2Connection, int], None]


class FakeServer:
    """A TCP server on 127.0.0.1: with ``answer``, an HTTP/2 server calling ``answer(conn, stream_id)``
    for every request; with ``raw``, it sends those bytes to whatever arrives and closes."""

    def __init__(self, answer: Answer | None = None, raw: bytes | None = None) -> None:
        self.answer, self.raw = answer, raw
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = int(self.listener.getsockname()[1])
        self.connections = 0
        self.requests: list[dict[bytes, bytes]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            if self.raw is not None:
                sock.recv(65536)
                if self.raw:
                    sock.sendall(self.raw)
                return
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.requests.append(dict(ev.headers))   # type: ignore[arg-type]
                    if isinstance(ev, h2.events.StreamEnded):
                        assert self.answer is not None
                        self.answer(conn, ev.stream_id)
                try:
                    sock.sendall(conn.data_to_send())
                except OSError:
                    return
                if conn.state_machine.state.name == "CLOSED":
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def make(answer: Answer | None = None, raw: bytes | None = None) -> FakeServer:
        servers.append(FakeServer(answer, raw))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def message(body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", 0, len(body) if length is None else length) + body


OK_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
#: a RangeResponse holding the config key
CONFIG_KV = etcdpb.rpc().RangeResponse(kvs=[{"key": (PREFIX + "/config").encode(), "value": CONFIG.encode(),
                                             "mod_revision": 3}], count=1).SerializeToString()


def answer_with(data: bytes | None, trailers: list[tuple[bytes, bytes]] | None, head: Any = None) -> Answer:
    def answer(conn: h2.connection.H2Connection, sid: int) -> None:
        conn.send_headers(sid, head or OK_HEAD, end_stream=data is None and trailers is None)
        if data is not None:
            conn.send_data(sid, data, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(sid, trailers, end_stream=True)
    return answer


STATUS_0 = [(b"grpc-status", b"0")]


def reset(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.reset_stream(sid, 2)


def goaway_mid_call(conn: h2.connection.H2Connection, sid: int) -> None:
    conn.send_headers(sid, OK_HEAD)
    conn.close_connection(last_stream_id=sid)


BROKEN_ANSWERS: dict[str, tuple[Answer | None, bytes | None, str]] = {
    "junk for a preface": (None, b"\x00\x00\x04\x99junk that is not HTTP/2 at all" * 3, "not an HTTP/2 server"),
    "an HTTP/1.1 answer": (None, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
                           "not an HTTP/2 server: it answered b'HTTP/1.1 400"),
    "closed without a byte": (None, b"", "closed|reset"),
    "HTTP 503": (answer_with(None, None, [(b":status", b"503")]), None, "HTTP/2 status 503"),
    "no grpc-status": (answer_with(message(CONFIG_KV), None), None, "without a grpc-status"),
    "a bad grpc-status": (answer_with(message(CONFIG_KV), [(b"grpc-status", b"zero")]), None, "not a number"),
    "a truncated message": (answer_with(message(CONFIG_KV[:10], len(CONFIG_KV)), STATUS_0), None, "truncated"),
    "two messages": (answer_with(message(CONFIG_KV) * 2, STATUS_0), None, "more than one message"),
    "a compressed message": (answer_with(b"\x01" + message(CONFIG_KV)[1:], STATUS_0), None, "compressed"),
    "not protobuf": (answer_with(message(b"\xff\xff\xff\xff"), STATUS_0), None, "malformed answer"),
    "a stream reset": (reset, None, "reset the stream"),
    "a GOAWAY, then a close during the call": (goaway_mid_call, None, "closed|reset"),
    "etcd unavailable": (answer_with(None, None, [*OK_HEAD, (b"grpc-status", b"14"),
                                                  (b"grpc-message", b"etcdserver%3A%20leader%20changed")]),
                         None, "unavailable: etcdserver: leader changed"),
}


@pytest.mark.parametrize("name", list(BROKEN_ANSWERS))
def test_anything_but_etcds_grpc_is_store_unavailable(fake, name):
    answer, raw, match = BROKEN_ANSWERS[name]
    srv = fake(answer, raw)
    reg = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, timeout=3)
    try:
        for _ in range(2):   # and again (a fresh connection after a broken one)
            with pytest.raises(errors.StoreUnavailable, match=match) as got:
                reg.get_config()
            assert not isinstance(got.value, registry_mod._Reauthenticate)
        assert reg._mode == "h2" and reg._client is None
    finally:
        reg.close()


def test_the_request_is_grpc_and_a_good_answer_and_an_error_status_are_read(fake):
    """What we send is what grpcio sends (HEADERS for a gRPC unary call, the token as metadata);
    a trailers-only error keeps its code and percent-decoded message."""
    srv = fake(answer_with(message(CONFIG_KV), STATUS_0))
    reg = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, timeout=3)
    try:
        assert reg.get_config() == CONFIG
        assert reg.get_config() == CONFIG
        assert srv.connections == 1
        head = srv.requests[0]
        assert head[b":method"] == b"POST" and head[b":path"] == b"/etcdserverpb.KV/Range"
        assert head[b":scheme"] == b"http" and head[b":authority"] == f"127.0.0.1:{srv.port}".encode()
        assert head[b"content-type"] == b"application/grpc" and head[b"te"] == b"trailers"
        assert head[b"grpc-timeout"] == b"3000m" or head[b"grpc-timeout"].endswith(b"m")
        srv.answer = answer_with(None, None, [*OK_HEAD, (b"grpc-status", b"7"),
                                              (b"grpc-message", b"etcdserver%3A permission denied")])
        with pytest.raises(errors.PermissionDenied, match="etcdserver: permission denied"):
            reg.get_config()
    finally:
        reg.close()


def test_a_goaway_on_the_kept_connection_between_calls_is_replaced(fake):
    """The server says GOAWAY (and closes) after answering: the next call notices before sending
    and connects again, within the call."""
    good = answer_with(message(CONFIG_KV), STATUS_0)

    def answer_then_go_away(conn: h2.connection.H2Connection, sid: int) -> None:
        good(conn, sid)
        conn.close_connection(last_stream_id=sid)
    srv = fake(answer_then_go_away)
    reg = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, timeout=3)
    try:
        for i in range(1, 4):
            assert reg.get_config() == CONFIG
            wait_for(lambda n=i: srv.connections == n, timeout=10)
        assert reg._h2_unary[0].connections == 3
    finally:
        reg.close()


def test_a_connection_that_breaks_during_the_answer_is_not_asked_again(fake):
    """Headers of the answer arrived, then the connection closed: etcd had the call (it may have
    been applied), so it is an outage, not a stale connection to send it again on."""
    good = answer_with(message(CONFIG_KV), STATUS_0)
    calls: list[int] = []

    def second_breaks(conn: h2.connection.H2Connection, sid: int) -> None:
        calls.append(sid)
        if len(calls) == 1:
            good(conn, sid)
        else:
            goaway_mid_call(conn, sid)
    srv = fake(second_breaks)
    reg = EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, timeout=3)
    try:
        assert reg.get_config() == CONFIG
        with pytest.raises(errors.StoreUnavailable, match=r"closed during the answer|reset"):
            reg.get_config()
        assert len(calls) == 2, "the broken call was sent again"
        assert srv.connections == 1
    finally:
        reg.close()
