"""wireguard backend (reference §9.4): pod traffic encrypted by WireGuard — the kernel's, or
``wireguard-go`` when the kernel has none.

* ``keys.py``    – the private key file and key encodings (X25519 via ``cryptography``);
* ``model.py``   – value types: ``PeerConfig``, ``PeerStatus``, ``DeviceStatus``, ``SetRequest``;
* ``network.py`` – pure: options, BackendData, lease → peers, the incremental peer table, plans;
* ``uapi.py``    – pure codecs of the UAPI text protocol and of the ``wg`` tool;
* ``device.py``  – the port: creates, configures, reads and deletes devices (kernel or wireguard-go);
* ``backend.py`` – ``WireGuardBackend`` (the plugin) and ``WireGuardNetwork``.
"""

from flannel.backends.wireguard.backend import PeerReport, WireGuardBackend, WireGuardNetwork

__all__ = ["PeerReport", "WireGuardBackend", "WireGuardNetwork"]
