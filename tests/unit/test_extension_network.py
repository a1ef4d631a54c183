"""extension backend, pure parts and the command runner (reference §9.6, §14.3)."""

from __future__ import annotations

import logging
import queue
import threading
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from ipaddress import IPv6Address as A6
from ipaddress import IPv6Network as N6

import pytest

from flannel import errors, wire
from flannel.backends.base import ExternalInterface
from flannel.backends.extension import ExtensionBackend, ExtensionNetwork, command
from flannel.backends.extension import network as ext
from flannel.config import parse_network_config
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent
from tests.support import FakeLeases


def test_options_case_insensitive_and_unknown_commands_reported():
    opts, unknown = ext.parse_options({"Type": "extension", "prestartupcommand": " echo hi ",
                                       "SubnetAddCommand": "a", "SUBNETREMOVECOMMAND": "r",
                                       "ShutdownCommand": "ip link del x"})
    assert opts == ext.ExtensionOptions(pre_startup="echo hi", subnet_add="a", subnet_remove="r")
    assert unknown == ["ShutdownCommand"]


def test_a_command_that_is_not_a_string_is_a_config_error():
    with pytest.raises(errors.ConfigError, match="SubnetAddCommand: must be a string"):
        ext.parse_options({"SubnetAddCommand": ["ip", "route"]})


def test_backend_data_is_a_json_string():
    assert ext.encode_backend_data("aa:bb:cc:dd:ee:ff") == '"aa:bb:cc:dd:ee:ff"'
    assert ext.encode_backend_data('a"<b>') == '"a\\"\\u003cb\\u003e"'     # Go's escaping
    assert ext.decode_backend_data('"aa:bb"') == "aa:bb"
    assert ext.decode_backend_data(None) == ""
    with pytest.raises(errors.BadLeaseRecord, match="must be a JSON string"):
        ext.decode_backend_data('{"VNI":1}')


def test_golden_lease_value():
    attrs = LeaseAttrs(public_ip=A("192.168.1.10"), backend_type="extension",
                       backend_data=ext.encode_backend_data("aa:bb:cc:dd:ee:ff"))
    assert wire.encode_attrs(attrs) == \
        '{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"extension","BackendData":"aa:bb:cc:dd:ee:ff"}'


def test_environments():
    config = parse_network_config('{"Network":"10.8.0.0/16","Backend":{"Type":"extension"}}')
    own = Lease(N("10.8.1.0/24"), LeaseAttrs(public_ip=A("198.18.0.1"), backend_type="extension"))
    assert ext.post_startup_env(config, own) == {"NETWORK": "10.8.0.0/16", "SUBNET": "10.8.1.0/24", "IPV6SUBNET": "",
                                                 "PUBLIC_IP": "198.18.0.1", "PUBLIC_IPV6": ""}
    remote = Lease(N("10.8.2.0/24"), LeaseAttrs(public_ip=A("198.18.0.2"), public_ipv6=A6("fd00::2"),
                                                backend_type="extension", backend_data='"k2"'), N6("fd10::/64"))
    assert ext.subnet_env(remote) == {"SUBNET": "10.8.2.0/24", "PUBLIC_IP": "198.18.0.2",
                                      "IPV6SUBNET": "fd10::/64", "PUBLIC_IPV6": "fd00::2"}
    assert ext.subnet_stdin(remote) == "k2\n"


def test_command_runs_through_sh_with_env_and_stdin():
    res = command.run('read X; echo "$SUBNET via $PUBLIC_IP: $X" && echo err >&2', {"SUBNET": "10.8.2.0/24",
                      "PUBLIC_IP": "198.18.0.2"}, "payload\n")
    assert res.ok and res.output == "10.8.2.0/24 via 198.18.0.2: payload\nerr"


def test_failing_and_hanging_commands_are_reported():
    res = command.run("echo boom; exit 3")
    assert not res.ok and res.returncode == 3 and res.output == "boom" and "exit status 3" in res.describe()
    slow = command.run("echo started; sleep 30", timeout=0.5)
    assert slow.timed_out and not slow.ok and slow.output == "started" and "timed out" in slow.describe()


