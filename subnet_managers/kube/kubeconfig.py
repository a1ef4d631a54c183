"""Where the API server is and how to authenticate to it, loaded like client-go does, without the
``kubernetes`` package.

Why our own loader: ``import kubernetes`` loads every API and model module of the package (~22 MB of
RSS), and flannel needs only its configuration loading and five plain HTTP calls. This module covers
the configurations flannel meets in practice:

* **in-cluster** (the DaemonSet): ``KUBERNETES_SERVICE_HOST``/``_PORT``, the service account's
  ``token`` and ``ca.crt``. Bound service-account tokens rotate (the kubelet rewrites the file at 80 %
  of the token's life, ~1 h), so the token file is re-read at most once a minute
  (``TOKEN_REFRESH``), as client-go's ``cachingTokenSource`` and the ``kubernetes`` package do; a
  failed re-read keeps the last good token.
* **a kubeconfig file**: ``current-context`` → cluster (``server``, ``certificate-authority`` /
  ``-data``, ``insecure-skip-tls-verify``, ``tls-server-name``) and user (``client-certificate`` /
  ``-data`` + ``client-key`` / ``-data``, ``token``, ``tokenFile``, ``username``/``password``);
  relative paths are resolved against the kubeconfig's directory; ``-data`` wins over the file.

Anything else a kubeconfig can ask for (a user ``exec`` plugin or ``auth-provider``,
impersonation, a cluster ``proxy-url``, or a proxy in the environment) raises ``Unsupported``:
the client then falls back to the ``kubernetes`` package, which implements them.

A broken kubeconfig (unreadable, not YAML, a missing context/cluster/user, bad base64, an
unreadable certificate) is a ``ConfigError`` that says which file, which entry and why.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from flannel import errors

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: seconds between re-reads of a token file (client-go and the ``kubernetes`` package: 1 minute)
TOKEN_REFRESH = 60.0
IN_CLUSTER = "in-cluster service account"

#: kubeconfig user fields only the ``kubernetes`` package implements (exec plugins, auth providers,
#: impersonation): a user with one of them is served by the fallback
_FALLBACK_USER_KEYS = ("exec", "auth-provider", "as", "as-uid", "as-groups", "as-user-extra")
_FALLBACK_CLUSTER_KEYS = ("proxy-url",)


class Unsupported(Exception):
    """The configuration needs something only the ``kubernetes`` package implements (the reason
    is the message). Not a ``FlannelError``: it never leaves the kube client."""


@dataclass(frozen=True)
class TLS:
    """How to verify the server and prove who we are. ``*_data`` (PEM bytes) wins over ``*_file``."""

    ca_file: str = ""
    ca_data: bytes = b""
    insecure: bool = False
    server_name: str = ""
    cert_file: str = ""
    cert_data: bytes = b""
    key_file: str = ""
    key_data: bytes = b""


@dataclass(frozen=True)
class ClientConfig:
    """A loaded client configuration. ``source`` names it in messages (``kubeconfig <path>``,
    ``in-cluster service account``, ``--kube-api-url``). ``token_file`` wins over ``token`` (re-read
    every ``TOKEN_REFRESH`` seconds, as client-go's ``BearerTokenFile``)."""

    server: str
    source: str
    tls: TLS = TLS()
    token: str = ""
    token_file: str = ""
    username: str = ""
    password: str = ""


def _config_error(source: str, why: str, hint: str = "") -> errors.ConfigError:
    return errors.ConfigError(f"cannot load Kubernetes client config from {source}: {why}{hint}")


# ---- in-cluster ---------------------------------------------------------------------------------

def _join_host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host or "%" in host else f"{host}:{port}"


def load_in_cluster(*, environ: Mapping[str, str] = os.environ, sa_dir: str | None = None) -> ClientConfig:
    """The pod's service account (client-go's ``InClusterConfig``).

    :param sa_dir: where ``token`` and ``ca.crt`` are (default ``SERVICE_ACCOUNT_DIR``, looked up at
        call time so that tests can point it at a fake directory).
    :raises errors.ConfigError: not in a pod (no service env), or the token/CA cannot be read.
    """
    hint = " (outside a pod, pass --kubeconfig-file or --kube-api-url)"
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if host is None or port is None:
        raise _config_error(IN_CLUSTER, "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set", hint)
    if not host or not port:
        raise _config_error(IN_CLUSTER, "KUBERNETES_SERVICE_HOST or KUBERNETES_SERVICE_PORT is empty", hint)
    sa_dir = sa_dir or SERVICE_ACCOUNT_DIR
    token_file = os.path.join(sa_dir, "token")
    ca_file = os.path.join(sa_dir, "ca.crt")
    try:
        token = _read_token(token_file)
        with open(ca_file, "rb") as f:
            if not f.read().strip():
                raise ValueError(f"{ca_file} is empty")
    except (OSError, ValueError) as e:
        raise _config_error(IN_CLUSTER, _why(e), hint) from None
    return ClientConfig(server=f"https://{_join_host_port(host, port)}", source=IN_CLUSTER,
                        tls=TLS(ca_file=ca_file), token=token, token_file=token_file)


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or e}: {e.filename}"
    return str(e)


