"""The flannel CNI plugin (CNI spec 1.0): a meta-plugin that reads subnet.env and delegates.

It turns the node's flannel lease (``/run/flannel/subnet.env``, written by the agent) into a
``bridge`` + ``host-local`` config and runs that plugin, like flannel's Go plugin does. The package
uses only the standard library (plus ``flannel.errors``) on purpose: ``flannel-cni install`` can
then pack it into a single self-contained file that runs with the node's own ``python3`` as
``/opt/cni/bin/flannel``, without the agent's dependencies installed on the host.
"""
