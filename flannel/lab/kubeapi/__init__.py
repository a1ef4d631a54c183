"""A stand-in for the Kubernetes API server, for tests and the lab (NOT a real API server).

No kube-apiserver binary can be installed on the CI machines, so this package answers the few
requests flannel makes, with the response shapes the real server uses, so that the official
``kubernetes`` client talks to it unmodified:

* ``GET /api/v1/nodes`` → ``NodeList`` (``kind``, ``apiVersion: v1``, ``metadata.resourceVersion``);
  ``GET /api/v1/nodes/<n>``; ``POST /api/v1/nodes``; ``DELETE /api/v1/nodes/<n>``;
* ``GET /api/v1/nodes?watch=1&resourceVersion=N`` → chunked newline-delimited
  ``{"type": "ADDED|MODIFIED|DELETED|BOOKMARK", "object": {...}}`` for every change after N;
  no version (or ``0``) starts with synthetic ADDED events; ``timeoutSeconds`` ends the stream;
  ``allowWatchBookmarks`` sends a BOOKMARK every ``bookmark_interval`` seconds (default 60, like the
  watch cache's ``defaultBookmarkFrequency`` of one minute) and one 2 s before the deadline; a
  version older than the history window gets
  ``{"type": "ERROR", "object": <Status code 410, reason Expired>}`` (as the watch cache does);
* ``GET /api/v1/nodes?limit=N[&continue=T]`` → pages with ``metadata.continue`` and
  ``remainingItemCount``, consistent at the first page's version; a token older than the history
  window gets ``410 Expired``;
* resourceVersions are one monotonic counter for all objects (like etcd revisions);
* ``PATCH /api/v1/nodes/<n>[/status]`` with ``application/strategic-merge-patch+json`` (lists with a
  patch merge key, e.g. ``status.conditions`` by ``type``, merge) or ``application/merge-patch+json``;
  the status subresource changes only metadata and status, the main resource everything but
  status; a no-op patch creates no new version and no event;
* ``GET /api/v1/namespaces/<ns>/pods/<name>``;
* bearer-token authentication (401 ``Status`` without it) and per-verb 403 rules with the real
  RBAC message (``User "..." cannot patch resource "nodes/status" in API group "" ...``);
* errors are ``Status`` objects (``kind: Status``, ``code``, ``reason``, ``message``, ``details``).

Not implemented: other resources, label/field selectors, apply, admission, TLS.

In-process use (tests): ``KubeAPIServer(...).start()`` plus the hooks ``add_node``,
``modify_node``, ``set_annotations``, ``heartbeat``, ``delete_node``, ``add_pod``, ``deny``,
``cut_watches``, ``compact`` (forces 410), ``hang_watches`` (an Event: watch requests get no
answer), ``abort_connections`` (the host vanished: every connection reset, silently if the path is
blocked), ``freeze_watches`` (open watches stay connected but send nothing more),
``inject_watch_line`` (raw bytes as one watch line), ``add_nodes`` (bulk load, e.g.
``generate.realistic_cluster``), ``state.heartbeat_nodes`` (kubelet heartbeats, cheap),
``stop``/``start`` (an outage; state and port survive); ``watch_requests``, ``list_requests`` and
``bookmarks_sent`` count.
``netns=`` creates the listening socket inside a named network namespace (e.g. the lab hub).

As a process (the lab, agent tests)::

    ip netns exec <hub> python -m flannel.lab.kubeapi --host 198.18.0.254 --port 6443 --token T \\
        --node h1=10.244.1.0/24 --node h2=10.244.2.0/24

Out-of-process tests reach the hooks over HTTP: ``POST /_test/cut-watches``, ``POST /_test/compact``,
``POST /_test/outage?seconds=N`` (down for N seconds: connections refused, then back with the same state);
``POST /_test/heartbeat[?count=N]``, ``POST /_test/inject-line`` (the body is the line);
node changes go through the normal API (``POST``/``PATCH``/``DELETE`` nodes).
"""

from __future__ import annotations

from flannel.lab.kubeapi.server import KubeAPIServer
from flannel.lab.kubeapi.state import APIError, ClusterState, make_node, make_pod

__all__ = ["APIError", "ClusterState", "KubeAPIServer", "make_node", "make_pod"]
