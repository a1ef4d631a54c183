"""extension backend (reference §9.6): the data plane is the operator's own commands (prototyping).

* ``network.py`` – pure: options, BackendData, each command's environment and stdin;
* ``command.py`` – runs one command (``sh -c``, combined output, timeout);
* ``backend.py`` – ``ExtensionBackend`` (the plugin) and ``ExtensionNetwork``.
"""

from flannel.backends.extension.backend import ExtensionBackend, ExtensionNetwork

__all__ = ["ExtensionBackend", "ExtensionNetwork"]
