"""The Kubernetes subnet manager: the API server is the lease store (reference §5).

* Our lease is our node's ``spec.podCIDR(s)``; we publish our attributes as node annotations
  (strategic-merge PATCH on ``nodes/<name>/status``, only the keys that differ).
* Other nodes' leases come from list + watch of all nodes: LIST gives a snapshot and a
  resourceVersion, WATCH from it gives events. A ``410 Gone`` (our version fell out of the
  server's history) means relist and hand the watcher a new snapshot to diff; a dropped
  connection means re-watch from the last version seen (bookmarks keep it fresh), with backoff
  while the server is down. This is the informer pattern (kopf's ``watching.py``) without its
  cache: the ``NodeTracker`` keeps only each node's last lease.
* Kube leases do not expire: ``complete_lease`` marks the node's network available once and
  then waits for stop.

Backends see the same ``Lease``/``LeaseAttrs`` as with etcd and never learn which store this is.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from flannel import errors, metrics, retry
from flannel.config import NetworkConfig, parse_network_config
from flannel.lease import Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from flannel.subnet_managers.base import SubnetManager
from flannel.subnet_managers.kube import annotations as annots
from flannel.subnet_managers.kube import nodes
from flannel.subnet_managers.kube.client import END, Expired, KubeClient, NotFound
from flannel.subnet_managers.kube.tracker import NodeTracker

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long acquire_lease waits for our node to exist and get a podCIDR (flannel: 30 s, poll 3 s).
NODE_WAIT_SECONDS = 30.0
NODE_POLL_SECONDS = 3.0
#: Server-side watch duration, randomised like client-go so agents do not re-watch in lockstep.
WATCH_TIMEOUT_RANGE = (300, 600)
#: Most watch events handed on in one WatchResult.
MAX_EVENTS_PER_RESULT = 500
#: How often blocking loops look at the stop event.
POLL_SECONDS = 0.5


class KubeSubnetManager(SubnetManager):
    """``flannel --subnet-manager=kube``. Constructed from the options; no I/O until used."""

    kind = "kube"

    def __init__(self, opts: AgentOptions, *, client: KubeClient | None = None,
                 node_name: str | None = None) -> None:
        """:param node_name: overrides the environment lookup (for embedding several managers in
        one process, e.g. tests and benchmarks)."""
        self._opts = opts
        self._names = annots.AnnotationNames.for_prefix(opts.kube_annotation_prefix)
        self._client = client or KubeClient(kubeconfig_file=opts.kubeconfig_file, api_url=opts.kube_api_url)
        self._closed = threading.Event()
        self._node_name: str | None = node_name
        self._config: NetworkConfig | None = None
        self._own_attrs: LeaseAttrs | None = None

    # -- identity and config -------------------------------------------------------------------

    @property
    def name(self) -> str:
        node = self._node_name or os.environ.get("NODE_NAME") or "<node from pod spec>"
        return f"Kubernetes Subnet Manager - {node} (API server {self._client.host})"

    @property
    def annotation_names(self) -> annots.AnnotationNames:
        return self._names

    def node_name(self) -> str:
        """``$NODE_NAME``, else ``spec.nodeName`` of pod ``$POD_NAMESPACE/$POD_NAME`` (§5.1).

        :raises errors.ConfigError: neither is set, or the pod has no node name.
        """
        if self._node_name:
            return self._node_name
        env = os.environ.get("NODE_NAME", "").strip()
        if env:
            self._node_name = env
            return env
        pod, ns = os.environ.get("POD_NAME", "").strip(), os.environ.get("POD_NAMESPACE", "").strip()
        if not pod or not ns:
            raise errors.ConfigError("cannot determine this node's name: set NODE_NAME, or POD_NAME and "
                                     "POD_NAMESPACE (the DaemonSet passes them through the downward API)")
        try:
            spec = self._call(f"get pod {ns}/{pod}", self._client.get_pod, ns, pod).get("spec") or {}
        except (NotFound, errors.PermissionDenied) as e:
            raise errors.ConfigError(f"error retrieving pod spec for '{ns}/{pod}': {e}") from None
        node = spec.get("nodeName")
        if not node:
            raise errors.ConfigError(f"node name not present in pod spec '{ns}/{pod}'")
        self._node_name = str(node)
        return self._node_name

    def get_network_config(self) -> NetworkConfig:
        """Read ``--net-config-path`` once (kube mode has no config in the store, §3.1)."""
        if self._config is None:
            path = self._opts.net_config_path
            try:
                with open(path, "rb") as f:
                    text = f.read()
            except OSError as e:
                raise errors.ConfigError(f"failed to read net conf {path}: {e.strerror or e} (in a cluster it "
                                         "comes from ConfigMap kube-flannel-cfg, key net-conf.json)") from None
            self._config = parse_network_config(text, source=path)
        return self._config

    # -- helpers -------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Call the API server, retrying while it is unreachable (until close())."""
        return retry.store(self._closed, what=what)(fn, *args)

    def _own_node(self, *, need_cidr: bool = False) -> dict[str, Any]:
        """GET our node, waiting (poll 3 s, up to 30 s) for it to exist and, if asked, for a podCIDR."""
        name = self.node_name()
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while True:
            node: dict[str, Any] | None = None
            try:
                node = self._call(f"get node {name}", self._client.get_node, name)
                spec = node.get("spec") or {}
                if not need_cidr or spec.get("podCIDR") or spec.get("podCIDRs"):
                    return node
                problem = f"node {name!r} pod cidr not assigned"
            except NotFound:
                problem = f"node {name!r} not found"
            if time.monotonic() >= deadline or self._closed.is_set():
                if node is not None:
                    return node  # still no podCIDR: own_lease() raises the ConfigError explaining it
                raise errors.ConfigError(f"timeout contacting kube-api: {problem} after {NODE_WAIT_SECONDS:.0f}s "
                                         "(is NODE_NAME right, and is the node registered?)")
            log.info("%s; waiting", problem)
            self._closed.wait(NODE_POLL_SECONDS)

    # -- SubnetManager -------------------------------------------------------------------------

    def stored_public_ips(self) -> tuple[str | None, str | None]:
        """``node-public-ip`` / ``node-public-ipv6`` annotations (they replace --public-ip[v6])."""
        ann = nodes.annotations_of(self._own_node())
        return ann.get(self._names.node_public_ip) or None, ann.get(self._names.node_public_ipv6) or None

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        """What we published last time (vxlan reads its VtepMAC from it to keep the MAC)."""
        return annots.stored_backend_data(self._names, nodes.annotations_of(self._own_node()))

    def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        """Our lease from our podCIDR(s); publish ``attrs`` as annotations if they differ (§5.5)."""
        config = self.get_network_config()
        node = self._own_node(need_cidr=True)
        lease = nodes.own_lease(node, config, attrs)
        self._publish(node, attrs)
        self._own_attrs = attrs
        log.info("acquired lease %s from node %r", lease.describe(), nodes.node_name(node))
        return lease

    def _publish(self, node: dict[str, Any], attrs: LeaseAttrs, *, retrying: bool = True) -> None:
        name = nodes.node_name(node)
        current = nodes.annotations_of(node)
        desired = annots.desired_annotations(self._names, attrs, current)
        for key, overwrite in ((self._names.public_ip, self._names.public_ip_overwrite),
                               (self._names.public_ipv6, self._names.public_ipv6_overwrite)):
            if key in desired and current.get(overwrite) and current.get(key) != desired[key]:
                log.info("Overriding public ip with '%s' from node annotation '%s'", desired[key], overwrite)
        patch = annots.annotation_patch(current, desired)
        if not patch:
            log.info("node %r annotations are up to date; not patching", name)
            return
        log.info("patching node %r annotations: %s", name, sorted(patch))
        body = {"metadata": {"annotations": patch}}
        if retrying:
            self._call(f"patch node {name} status", self._client.patch_node_status, name, body)
        else:
            self._client.patch_node_status(name, body)

    def complete_lease(self, lease: Lease, stop: threading.Event,
                       on_lease: Callable[[Lease], None] | None = None) -> None:
        """Set ``NetworkUnavailable=False`` once (unless disabled), then wait for stop (§5.8).

        A failure here is logged, never fatal: the data plane already works.
        """
        if self._opts.set_node_network_unavailable:
            name = self.node_name()
            try:
                retry.store(stop, what=f"set NetworkUnavailable=False on node {name}")(
                    self._client.patch_node_status, name, nodes.network_available_patch())
                log.info("node %r: NetworkUnavailable=False (%s)", name, nodes.CONDITION_REASON)
            except errors.StoreUnavailable:
                pass  # stop was set while the API server was unreachable
            except errors.StoreError as e:
                log.error("could not set the NetworkUnavailable condition on node %r: %s", name, e)
        stop.wait()

    def watch_leases(self, stop: threading.Event) -> Iterator[WatchResult]:
        """Snapshot, then events, forever; relist on 410, re-watch (with backoff) on a drop."""
        tracker = NodeTracker(self._names, self.get_network_config())
        rv: str | None = None
        failures = 0
        while not stop.is_set():
            try:
                if rv is None:
                    items, rv = retry.store(stop, what="list nodes")(self._client.list_nodes)
                    snapshot = tracker.reset(items)
                    log.info("listed %d nodes (%d with flannel leases) at resourceVersion %s",
                             len(items), len(snapshot), rv)
                    yield WatchResult.of_snapshot(snapshot)
                for result, seen in self._watch_once(tracker, rv, stop):
                    rv = seen  # where to resume if the watch drops
                    failures = 0
                    if result is not None:
                        yield result
            except Expired as e:
                log.info("%s; relisting nodes", e)
                rv = None
            except errors.StoreUnavailable as e:
                if stop.is_set():
                    break
                metrics.store_reconnected("kube")  # metrics
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning("watching nodes failed (attempt %d): %s; retrying in %.1fs", failures, e, delay)
                stop.wait(delay)
            except errors.StoreError as e:  # 401/403 and other refusals: may be fixed at runtime
                failures += 1
                log.error("cannot list/watch nodes: %s; retrying in 10s", e)
                stop.wait(10.0)

    def _watch_once(self, tracker: NodeTracker, rv: str,
                    stop: threading.Event) -> Iterator[tuple[WatchResult | None, str]]:
        """One watch connection: yields (result or None for a bookmark, latest resourceVersion)."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        with self._client.watch_nodes(rv, timeout_seconds=timeout) as watch:
            while not stop.is_set():
                item = watch.get(POLL_SECONDS)
                if item is None:
                    continue
                if item is END:
                    log.debug("watch on nodes ended by the server; re-watching from %s", rv)
                    return
                events = []
                broke: errors.StoreError | None = None
                while item is not None and item is not END:
                    etype, obj = item  # type: ignore[misc]
                    rv = nodes.resource_version(obj) or rv
                    if etype != "BOOKMARK":
                        events.extend(tracker.apply(etype, obj))
                        self._maybe_republish(etype, obj)
                    if len(events) >= MAX_EVENTS_PER_RESULT:
                        break
                    try:
                        item = watch.get(0)
                    except errors.StoreError as e:
                        # the tracker already holds these events: hand them on before re-watching
                        broke, item = e, None
                yield (WatchResult.of_events(events) if events else None), rv
                if broke is not None:
                    raise broke
                if item is END:
                    return

    def _maybe_republish(self, etype: str, node: dict[str, Any]) -> None:
        """If our own node's flannel annotations were changed or removed by someone, put them back
        (other agents would otherwise drop or misroute us)."""
        if etype != "MODIFIED" or self._own_attrs is None or nodes.node_name(node) != self._node_name:
            return
        current = nodes.annotations_of(node)
        if annots.annotation_patch(current, annots.desired_annotations(self._names, self._own_attrs, current)):
            log.warning("our node's flannel annotations changed under us; restoring them")
            try:
                self._publish(node, self._own_attrs, retrying=False)
            except errors.StoreError as e:
                log.error("could not restore our node annotations: %s", e)

    def close(self) -> None:
        self._closed.set()
        self._client.close()
