"""Our own client configuration loader (``subnet_managers/kube/kubeconfig.py``): each kubeconfig
field, data vs file, relative paths, in-cluster from a fake service-account directory, token
rotation, what falls back to the ``kubernetes`` package, and every broken input's error."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest

from flannel import errors
from flannel.subnet_managers.kube import client as kc
from flannel.subnet_managers.kube import kubeconfig as kcfg
from flannel.subnet_managers.kube.rest import NativeCoreV1
from tests.support import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Made by openssl: a CA and a client certificate signed by it."""
    return make_pki(tmp_path_factory.mktemp("pki"), (("client", "ca", "extendedKeyUsage=clientAuth"),), cas=("ca",))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write(path: Path, *, cluster: dict[str, Any] | None = None, user: dict[str, Any] | None = None,
          current: str = "ctx", extra_contexts: tuple[str, ...] = ()) -> str:
    """A kubeconfig with context ``ctx`` → cluster ``c`` + user ``u``, plus decoy contexts that point
    at another cluster/user (to show the current context is the one used)."""
    doc: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": "decoy", "cluster": {"server": "https://198.18.0.99:6443"}},
                     {"name": "c", "cluster": {"server": "https://198.18.0.1:6443", **(cluster or {})}}],
        "users": [{"name": "decoy", "user": {"token": "decoy-token"}}, {"name": "u", "user": user or {}}],
        "contexts": [{"name": name, "context": {"cluster": "decoy", "user": "decoy"}} for name in extra_contexts]
        + [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
    }
    path.write_text(json.dumps(doc))
    return str(path)


# ---- each field --------------------------------------------------------------------------------

def test_the_current_context_picks_cluster_and_user(tmp_path):
    cfg = kcfg.load_kubeconfig(write(tmp_path / "kc", user={"token": "t0k"}, extra_contexts=("other",)))
    assert cfg.server == "https://198.18.0.1:6443"
    assert cfg.token == "t0k" and cfg.source == f"kubeconfig {tmp_path / 'kc'}"
    cfg = kcfg.load_kubeconfig(write(tmp_path / "kc2", user={"token": "t0k"}, current="other",
                                     extra_contexts=("other",)))
    assert cfg.server == "https://198.18.0.99:6443" and cfg.token == "decoy-token"


def test_yaml_kubeconfig_as_kubectl_writes_it(tmp_path):
    (tmp_path / "kc").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: ctx\n"
        "clusters:\n- name: c\n  cluster:\n    server: https://10.96.0.1:443/\n    insecure-skip-tls-verify: true\n"
        "    tls-server-name: kubernetes.default.svc\n"
        "users:\n- name: u\n  user:\n    username: admin\n    password: pw\n"
        "contexts:\n- name: ctx\n  context: {cluster: c, user: u}\n")
    cfg = kcfg.load_kubeconfig(str(tmp_path / "kc"))
    assert cfg.server == "https://10.96.0.1:443"  # trailing slash dropped
    assert cfg.tls.insecure and cfg.tls.server_name == "kubernetes.default.svc"
    assert (cfg.username, cfg.password, cfg.token) == ("admin", "pw", "")


def test_relative_paths_are_resolved_against_the_kubeconfig_directory(tmp_path, pki):
    sub = tmp_path / "conf"
    sub.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (sub / name).write_bytes((pki / name).read_bytes())
    (sub / "tok").write_text("file-token\n")
    path = write(sub / "kc", cluster={"certificate-authority": "ca.crt"},
                 user={"client-certificate": "client.crt", "client-key": "./client.key", "tokenFile": "tok"})
    cfg = kcfg.load_kubeconfig(path)
    assert cfg.tls.ca_file == str(sub / "ca.crt")
    assert (cfg.tls.cert_file, cfg.tls.key_file) == (str(sub / "client.crt"), str(sub / "client.key"))
    assert cfg.token_file == str(sub / "tok") and cfg.token == "file-token"  # whitespace stripped
    ctx = kcfg.ssl_context(cfg)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c["subject"] == ((("commonName", "flannel-test-ca"),),) for c in ctx.get_ca_certs())