def lease(i: int, data: str | None = None, ip: str | None = None, typ: str = "extension") -> Lease:
    return Lease(N(f"10.8.{i}.0/24"), LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), backend_type=typ,
                                                 backend_data=data))


def test_network_runs_add_remove_and_survives_failures(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    log_file = tmp_path / "calls"
    opts = ext.ExtensionOptions(
        subnet_add=f'read D; echo "add $SUBNET $PUBLIC_IP $D" >> {log_file}; [ "$SUBNET" != 10.8.3.0/24 ] || '
                   '{ echo "cannot program $SUBNET"; exit 7; }',
        subnet_remove=f'read D; echo "del $SUBNET $PUBLIC_IP $D" >> {log_file}')
    net = ExtensionNetwork(Lease(N("10.8.1.0/24"), LeaseAttrs()), 1500, opts)
    q: queue.Queue[Batch | None] = queue.Queue()
    stop = threading.Event()
    t = threading.Thread(target=net.run, args=(q, stop))
    t.start()
    try:
        a, b, c = lease(2, '"k2"'), lease(3, '"k3"'), lease(4)
        q.put(Batch(tuple(LeaseEvent(EventType.ADDED, x) for x in (a, b, c, lease(5, typ="vxlan"),
                                                                    lease(6, data="{}"))), synced=True))
        q.put(Batch((LeaseEvent(EventType.ADDED, a),)))                       # unchanged: no second add
        q.put(Batch((LeaseEvent(EventType.ADDED, lease(2, '"k2"', ip="198.18.0.22")),)))   # moved: del + add
        q.put(Batch((LeaseEvent(EventType.REMOVED, c),)))
        q.put(None)
        t.join(30)
    finally:
        stop.set()
        q.put(None)
        t.join(5)
    assert log_file.read_text().splitlines() == [
        "add 10.8.2.0/24 198.18.0.2 k2", "add 10.8.3.0/24 198.18.0.3 k3", "add 10.8.4.0/24 198.18.0.4 ",
        "del 10.8.2.0/24 198.18.0.2 k2", "add 10.8.2.0/24 198.18.0.22 k2", "del 10.8.4.0/24 198.18.0.4 "]
    assert net.failures == 1
    assert "SubnetAddCommand failed (exit status 7" in caplog.text
    assert "Output: cannot program 10.8.3.0/24" in caplog.text
    assert "ignoring non-extension subnet 10.8.5.0/24" in caplog.text
    assert "not running SubnetAddCommand for 10.8.6.0/24" in caplog.text


def test_pre_and_post_startup(tmp_path):
    ext_if = ExternalInterface("eth0", 2, 1400, A("198.18.0.1"), A("203.0.113.1"))
    post_file = tmp_path / "post"
    cfg = parse_network_config('{"Network":"10.8.0.0/16","Backend":{"Type":"extension",'
                               '"PreStartupCommand":"echo \\"  aa:bb:cc:dd:ee:ff \\"",'
                               f'"PostStartupCommand":"echo $NETWORK $SUBNET $PUBLIC_IP > {post_file}"}}}}')
    leases = FakeLeases("10.8.1.0/24")
    net = ExtensionBackend(ext_if).register_network(config=cfg, leases=leases)
    # the interface address, not the public one; the pre-startup output trimmed, as a JSON string
    assert leases.attrs == LeaseAttrs(public_ip=A("198.18.0.1"), backend_type="extension",
                                      backend_data='"aa:bb:cc:dd:ee:ff"')
    assert post_file.read_text() == "10.8.0.0/16 10.8.1.0/24 198.18.0.1\n"
    assert net.mtu == 1400


def test_failing_startup_command_is_fatal_with_its_output():
    ext_if = ExternalInterface("eth0", 2, 1500, A("198.18.0.1"), A("198.18.0.1"))
    cfg = parse_network_config('{"Network":"10.8.0.0/16","Backend":{"Type":"extension",'
                               '"PreStartupCommand":"echo no device here; exit 2"}}')
    with pytest.raises(errors.BackendError, match=r"PreStartupCommand failed \(exit status 2.*no device here"):
        ExtensionBackend(ext_if).register_network(config=cfg, leases=FakeLeases("10.8.1.0/24"))
