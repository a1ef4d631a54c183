"""The stand-in's object store: nodes and pods, one resourceVersion counter, a bounded watch history.

Like etcd behind the real API server: every change gets the next resourceVersion (one counter for
all kinds, so a kind sees gaps), node changes are recorded in a history window that watches replay
from, and a watch from a version that fell out of the window is told ``410 Gone``.

Paginated lists (``limit`` / ``continue``) are consistent like the real server's (which reads an
etcd snapshot at the first page's revision): later pages show the nodes as they were at that
version, reconstructed by undoing the history after it; a continue token older than the history
window gets ``410 Gone`` ("too old to display a consistent list result").

Stored node dicts are never changed in place (every change stores a new dict), so the history and
the lists can share them without copies; objects leave this module as copies or as JSON text.
"""

from __future__ import annotations

import base64
import collections
import copy
import datetime
import json
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from flannel.lab.kubeapi.patch import merge_patch, strategic_merge_patch

JSON = dict[str, Any]


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class APIError(Exception):
    """Becomes a ``Status`` response with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> JSON:
        out: JSON = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def not_found(kind: str, name: str) -> APIError:
    return APIError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind})


def make_node(name: str, *, pod_cidrs: list[str] | tuple[str, ...] = (), annotations: dict[str, str] | None = None,
              labels: dict[str, str] | None = None, internal_ip: str | None = None,
              single_pod_cidr_field: bool = False) -> JSON:
    """A Node as a kubelet registers it and the node-ipam controller fills in (the shape of
    ``kubectl get node -o json``). ``single_pod_cidr_field`` leaves out ``podCIDRs`` like old clusters."""
    spec: JSON = {}
    if pod_cidrs:
        spec["podCIDR"] = pod_cidrs[0]
        if not single_pod_cidr_field:
            spec["podCIDRs"] = list(pod_cidrs)
    ts = now_rfc3339()
    meta: JSON = {"name": name,
                  "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                             "kubernetes.io/arch": "amd64", **(labels or {})}}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    addresses = [{"type": "Hostname", "address": name}]
    if internal_ip:
        addresses.insert(0, {"type": "InternalIP", "address": internal_ip})
    return {
        "kind": "Node", "apiVersion": "v1", "metadata": meta, "spec": spec,
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": ts,
                            "lastTransitionTime": ts, "reason": "KubeletReady",
                            "message": "kubelet is posting ready status"}],
            "addresses": addresses,
            "nodeInfo": {"machineID": uuid.uuid4().hex, "systemUUID": str(uuid.uuid4()),
                         "bootID": str(uuid.uuid4()), "kernelVersion": "6.1.0", "osImage": "Debian GNU/Linux 12",
                         "containerRuntimeVersion": "containerd://1.7.0", "kubeletVersion": "v1.30.0",
                         "kubeProxyVersion": "v1.30.0", "operatingSystem": "linux", "architecture": "amd64"},
        },
    }


def make_pod(namespace: str, name: str, node_name: str) -> JSON:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "flannel"}},
            "spec": {"nodeName": node_name, "serviceAccountName": "flannel",
                     "containers": [{"name": "kube-flannel", "image": "pyflannel:latest"}]},
            "status": {"phase": "Running"}}


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED / MODIFIED / DELETED, or RAW (``data`` sent as it is: a corrupted line)
    obj: JSON
    #: the node before this change (MODIFIED / DELETED), to reconstruct lists at older versions
    prev: JSON | None = None
    #: the watch line, serialised once
    data: bytes = field(default=b"", compare=False)


def watch_line(etype: str, obj: JSON) -> bytes:
    return json.dumps({"type": etype, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _continue_token(rv: int, start: str) -> str:
    """The real server's format: base64 of ``{"v":"meta.k8s.io/v1","rv":N,"start":"<key>\\u0000"}``."""
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start + "\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _parse_continue(token: str) -> tuple[int, str]:
    try:
        obj = json.loads(base64.urlsafe_b64decode(token.encode()))
        return int(obj["rv"]), str(obj["start"]).rstrip("\x00")
    except (ValueError, KeyError, TypeError) as e:
        raise APIError(400, "BadRequest", f"continue key is not valid: {e}") from None


