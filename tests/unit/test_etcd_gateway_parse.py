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


def test_the_chunked_body_reader_keeps_its_place_across_socket_timeouts():
    """Lines split across chunks, chunk heads split across recvs, and a socket timeout in the
    middle of a line (the liveness probe's wake-up): nothing is lost or repeated."""
    a, b = socket.socketpair()
    try:
        a.settimeout(0.05)
        body = gateway._Body(a, b"5\r\nhel", True, 1000)
        b.sendall(b"lo\r\n")
        wakeups: list[int] = []

        def on_timeout() -> None:   # the wake-up: send the rest of the line only now
            wakeups.append(1)
            if len(wakeups) == 1:
                b.sendall(b"4;ext=1\r\n wor\r\n3\r\nld\n\r\n6\r\nsecond\r\n2\r\n!\n\r\n0\r\n\r\n")
        assert body.readline(on_timeout) == b"hello world\n"
        assert len(wakeups) == 1
        assert body.readline(on_timeout) == b"second!\n"
        assert body.readline(on_timeout) == b""   # the last chunk: the body ended
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("data", [b"zz\r\nab\r\n", b"-1\r\n", b"0x5\r\nhello\r\n", b"3\r\nabcXY", b"1" * 2000])
def test_a_malformed_chunk_is_a_value_error(data):
    a, b = socket.socketpair()
    try:
        a.settimeout(1)
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        body = gateway._Body(a, b"", True, 1000)
        with pytest.raises(ValueError):
            body.readline(lambda: None)
    finally:
        a.close()
        b.close()


def test_a_long_line_is_returned_unfinished_and_not_buffered_further():
    a, b = socket.socketpair()
    try:
        a.settimeout(1)
        b.sendall(b"%x\r\n%s\r\n" % (3000, b"x" * 3000))
        line = gateway._Body(a, b"", True, 1000).readline(lambda: None)
        assert len(line) > 1000 and not line.endswith(b"\n")
    finally:
        a.close()
        b.close()
