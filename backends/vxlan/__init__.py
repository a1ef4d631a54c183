"""vxlan backend (reference §7): ``flannel.<VNI>`` kernel device (and ``flannel-v6.<VNI>`` with
EnableIPv6, MTU − 70 over its IPv6 underlay), per-peer route + neighbour + fdb.

* ``network.py`` – pure: options, BackendData, lease → kernel entries, the reconcile plan;
* ``device.py``  – the only netlink user (pyroute2, and iproute2 batch mode for big plans);
* ``backend.py`` – ``VXLANBackend`` and the reconcile loop shared with host-gw.
"""

from flannel.backends.vxlan.backend import VXLANBackend, VXLANNetwork

__all__ = ["VXLANBackend", "VXLANNetwork"]
