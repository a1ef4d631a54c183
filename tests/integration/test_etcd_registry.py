"""registry.py against a real etcd: flannel's exact keys and bytes, create-if-absent, reservations,
watches, error conversion, username/password auth and TLS with client certificates."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import urllib.request
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from flannel import errors
from flannel.lab.etcd import EtcdServer
from flannel.lease import EventType, LeaseAttrs
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd.registry import EtcdRegistry
from tests.support import acquire

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = '{ "Network": "10.1.0.0/16", "Backend": { "Type": "host-gw" } }'
SN = IPv4Network("10.1.5.0/24")


def registry(srv: EtcdServer, **kw: str) -> EtcdRegistry:
    return EtcdRegistry(endpoints=[srv.endpoint], prefix=PREFIX, **kw)


def collect(handle, want: int, timeout: float = 10.0) -> list:  # type: ignore[no-untyped-def]
    events: list = []
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        chunk = handle.get(0.2)
        if chunk is not None:
            events.extend(chunk.events)
    return events


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
            assert handle.get(0.3) is None  # exactly one Added and one Removed
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

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server cert for 127.0.0.1 and a client cert, made by openssl."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=flannel-test-ca", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=flannel-test-{name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


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


def test_tls_with_client_certificate(pki, tmp_path):
    srv = TLSEtcdServer(str(tmp_path / "etcd"), extra_args=[
        "--cert-file", str(pki / "server.crt"), "--key-file", str(pki / "server.key"),
        "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth"])
    srv.pki = pki
    srv.start()
    try:
        tls = {"cafile": str(pki / "ca.crt"), "certfile": str(pki / "client.crt"), "keyfile": str(pki / "client.key")}
        reg = registry(srv, **tls)
        try:
            reg.put_config(CONFIG)
            assert reg.get_config() == CONFIG
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
        finally:
            both.close()
        # no client certificate: the server refuses the handshake
        nocert = registry(srv, cafile=str(pki / "ca.crt"))
        try:
            with pytest.raises(errors.StoreError):
                nocert.get_config()
        finally:
            nocert.close()
    finally:
        srv.close()


def test_expired_auth_token_is_renewed(tmp_path, caplog):
    """etcd's simple tokens expire (here after 1 s): the registry authenticates again by itself."""
    srv = EtcdServer(str(tmp_path / "etcd"), extra_args=["--auth-token", "simple", "--auth-token-ttl", "1"])
    srv.start()
    try:
        srv.etcdctl("put", f"{PREFIX}/config", CONFIG)
        srv.etcdctl("user", "add", "root:s3cret-pw")
        srv.etcdctl("auth", "enable")
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
    finally:
        srv.close()
