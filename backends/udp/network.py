"""Pure lease → peer-table translation of the udp backend (the analogue of vxlan's ``vxlan_entries``).

A remote lease becomes one ``Peer``: its subnet is reached by sending flannel-format datagrams to
its public IP. The workers' lookup and anti-spoof rules over the resulting ``PeerTable`` live in
``packet.py``.
"""

from __future__ import annotations

from flannel.backends.udp.packet import Peer
from flannel.lease import Lease


def peer_of(lease: Lease) -> Peer | None:
    """The peer-table entry for a remote lease, or ``None`` if it has no IPv4 subnet (udp is IPv4 only)."""
    if lease.subnet is None:
        return None
    return Peer(subnet=lease.subnet, public_ip=lease.attrs.public_ip)