# ---- kubeconfig ---------------------------------------------------------------------------------

def load_kubeconfig(path: str) -> ClientConfig:
    """The current context of the kubeconfig at ``path`` (one file; no ``$KUBECONFIG`` merging).

    :raises errors.ConfigError: the file is unreadable or broken (what, where, why).
    :raises Unsupported: it asks for something only the ``kubernetes`` package implements.
    """
    source = f"kubeconfig {path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _config_error(source, _why(e)) from None
    import yaml  # here, not at import time: in-cluster agents never need it

    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise _config_error(source, f"not valid YAML: {str(e)[:300]}") from None
    if not isinstance(doc, dict):
        raise _config_error(source, f"not a kubeconfig (a YAML {type(doc).__name__}, not a mapping)")
    base = os.path.dirname(os.path.abspath(path))
    return _from_doc(doc, source, base)


def _from_doc(doc: dict[str, Any], source: str, base: str) -> ClientConfig:
    cluster_name, cluster, user_name, user = _current(doc, source)
    for key in _FALLBACK_CLUSTER_KEYS:
        if cluster.get(key):
            raise Unsupported(f"cluster {cluster_name!r} sets {key}")
    for key in _FALLBACK_USER_KEYS:
        if user.get(key):
            raise Unsupported(f"user {user_name!r} uses {key}")
    server = cluster.get("server")
    if not server or not isinstance(server, str):
        raise _config_error(source, f"cluster {cluster_name!r} has no server")
    if urlsplit(server).scheme not in ("http", "https"):
        raise _config_error(source, f"cluster {cluster_name!r}: server {server!r} is not an http(s) URL")
    where = f"cluster {cluster_name!r}"
    tls = TLS(ca_file=_path(cluster, "certificate-authority", base, source, where),
              ca_data=_data(cluster, "certificate-authority-data", source, where),
              insecure=_bool(cluster, "insecure-skip-tls-verify", source, where),
              server_name=_str(cluster, "tls-server-name", source, where))
    if tls.insecure and (tls.ca_file or tls.ca_data):
        raise _config_error(source, f"{where}: certificate-authority and insecure-skip-tls-verify are both set "
                                    "(client-go refuses this too)")
    cfg = ClientConfig(server=server.rstrip("/"), source=source, tls=tls)
    return _with_user(cfg, user, f"user {user_name!r}", base)


def _current(doc: dict[str, Any], source: str) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    """(cluster name, cluster, user name, user) of the current context; no user: ``""``, ``{}``."""
    current = doc.get("current-context")
    if not current or not isinstance(current, str):
        raise _config_error(source, "no current-context is set")
    context = _named(doc, "contexts", "context", current, source)
    cluster_name, user_name = context.get("cluster"), context.get("user")
    if not cluster_name or not isinstance(cluster_name, str):
        raise _config_error(source, f"context {current!r} names no cluster")
    cluster = _named(doc, "clusters", "cluster", cluster_name, source)
    if not user_name:
        return cluster_name, cluster, "", {}
    if not isinstance(user_name, str):
        raise _config_error(source, f"context {current!r}: user is not a string")
    return cluster_name, cluster, user_name, _named(doc, "users", "user", user_name, source)


def _with_user(cfg: ClientConfig, user: dict[str, Any], where: str, base: str) -> ClientConfig:
    """``cfg`` with the user's client certificate and token or basic credentials."""
    source = cfg.source
    tls = replace(cfg.tls, cert_file=_path(user, "client-certificate", base, source, where),
                  cert_data=_data(user, "client-certificate-data", source, where),
                  key_file=_path(user, "client-key", base, source, where),
                  key_data=_data(user, "client-key-data", source, where))
    if bool(tls.cert_file or tls.cert_data) != bool(tls.key_file or tls.key_data):
        raise _config_error(source, f"{where}: a client certificate needs both client-certificate(-data) "
                                    "and client-key(-data)")
    token, token_file = _str(user, "token", source, where), _path(user, "tokenFile", base, source, where)
    username, password = _str(user, "username", source, where), _str(user, "password", source, where)
    if (token or token_file) and (username or password):
        raise _config_error(source, f"{where}: more than one authentication method (token and username/password)")
    if token_file:
        try:
            token = _read_token(token_file)
        except (OSError, ValueError) as e:
            raise _config_error(source, f"{where}: tokenFile: {_why(e)}") from None
    return replace(cfg, tls=tls, token=token, token_file=token_file, username=username, password=password)


