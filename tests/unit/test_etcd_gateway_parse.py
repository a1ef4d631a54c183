"""gateway.py's pure parts: one line of etcd's JSON watch stream → a Response, everything malformed
→ StoreUnavailable (never ValueError, KeyError, ...); the socket's keepalive options."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from flannel import errors
from flannel.subnet_managers.etcd import gateway


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_response_with_a_put_and_a_delete():
    line = json.dumps({"result": {"header": {"revision": "12"}, "events": [
        {"kv": {"key": b64(b"/k/a"), "value": b64(b"\x00\xffv"), "mod_revision": "11", "lease": "7587"}},
        {"type": "DELETE", "kv": {"key": b64(b"/k/b"), "mod_revision": "12"}}]}}).encode() + b"\n"
    r = gateway.parse_response(line, "here")
    assert r.revision == 12 and not r.created and not r.canceled and r.compact_revision == 0
    assert r.events == ((False, b"/k/a", b"\x00\xffv", 11, 7587), (True, b"/k/b", b"", 12, 0))


def test_creation_cancellation_and_compaction_fields():
    r = gateway.parse_response(b'{"result":{"header":{"revision":"3"},"watch_id":"-1","created":true,'
                               b'"canceled":true,"cancel_reason":"etcdserver: permission denied"}}', "here")
    assert r.created and r.canceled and r.cancel_reason == "etcdserver: permission denied"
    r = gateway.parse_response(b'{"result":{"header":{},"canceled":true,"compact_revision":"5"}}', "here")
    assert r.compact_revision == 5 and r.revision == 0


def test_an_error_object_is_a_gateway_error_with_its_grpc_code():
    with pytest.raises(gateway.GatewayError) as exc:
        gateway.parse_response(b'{"error":{"grpc_code":16,"http_code":401,"message":"invalid auth token"}}', "here")
    assert exc.value.code == 16 and exc.value.message == "invalid auth token"
    assert isinstance(exc.value, errors.StoreError)


@pytest.mark.parametrize("line", [
    b"", b"{", b"null", b"[]", b'"text"', b"{}", b'{"result": 3}', b'{"result": {"header": 5}}',
    b'{"result": {"header": {"revision": "x"}}}', b'{"result": {"events": 3}}',
    b'{"result": {"events": [{"kv": {"key": "!!", "mod_revision": "1"}}]}}',
    b'{"result": {"events": [{"kv": {"key": "YQ=", "mod_revision": "1"}}]}}',
    b'{"result": {"events": [{"kv": {"key": 5, "mod_revision": "1"}}]}}',
    b'{"result": {"events": [{"kv": {"key": "YQ=="}}]}}',
    b'{"result": {"events": [{"type": "BOOM", "kv": {"key": "YQ==", "mod_revision": "1"}}]}}',
    b'{"result": {"events": [{"type": []}]}}',
    b'{"error": "not an object"}',
    b"\xff\xfe garbage",
    b"[" * 100000,
])
def test_anything_malformed_is_store_unavailable(line):
    with pytest.raises(errors.StoreUnavailable, match="here: malformed watch response"):
        gateway.parse_response(line, "here")


def test_keepalive_options_follow_time_and_timeout():
    s = socket.socket()
    try:
        gateway._set_keepalive(s, gateway.Keepalive(idle=30, timeout=10))
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 40000
    finally:
        s.close()
