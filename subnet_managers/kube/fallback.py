"""The ``kubernetes`` package as the API client, for configurations our own loader does not
implement (``kubeconfig.Unsupported``: a user ``exec`` plugin or ``auth-provider``, impersonation,
a proxy). Imported only then: ``import kubernetes`` costs ~22 MB of RSS (every API and model
module loads), which an agent with a plain kubeconfig or a service account does not pay.

The calls are the package's ``CoreV1Api`` methods with raw responses (``_preload_content=False``),
so the kube client handles both transports alike; the package's ``ApiException`` is converted to
flannel errors by ``client._mapped`` (it has the same status/reason/body shape as ``ApiStatus``).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.config.config_exception import ConfigException

from flannel import errors


def build_api_client(*, kubeconfig_file: str = "", api_url: str = "",
                     socket_options: list[tuple[int, int, int]] | None = None) -> kclient.ApiClient:
    """Client config like client-go's: kubeconfig (server overridden by the URL if given), else the
    URL alone, else the in-cluster service account; no retries inside urllib3 (we retry with our
    own policies).

    :raises errors.ConfigError: the kubeconfig is unreadable, or nothing is configured and we are
        not running in a pod.
    """
    cfg = kclient.Configuration()
    try:
        if kubeconfig_file:
            kconfig.load_kube_config(config_file=kubeconfig_file, client_configuration=cfg,
                                     persist_config=False)
        elif not api_url:
            kconfig.load_incluster_config(client_configuration=cfg)
    except (ConfigException, OSError, ValueError, TypeError) as e:
        src = f"kubeconfig {kubeconfig_file}" if kubeconfig_file else "in-cluster service account"
        hint = "" if kubeconfig_file else " (outside a pod, pass --kubeconfig-file or --kube-api-url)"
        raise errors.ConfigError(f"cannot load Kubernetes client config from {src}: {e}{hint}") from None
    if api_url:
        cfg.host = api_url.rstrip("/")
    if socket_options is not None:
        cfg.socket_options = socket_options
    cfg.retries = 0  # we retry with our own policies; never silently inside urllib3
    return kclient.ApiClient(cfg)


class PackageCoreV1:
    """``CoreV1Api`` of the package, with the ``host``/``close`` the kube client needs of any transport."""

    def __init__(self, api_client: kclient.ApiClient) -> None:
        self._client = api_client
        self._api = kclient.CoreV1Api(api_client)

    @property
    def host(self) -> str:
        return str(self._client.configuration.host)

    def read_node(self, name: str, **kw: Any) -> Any:
        return self._api.read_node(name, **kw)

    def read_namespaced_pod(self, name: str, namespace: str, **kw: Any) -> Any:
        return self._api.read_namespaced_pod(name, namespace, **kw)

    def list_node(self, **kw: Any) -> Any:
        return self._api.list_node(**kw)

    def patch_node_status(self, name: str, body: dict[str, Any], **kw: Any) -> Any:
        return self._api.patch_node_status(name, body, **kw)

    def close(self) -> None:
        self._client.close()
