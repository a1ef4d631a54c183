"""host-gw backend (reference §9.2): ``S via PublicIP dev <ext>`` per peer, nodes on one L2 segment.

``network.py`` is the pure translation, ``backend.py`` the plugin and its Network; the kernel side and
the reconcile loop are shared with vxlan (``flannel.backends.routed``).
"""

from flannel.backends.hostgw.backend import HostGWBackend, HostGWNetwork

__all__ = ["HostGWBackend", "HostGWNetwork"]
