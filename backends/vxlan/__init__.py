"""vxlan backend (reference §7): ``flannel.<VNI>`` kernel device (and ``flannel-v6.<VNI>`` with
EnableIPv6, MTU − 70 over its IPv6 underlay), per-peer route + neighbour + fdb.

* ``network.py`` – pure: options, BackendData, lease → kernel entries;
* ``device.py``  – the vxlan device: create, reuse or replace it, its address (through the port);
* ``backend.py`` – ``VXLANBackend`` (the plugin) and ``VXLANNetwork``, a ``RoutedNetwork``.

The reconcile loop, the kernel-state model and the netlink port are shared with host-gw
(``flannel.backends.routed``).
"""

from flannel.backends.vxlan.backend import VXLANBackend, VXLANNetwork

__all__ = ["VXLANBackend", "VXLANNetwork"]
