"""The five API calls flannel makes, over urllib3 directly (no ``kubernetes`` package).

Method names and arguments are the package's ``CoreV1Api`` ones (``read_node``,
``read_namespaced_pod``, ``list_node`` — with ``watch=True`` for a watch —, ``patch_node_status``):
the kube client calls either transport the same way, and ``tests/unit/test_manifests.py`` derives
the ClusterRole from those names. Responses are the raw urllib3 responses (bodies are parsed by the
caller); a non-2xx answer raises ``ApiStatus``. Nothing is retried here: ``retries=False`` (our
callers retry with named policies) and redirects are not followed (the API server does not send
them; a redirect elsewhere must not get our credentials).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import urllib3

from flannel import __version__
from flannel.subnet_managers.kube.kubeconfig import ClientConfig, TokenSource, ssl_context

log = logging.getLogger(__name__)

USER_AGENT = f"flannel/{__version__} (pyflannel)"
#: connections kept per server: the watch holds one, a patch or get may run beside it
POOL_SIZE = 4
_ERROR_BODY_LIMIT = 64 * 1024


class ApiStatus(Exception):
    """A non-2xx answer. Same shape as the package's ``ApiException`` (``status``, ``reason``,
    ``body``), so the kube client converts both the same way."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"({status}) {reason}")
        self.status, self.reason, self.body = status, reason, body


class NativeCoreV1:
    """``CoreV1Api``'s calls that flannel makes, for a ``ClientConfig``.

    :raises errors.ConfigError: (constructor) a CA, certificate or key cannot be loaded.
    """

    def __init__(self, cfg: ClientConfig, *, socket_options: list[tuple[int, int, int]]) -> None:
        self.host = cfg.server
        self._tokens = TokenSource(cfg.token, cfg.token_file) if cfg.token or cfg.token_file else None
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if cfg.username or cfg.password:
            basic = base64.b64encode(f"{cfg.username}:{cfg.password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        self._headers = headers
        kw: dict[str, Any] = {"maxsize": POOL_SIZE, "retries": False, "socket_options": socket_options}
        if urlsplit(cfg.server).scheme == "https":
            kw["ssl_context"] = ssl_context(cfg)
            if cfg.tls.insecure:
                kw.update(cert_reqs=ssl.CERT_NONE, assert_hostname=False)
                # said once here rather than by urllib3 on every request
                log.warning("the API server's certificate is not verified (%s: insecure-skip-tls-verify)", cfg.source)
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            else:
                kw["cert_reqs"] = ssl.CERT_REQUIRED
            if cfg.tls.server_name:
                kw["server_hostname"] = cfg.tls.server_name
        self._pool = urllib3.PoolManager(**kw)

    def _request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                 content_type: str = "", timeout: tuple[float, float], stream: bool = False) -> Any:
        headers = dict(self._headers)
        if self._tokens is not None:
            headers["Authorization"] = f"Bearer {self._tokens.token()}"
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = content_type or "application/json"
        url = self.host + path
        if query:
            url += "?" + urlencode({k: _query_value(v) for k, v in query.items() if v is not None})
        resp = self._pool.request(method, url, body=data, headers=headers, preload_content=not stream,
                                  timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
                                  retries=False, redirect=False)
        if not 200 <= resp.status < 300:
            try:
                text = (resp.read(_ERROR_BODY_LIMIT) if stream else resp.data[:_ERROR_BODY_LIMIT]) or b""
            finally:
                if stream:
                    resp.release_conn()
            raise ApiStatus(resp.status, resp.reason or "", text.decode(errors="replace"))
        return resp

    # -- CoreV1Api's names: _preload_content is accepted for the same calls; answers are always raw

    def read_node(self, name: str, *, _request_timeout: tuple[float, float], _preload_content: bool = False) -> Any:
        return self._request("GET", f"/api/v1/nodes/{quote(name, safe='')}", timeout=_request_timeout)

    def read_namespaced_pod(self, name: str, namespace: str, *, _request_timeout: tuple[float, float],
                            _preload_content: bool = False) -> Any:
        return self._request("GET", f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}",
                             timeout=_request_timeout)

    def list_node(self, *, _request_timeout: tuple[float, float], _preload_content: bool = False,
                  watch: bool = False, resource_version: str | None = None,
                  allow_watch_bookmarks: bool | None = None, timeout_seconds: int | None = None,
                  limit: int | None = None, _continue: str | None = None) -> Any:
        query = {"limit": limit, "continue": _continue, "watch": watch or None, "resourceVersion": resource_version,
                 "allowWatchBookmarks": allow_watch_bookmarks, "timeoutSeconds": timeout_seconds}
        return self._request("GET", "/api/v1/nodes", query=query, timeout=_request_timeout, stream=watch)

    def patch_node_status(self, name: str, body: dict[str, Any], *, _content_type: str,
                          _request_timeout: tuple[float, float], _preload_content: bool = False) -> Any:
        return self._request("PATCH", f"/api/v1/nodes/{quote(name, safe='')}/status", body=body,
                             content_type=_content_type, timeout=_request_timeout)

    def close(self) -> None:
        self._pool.clear()


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
