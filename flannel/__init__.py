"""pyflannel: a flannel-compatible overlay network agent.

The package layout is described in DESIGN.md: the core lives here, backends and subnet managers
are installed as ``flannel.backends`` and ``flannel.subnet_managers`` from the top-level
``backends/`` and ``subnet_managers/`` folders.
"""

__version__ = "0.1.0"
