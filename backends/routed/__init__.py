"""What every peer-programming backend shares (vxlan, host-gw): the kernel-state model, the
desired-state index, the reconcile loop and the netlink port.

* ``model.py``     – pure: ``Route``/``Neigh``/``Fdb``/``ForeignRoute`` values, ``KernelState``, ``plan``
                     (the diff), ``Context`` and the ``Translate`` contract of a backend's ``network.py``;
* ``desired.py``   – pure: ``Index``, what the leases want per lease and per kernel key, so that a
                     batch of k events costs O(k); conflicts and refusals (ownership) decided here;
* ``rtnl.py``      – raw rtnetlink for the per-peer entries: batched writes, dumps, notifications;
* ``netlink.py``   – the port the loop talks to (links, addresses, entries; what the agent owns);
* ``reconcile.py`` – ``RoutedNetwork``: keeps the kernel in step with the leases (DESIGN §3).

A backend package built on it reads the same way as vxlan and host-gw: ``network.py`` is the pure
lease → kernel-entries translation, ``backend.py`` the plugin and its ``Network`` (a
``RoutedNetwork`` subclass). What the agent owns in the kernel: docs/ownership.md.
"""