def _named(doc: dict[str, Any], section: str, key: str, name: str, source: str) -> dict[str, Any]:
    """The ``key`` mapping of the entry called ``name`` in the list ``section``."""
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise _config_error(source, f"{section} is not a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise _config_error(source, f"{section[:-1]} {name!r}: {key} is not a mapping")
            return value
    raise _config_error(source, f"{section[:-1]} {name!r} not found in {section}")


def _str(d: dict[str, Any], key: str, source: str, where: str) -> str:
    value = d.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _config_error(source, f"{where}: {key} is not a string")
    return value


def _bool(d: dict[str, Any], key: str, source: str, where: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise _config_error(source, f"{where}: {key} is not true or false")
    return value


def _path(d: dict[str, Any], key: str, base: str, source: str, where: str) -> str:
    """A file name, relative ones against the kubeconfig's directory (client-go's ResolvePaths)."""
    value = _str(d, key, source, where)
    return os.path.normpath(os.path.join(base, os.path.expanduser(value))) if value else ""


def _data(d: dict[str, Any], key: str, source: str, where: str) -> bytes:
    value = _str(d, key, source, where)
    if not value:
        return b""
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _config_error(source, f"{where}: {key} is not valid base64: {e}") from None


# ---- the choice ---------------------------------------------------------------------------------

def load(*, kubeconfig_file: str = "", api_url: str = "", environ: Mapping[str, str] = os.environ,
         sa_dir: str | None = None) -> ClientConfig:
    """Like client-go's ``BuildConfigFromFlags``: the kubeconfig (its server replaced by
    ``api_url`` if given), else ``api_url`` alone (no credentials), else the in-cluster service account.

    :raises errors.ConfigError: the configuration is broken or missing.
    :raises Unsupported: it needs the ``kubernetes`` package (see the module docstring).
    """
    if kubeconfig_file:
        cfg = load_kubeconfig(kubeconfig_file)
        if api_url:
            cfg = replace(cfg, server=api_url.rstrip("/"))
    elif api_url:
        cfg = ClientConfig(server=api_url.rstrip("/"), source="--kube-api-url")
    else:
        cfg = load_in_cluster(environ=environ, sa_dir=sa_dir)
    _check_proxy(cfg.server)
    return cfg


def _check_proxy(server: str) -> None:
    """A proxy in the environment (``HTTPS_PROXY`` ...) for this server: the ``kubernetes`` package
    (and client-go) use it, plain urllib3 does not, so such a setup goes to the fallback."""
    parts = urlsplit(server)
    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        raise Unsupported(f"the environment sets a proxy for {parts.scheme} ({proxy})")


# ---- TLS and credentials ------------------------------------------------------------------------

def ssl_context(cfg: ClientConfig) -> ssl.SSLContext:
    """The TLS context for ``cfg``: its CA (else the system's), hostname checked unless
    ``insecure``, and its client certificate. In-memory PEM data is loaded through a private
    temporary file that is removed at once (``ssl`` only loads certificate chains from files).

    :raises errors.ConfigError: a CA, certificate or key cannot be read or does not parse.
    """
    tls = cfg.tls
    try:
        if tls.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif tls.ca_data:
            ctx = ssl.create_default_context(cadata=tls.ca_data.decode("ascii", errors="replace"))
        elif tls.ca_file:
            ctx = ssl.create_default_context(cafile=tls.ca_file)
        else:
            ctx = ssl.create_default_context()
    except (OSError, ssl.SSLError, ValueError) as e:
        what = "certificate-authority-data" if tls.ca_data else f"certificate-authority {tls.ca_file}"
        raise _config_error(cfg.source, f"{what}: {_why(e)}") from None
    if tls.cert_data or tls.cert_file:
        try:
            with _pem_file(tls.cert_data, tls.cert_file) as cert, _pem_file(tls.key_data, tls.key_file) as key:
                ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError, ValueError) as e:
            what = (f"client certificate {'(data)' if tls.cert_data else tls.cert_file} / "
                    f"key {'(data)' if tls.key_data else tls.key_file}")
            raise _config_error(cfg.source, f"{what}: {_why(e)}") from None
    return ctx


@contextlib.contextmanager
def _pem_file(data: bytes, path: str) -> Any:
    if not data:
        yield path
        return
    fd, tmp = tempfile.mkstemp(prefix="flannel-kube-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class TokenSource:
    """The bearer token, from a file re-read at most every ``period`` seconds (bound service
    account tokens rotate), else a fixed one. Like client-go's ``cachingTokenSource``: a failed
    re-read is logged and the last good token kept (the kubelet replaces the file atomically, so a
    failure is rare and the old token is still valid for a while)."""

    def __init__(self, token: str, token_file: str = "", *, period: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._token, self._file, self._clock = token, token_file, clock
        self._period = TOKEN_REFRESH if period is None else period
        self._read_at = clock()
        self._lock = threading.Lock()

    def token(self) -> str:
        if not self._file:
            return self._token
        with self._lock:
            now = self._clock()
            if now - self._read_at >= self._period:
                self._read_at = now
                try:
                    self._token = _read_token(self._file)
                except (OSError, ValueError) as e:
                    log.warning("cannot re-read the API token file, keeping the last token: %s", _why(e))
            return self._token