class ClusterState:
    """Thread-safe; ``cond`` is notified on every change and on ``cut_watches``/``close``."""

    def __init__(self, *, history_limit: int = 1000, first_rv: int = 100) -> None:
        self.cond = threading.Condition()
        self._rv = first_rv
        self._floor = first_rv  # a watch from rv < floor may have missed events → 410
        self._history: collections.deque[Event] = collections.deque()
        self._history_limit = history_limit
        self._nodes: dict[str, JSON] = {}
        #: list-item JSON per node, valid while the stored dict is the same object (never mutated)
        self._item_json: dict[str, tuple[JSON, bytes]] = {}
        self._pods: dict[tuple[str, str], JSON] = {}
        self.epoch = 0  # bumped by cut_watches(): open watches drop their connections
        self.closed = False

    # -- reading ---------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self.cond:
            return self._rv

    def list_nodes(self) -> tuple[list[JSON], int]:
        with self.cond:
            return [copy.deepcopy(n) for _, n in sorted(self._nodes.items())], self._rv

    @property
    def node_count(self) -> int:
        with self.cond:
            return len(self._nodes)

    def list_page(self, *, limit: int = 0, token: str = "") -> tuple[list[JSON], int, str, int]:
        """One page of the node list: (items, list version, continue token or "", remaining count).

        Items are the stored dicts (serialise them; never change them). ``limit`` 0 = everything.
        :raises APIError: 410 for a token older than the history window, 400 for a bad token.
        """
        with self.cond:
            if token:
                rv, start = _parse_continue(token)
                if rv < self._floor:
                    raise APIError(410, "Expired", "The provided continue parameter is too old to display a "
                                   "consistent list result. You can start a new list without the continue "
                                   "parameter.")
            else:
                rv, start = self._rv, ""
            view = self._nodes_at(rv)
            names = sorted(n for n in view if n > start)
        page = names[:limit] if limit > 0 else names
        items = [view[n] for n in page]
        rest = len(names) - len(page)
        return items, rv, (_continue_token(rv, page[-1]) if rest > 0 else ""), rest

    def item_json(self, node: JSON) -> bytes:
        """``node`` as a list item (no kind/apiVersion, like the real server), serialised once per
        stored version (a relist of thousands of nodes must not be bound by this server's JSON)."""
        name = node.get("metadata", {}).get("name")
        cached = self._item_json.get(name) if isinstance(name, str) else None
        if cached is not None and cached[0] is node:
            return cached[1]
        data = json.dumps({k: v for k, v in node.items() if k not in ("kind", "apiVersion")},
                          separators=(",", ":")).encode()
        if isinstance(name, str):
            with self.cond:
                if self._nodes.get(name) is node:
                    self._item_json[name] = (node, data)
        return data

    def _nodes_at(self, rv: int) -> dict[str, JSON]:
        """The nodes as they were at version ``rv`` (>= the floor): undo the later history."""
        if rv >= self._rv:
            return self._nodes
        view = dict(self._nodes)
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            name = ev.obj.get("metadata", {}).get("name")
            if ev.type == "ADDED":
                view.pop(name, None)
            elif ev.type in ("MODIFIED", "DELETED") and ev.prev is not None:
                view[name] = ev.prev
        return view

    def get_node(self, name: str) -> JSON:
        with self.cond:
            if name not in self._nodes:
                raise not_found("nodes", name)
            return copy.deepcopy(self._nodes[name])

    def get_pod(self, namespace: str, name: str) -> JSON:
        with self.cond:
            pod = self._pods.get((namespace, name))
            if pod is None:
                raise not_found("pods", name)
            return copy.deepcopy(pod)

    def events_after(self, rv: int) -> list[Event]:
        """Node events with version > rv. :raises APIError: 410 if the window no longer covers rv."""
        with self.cond:
            if rv < self._floor:
                raise APIError(410, "Expired", f"too old resource version: {rv} ({self._floor})")
            return [e for e in self._history if e.rv > rv]

    # -- writing ---------------------------------------------------------------------------

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, etype: str, obj: JSON, prev: JSON | None = None) -> None:
        self._history.append(Event(self._rv, etype, obj, prev, watch_line(etype, obj)))
        while len(self._history) > self._history_limit:
            self._floor = self._history.popleft().rv
        self.cond.notify_all()

    def create_node(self, node: JSON) -> JSON:
        meta_in = node.get("metadata")
        name = meta_in.get("name") if isinstance(meta_in, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(422, "Invalid", "Node is invalid: metadata.name: Required value: name is required")
        with self.cond:
            if name in self._nodes:
                raise APIError(409, "AlreadyExists", f'nodes "{name}" already exists', {"name": name, "kind": "nodes"})
            obj = copy.deepcopy(node)
            obj["kind"], obj["apiVersion"] = "Node", "v1"
            meta = obj["metadata"]
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), resourceVersion=str(self._bump()))
            obj.setdefault("spec", {})
            obj.setdefault("status", {})
            self._nodes[name] = obj
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def add_nodes(self, nodes: list[JSON]) -> int:
        """Register many nodes at once (a generated cluster): one version each, no history (as if
        they were created long ago: watches from before them get 410). Returns the version."""
        with self.cond:
            for node in nodes:
                name = node["metadata"]["name"]
                if name in self._nodes:
                    raise APIError(409, "AlreadyExists", f'nodes "{name}" already exists')
                node["metadata"]["resourceVersion"] = str(self._bump())
                self._nodes[name] = node
            self._floor = self._bump()
            self._history.clear()
            self.cond.notify_all()
            return self._rv

    def heartbeat_nodes(self, names: list[str] | None = None, *, stamp: str | None = None) -> int:
        """What every kubelet does every 10 s: a new ``Ready`` heartbeat time, nothing else.
        Cheap (no deep copies) so a benchmark can drive thousands per second. Returns the count."""
        stamp = stamp or now_rfc3339()
        with self.cond:
            targets = list(self._nodes) if names is None else [n for n in names if n in self._nodes]
            for name in targets:
                old = self._nodes[name]
                status = dict(old.get("status") or {})
                conds = [dict(c) if c.get("type") == "Ready" else c for c in status.get("conditions") or []]
                for c in conds:
                    if c.get("type") == "Ready":
                        c["lastHeartbeatTime"] = stamp
                status["conditions"] = conds
                new = {**old, "status": status, "metadata": {**old["metadata"], "resourceVersion": str(self._bump())}}
                self._nodes[name] = new
                self._record("MODIFIED", new, old)
            return len(targets)

    def inject_raw(self, data: bytes) -> None:
        """Send ``data`` as one line to every watch (a corrupted stream, e.g. a broken proxy)."""
        with self.cond:
            self._bump()
            self._history.append(Event(self._rv, "RAW", {}, None, data.rstrip(b"\n") + b"\n"))
            while len(self._history) > self._history_limit:
                self._floor = self._history.popleft().rv
            self.cond.notify_all()

    def delete_node(self, name: str) -> JSON:
        with self.cond:
            old = self._nodes.pop(name, None)
            if old is None:
                raise not_found("nodes", name)
            obj = {**old, "metadata": {**old["metadata"], "resourceVersion": str(self._bump())}}
            self._record("DELETED", obj, old)
            return copy.deepcopy(obj)

    def patch_node(self, name: str, patch: JSON, *, strategic: bool, subresource: str | None) -> JSON:
        """Apply a patch like the API server: the status subresource only changes metadata and
        status, the main resource everything but status; a no-op patch changes nothing (no new
        version, no event)."""
        with self.cond:
            if name not in self._nodes:
                raise not_found("nodes", name)
            old = self._nodes[name]
            want_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
            if want_rv is not None and str(want_rv) != old["metadata"]["resourceVersion"]:
                raise APIError(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object has '
                                                "been modified; please apply your changes to the latest version "
                                                "and try again", {"name": name, "kind": "nodes"})
            try:
                new = (strategic_merge_patch if strategic else merge_patch)(old, patch)
            except ValueError as e:
                raise APIError(400, "BadRequest", f"invalid patch: {e}") from None
            if not isinstance(new, dict):
                raise APIError(400, "BadRequest", "patch must be a JSON object")
            keep = "spec" if subresource == "status" else "status"
            new[keep] = copy.deepcopy(old.get(keep, {}))
            meta = new.setdefault("metadata", {})
            for k in ("name", "uid", "creationTimestamp", "resourceVersion"):
                meta[k] = old["metadata"][k]
            new["kind"], new["apiVersion"] = "Node", "v1"
            if new == old:
                return copy.deepcopy(old)
            meta["resourceVersion"] = str(self._bump())
            self._nodes[name] = new
            self._record("MODIFIED", new, old)
            return copy.deepcopy(new)

    def put_pod(self, pod: JSON) -> JSON:
        with self.cond:
            obj = copy.deepcopy(pod)
            meta = obj["metadata"]
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), resourceVersion=str(self._bump()))
            self._pods[(meta["namespace"], meta["name"])] = obj
            return copy.deepcopy(obj)

    def compact(self) -> int:
        """Forget all history: every watch from an older version gets 410 and must relist."""
        with self.cond:
            self._floor = self._bump()
            self._history.clear()
            self.cond.notify_all()
            return self._rv

    def cut_watches(self) -> None:
        with self.cond:
            self.epoch += 1
            self.cond.notify_all()
