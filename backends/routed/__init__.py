"""What every peer-programming backend shares (vxlan, host-gw): the kernel-state model, the plan, the
reconcile loop and the netlink port.

* ``model.py``     – pure: ``Route``/``Neigh``/``Fdb`` values, ``KernelState``, ``plan`` (the diff),
                     ``Context`` and the ``Translate`` contract of a backend's ``network.py``;
* ``netlink.py``   – the only module of the backends that imports pyroute2 (and runs ``ip -batch``);
* ``reconcile.py`` – ``RoutedNetwork``: keeps the kernel in step with the leases (DESIGN §3).

A backend package built on it reads the same way as vxlan and host-gw: ``network.py`` is the pure
lease → kernel-entries translation, ``backend.py`` the plugin and its ``Network`` (a
``RoutedNetwork`` subclass).
"""
