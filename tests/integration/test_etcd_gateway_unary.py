"""The registry's unary calls through etcd's JSON gateway (gateway.Unary, forced here by
$FLANNEL_ETCD_TRANSPORT=gateway), against a real etcd: grpc/pyetcd never imported but with the grpc transport,
a kept connection that went stale is replaced, a timeout is never retried, a too-large answer is refused
without being read past the bound, a listing restarts over a compaction, a failed endpoint is left for the
next, a malformed answer is StoreUnavailable, and an endpoint without the gateway makes everything fall back
to gRPC."""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel import errors, wire
from flannel.lab.etcd import free_port
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.etcd import gateway
from flannel.subnet_managers.etcd import registry as registry_mod
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from tests.support import FreezableProxy, GatewayProxy

pytestmark = pytest.mark.etcd


@pytest.fixture(autouse=True)
def gateway_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unary calls through the JSON gateway (the default is gRPC over h2: test_etcd_h2.py)."""
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, "gateway")

PREFIX = "/coreos.com/network"
SUBNETS = PREFIX + "/subnets/"
CONFIG = '{ "Network": "10.1.0.0/16", "Backend": { "Type": "host-gw" } }'
REPO = Path(__file__).resolve().parents[2]


def attrs(ip: str) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip))


def raw_put(reg: EtcdRegistry, key: str, value: bytes) -> None:
    reg._call("test put", lambda c: c.put(key.encode(), value))


# -- grpc is not imported ---------------------------------------------------------------------------

USE_THE_REGISTRY = r'''
import json, sys
from ipaddress import IPv4Address, IPv4Network
import flannel.daemon, flannel.ctl   # the agent's and flannelctl's module graphs
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd.registry import EtcdRegistry
endpoint, prefix, config = sys.argv[1:4]
reg = EtcdRegistry(endpoints=[endpoint], prefix=prefix)
reg.put_config(config)
assert reg.get_config() == config
listing = reg.list_leases(ttl=True)
sn = IPv4Network("10.1.5.0/24")
reg.create_lease(sn, None, LeaseAttrs(public_ip=IPv4Address("1.2.3.4")), 600)
stored = reg.get_lease(sn, None)
reg.renew_lease(sn, None, stored.lease.attrs, 600, mod_revision=stored.mod_revision)
handle = reg.watch_leases(listing.revision + 1)
chunk = handle.next()
handle.cancel()
reg.delete_lease(sn, None)
reg.close()
print(json.dumps({"grpc": "grpc" in sys.modules, "pyetcd": "pyetcd" in sys.modules,
                  "handle": type(handle).__name__, "events": [str(e.lease.subnet) for e in chunk.events]}))
'''


def run_registry(etcd_server: Any, env: dict[str, str]) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if k not in (registry_mod.TRANSPORT_ENV, registry_mod.WATCH_ENV)}
    out = subprocess.run([sys.executable, "-c", USE_THE_REGISTRY, etcd_server.endpoint, PREFIX, CONFIG],
                         env={**clean, **env}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("env", [{}, {registry_mod.TRANSPORT_ENV: "h2"}, {registry_mod.TRANSPORT_ENV: "gateway"},
                                 {registry_mod.TRANSPORT_ENV: "grpc"}, {registry_mod.WATCH_ENV: "grpc"}],
                         ids=["default (h2)", "transport=h2", "transport=gateway", "transport=grpc",
                              "watch=grpc (the older name)"])
def test_grpc_and_pyetcd_are_imported_only_for_the_grpc_transport(etcd_server, env):
    """Config, listing (with TTLs), create, read, renew, watch, delete: as gRPC over our HTTP/2
    client (the default) or through the gateway, without ever importing grpc or pyetcd (their C
    library alone is ~10 MB of the agent's RSS); forcing grpcio (by either name) does import them,
    and works the same."""
    got = run_registry(etcd_server, env)
    assert got["events"] and set(got["events"]) == {"10.1.5.0/24"}   # the create (and maybe the renewal)
    if "grpc" in env.values():
        assert got["grpc"] and got["pyetcd"] and got["handle"] == "_Stream"
    else:
        assert not got["grpc"] and not got["pyetcd"] and got["handle"] == "_GatewayStream"


def test_the_transport_switch_is_checked_and_the_new_name_wins(monkeypatch):
    monkeypatch.delenv(registry_mod.TRANSPORT_ENV)
    assert registry_mod.transport_mode() == "h2"
    monkeypatch.setenv(registry_mod.WATCH_ENV, "grpc")
    assert registry_mod.transport_mode() == "grpc"
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, "gateway")
    assert registry_mod.transport_mode() == "gateway"
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, "h2")
    assert registry_mod.transport_mode() == "h2"
    monkeypatch.setenv(registry_mod.TRANSPORT_ENV, "http2")
    with pytest.raises(errors.UsageError, match="FLANNEL_ETCD_TRANSPORT: 'http2'"):
        registry_mod.transport_mode()


@pytest.mark.parametrize(("prefix", "end"), [(b"/a/", b"/a0"), (b"a\xff", b"b"), (b"\xff\xff", b"\0"), (b"", b"\0")])
def test_prefix_range_end(prefix, end):
    assert registry_mod._prefix_range_end(prefix) == end


# -- the kept connection ----------------------------------------------------------------------------

def test_a_kept_connection_closed_by_the_server_is_replaced_within_the_call(etcd_server):
    """etcd or a proxy closes the idle kept connection: the next call notices (the request cannot
    be sent, or the answer is a close) and asks again on a new connection, once, within the call."""
    proxy = GatewayProxy(*registry_mod._split_endpoint(etcd_server.endpoint)[:2])
    reg = EtcdRegistry(endpoints=[proxy.endpoint], prefix=PREFIX)
    try:
        reg.put_config(CONFIG)
        assert reg.get_config() == CONFIG
        unary = reg._gw_unary[0]
        assert unary.connections == 1, "two calls, one kept connection"
        with proxy._lock:
            socks = list(proxy._socks)
        for s in socks:   # the server side goes away (no request in flight)
            try:
                s.shutdown(2)
            except OSError:   # already shut down by the proxy (closing one end closes the other)
                pass
        for _ in range(3):
            assert reg.get_config() == CONFIG
        assert unary.connections == 2
        assert reg._mode == "gateway" and reg._client is None   # no fallback, no gRPC client
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


# -- failover ---------------------------------------------------------------------------------------

def test_a_refused_endpoint_is_left_for_the_next_and_the_next_call_starts_there(etcd_server):
    dead = f"http://127.0.0.1:{free_port()}"
    reg = EtcdRegistry(endpoints=[dead, etcd_server.endpoint], prefix=PREFIX, timeout=2)
    try:
        reg.put_config(CONFIG)
        assert reg._gw_next == 1
        assert reg._gw_unary[0].connections == 0 and reg._gw_unary[1].connections == 1
        assert reg.get_config() == CONFIG
        assert reg._gw_unary[1].connections == 1   # straight to the one that worked
    finally:
        reg.close()
    down = EtcdRegistry(endpoints=[dead], prefix=PREFIX, timeout=2)
    try:
        with pytest.raises(errors.StoreUnavailable, match="ConnectionRefused"):
            down.get_config()
    finally:
        down.close()


# -- too large, compaction --------------------------------------------------------------------------

def test_too_large_answers_over_the_gateway_shrink_pages_and_skip_one_value(etcd_server, monkeypatch):
    """A receive limit of 64 KiB: a page over it is asked for again with fewer keys, a value over
    it alone is skipped (counted) but occupies its subnet, and read keys-only by get_lease; no
    answer is read past the bound."""
    monkeypatch.setattr(registry_mod, "MAX_RECEIVE_BYTES", 64 * 1024)
    limit = registry_mod._gateway_line_limit()
    reads: list[int | None] = []
    real_read = http.client.HTTPResponse.read

    def read(self: http.client.HTTPResponse, amt: int | None = None) -> bytes:
        reads.append(amt)
        return real_read(self, amt)
    monkeypatch.setattr(http.client.HTTPResponse, "read", read)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        n = 12
        pad = json.dumps({"VNI": 1, "Pad": "p" * 8000})
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
        assert reads and all(amt is not None and amt <= limit + 1 for amt in reads), reads
    finally:
        reg.close()


def test_a_listing_whose_revision_is_compacted_between_pages_starts_over(etcd_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=registry_mod.__name__)
    monkeypatch.setattr(registry_mod, "LIST_PAGE_KEYS", 2)
    reg = EtcdRegistry(endpoints=[etcd_server.endpoint], prefix=PREFIX)
    try:
        for i in range(5):
            raw_put(reg, SUBNETS + f"10.1.{i}.0-24", wire.encode_attrs(attrs(f"198.18.0.{i + 1}")).encode())
        real_range = registry_mod._GatewayKV.range
        pages: list[int] = []

        def range_then_compact(self: Any, key: bytes, range_end: bytes, **kw: Any) -> gateway.RangeResult:
            pages.append(kw.get("revision", 0))
            result = real_range(self, key, range_end, **kw)
            if len(pages) == 1:   # between the first and the second page: a write, and a compaction past it
                etcd_server.etcdctl("put", SUBNETS + "10.1.9.0-24", wire.encode_attrs(attrs("198.18.0.9")))
                rev = real_range(self, b"x", b"").revision
                etcd_server.etcdctl("compact", str(rev))
            return result
        monkeypatch.setattr(registry_mod._GatewayKV, "range", range_then_compact)
        listing = reg.list_leases()
        assert sorted(str(x.subnet) for x in listing.leases) == sorted([f"10.1.{i}.0/24" for i in (*range(5), 9)])
        assert "listing again" in caplog.text
        # the first page read at the current revision, the second at the first's (compacted), then from scratch
        assert pages[0] == 0 and pages[1] > 0 and pages[2] == 0, pages
    finally:
        reg.close()


# -- malformed answers ------------------------------------------------------------------------------

class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers every POST with the server's ``body`` (200, JSON), or ``raw`` bytes as they are."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server: Any = self.server
        if server.raw is not None:
            self.wfile.write(server.raw)
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(server.body)))
        self.end_headers()
        self.wfile.write(server.body)

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture
def fake_gateway() -> Iterator[Any]:
    srv: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    srv.raw, srv.body = None, b"{}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


MALFORMED = {
    "not JSON": (None, b"<html>"),
    "a JSON list": (None, b"[1, 2]"),
    "bad base64": (None, b'{"kvs": [{"key": "!!!", "value": "eA==", "mod_revision": "3"}]}'),
    "a missing key": (None, b'{"kvs": [{"value": "eA=="}]}'),
    "a wrong type": (None, b'{"kvs": [{"key": "eA==", "mod_revision": {"a": 1}}]}'),
    "a truncated body": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                         b'{"kvs":', None),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_answer_is_store_unavailable(fake_gateway, name):
    fake_gateway.raw, body = MALFORMED[name]
    if body is not None:
        fake_gateway.body = body
    reg = EtcdRegistry(endpoints=[f"http://127.0.0.1:{fake_gateway.server_address[1]}"], prefix=PREFIX, timeout=2)
    try:
        with pytest.raises(errors.StoreUnavailable):
            reg.get_config()
        with pytest.raises(errors.StoreUnavailable):
            reg.list_leases()
        assert reg._mode == "gateway"
    finally:
        reg.close()


# -- fallback ---------------------------------------------------------------------------------------

def test_an_endpoint_without_the_gateway_falls_back_for_unary_calls_too(etcd_server, caplog):
    """The first unary call gets a 404: it and every later call and watch go through gRPC, said once."""
    caplog.set_level(logging.INFO, logger=registry_mod.__name__)
    proxy = GatewayProxy(*registry_mod._split_endpoint(etcd_server.endpoint)[:2], mode="404")
    reg = EtcdRegistry(endpoints=[proxy.endpoint], prefix=PREFIX)
    try:
        reg.put_config(CONFIG)
        assert reg._mode == "grpc" and reg._client is not None
        lease = reg.create_lease(IPv4Network("10.1.5.0/24"), None, attrs("1.2.3.4"), 600)
        stored = reg.get_lease(IPv4Network("10.1.5.0/24"), None)
        assert stored.lease is not None and stored.lease.attrs == lease.attrs
        assert reg.get_config() == CONFIG
        assert proxy.http_requests == 1, "the gateway was tried again after falling back"
        h = reg.watch_leases(1)
        h.cancel()
        assert type(h).__name__ == "_Stream"
        falls = [r for r in caplog.records if "does not serve its JSON gateway" in r.getMessage()]
        assert len(falls) == 1 and falls[0].levelno == logging.INFO
    finally:
        reg.close()
        proxy.close()
