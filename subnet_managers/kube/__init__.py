"""Kubernetes subnet manager (entry point ``kube``): leases from node podCIDRs, attributes in node
annotations, peers from list + watch of all nodes. Only this package imports ``kubernetes``."""

from __future__ import annotations

from flannel.subnet_managers.kube.manager import KubeSubnetManager

__all__ = ["KubeSubnetManager"]
