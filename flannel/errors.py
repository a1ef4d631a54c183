"""One exception hierarchy for the whole agent.

Classes are grouped by what the caller can do about them:

* ``ConfigError`` – a user mistake (flag, network config, backend options). Fatal, exit 1
  (or 2 for command-line usage errors). The message names the field and the rule. Two
  subclasses come from the store while the agent runs or connects: ``ConfigChanged`` (the
  network config in the store changed under a running agent) and ``StoreTLSError`` (the TLS
  handshake with the store failed for a reason no retry fixes: certificate, CA, server name).
* ``StoreUnavailable`` – etcd / the API server cannot be reached right now. Retried.
* ``LeaseConflict`` – someone else created the subnet key first. Try another subnet.
* ``NetworkFull`` – no free subnet left. Fatal, with the network and its size in the message.
* ``BackendError`` – the data plane could not be set up. ``ResourceBusy`` – a tool or the
  kernel was busy (the xtables lock held by another program, a command that timed out): retried.
* ``PluginError`` – an unknown or broken backend / subnet-manager plugin.

Adapters (etcd registry, kube client, netlink) convert library errors into these at their
boundary with ``raise ... from``; nothing above them catches a library exception.
"""

from __future__ import annotations


class FlannelError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(FlannelError):
    """Invalid configuration: network config, backend options, flags. Not retried."""


class UsageError(ConfigError):
    """A command-line flag or environment value is invalid (exit status 2)."""


class InterfaceError(ConfigError):
    """No usable external interface / public address could be determined."""


class ConfigChanged(ConfigError):
    """The network config in the store changed incompatibly while the agent runs (``Network``,
    subnet lengths, address families or the backend type).

    Raised by a subnet manager's ``watch_leases``. subnet.env, the traffic rules and the backend's
    devices all describe the old network, so rather than patch them in place the agent exits 1 with
    this message and its supervisor (systemd, the DaemonSet) restarts it with the new config
    (flannel ignored the change until a restart).
    """


class StoreError(FlannelError):
    """A problem talking to the lease store (etcd or the Kubernetes API)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now; callers retry with backoff."""


class ConfigNotFound(StoreError):
    """The network config does not exist (yet) in the store; the daemon waits for it."""


class PermissionDenied(StoreError):
    """The store refused an operation (auth/RBAC). Not retried; names what was refused."""


class LeaseConflict(StoreError):
    """A create-if-absent lost a race: the subnet key already exists. Try another subnet."""


class LeaseNotFound(StoreError):
    """The lease key does not exist (deleted or expired)."""


class NetworkFull(StoreError):
    """No free subnet is left in the configured network."""


class StoreTLSError(ConfigError):
    """The TLS handshake with the store failed: client certificate missing or rejected, CA
    mismatch, wrong server name. The message names the likely cause and the flag to fix.

    Fatal at startup (retrying does not fix a certificate); loops that already run keep retrying
    with this message (a certificate may be rotated while we wait)."""


class BadLeaseRecord(FlannelError):
    """A stored key or value could not be decoded; the record is skipped, never fatal.

    ``reason`` is a short, stable label for counting skipped records (``key``, ``size``,
    ``encoding``, ``json``, ``depth``, ``type``, ``address``, ...); the message says the rest.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class BackendError(FlannelError):
    """The data plane (devices, routes, sockets) could not be set up."""


class ResourceBusy(BackendError):
    """A tool or the kernel is busy right now: ``iptables`` could not take the xtables lock (another
    program, e.g. kube-proxy, holds it), or a command did not finish within its timeout. Retried
    with backoff (``retry.firewall``, then the worker supervision); the message names the command."""


class PluginError(FlannelError):
    """A backend or subnet-manager plugin is unknown or failed to load."""

    def __init__(self, group: str, name: str, available: list[str], cause: str | None = None):
        self.group, self.name, self.available = group, name, available
        avail = ", ".join(sorted(available)) or "none"
        if cause:
            msg = f"cannot load {group} plugin {name!r}: {cause}"
        else:
            msg = f"unknown {group} {name!r} (installed: {avail})"
        super().__init__(msg)
