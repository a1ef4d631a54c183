"""Backends (installed as ``flannel.backends``): how the data plane is programmed."""
