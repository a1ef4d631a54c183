"""The etcd subnet manager (flannel's "local manager"): policy in manager.py, storage in registry.py."""

from __future__ import annotations

from flannel.subnet_managers.etcd.manager import EtcdSubnetManager

__all__ = ["EtcdSubnetManager"]