def test_absolute_paths_are_kept(tmp_path, pki):
    cfg = kcfg.load_kubeconfig(write(tmp_path / "kc", cluster={"certificate-authority": str(pki / "ca.crt")}))
    assert cfg.tls.ca_file == str(pki / "ca.crt")


def test_data_fields_are_decoded_and_win_over_files(tmp_path, pki):
    ca, cert, key = ((pki / n).read_bytes() for n in ("ca.crt", "client.crt", "client.key"))
    path = write(tmp_path / "kc",
                 cluster={"certificate-authority-data": b64(ca), "certificate-authority": "/nonexistent/ca"},
                 user={"client-certificate-data": b64(cert), "client-key-data": b64(key)})
    cfg = kcfg.load_kubeconfig(path)
    assert (cfg.tls.ca_data, cfg.tls.cert_data, cfg.tls.key_data) == (ca, cert, key)
    ctx = kcfg.ssl_context(cfg)  # the missing CA file is not read: the data wins
    assert any(c["subject"] == ((("commonName", "flannel-test-ca"),),) for c in ctx.get_ca_certs())
    assert not list(Path(tempfile.gettempdir()).glob("flannel-kube-*.pem")), "the temporary PEM files are removed"


def test_insecure_skip_tls_verify_turns_verification_off(tmp_path):
    cfg = kcfg.load_kubeconfig(write(tmp_path / "kc", cluster={"insecure-skip-tls-verify": True}))
    ctx = kcfg.ssl_context(cfg)
    assert cfg.tls.insecure and ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_the_url_flag_overrides_the_server_and_keeps_the_credentials(tmp_path):
    path = write(tmp_path / "kc", user={"token": "tok"})
    cfg = kcfg.load(kubeconfig_file=path, api_url="http://198.18.0.253:8080/", environ={})
    assert cfg.server == "http://198.18.0.253:8080" and cfg.token == "tok"
    cfg = kcfg.load(api_url="http://198.18.0.253:8080/", environ={})
    assert cfg.server == "http://198.18.0.253:8080" and cfg.token == "" and cfg.source == "--kube-api-url"


# ---- in-cluster ----------------------------------------------------------------------------------

