"""The kube client adapter: error mapping at the boundary and client configuration (no server)."""

from __future__ import annotations

import json

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from flannel import errors
from flannel.lab.kubeapi.kubeconfig import write_kubeconfig
from flannel.records import SkippedRecords
from flannel.subnet_managers.kube import client as kc
from flannel.subnet_managers.kube import skips


def raised(exc: BaseException, verb: str = "patch", resource: str = "nodes/status", name: str = "n1") -> BaseException:
    with pytest.raises(errors.FlannelError) as info, kc._mapped(verb, resource, name):
        raise exc
    return info.value


def test_403_names_verb_resource_and_the_clusterrole():
    e = raised(ApiException(status=403, reason="Forbidden"))
    assert isinstance(e, errors.PermissionDenied)
    assert 'verb "patch" on resource "nodes/status"' in str(e) and "ClusterRole" in str(e) and "'n1'" in str(e)


@pytest.mark.parametrize("status, cls", [
    (401, errors.PermissionDenied), (404, kc.NotFound), (410, kc.Expired), (429, errors.StoreUnavailable),
    (500, errors.StoreUnavailable), (503, errors.StoreUnavailable), (0, errors.StoreUnavailable),
    (422, errors.StoreError),
])
def test_status_codes_map_to_what_the_caller_can_do(status, cls):
    assert type(raised(ApiException(status=status, reason="x"))) is cls


def test_transport_errors_are_store_unavailable_with_a_short_reason():
    cause = urllib3.exceptions.NewConnectionError(
        None, "Failed to establish a new connection: [Errno 111] Connection refused")
    e = raised(urllib3.exceptions.MaxRetryError(None, "/api/v1/nodes", cause), verb="list", resource="nodes", name="")
    assert isinstance(e, errors.StoreUnavailable)
    assert str(e) == ("API server unreachable: list nodes: "
                      "Failed to establish a new connection: [Errno 111] Connection refused")


def test_long_error_bodies_are_cut():
    e = raised(ApiException(status=400, reason="x" * 5000))
    assert len(str(e)) < 600


def test_watch_error_event_410_means_relist():
    with pytest.raises(kc.Expired, match="too old"):
        kc.NodeWatch._event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                          "message": "too old resource version: 5 (9)"}})
    with pytest.raises(errors.StoreUnavailable, match="500"):
        kc.NodeWatch._event({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}})
    assert kc.NodeWatch._event({"type": "ADDED", "object": {"a": 1}}) == ("ADDED", {"a": 1})


def test_kubeconfig_with_token_and_url_override(tmp_path):
    path = write_kubeconfig(str(tmp_path / "kc"), "http://198.18.0.254:6443", "tok")
    c = kc.build_api_client(kubeconfig_file=path)
    assert c.configuration.host == "http://198.18.0.254:6443"
    assert c.configuration.auth_settings()["BearerToken"]["value"] == "Bearer tok"
    c2 = kc.build_api_client(kubeconfig_file=path, api_url="http://198.18.0.253:8080/")
    assert c2.configuration.host == "http://198.18.0.253:8080"
    assert c2.configuration.auth_settings()["BearerToken"]["value"] == "Bearer tok"


def test_missing_kubeconfig_is_a_config_error(tmp_path):
    with pytest.raises(errors.ConfigError, match="cannot load Kubernetes client config from kubeconfig"):
        kc.build_api_client(kubeconfig_file=str(tmp_path / "missing"))


def test_outside_a_cluster_without_config_says_what_to_pass(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(errors.ConfigError, match="--kubeconfig-file or --kube-api-url"):
        kc.build_api_client()


def test_the_status_message_is_quoted_not_the_raw_json():
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
                       "message": 'nodes "n1" is forbidden: User "x" cannot patch resource "nodes/status"'})
    e = raised(ApiException(status=403, reason="Forbidden"))
    e2 = raised(_with_body(ApiException(status=403, reason="Forbidden"), body))
    assert str(e2).endswith('server said: nodes "n1" is forbidden: User "x" cannot patch resource "nodes/status"')
    assert "server said: Forbidden" in str(e)


def _with_body(exc: ApiException, body: str) -> ApiException:
    exc.body = body
    return exc


class FakeStream:
    """A urllib3 response whose body arrives in the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: int, decode_content: bool = True):
        yield from self.chunks

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_all(chunks: list[bytes], counter: SkippedRecords) -> list:
    watch = kc.NodeWatch(lambda: FakeStream(chunks), skipped=counter)
    out = []
    while True:
        item = watch.get(5.0)
        assert item is not None, "the reader thread stopped without ending the stream"
        if item is kc.END:
            return out
        out.append(item)


def event(name: str, rv: int) -> bytes:
    return json.dumps({"type": "MODIFIED", "object": {"metadata": {"name": name, "resourceVersion": str(rv)}}}).encode()


def test_garbage_lines_are_skipped_and_counted_and_later_events_still_arrive(monkeypatch, caplog):
    monkeypatch.setattr(kc, "MAX_EVENT_BYTES", 16384)
    deep = b'{"type":"ADDED","object":' + b"[" * 6000 + b"]" * 6000 + b"}"
    garbage = [
        b"this is not json",
        deep,                                            # RecursionError in the decoder
        b'{"type":"ADDED","object":{"metadata":{"name":"\xff\xfe"}}}',  # invalid UTF-8 in a string
        b"\xff\xfe\x00garbage",                       # not UTF-8 at all
        b"[1, 2, 3]",                                    # JSON, but not an event object
        b'{"type": "ADDED"}',                            # no object
        b'{"type": 7, "object": {}}',                    # type not a string
        b'{"type":"ADDED","object":{"x":"' + b"y" * 40000 + b'"}}',   # longer than MAX_EVENT_BYTES
    ]
    body = b"\n".join([event("a", 1), *garbage, event("b", 2)]) + b"\n"
    # deliver in awkward pieces: lines split across chunks
    chunks = [body[i:i + 777] for i in range(0, len(body), 777)]
    counter = skips.counter()
    got = read_all(chunks, counter)
    assert [(t, o["metadata"]["name"]) for t, o in got] == [("MODIFIED", "a"), ("MODIFIED", "b")]
    counts = counter.snapshot()
    assert counts.get(skips.TOO_DEEP) == 1
    assert counts.get(skips.TOO_LARGE) == 1
    assert counts.get(skips.MALFORMED_EVENT) == 3
    assert counts.get(skips.BAD_ENCODING) == 1
    assert counter.total == len(garbage)  # every garbage line counted once
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping watch line ")]
    assert "skipping watch line this is not json (undecodable-line): " in lines[0]
    assert all(len(line) < 500 for line in lines), "a bad line itself never reaches the log whole"


def test_a_trailing_line_without_newline_is_still_delivered():
    counter = skips.counter()
    got = read_all([event("a", 1) + b"\n" + event("b", 2)[:10], event("b", 2)[10:]], counter)
    assert [o["metadata"]["name"] for _, o in got] == ["a", "b"]
    assert counter.total == 0


def test_api_connections_use_tcp_keepalive():
    import socket

    opts = kc.keepalive_socket_options()
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in opts
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, kc.KEEPALIVE[0]) in opts
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in opts  # urllib3's default kept
    cfg = kc.build_api_client(api_url="http://127.0.0.1:1").configuration
    assert cfg.socket_options == opts
    # a dead peer is given up well within a minute
    idle, interval, count = kc.KEEPALIVE
    assert idle + interval * count <= 45 and kc.WATCH_READ_TIMEOUT < 300
