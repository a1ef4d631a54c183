"""The Kubernetes subnet manager: the API server is the lease store (reference §5).

* Our lease is our node's ``spec.podCIDR(s)``; we publish our attributes as node annotations
  (strategic-merge PATCH on ``nodes/<name>/status``, only the keys that differ).
* Other nodes' leases come from list + watch of all nodes: LIST gives a snapshot and a
  resourceVersion, WATCH from it gives events. A ``410 Gone`` (our version fell out of the
  server's history) means relist and hand the watcher a new snapshot to diff; a dropped
  connection means re-watch from the last version seen (bookmarks keep it fresh), with backoff
  while the server is down. This is the informer pattern (kopf's ``watching.py``) without its
  cache: the ``NodeTracker`` keeps only each node's last lease.
* Kube leases do not expire: ``complete_lease`` marks the node's network available, then looks
  after our own node for as long as we run: the watch hands it every version of our node object
  (it is never a peer), and
  - annotations changed or removed by someone else, or our node deleted and re-created with the
    same podCIDR: our annotations (and ``NetworkUnavailable=False``) are published again: the lease
    is re-established in place;
  - our node's podCIDR changed (edited, or the node re-created with another CIDR): ``on_lease`` is
    called with the new lease, and the daemon exits 1 so that a restart sets up the new subnet
    (pods on this node hold addresses of the old one). Nothing is published for the new CIDR
    before that restart, so no agent routes it here early;
  - our node deleted: logged; our routes stay, and we wait for it to come back.

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

from flannel import errors, metrics, retry, stophooks
from flannel.config import NetworkConfig, parse_network_config
from flannel.lease import Lease, LeaseAttrs, WatchResult
from flannel.options import AgentOptions
from flannel.subnet_managers.base import SubnetManager
from flannel.subnet_managers.kube import annotations as annots
from flannel.subnet_managers.kube import nodes
from flannel.subnet_managers.kube.client import END, WATCH_READ_TIMEOUT, Expired, KubeClient, NodeWatch, NotFound
from flannel.subnet_managers.kube.tracker import MISSING, NodeTracker

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long acquire_lease waits for our node to exist and get a podCIDR (flannel: 30 s, poll 3 s).
NODE_WAIT_SECONDS = 30.0
NODE_POLL_SECONDS = 3.0
#: Server-side watch duration, randomised like client-go so agents do not re-watch in lockstep.
WATCH_TIMEOUT_RANGE = (300, 600)
#: Most watch events handed on in one WatchResult.
MAX_EVENTS_PER_RESULT = 500


def _uid(node: Any) -> str | None:
    meta = node.get("metadata") if isinstance(node, dict) else None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return uid if isinstance(uid, str) else None


class _OwnNodeBox:
    """The latest version of our own node seen by the watch (latest wins), for ``complete_lease``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: tuple[str, Any] | None = None
        self.changed = threading.Event()

    def put(self, kind: str, node: Any) -> None:
        with self._lock:
            self._item = (kind, node)
        self.changed.set()

    def take(self) -> tuple[str, Any] | None:
        with self._lock:
            item, self._item = self._item, None
            self.changed.clear()
            return item


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
        self._own_lease: Lease | None = None
        self._own_uid: str | None = None  # our node object's uid: another one means it was re-created
        self._own_box = _OwnNodeBox()
        #: how long a watch may stay silent before it is re-opened (tests shorten it)
        self.watch_read_timeout = WATCH_READ_TIMEOUT

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
        out: list[str | None] = []
        for key in (self._names.node_public_ip, self._names.node_public_ipv6):
            value = ann.get(key) or None
            if value is not None and len(value) > 64:  # no address is that long: never pass it on
                log.warning("ignoring annotation %s on our node: %d characters is not an address", key, len(value))
                value = None
            out.append(value)
        return out[0], out[1]

    def stored_backend_data(self) -> tuple[str | None, str | None]:
        """What we published last time (vxlan reads its VtepMAC from it to keep the MAC)."""
        return annots.stored_backend_data(self._names, nodes.annotations_of(self._own_node()))

    def acquire_lease(self, config: NetworkConfig, attrs: LeaseAttrs) -> Lease:
        """Our lease from our podCIDR(s); publish ``attrs`` as annotations if they differ (§5.5)."""
        node = self._own_node(need_cidr=True)
        lease = nodes.own_lease(node, config, attrs)
        self._publish(node, attrs)
        self._own_attrs = attrs
        self._own_lease = lease
        self._own_uid = _uid(node)
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

    def complete_lease(self, config: NetworkConfig, lease: Lease, stop: threading.Event,
                       on_lease: Callable[[Lease], None] | None = None) -> None:
        """Set ``NetworkUnavailable=False`` (unless disabled), then look after our own node until
        stop (see the module docstring). A failure to patch is logged, never fatal: the data plane
        already works.

        :raises errors.ConfigError: our node's new podCIDR is unusable (outside ``Network``): the
            daemon exits 1, and a restart reports the same error until the node is fixed.
        """
        self._own_lease = self._own_lease or lease
        self._mark_network_available(stop)
        unregister = stophooks.on_stop(stop, self._own_box.changed.set)   # no polling: stop wakes the wait
        try:
            self._look_after_own_node(on_lease, stop)
        finally:
            unregister()

    def _look_after_own_node(self, on_lease: Callable[[Lease], None] | None, stop: threading.Event) -> None:
        deleted = False
        while not stop.is_set():
            self._own_box.changed.wait()
            item = self._own_box.take()
            if item is None:
                continue
            kind, node = item
            if kind in ("DELETED", MISSING):
                if not deleted:
                    log.warning("our node %r was deleted; keeping our routes and waiting for it to be "
                                "registered again (other nodes drop their routes to us meanwhile)", self._node_name)
                deleted = True
                continue
            recreated = deleted or _uid(node) != self._own_uid
            outcome = self._own_node_changed(node, on_lease, stop, recreated=recreated)
            if outcome == "stop":
                return
            if outcome == "handled":
                deleted = False
                self._own_uid = _uid(node)

    def _mark_network_available(self, stop: threading.Event) -> None:
        if not self._opts.set_node_network_unavailable:
            return
        name = self.node_name()
        try:
            retry.store(stop, what=f"set NetworkUnavailable=False on node {name}")(
                self._client.patch_node_status, name, nodes.network_available_patch())
            log.info("node %r: NetworkUnavailable=False (%s)", name, nodes.CONDITION_REASON)
        except errors.StoreUnavailable:
            pass  # stop was set while the API server was unreachable
        except errors.StoreError as e:
            log.error("could not set the NetworkUnavailable condition on node %r: %s", name, e)

    def _own_node_changed(self, node: Any, on_lease: Callable[[Lease], None] | None, stop: threading.Event,
                          *, recreated: bool) -> str:
        """Handle a new version of our node: "stop" (the lease moved: the daemon exits), "waiting"
        (no podCIDR yet) or "handled"."""
        current, attrs = self._own_lease, self._own_attrs
        if current is None or attrs is None:
            return "handled"
        try:
            lease = nodes.own_lease(node, self.get_network_config(), attrs)
        except errors.ConfigError as e:
            if "pod cidr not assigned" in str(e):
                log.warning("our node %r has no podCIDR (re-registered?); waiting for one", self._node_name)
                return "waiting"
            raise errors.ConfigError(f"our node changed under us: {e}") from None
        if lease.ident != current.ident:
            msg = (f"our node {self._node_name!r} changed its podCIDR from {current.describe()} to "
                   f"{lease.describe()} while we run")
            if on_lease is None:
                log.error("%s; restart this agent to use the new subnet", msg)
                return "handled"
            log.error("%s; handing the new lease to the daemon (it exits so that a restart sets up the new "
                      "subnet)", msg)
            on_lease(lease)
            return "stop"
        if recreated:
            log.warning("our node %r was registered again with the same podCIDR; publishing our annotations "
                        "again", self._node_name)
        current_ann = nodes.annotations_of(node)
        if annots.annotation_patch(current_ann, annots.desired_annotations(self._names, attrs, current_ann)):
            log.warning("our node's flannel annotations changed under us; restoring them")
            try:
                retry.store(stop, what="restore our node annotations")(self._publish, node, attrs)
            except errors.StoreUnavailable:
                return "handled"  # stop was set
            except errors.StoreError as e:
                log.error("could not restore our node annotations: %s", e)
        if recreated:
            self._mark_network_available(stop)
        return "handled"

    def watch_leases(self, config: NetworkConfig, stop: threading.Event) -> Iterator[WatchResult]:
        """Snapshot, then events, forever; relist on 410, re-watch (with backoff) on a drop.

        Our own node never comes out of here: the tracker hands it to ``complete_lease``.
        """
        tracker = NodeTracker(self._names, config, own_name=self._node_name, on_own=self._own_box.put)
        rv: str | None = None
        failures = 0
        while not stop.is_set():
            try:
                if rv is None:
                    snapshot, rv, count = retry.store(stop, what="list nodes")(self._list, tracker)
                    log.info("listed %d nodes (%d with flannel leases) at resourceVersion %s",
                             count, len(snapshot), rv)
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

    def _list(self, tracker: NodeTracker) -> tuple[list[Lease], str, int]:
        """One paginated LIST fed straight into the tracker: only one page of node objects is ever
        held. Returns (snapshot, resourceVersion, number of nodes)."""
        rv = ""
        count = 0

        def items() -> Iterator[Any]:
            nonlocal rv, count
            for page, page_rv in self._client.list_node_pages():
                rv = rv or page_rv
                count += len(page)
                yield from page

        snapshot = tracker.reset(items())
        return snapshot, rv, count

    def _watch_once(self, tracker: NodeTracker, rv: str,
                    stop: threading.Event) -> Iterator[tuple[WatchResult | None, str]]:
        """One watch connection: yields (result or None for a bookmark, latest resourceVersion)."""
        timeout = random.randint(*WATCH_TIMEOUT_RANGE)
        with self._client.watch_nodes(rv, timeout_seconds=timeout, read_timeout=self.watch_read_timeout) as watch:
            unregister = stophooks.on_stop(stop, watch.wake)   # get() blocks; stop wakes it
            try:
                yield from self._read_watch(watch, tracker, rv, stop)
            finally:
                unregister()

    def _read_watch(self, watch: NodeWatch, tracker: NodeTracker, rv: str,
                    stop: threading.Event) -> Iterator[tuple[WatchResult | None, str]]:
        while not stop.is_set():
            item = watch.get(None)
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

    def close(self) -> None:
        self._closed.set()
        self._client.close()