@pytest.fixture
def sa_dir(tmp_path, pki) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text("sa-token-1")
    (d / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    return d


def test_in_cluster_from_the_service_environment_and_account_dir(sa_dir):
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    cfg = kcfg.load(environ=env, sa_dir=str(sa_dir))
    assert cfg.server == "https://10.96.0.1:443" and cfg.source == kcfg.IN_CLUSTER
    assert cfg.token == "sa-token-1" and cfg.token_file == str(sa_dir / "token")
    assert cfg.tls.ca_file == str(sa_dir / "ca.crt")
    v6 = kcfg.load_in_cluster(environ={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"},
                              sa_dir=str(sa_dir))
    assert v6.server == "https://[fd00::1]:443"


@pytest.mark.parametrize("env, broken, match", [
    ({}, None, "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"),
    ({"KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": "443"}, None, "is empty"),
    (None, "token", "No such file or directory: .*/token"),
    (None, "empty-token", "token file .*/token is empty"),
    (None, "ca.crt", "No such file or directory: .*/ca.crt"),
])
def test_in_cluster_errors_say_what_is_missing_and_what_to_pass(sa_dir, env, broken, match):
    if broken == "empty-token":
        (sa_dir / "token").write_text("\n")
    elif broken:
        (sa_dir / broken).unlink()
    env = env if env is not None else {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(errors.ConfigError, match=match) as info:
        kcfg.load(environ=env, sa_dir=str(sa_dir))
    assert str(info.value).startswith("cannot load Kubernetes client config from in-cluster service account: ")
    assert str(info.value).endswith("(outside a pod, pass --kubeconfig-file or --kube-api-url)")


# ---- token rotation ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_token_file_is_re_read_once_a_minute_and_a_failed_read_keeps_the_last_token(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("one")
    clock = Clock()
    src = kcfg.TokenSource("one", str(path), clock=clock)
    path.write_text("two\n")   # the kubelet rotated the token
    assert src.token() == "one", "not re-read before the refresh period"
    clock.now += kcfg.TOKEN_REFRESH - 1
    assert src.token() == "one"
    clock.now += 1
    assert src.token() == "two"
    path.unlink()
    clock.now += kcfg.TOKEN_REFRESH
    with caplog.at_level(logging.WARNING):
        assert src.token() == "two"
    assert "keeping the last token" in caplog.text and str(path) in caplog.text
    assert kcfg.TOKEN_REFRESH == 60.0  # client-go's and the kubernetes package's period


def test_a_fixed_token_is_never_read_from_disk():
    assert kcfg.TokenSource("fixed").token() == "fixed"


# ---- what falls back ------------------------------------------------------------------------------

@pytest.mark.parametrize("cluster, user, why", [
    ({}, {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}, "user 'u' uses exec"),
    ({}, {"auth-provider": {"name": "oidc", "config": {}}}, "user 'u' uses auth-provider"),
    ({}, {"token": "t", "as": "someone"}, "user 'u' uses as"),
    ({"proxy-url": "http://198.18.0.7:3128"}, {"token": "t"}, "cluster 'c' sets proxy-url"),
])
def test_what_only_the_package_implements_is_unsupported(tmp_path, cluster, user, why):
    with pytest.raises(kcfg.Unsupported, match=why):
        kcfg.load(kubeconfig_file=write(tmp_path / "kc", cluster=cluster, user=user), environ={})


def test_a_proxy_in_the_environment_falls_back_unless_the_server_bypasses_it(tmp_path, monkeypatch):
    path = write(tmp_path / "kc", user={"token": "t"})
    monkeypatch.setenv("HTTPS_PROXY", "http://198.18.0.7:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(kcfg.Unsupported, match="proxy"):
        kcfg.load(kubeconfig_file=path)
    monkeypatch.setenv("NO_PROXY", "198.18.0.1")
    assert kcfg.load(kubeconfig_file=path).server == "https://198.18.0.1:6443"


def test_connect_uses_our_transport_for_a_plain_kubeconfig_and_the_package_for_exec(tmp_path, caplog):
    native = kc.connect(kubeconfig_file=write(tmp_path / "kc", user={"token": "t"}))
    assert isinstance(native, NativeCoreV1) and native.host == "https://198.18.0.1:6443"
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "/bin/true"}}
    with caplog.at_level(logging.INFO, logger="flannel.subnet_managers.kube.client"):
        pkg = kc.connect(kubeconfig_file=write(tmp_path / "kc2", user=exec_user))
    from flannel.subnet_managers.kube.fallback import PackageCoreV1

    assert isinstance(pkg, PackageCoreV1) and pkg.host == "https://198.18.0.1:6443"
    assert "using the kubernetes client package" in caplog.text and "uses exec" in caplog.text
    pkg.close()
    native.close()


# ---- broken input --------------------------------------------------------------------------------

def _raw(tmp_path: Path, text: str) -> str:
    (tmp_path / "kc").write_text(text)
    return str(tmp_path / "kc")


def _doc(**over: Any) -> str:
    doc: dict[str, Any] = {"current-context": "ctx", "clusters": [{"name": "c", "cluster": {"server": "https://x"}}],
                           "users": [{"name": "u", "user": {}}],
                           "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}]}
    doc.update(over)
    return json.dumps(doc)


@pytest.mark.parametrize("text, why", [
    ("clusters: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "not a kubeconfig \\(a YAML list"),
    (_doc(**{"current-context": ""}), "no current-context is set"),
    (_doc(**{"current-context": "nope"}), "context 'nope' not found in contexts"),
    (_doc(contexts=[{"name": "ctx", "context": {"user": "u"}}]), "context 'ctx' names no cluster"),
    (_doc(clusters=[]), "cluster 'c' not found in clusters"),
    (_doc(users=[]), "user 'u' not found in users"),
    (_doc(clusters="c"), "clusters is not a list"),
    (_doc(clusters=[{"name": "c", "cluster": {}}]), "cluster 'c' has no server"),
    (_doc(clusters=[{"name": "c", "cluster": {"server": "198.18.0.1:6443"}}]), "is not an http\\(s\\) URL"),
    (_doc(clusters=[{"name": "c", "cluster": {"server": "https://x", "certificate-authority-data": "%%%"}}]),
     "cluster 'c': certificate-authority-data is not valid base64"),
    (_doc(users=[{"name": "u", "user": {"client-key-data": "bm90IGJhc2U2NA=!"}}]),
     "user 'u': client-key-data is not valid base64"),
    (_doc(users=[{"name": "u", "user": {"client-certificate-data": b64(b"x")}}]),
     "user 'u': a client certificate needs both"),
    (_doc(users=[{"name": "u", "user": {"token": "t", "username": "a", "password": "b"}}]),
     "more than one authentication method"),
    (_doc(users=[{"name": "u", "user": {"tokenFile": "missing-token"}}]),
     "user 'u': tokenFile: No such file or directory: .*missing-token"),
    (_doc(clusters=[{"name": "c", "cluster": {"server": "https://x", "insecure-skip-tls-verify": "yes"}}]),
     "insecure-skip-tls-verify is not true or false"),
    (_doc(clusters=[{"name": "c", "cluster": {"server": "https://x", "insecure-skip-tls-verify": True,
                                              "certificate-authority": "ca.crt"}}]),
     "certificate-authority and insecure-skip-tls-verify are both set"),
    (_doc(users=[{"name": "u", "user": {"token": 42}}]), "user 'u': token is not a string"),
])
def test_a_broken_kubeconfig_says_where_and_why(tmp_path, text, why):
    path = _raw(tmp_path, text)
    with pytest.raises(errors.ConfigError, match=why) as info:
        kcfg.load(kubeconfig_file=path, environ={})
    assert str(info.value).startswith(f"cannot load Kubernetes client config from kubeconfig {path}: ")


def test_an_unreadable_kubeconfig_is_a_config_error(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"No such file or directory: .*missing"):
        kcfg.load(kubeconfig_file=str(tmp_path / "missing"), environ={})
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(errors.ConfigError, match="cannot load Kubernetes client config from kubeconfig"):
        kcfg.load(kubeconfig_file=str(tmp_path / "bin"), environ={})


@pytest.mark.parametrize("cluster, user, why", [
    ({"certificate-authority": "nonexistent-ca.crt"}, {},
     "certificate-authority .*/nonexistent-ca.crt: .*No such file"),
    ({"certificate-authority-data": b64(b"not a certificate")}, {}, "certificate-authority-data: "),
    ({}, {"client-certificate-data": b64(b"not a cert"), "client-key-data": b64(b"not a key")},
     "client certificate \\(data\\) / key \\(data\\): "),
    ({}, {"client-certificate": "missing.crt", "client-key": "missing.key"},
     "client certificate .*/missing.crt / key .*/missing.key: .*No such file"),
])
def test_unloadable_certificates_are_config_errors_when_connecting(tmp_path, cluster, user, why):
    """The files and PEM data are parsed when the client is made (the first API call): the same
    ConfigError, naming the kubeconfig."""
    path = write(tmp_path / "kc", cluster=cluster, user=user)
    with pytest.raises(errors.ConfigError, match=why) as info:
        kc.connect(kubeconfig_file=path)
    assert str(info.value).startswith(f"cannot load Kubernetes client config from kubeconfig {path}: ")


def test_our_transport_uses_tcp_keepalive_and_never_retries_inside_urllib3():
    native = kc.connect(api_url="http://127.0.0.1:1")
    assert isinstance(native, NativeCoreV1)
    kw = native._pool.connection_pool_kw
    assert kw["socket_options"] == kc.keepalive_socket_options()
    assert kw["retries"].total is False  # urllib3's Retry.from_int(False)
    with pytest.raises(errors.StoreUnavailable, match=r"API server unreachable: get nodes 'n1': .*refused"), \
            kc._mapped("get", "nodes", "n1"):
        native.read_node("n1", _request_timeout=kc.REQUEST_TIMEOUT)
    native.close()
