"""Kubernetes subnet manager (entry point ``kube``): leases from node podCIDRs, attributes in node
annotations, peers from list + watch of all nodes. Only this package imports ``kubernetes``, and only
for configurations our own client does not support (``client.connect``)."""

# No ``from __future__ import annotations`` here: it would bind the name ``annotations`` in this
# package and shadow the ``annotations`` submodule for ``from ...kube import annotations``.
from flannel.subnet_managers.kube.manager import KubeSubnetManager

__all__ = ["KubeSubnetManager"]
