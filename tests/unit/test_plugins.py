"""Entry-point discovery: only the asked-for plugin is loaded; unknown names list what exists."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from flannel import errors, plugins


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=plugins.BACKENDS)


def test_loads_only_the_requested_plugin():
    eps = [_ep("good", "flannel.backends.alloc:AllocBackend"), _ep("broken", "no.such.module:X")]
    cls = plugins.load(plugins.BACKENDS, "GOOD", eps)
    assert cls.__name__ == "AllocBackend"


def test_unknown_lists_installed():
    eps = [_ep("vxlan", "a:b"), _ep("udp", "c:d")]
    with pytest.raises(errors.PluginError) as info:
        plugins.load(plugins.BACKENDS, "wireguard", eps)
    assert "unknown flannel.backends 'wireguard' (installed: udp, vxlan)" in str(info.value)


def test_broken_plugin_reports_cause():
    with pytest.raises(errors.PluginError, match=r"cannot load .* 'broken': ModuleNotFoundError"):
        plugins.load(plugins.BACKENDS, "broken", [_ep("broken", "no.such.module:X")])


def test_builtins_are_registered_like_third_party():
    assert {"alloc", "vxlan", "host-gw", "udp", "wireguard", "extension"} <= set(plugins.available(plugins.BACKENDS))
    assert {"etcd", "kube"} <= set(plugins.available(plugins.SUBNET_MANAGERS))
