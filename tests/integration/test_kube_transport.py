"""The kube client's own transport (no ``kubernetes`` package): errors as the caller sees them,
headers, TLS, and which transport an agent ends up with.

The stand-in API server speaks plain HTTP, so ``TLSFront`` (Python's ``ssl`` server) terminates
TLS in front of it — with a server certificate from a test CA made by openssl, and, when asked,
requiring a client certificate from that CA — and forwards the bytes. Everything else is real:
the stand-in, the kube client and manager, the LeaseWatcher.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, ClassVar

import pytest

from flannel import errors
from flannel.lab.kubeapi import KubeAPIServer
from flannel.lease import LeaseAttrs
from flannel.subnet_managers.kube import KubeSubnetManager
from flannel.subnet_managers.kube import kubeconfig as kcfg
from flannel.subnet_managers.kube.client import END, Expired, KubeClient, NotFound
from tests.support import Follower, acquire, make_env, make_pki, wait_for

TOKEN = "tls-test-token"
P = "flannel.alpha.coreos.com/"
REPO = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA; a server certificate for 127.0.0.1; one only for the name kube.example; a client
    certificate; and another CA with its own client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"), (
        ("server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("named", "ca", "subjectAltName=DNS:kube.example\nextendedKeyUsage=serverAuth"),
        ("client", "ca", "extendedKeyUsage=clientAuth"),
        ("other-client", "other-ca", "extendedKeyUsage=clientAuth"),
    ))


class TLSFront:
    """TLS on 127.0.0.1:<port> in front of a plain-HTTP server on ``target_port``. Records the
    common name of each client certificate and each failed handshake."""

    def __init__(self, target_port: int, pki: Path, *, cert: str = "server", client_ca: bool = True) -> None:
        self.target_port = target_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
        if client_ca:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(str(pki / "ca.crt"))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.client_names: list[str] = []
        self.handshake_errors: list[str] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="tls-front", daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="tls-front-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            with self._lock:
                self.handshake_errors.append(str(e))
            conn.close()
            return
        peer = tls.getpeercert() or {}
        with self._lock:
            self.client_names += [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
        up = socket.create_connection(("127.0.0.1", self.target_port))
        with self._lock:
            self._socks += [tls, up]
        # one thread per connection moves both directions: an SSL socket is not read and written
        # from two threads at once
        try:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, up], [], [], 1.0)[0]
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (up if s is tls else tls).sendall(data)
        except (OSError, ssl.SSLError):
            return
        finally:
            for s in (tls, up):
                s.close()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def server():
    srv = KubeAPIServer(token=TOKEN, bookmark_interval=1.0).start()
    yield srv
    srv.stop()


@pytest.fixture
def fronts():
    made: list[TLSFront] = []

    def make(*a: Any, **kw: Any) -> TLSFront:
        made.append(TLSFront(*a, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def kubeconfig(path: Path, server: str, cluster: dict[str, Any], user: dict[str, Any]) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "tls",
        "clusters": [{"name": "tls", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "tls", "user": user}],
        "contexts": [{"name": "tls", "context": {"cluster": "tls", "user": "tls"}}]}))
    return str(path)


def b64file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def vxlan_attrs(i: int) -> LeaseAttrs:
    bd = json.dumps({"VNI": 1, "VtepMAC": f"aa:bb:cc:00:00:{i:02x}"}, separators=(",", ":"))
    return LeaseAttrs(public_ip=IPv4Address(f"198.18.0.{i}"), backend_type="vxlan", backend_data=bd)


def remote_annotations(i: int) -> dict[str, str]:
    a = vxlan_attrs(i)
    return {P + "kube-subnet-manager": "true", P + "backend-type": "vxlan", P + "backend-data": a.backend_data,
            P + "public-ip": str(a.public_ip)}


def test_the_manager_works_over_tls_with_a_client_certificate(server, fronts, pki, tmp_path):
    """CA by a relative file name, the client certificate and key as -data, the token as well:
    lease, annotations, list and watch all go through TLS with the client certificate."""
    front = fronts(server.port, pki)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    path = kubeconfig(conf / "kubeconfig", front.url, {"certificate-authority": "ca.crt"},
                      {"client-certificate-data": b64file(pki / "client.crt"),
                       "client-key-data": b64file(pki / "client.key"), "token": TOKEN})
    env = make_env(server, str(tmp_path))
    server.add_node("me", ["10.244.1.0/24"])
    server.add_node("n2", ["10.244.2.0/24"], annotations=remote_annotations(2))
    m = KubeSubnetManager(env.options(kubeconfig_file=path), node_name="me")
    f: Follower | None = None
    try:
        own = acquire(m, vxlan_attrs(1))
        assert str(own.subnet) == "10.244.1.0/24"
        assert server.get_node("me")["metadata"]["annotations"][P + "public-ip"] == "198.18.0.1"
        f = Follower(m, own).start()
        f.wait_peers(lambda p: set(p) == {"10.244.2.0/24"}, "n2 listed over TLS")
        server.add_node("n3", ["10.244.3.0/24"], annotations=remote_annotations(3))
        f.wait_peers(lambda p: set(p) == {"10.244.2.0/24", "10.244.3.0/24"}, "n3 watched over TLS")
        assert m.name.endswith(f"(API server {front.url})")
    finally:
        if f is not None:
            assert f.close(), "watch_leases did not honour stop"
        m.close()
    assert front.client_names and set(front.client_names) == {"flannel-test-client"}
    assert front.handshake_errors == []


def _client(path: str) -> KubeClient:
    return KubeClient(kubeconfig_file=path)


def test_a_server_certificate_from_another_ca_is_refused(server, fronts, pki, tmp_path):
    front = fronts(server.port, pki, client_ca=False)
    path = kubeconfig(tmp_path / "kc", front.url, {"certificate-authority": str(pki / "other-ca.crt")},
                      {"token": TOKEN})
    c = _client(path)
    with pytest.raises(errors.StoreUnavailable, match="certificate verify failed"):
        c.get_node("me")
    c.close()


def test_without_the_client_certificate_the_server_refuses_the_handshake(server, fronts, pki, tmp_path):
    server.add_node("me", ["10.244.1.0/24"])
    front = fronts(server.port, pki)
    for user in ({"token": TOKEN},
                 {"client-certificate": str(pki / "other-client.crt"), "client-key": str(pki / "other-client.key")}):
        c = _client(kubeconfig(tmp_path / "kc", front.url, {"certificate-authority-data": b64file(pki / "ca.crt")},
                               user))
        with pytest.raises(errors.StoreUnavailable, match=r"API server unreachable: get nodes 'me'"):
            c.get_node("me")
        c.close()
    # TLS 1.3: the client may see the refusal before the server's thread has recorded it
    wait_for(lambda: len(front.handshake_errors) == 2, what="both handshakes refused")
    assert front.client_names == []


def test_tls_server_name_checks_the_certificate_against_that_name(server, fronts, pki, tmp_path):
    """The certificate names only kube.example; we connect to 127.0.0.1."""
    server.add_node("me", ["10.244.1.0/24"])
    front = fronts(server.port, pki, cert="named", client_ca=False)
    cluster = {"certificate-authority": str(pki / "ca.crt")}
    wrong = _client(kubeconfig(tmp_path / "kc1", front.url, cluster, {"token": TOKEN}))
    with pytest.raises(errors.StoreUnavailable, match=r"certificate verify failed|doesn't match|mismatch"):
        wrong.get_node("me")
    wrong.close()
    right = _client(kubeconfig(tmp_path / "kc2", front.url, {**cluster, "tls-server-name": "kube.example"},
                               {"token": TOKEN}))
    assert right.get_node("me")["metadata"]["name"] == "me"
    right.close()
    insecure = _client(kubeconfig(tmp_path / "kc3", front.url, {"insecure-skip-tls-verify": True}, {"token": TOKEN}))
    assert insecure.get_node("me")["metadata"]["name"] == "me"
    insecure.close()


def test_in_cluster_the_rotated_service_account_token_is_picked_up(server, fronts, pki, tmp_path, monkeypatch):
    """The kubelet rewrites the token file; the API server stops accepting the old token. The
    client re-reads the file (every TOKEN_REFRESH seconds, shortened here) and carries on."""
    server.add_node("me", ["10.244.1.0/24"])
    front = fronts(server.port, pki, client_ca=False)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    (sa / "token").write_text(TOKEN + "\n")
    monkeypatch.setattr(kcfg, "SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setattr(kcfg, "TOKEN_REFRESH", 0.5)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(front.port))
    c = KubeClient()
    try:
        assert c.get_node("me")["metadata"]["name"] == "me"
        assert c.host == front.url
        (sa / "token.new").write_text("rotated-token")
        os.replace(sa / "token.new", sa / "token")
        server.token = "rotated-token"

        def accepted() -> bool:
            try:
                return c.get_node("me")["metadata"]["name"] == "me"
            except errors.PermissionDenied:
                return False
        wait_for(accepted, what="the rotated token to be used", timeout=30)
    finally:
        c.close()


# ---- errors and headers over plain HTTP ----------------------------------------------------------------

def test_http_statuses_become_the_errors_the_manager_acts_on(server, tmp_path):
    env = make_env(server, str(tmp_path))
    server.add_node("me", ["10.244.1.0/24"])
    c = KubeClient(kubeconfig_file=env.kubeconfig)
    try:
        with pytest.raises(NotFound, match="get nodes 'ghost': not found"):
            c.get_node("ghost")
        server.deny("patch", "nodes/status")
        with pytest.raises(errors.PermissionDenied) as info:
            c.patch_node_status("me", {"metadata": {"annotations": {"a": "b"}}})
        assert 'verb "patch" on resource "nodes/status"' in str(info.value) and "ClusterRole" in str(info.value)
        assert 'server said: nodes "me" is forbidden' in str(info.value)
        server.deny("watch", "nodes")
        with c.watch_nodes("1", timeout_seconds=30) as w, pytest.raises(errors.PermissionDenied, match="watch nodes"):
            w.get(30.0)
        server.allow("watch", "nodes")
        rv = server.compact()
        with c.watch_nodes(str(rv - 1), timeout_seconds=30) as w, pytest.raises(Expired, match="410"):
            w.get(30.0)
        with c.watch_nodes(str(rv), timeout_seconds=3) as w:
            server.add_node("n2", ["10.244.2.0/24"])
            assert w.get(30.0) == ("ADDED", server.get_node("n2"))
            rest = []
            while (item := w.get(30.0)) not in (END, None) and len(rest) < 20:
                rest.append(item)
            assert item is END, "the server ends the watch at timeoutSeconds"
            assert {t for t, _ in rest} <= {"BOOKMARK"}
        server.token = "another-token"
        with pytest.raises(errors.PermissionDenied, match="401 Unauthorized"):
            c.get_node("me")
    finally:
        c.close()
    refused = KubeClient(api_url=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(errors.StoreUnavailable, match=r"API server unreachable: list nodes: .*refused"):
        list(refused.list_node_pages())
    refused.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        data = json.dumps({"kind": "Node", "metadata": {"name": "me"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture
def recorder():
    _Recorder.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, _Recorder.seen
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("user, auth", [
    ({"username": "admin", "password": "pa:ss"}, "Basic " + base64.b64encode(b"admin:pa:ss").decode()),
    ({"token": "tok"}, "Bearer tok"),
    ({}, None),
])
def test_credentials_headers_and_a_server_path_prefix(recorder, tmp_path, user, auth):
    """A server URL with a path (a proxying front such as Rancher's) keeps it; names are escaped."""
    srv, seen = recorder
    url = f"http://127.0.0.1:{srv.server_address[1]}/k8s/clusters/c-1"
    c = KubeClient(kubeconfig_file=kubeconfig(tmp_path / "kc", url, {}, user))
    assert c.get_node("me")["metadata"]["name"] == "me"
    c.get_pod("kube-flannel", "flannel ds/x")
    c.close()
    assert [p for p, _ in seen] == ["/k8s/clusters/c-1/api/v1/nodes/me",
                                    "/k8s/clusters/c-1/api/v1/namespaces/kube-flannel/pods/flannel%20ds%2Fx"]
    headers = seen[0][1]
    assert headers.get("authorization") == auth
    assert headers["accept"] == "application/json" and headers["user-agent"].startswith("flannel/")


# ---- which transport an agent ends up with ---------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from ipaddress import IPv4Address
    from flannel.options import AgentOptions
    from flannel.lease import LeaseAttrs
    from flannel.subnet_managers.kube import KubeSubnetManager
    opts = AgentOptions(subnet_manager="kube", kubeconfig_file=sys.argv[1], net_config_path=sys.argv[2])
    m = KubeSubnetManager(opts, node_name="me")
    config = m.get_network_config()
    lease = m.acquire_lease(config, LeaseAttrs(public_ip=IPv4Address("198.18.0.1"), backend_type="vxlan",
                                               backend_data='{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:01"}'))
    nodes = sum(len(page) for page, _ in m._client.list_node_pages())
    m.close()
    loaded = sorted(n for n in sys.modules if n == "kubernetes" or n.startswith("kubernetes."))
    print(json.dumps({"subnet": str(lease.subnet), "nodes": nodes, "kubernetes": loaded}))
""")


def _probe(kubeconfig_path: str, net_conf: str) -> tuple[dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, kubeconfig_path, net_conf], capture_output=True, text=True,
                          timeout=120, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_plain_kubeconfig_never_imports_the_kubernetes_package(server, tmp_path):
    """Issue 9 item 3 (RSS): ``import kubernetes`` costs ~22 MB; an agent with a token kubeconfig
    gets its lease, publishes its annotations and lists the nodes without it."""
    env = make_env(server, str(tmp_path))
    server.add_node("me", ["10.244.1.0/24"])
    server.add_node("n2", ["10.244.2.0/24"], annotations=remote_annotations(2))
    out, log = _probe(env.kubeconfig, env.net_conf)
    assert out == {"subnet": "10.244.1.0/24", "nodes": 2, "kubernetes": []}
    assert "using the kubernetes client package" not in log


def test_an_exec_credential_plugin_falls_back_to_the_package_and_works(server, tmp_path):
    """A user ``exec`` plugin (what EKS/GKE kubeconfigs use) is the package's: the agent logs why
    and gets its token from the plugin through it."""
    plugin = tmp_path / "credential-plugin"
    plugin.write_text("#!/bin/sh\necho '" + json.dumps({
        "apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
        "status": {"token": TOKEN}}) + "'\n")
    plugin.chmod(0o755)
    env = make_env(server, str(tmp_path))
    path = kubeconfig(tmp_path / "exec-kubeconfig", server.url, {}, {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin)}})
    server.add_node("me", ["10.244.1.0/24"])
    out, log = _probe(path, env.net_conf)
    assert out["subnet"] == "10.244.1.0/24" and out["nodes"] == 1
    assert "kubernetes" in out["kubernetes"]
    assert "using the kubernetes client package" in log and "uses exec" in log
