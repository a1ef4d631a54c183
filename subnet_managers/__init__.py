"""Subnet managers (installed as ``flannel.subnet_managers``): where leases are stored."""
