"""Generated clusters: node objects shaped like real ones, for scale tests and benchmarks.

A real node object is mostly things flannel never reads: ~20 labels, a list of the container images
on the node (kubelet reports up to 50), five conditions, addresses, capacity, ``nodeInfo`` and
``managedFields``; about 10 KB of JSON. The agent must keep none of it, and a kubelet heartbeat
(a new ``lastHeartbeatTime``) must cost it next to nothing. ``realistic_node`` builds that shape
deterministically from an index, with flannel's annotations as the node's own agent publishes them.

Addressing (fake peers only, see the network safety rule): node ``i`` gets pod CIDR
``10.<i/256>.<i%256>.0/24`` (``Network`` 10.0.0.0/8) and public IP ``198.19.<i/256>.<i%256>``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flannel.lab.kubeapi.state import JSON

PREFIX = "flannel.alpha.coreos.com/"
NETWORK = "10.0.0.0/8"
_IMAGES = ["registry.k8s.io/kube-proxy", "registry.k8s.io/pause", "docker.io/library/nginx",
           "quay.io/prometheus/node-exporter", "docker.io/calico/node", "registry.k8s.io/coredns/coredns",
           "docker.io/grafana/promtail", "quay.io/jetstack/cert-manager-controller", "docker.io/library/redis",
           "docker.io/bitnami/postgresql", "ghcr.io/fluxcd/source-controller", "docker.io/istio/proxyv2",
           "registry.k8s.io/metrics-server/metrics-server", "docker.io/library/busybox",
           "quay.io/cilium/cilium", "docker.io/envoyproxy/envoy", "gcr.io/distroless/static",
           "docker.io/library/python", "docker.io/library/golang", "docker.io/elastic/filebeat",
           "docker.io/fluent/fluent-bit", "registry.k8s.io/ingress-nginx/controller",
           "docker.io/library/postgres", "docker.io/library/alpine", "docker.io/rancher/local-path-provisioner"]


def _sha(i: int, salt: str) -> str:
    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def pod_cidr(i: int) -> str:
    return f"10.{i >> 8}.{i & 0xff}.0/24"


def public_ip(i: int) -> str:
    return f"198.19.{i >> 8}.{i & 0xff}"


def vtep_mac(i: int) -> str:
    return f"02:00:00:00:{i >> 8:02x}:{i & 0xff:02x}"


def flannel_annotations(i: int) -> dict[str, str]:
    return {PREFIX + "backend-type": "vxlan",
            PREFIX + "backend-data": json.dumps({"VNI": 1, "VtepMAC": vtep_mac(i)}, separators=(",", ":")),
            PREFIX + "kube-subnet-manager": "true", PREFIX + "public-ip": public_ip(i)}


def realistic_node(i: int, *, managed: bool = True, images: int = 30, stamp: str = "2026-01-01T00:00:00Z") -> JSON:
    """Node ``i`` as ``kubectl get node -o json`` shows it on a busy cluster (~10 KB of JSON)."""
    name = node_name(i)
    annotations = {
        "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        "csi.volume.kubernetes.io/nodeid": json.dumps({"ebs.csi.aws.com": f"i-{_sha(i, 'inst')[:17]}"}),
    }
    if managed:
        annotations.update(flannel_annotations(i))
    labels = {
        "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "m5.2xlarge", "topology.kubernetes.io/region": "eu-west-1",
        "topology.kubernetes.io/zone": f"eu-west-1{'abc'[i % 3]}", "failure-domain.beta.kubernetes.io/zone":
        f"eu-west-1{'abc'[i % 3]}", "node-role.kubernetes.io/worker": "", "pool": f"pool-{i % 7}",
        "team": f"team-{i % 13}", "kubernetes.io/lifecycle": "normal",
    }
    conditions = [
        {"type": t, "status": s, "lastHeartbeatTime": stamp, "lastTransitionTime": "2025-12-01T00:00:00Z",
         "reason": r, "message": m}
        for t, s, r, m in (
            ("NetworkUnavailable", "False", "FlannelIsUp", "Flannel is running on this node"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"))
    ]
    image_list = [{"names": [f"{_IMAGES[k % len(_IMAGES)]}@sha256:{_sha(k, 'img')}",
                             f"{_IMAGES[k % len(_IMAGES)]}:v1.{k}.{i % 5}"],
                   "sizeBytes": 10_000_000 + 7919 * k} for k in range(images)]
    resources = {"cpu": "8", "ephemeral-storage": "104845292Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0",
                 "memory": "32408180Ki", "pods": "110"}
    managed_fields: list[dict[str, Any]] = [
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": stamp, "fieldsType": "FieldsV1",
         "subresource": "status",
         "fieldsV1": {"f:status": {"f:conditions": {f'k:{{"type":"{c["type"]}"}}': {
             "f:lastHeartbeatTime": {}, "f:lastTransitionTime": {}, "f:message": {}, "f:reason": {}, "f:status": {}}
             for c in conditions}, "f:images": {}, "f:nodeInfo": {"f:bootID": {}}}}},
        {"manager": "flanneld", "operation": "Update", "apiVersion": "v1", "time": stamp, "fieldsType": "FieldsV1",
         "subresource": "status", "fieldsV1": {"f:metadata": {"f:annotations": {
             f"f:{k}": {} for k in flannel_annotations(i)}}}},
        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": stamp,
         "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:podCIDR": {}, "f:podCIDRs": {".": {},
                                                                                      f'v:"{pod_cidr(i)}"': {}}}}},
    ]
    return {
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "uid": f"{_sha(i, 'uid')[:8]}-{_sha(i, 'uid')[8:12]}-4{_sha(i, 'uid')[13:16]}-"
                                         f"a{_sha(i, 'uid')[17:20]}-{_sha(i, 'uid')[20:32]}",
                     "creationTimestamp": "2025-12-01T00:00:00Z", "labels": labels, "annotations": annotations,
                     "managedFields": managed_fields},
        "spec": {"podCIDR": pod_cidr(i), "podCIDRs": [pod_cidr(i)],
                 "providerID": f"aws:///eu-west-1{'abc'[i % 3]}/i-{_sha(i, 'inst')[:17]}"},
        "status": {
            "capacity": resources, "allocatable": {**resources, "cpu": "7910m", "memory": "31391348Ki"},
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": public_ip(i)}, {"type": "Hostname", "address": name},
                          {"type": "InternalDNS", "address": f"{name}.eu-west-1.compute.internal"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": _sha(i, "m")[:32], "systemUUID": _sha(i, "s")[:32], "bootID": _sha(i, "b")[:32],
                         "kernelVersion": "6.1.0-18-amd64", "osImage": "Debian GNU/Linux 12 (bookworm)",
                         "containerRuntimeVersion": "containerd://1.7.13", "kubeletVersion": "v1.30.2",
                         "kubeProxyVersion": "v1.30.2", "operatingSystem": "linux", "architecture": "amd64"},
            "images": image_list,
        },
    }


def realistic_cluster(n: int, *, start: int = 1, **kw: Any) -> list[JSON]:
    """Nodes ``start`` .. ``start + n - 1`` (see ``realistic_node``)."""
    return [realistic_node(i, **kw) for i in range(start, start + n)]
