"""The kernel side of ``flannelctl doctor`` and the check itself (read-only).

For the network's backend it rebuilds what the running agent uses — the translation context (the
external interface chosen by the agent's own ``iface.select``, its connected subnets, the device
names from the backend's options) and the ``Scope`` of the entries the agent owns — reads the
kernel through the backends' own ports (``Netlink.dump``, ``wireguard.device.read_status``) and
hands both sides to the pure ``diff`` functions. It never writes to the kernel or the store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from flannel import errors, iface
from flannel.backends.base import ExternalInterface
from flannel.backends.routed import model
from flannel.backends.routed.netlink import Netlink, Scope
from flannel.doctor.diff import Diff, diff_routed, diff_wireguard
from flannel.doctor.findings import MISSING, WRONG_MAC, Finding, Report
from flannel.doctor.store import StoreView
from flannel.lease import UNSPECIFIED_V4
from flannel.options import AgentOptions

log = logging.getLogger(__name__)

VXLAN, HOST_GW, WIREGUARD = "vxlan", "host-gw", "wireguard"
CHECKED_BACKENDS = (VXLAN, HOST_GW, WIREGUARD)


def check(view: StoreView, *, ifaces: Sequence[str] = (), uapi_dir: str | None = None) -> Report:
    """Compare this node's kernel with ``view``.

    :param ifaces: ``--iface`` values as given to the agent (default: the interface holding our
        lease's public IP, else the default-route interface — the agent's own rule).
    :param uapi_dir: wireguard-go's UAPI directory (default: the backend's default).
    :raises errors.FlannelError: the check cannot be made (unsupported backend, bad options,
        no external interface, a device that cannot be read).
    """
    config = view.config
    backend = config.backend_type
    if backend not in CHECKED_BACKENDS:
        raise errors.ConfigError(f"doctor checks vxlan, host-gw and wireguard networks; this network's backend is "
                                 f"{backend!r}")
    ext = external_interface(view, ifaces)
    nl = Netlink()
    try:
        if backend == WIREGUARD:
            diff, checked = _wireguard(view, ext, nl, uapi_dir)
        else:
            diff, checked = _routed(view, ext, nl)
    finally:
        nl.close()
    return Report(mode=view.mode, store=view.where, backend=backend, node=view.own_ref, interface=ext.name,
                  checked=checked, findings=view.findings + diff.findings, notes=view.notes + diff.notes)


def external_interface(view: StoreView, ifaces: Sequence[str]) -> ExternalInterface:
    """The interface the agent runs on, chosen by the agent's own selection with our lease's
    public addresses as ``--public-ip`` / ``--public-ipv6``."""
    own = view.own
    pub4 = str(own.attrs.public_ip) if own is not None and own.attrs.public_ip != UNSPECIFIED_V4 else ""
    pub6 = str(own.attrs.public_ipv6) if own is not None and own.attrs.public_ipv6 is not None else ""
    opts = AgentOptions(iface=tuple(ifaces), public_ip=pub4, public_ipv6=pub6)
    return iface.select(opts, ipv4=view.config.enable_ipv4, ipv6=view.config.enable_ipv6)


# --------------------------------------------------------------------------------------------
# vxlan / host-gw
# --------------------------------------------------------------------------------------------

def routed_setup(view: StoreView, ext: ExternalInterface) -> tuple[model.Context, Scope, model.Translate]:
    """The translation context, the ownership scope and the translation of the running backend
    (as ``VXLANBackend`` / ``HostGWBackend.register_network`` and ``RoutedNetwork.scope`` build
    them; ``tests/unit/test_doctor.py`` checks the scope against ``RoutedNetwork.scope``).
    The connected subnets of the context are filled in by ``_routed`` from the kernel."""
    config = view.config
    v4, v6 = config.enable_ipv4, config.enable_ipv6
    if config.backend_type == VXLAN:
        from flannel.backends.vxlan import network as vx

        opts = vx.parse_options(config.backend)
        dev4 = vx.device_name(opts.vni) if v4 else None
        dev6 = vx.device_name(opts.vni, v6=True) if v6 else None
        ctx = model.Context(backend_type=VXLAN, dev=dev4, ext_dev=ext.name, direct_routing=opts.direct_routing,
                            dev6=dev6)
        devs = (*(d for d in (dev4, dev6) if d), ext.name)
        translate: model.Translate = vx.vxlan_entries
    else:
        from flannel.backends.hostgw.network import hostgw_entries

        ctx = model.Context(backend_type=HOST_GW, dev=ext.name if v4 else None, ext_dev=ext.name,
                            dev6=ext.name if v6 else None)
        dev4 = dev6 = None
        devs = (ext.name,)
        translate = hostgw_entries
    own4, own6 = view.own_ident
    scope = Scope(network=config.network if v4 else None, devs=devs, overlay_dev=dev4, exclude=own4,
                  network6=config.ipv6_network if v6 else None, overlay_dev6=dev6, exclude6=own6)
    return ctx, scope, translate


def _routed(view: StoreView, ext: ExternalInterface, nl: Netlink) -> tuple[Diff, dict[str, int]]:
    ctx, scope, translate = routed_setup(view, ext)
    # on-link subnets of the external interface, as RoutedNetwork.refresh_context reads them
    idx = nl.link_index(ext.name)
    if idx is None:
        raise errors.InterfaceError(f"external interface {ext.name} vanished")
    ctx = replace(ctx, local_nets=nl.connected_nets(idx, 4),
                  local_nets6=nl.connected_nets(idx, 6) if ctx.dev6 is not None else ())
    devices = _vxlan_devices(view, scope, nl) if ctx.backend_type == VXLAN else []
    actual = nl.dump(scope)
    diff = diff_routed(view.remote, ctx, translate, actual, ref=view.ref, kept=view.kept)
    checked = {"remote leases": len(view.remote), "expected kernel entries": diff.desired,
               "kernel entries": len(actual)}
    return Diff(tuple(devices) + diff.findings, diff.notes, diff.desired), checked


def _vxlan_devices(view: StoreView, scope: Scope, nl: Netlink) -> list[Finding]:
    """Our vxlan devices exist and carry the MAC our lease publishes (peers address us by it)."""
    from flannel.backends.vxlan import network as vx

    out = []
    for dev, data in ((scope.overlay_dev, view.own.attrs.backend_data if view.own else None),
                      (scope.overlay_dev6, view.own.attrs.backend_v6_data if view.own else None)):
        if dev is None:
            continue
        info = nl.link(dev)
        if info is None:
            out.append(Finding(MISSING, "device", None, f"vxlan device {dev}", view.own_ref,
                               "every route, neighbour and fdb entry on it is missing with it; the agent "
                               "re-creates it"))
            continue
        try:
            published = vx.parse_backend_data(data).mac if data is not None else None
        except errors.BadLeaseRecord as e:
            log.warning("our own lease's BackendData is unreadable: %s", e)
            published = None
        if published is not None and info.mac.lower() != published:
            out.append(Finding(WRONG_MAC, "device", f"{dev} address {info.mac.lower()}",
                               f"{dev} address {published} (our lease's VtepMAC)", view.own_ref,
                               "peers send this node's traffic to a MAC it does not have"))
    return out


# --------------------------------------------------------------------------------------------
# wireguard
# --------------------------------------------------------------------------------------------

def _wireguard(view: StoreView, ext: ExternalInterface, nl: Netlink,
               uapi_dir: str | None) -> tuple[Diff, dict[str, int]]:
    from flannel.backends.wireguard import backend as wgbackend
    from flannel.backends.wireguard import device as wgdevice
    from flannel.backends.wireguard import network as wgnet
    from flannel.backends.wireguard.model import DeviceStatus

    config = view.config
    opts = wgnet.parse_options(config.backend or {})
    fams: dict[int, object] = {v: None for v, on in ((4, config.enable_ipv4), (6, config.enable_ipv6)) if on}
    specs = wgbackend.device_specs(opts.mode, fams, opts)
    table = wgnet.PeerTable(wgbackend.make_context(opts, fams, ext))
    table.reset(view.remote)
    devices: dict[str, DeviceStatus | None] = {}
    for name in specs:
        if nl.link_index(name) is None:
            devices[name] = None
        else:
            devices[name] = wgdevice.read_status(name, uapi_dir=uapi_dir or wgdevice.DEFAULT_UAPI_DIR)
    own_key = None
    if view.own is not None:
        data = view.own.attrs.backend_data if config.enable_ipv4 else view.own.attrs.backend_v6_data
        try:
            own_key = wgnet.parse_backend_data(data).public_key
        except errors.BadLeaseRecord as e:
            log.warning("our own lease's BackendData is unreadable: %s", e)
    diff = diff_wireguard(table, devices, {n: s.listen_port for n, s in specs.items()}, own_key,
                          own=view.own_ref, ref=view.ref, kept=view.kept)
    peers = sum(len(s.peers) for s in devices.values() if s is not None)
    return diff, {"remote leases": len(view.remote), "expected peers": diff.desired, "device peers": peers}
