"""wireguard backend, pure parts: keys, options, BackendData, lease → peers, the incremental peer
table, plans, the UAPI / wg codecs, and golden lease/annotation values (reference §9.4)."""

from __future__ import annotations

import logging
import os
import stat
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from ipaddress import IPv6Address as A6
from ipaddress import IPv6Network as N6

import pytest

from flannel import errors, wire
from flannel.backends.base import ExternalInterface
from flannel.backends.wireguard import keys, uapi
from flannel.backends.wireguard import network as wg
from flannel.backends.wireguard.backend import device_specs, lease_attrs, make_context
from flannel.backends.wireguard.model import Endpoint, PeerConfig, PeerStatus, SetRequest
from flannel.lease import EventType, Lease, LeaseAttrs, LeaseEvent
from flannel.subnet_managers.kube import annotations as ann

# RFC 7748 §6.1 (Alice): the X25519 key pair, as WireGuard writes them (base64)
ALICE_PRIV = keys.encode_key(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
ALICE_PUB = keys.encode_key(bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"))
K1 = keys.encode_key(bytes([1]) * 32)
K2 = keys.encode_key(bytes([2]) * 32)
K3 = keys.encode_key(bytes([3]) * 32)
PSK = keys.encode_key(bytes([9]) * 32)


# ---- keys ---------------------------------------------------------------------------------------

def test_public_key_is_x25519_of_the_private_key():
    assert keys.public_key(ALICE_PRIV) == ALICE_PUB


def test_generated_keys_are_clamped_and_differ():
    a, b = keys.generate_private_key(), keys.generate_private_key()
    assert a != b
    raw = keys.parse_key(a)
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


def test_key_file_is_generated_0400_without_newline_and_reused(tmp_path):
    path = tmp_path / "sub" / "wgkey"
    k = keys.load_or_create(str(path))
    assert path.read_text() == k and len(k) == 44
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert keys.load_or_create(str(path)) == k


def test_key_file_with_trailing_newline_is_accepted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # flannel refuses this (reference §14.18); `wg genkey > file` writes exactly this
    path = tmp_path / "wgkey"
    path.write_text(ALICE_PRIV + "\n")
    os.chmod(path, 0o400)
    assert keys.load_or_create(str(path)) == ALICE_PRIV
    assert "ignoring surrounding whitespace" in caplog.text


@pytest.mark.parametrize("content, why", [
    ("", "44 base64 characters"),
    ("not a key at all", "44 base64 characters"),
    (ALICE_PRIV[:-2] + "!=", "not valid base64"),
    (ALICE_PRIV + ALICE_PRIV, "44 base64 characters"),
])
def test_bad_key_file_is_a_config_error_naming_the_file(tmp_path, content, why):
    path = tmp_path / "wgkey"
    path.write_text(content)
    with pytest.raises(errors.ConfigError, match=f"wireguard key file {path}: .*{why}"):
        keys.load_or_create(str(path))


def test_key_file_env(monkeypatch):
    assert keys.key_file_path({}) == "/run/flannel/wgkey"
    assert keys.key_file_path({"WIREGUARD_KEY_FILE": "/etc/k"}) == "/etc/k"


def test_hex_round_trip():
    assert keys.hex_to_b64(keys.b64_to_hex(ALICE_PUB)) == ALICE_PUB
    assert keys.b64_to_hex(ALICE_PUB) == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


# ---- options ------------------------------------------------------------------------------------

def test_option_defaults_are_flannels():
    assert wg.parse_options({"Type": "wireguard"}) == wg.WGOptions(51820, 51821, 0, None, 0, wg.Mode.SEPARATE)


def test_options_are_case_insensitive_and_parsed():
    o = wg.parse_options({"listenport": 5000, "LISTENPORTV6": 5001, "PSK": PSK, "PersistentKeepaliveInterval": 25,
                          "Mode": "auto", "MTU": 1400})
    assert o == wg.WGOptions(5000, 5001, 1400, PSK, 25, wg.Mode.AUTO)


@pytest.mark.parametrize("backend, msg", [
    ({"ListenPort": 0}, "ListenPort: must be an integer in \\[1, 65535\\]"),
    ({"ListenPort": "51820"}, "ListenPort"),
    ({"ListenPortV6": 70000}, "ListenPortV6"),
    ({"PSK": "short"}, "PSK: PSK must be 44 base64 characters"),
    ({"Mode": "both"}, 'Mode: "both"; must be one of separate, auto, ipv4, ipv6'),
    ({"Mode": 4}, "Mode: 4"),
    ({"PersistentKeepaliveInterval": -1}, "PersistentKeepaliveInterval"),
    ({"PersistentKeepaliveInterval": True}, "PersistentKeepaliveInterval"),
])
def test_bad_options_name_the_option(backend, msg):
    with pytest.raises(errors.ConfigError, match=msg):
        wg.parse_options(backend)


def test_device_mtu_is_c_minus_80():
    assert wg.device_mtu(wg.WGOptions(), 1500) == 1420
    assert wg.device_mtu(wg.WGOptions(mtu=9000), 1500) == 8920
    with pytest.raises(errors.ConfigError, match="MTU"):
        wg.device_mtu(wg.WGOptions(mtu=140), 1500)


# ---- golden wire values -------------------------------------------------------------------------

EXT = ExternalInterface("eth0", 2, 1500, A("192.168.1.10"), A("192.168.1.10"),
                        iface_v6_addr=A6("2001:db8::10"), ext_v6_addr=A6("2001:db8::10"))


def test_golden_lease_value_ipv4():
    attrs = lease_attrs(EXT, {4: None}, wg.WGOptions(), ALICE_PUB)
    assert wire.encode_attrs(attrs) == (
        '{"PublicIP":"192.168.1.10","PublicIPv6":"2001:db8::10","BackendType":"wireguard",'
        '"BackendData":{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51820}}')
    ext4 = ExternalInterface("eth0", 2, 1500, A("192.168.1.10"), A("192.168.1.10"))
    assert wire.encode_attrs(lease_attrs(ext4, {4: None}, wg.WGOptions(), ALICE_PUB)) == (
        '{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"wireguard",'
        '"BackendData":{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51820}}')


def test_golden_lease_value_dual_stack_separate_and_single_device():
    sep = lease_attrs(EXT, {4: None, 6: None}, wg.WGOptions(), ALICE_PUB)
    assert wire.encode_attrs(sep).endswith(
        '"BackendData":{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51820},'
        '"BackendV6Data":{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51821}}')
    # single device: the v6 Port is the port the one device listens on (flannel: ListenPortV6)
    auto = lease_attrs(EXT, {4: None, 6: None}, wg.WGOptions(mode=wg.Mode.AUTO), ALICE_PUB)
    assert auto.backend_v6_data == '{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51820}'


def test_golden_kube_annotations():
    names = ann.AnnotationNames.for_prefix("flannel.alpha.coreos.com")
    ext4 = ExternalInterface("eth0", 2, 1500, A("192.168.1.10"), A("192.168.1.10"))
    assert ann.desired_annotations(names, lease_attrs(ext4, {4: None}, wg.WGOptions(), ALICE_PUB), {}) == {
        "flannel.alpha.coreos.com/backend-type": "wireguard",
        "flannel.alpha.coreos.com/backend-data":
            '{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51820}',
        "flannel.alpha.coreos.com/public-ip": "192.168.1.10",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    }
    dual = ann.desired_annotations(names, lease_attrs(EXT, {4: None, 6: None}, wg.WGOptions(), ALICE_PUB), {})
    assert dual["flannel.alpha.coreos.com/backend-v6-data"] == \
        '{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51821}'
    assert dual["flannel.alpha.coreos.com/public-ipv6"] == "2001:db8::10"
    # a public IPv6 without v6 data (IPv4-only config): no v6 annotations (reference §5.5 step 6)
    v4only = ann.desired_annotations(names, lease_attrs(EXT, {4: None}, wg.WGOptions(), ALICE_PUB), {})
    assert "flannel.alpha.coreos.com/backend-v6-data" not in v4only


def test_device_specs_per_mode():
    o = wg.WGOptions()
    assert {n: s.listen_port for n, s in device_specs(wg.Mode.SEPARATE, {4: 0, 6: 0}, o).items()} == \
        {"flannel-wg": 51820, "flannel-wg-v6": 51821}
    single = device_specs(wg.Mode.IPV6, {4: 0, 6: 0}, o)
    assert list(single) == ["flannel-wg"] and single["flannel-wg"].versions == (4, 6)
    assert device_specs(wg.Mode.AUTO, {4: 0}, o)["flannel-wg"].versions == (4,)   # no zero IPv6 route (§14.17)


# ---- BackendData --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    (f'{{"PublicKey":"{K1}","Port":51820}}', wg.WGData(K1, 51820)),
    (f'{{"publickey":"{K1}"}}', wg.WGData(K1, 0)),          # flannel before it published ports
    (f'{{"PublicKey":"{K1}","Port":null,"Extra":1}}', wg.WGData(K1, 0)),
])
def test_backend_data_parses(text, want):
    assert wg.parse_backend_data(text) == want


@pytest.mark.parametrize("text, msg", [
    (None, "no BackendData"),
    ("{", "not JSON"),
    ('"aa:bb"', "must be a JSON object"),
    ('{"Port":51820}', "PublicKey must be a base64 string"),
    ('{"PublicKey":"abc"}', "PublicKey must be 44 base64 characters"),
    (f'{{"PublicKey":"{K1}","Port":"51820"}}', "Port must be an integer"),
    (f'{{"PublicKey":"{K1}","Port":65536}}', "Port must be an integer"),
])
def test_bad_backend_data_is_a_bad_lease_record(text, msg):
    with pytest.raises(errors.BadLeaseRecord, match=msg):
        wg.parse_backend_data(text)


# ---- lease → peers ------------------------------------------------------------------------------

def bd(key: str, port: int | None = 51820) -> str:
    return wg.encode_backend_data(key, port) if port is not None else f'{{"PublicKey":"{key}"}}'


def lease(i: int, key: str = K1, *, v6: bool = False, ip: str | None = None, ip6: str | None = None,
          port: int | None = 51820, port6: int | None = 51821, typ: str = "wireguard") -> Lease:
    attrs = LeaseAttrs(public_ip=A(ip or f"198.18.0.{i}"), public_ipv6=A6(ip6 or f"fd00::{i}") if v6 else None,
                       backend_type=typ, backend_data=bd(key, port),
                       backend_v6_data=bd(key, port6) if v6 else None)
    return Lease(N(f"10.7.{i}.0/24"), attrs, N6(f"fd10:0:0:{i}::/64") if v6 else None)


SEP4 = wg.Context(wg.Mode.SEPARATE, "flannel-wg", None)
SEP46 = wg.Context(wg.Mode.SEPARATE, "flannel-wg", "flannel-wg-v6")


def test_separate_ipv4_peer():
    assert wg.peers_of(lease(2), SEP4) == {"flannel-wg": PeerConfig(
        K1, Endpoint(A("198.18.0.2"), 51820), frozenset({N("10.7.2.0/24")}))}


def test_separate_dual_stack_two_peers_with_their_own_ports_psk_keepalive():
    ctx = wg.Context(wg.Mode.SEPARATE, "flannel-wg", "flannel-wg-v6", psk=PSK, keepalive=25)
    out = wg.peers_of(lease(2, v6=True), ctx)
    assert out["flannel-wg-v6"] == PeerConfig(K1, Endpoint(A6("fd00::2"), 51821), frozenset({N6("fd10:0:0:2::/64")}),
                                              PSK, 25)
    assert out["flannel-wg"].endpoint == Endpoint(A("198.18.0.2"), 51820)
    assert str(out["flannel-wg-v6"].endpoint) == "[fd00::2]:51821"


def test_missing_port_falls_back_to_our_listen_port():
    ctx = wg.Context(wg.Mode.SEPARATE, "flannel-wg", "flannel-wg-v6", port4=6000, port6=6001)
    out = wg.peers_of(lease(2, v6=True, port=None, port6=0), ctx)
    assert out["flannel-wg"].endpoint.port == 6000 and out["flannel-wg-v6"].endpoint.port == 6001


def test_ipv4_only_node_ignores_a_peers_ipv6_family():
    out = wg.peers_of(lease(2, v6=True), SEP4)
    assert list(out) == ["flannel-wg"]


def test_single_device_modes_one_peer_with_both_subnets():
    both = frozenset({N("10.7.2.0/24"), N6("fd10:0:0:2::/64")})
    v4 = wg.peers_of(lease(2, v6=True), wg.Context(wg.Mode.IPV4, "flannel-wg", "flannel-wg"))
    assert v4 == {"flannel-wg": PeerConfig(K1, Endpoint(A("198.18.0.2"), 51820), both)}
    v6 = wg.peers_of(lease(2, v6=True), wg.Context(wg.Mode.IPV6, "flannel-wg", "flannel-wg"))
    # the v6 endpoint uses the v4 data's Port: the remote's one device listens there (Go flannel's
    # v6 Port says ListenPortV6, which nothing listens on)
    assert v6 == {"flannel-wg": PeerConfig(K1, Endpoint(A6("fd00::2"), 51820), both)}


@pytest.mark.parametrize("peer_ip, peer_ip6, our4, our6, want_v6", [
    ("198.18.0.2", None, "198.18.0.1", "2001:db8::1", False),          # peer has no IPv6
    ("203.0.113.2", "2001:db8::2", "198.18.0.1", "2001:db8::1", False),  # public IPv4 and we have IPv4
    ("10.0.0.2", "2001:db8::2", "198.18.0.1", "2001:db8::1", True),      # private IPv4, global IPv6 both ends
    ("10.0.0.2", "fd00::2", "198.18.0.1", "2001:db8::1", False),         # peer IPv6 is ULA
    ("10.0.0.2", "2001:db8::2", "198.18.0.1", "fd00::1", False),         # our IPv6 is ULA
    ("192.168.1.2", "2001:db8::2", "198.18.0.1", None, False),           # we have no IPv6
])
def test_auto_mode_endpoint_choice(peer_ip, peer_ip6, our4, our6, want_v6):
    ctx = wg.Context(wg.Mode.AUTO, "flannel-wg", "flannel-wg", ext_addr=A(our4),
                     ext_v6_addr=A6(our6) if our6 else None)
    assert wg.select_v6(ctx, A(peer_ip), A6(peer_ip6) if peer_ip6 else None) is want_v6


def test_leases_that_give_no_peer():
    with pytest.raises(wg.Skip, match="non-wireguard"):
        wg.peers_of(lease(2, typ="vxlan"), SEP4)
    v6only = Lease(None, LeaseAttrs(public_ipv6=A6("fd00::2"), backend_type="wireguard",
                                    backend_v6_data=bd(K1)), N6("fd10::/64"))
    with pytest.raises(wg.Skip, match="no subnet of an address family"):
        wg.peers_of(v6only, SEP4)
    with pytest.raises(errors.BadLeaseRecord, match="no PublicIP"):
        wg.peers_of(lease(2, ip="0.0.0.0"), SEP4)
    with pytest.raises(errors.BadLeaseRecord, match="PublicIPv6"):
        wg.peers_of(Lease(N("10.7.2.0/24"), LeaseAttrs(public_ip=A("198.18.0.2"), backend_type="wireguard",
                                                        backend_data=bd(K1), backend_v6_data=bd(K1)),
                          N6("fd10:0:0:2::/64")), wg.Context(wg.Mode.IPV6, "flannel-wg", "flannel-wg"))


def test_context_from_options():
    ctx = make_context(wg.WGOptions(mode=wg.Mode.AUTO, psk=PSK), {4: 0, 6: 0}, EXT)
    assert (ctx.dev4, ctx.dev6, ctx.port6, ctx.psk) == ("flannel-wg", "flannel-wg", 51820, PSK)
    assert make_context(wg.WGOptions(), {4: 0, 6: 0}, EXT).devices == ("flannel-wg", "flannel-wg-v6")


# ---- the peer table: incremental ----------------------------------------------------------------

def ev(t: EventType, *leases: Lease) -> list[LeaseEvent]:
    return [LeaseEvent(t, x) for x in leases]


def test_a_batch_touches_only_its_own_peers():
    many = [lease(i, keys.encode_key(bytes([i]) * 32)) for i in range(2, 200)]
    t = wg.PeerTable(SEP4)
    t.update(ev(EventType.ADDED, *many))
    newcomer = lease(200, K3)
    touched = t.update(ev(EventType.ADDED, newcomer))
    assert touched == {("flannel-wg", K3)}
    req = wg.plan_keys(t, "flannel-wg", [K3], {})
    assert req == SetRequest(upsert=(t.desired(("flannel-wg", K3)),))
    touched = t.update(ev(EventType.REMOVED, many[5]))
    assert touched == {("flannel-wg", many[5].attrs.backend_data_obj["PublicKey"])}


def test_unchanged_re_add_plans_nothing():
    t = wg.PeerTable(SEP4)
    t.update(ev(EventType.ADDED, lease(2)))
    applied = {K1: t.desired(("flannel-wg", K1))}
    touched = t.update(ev(EventType.ADDED, lease(2)))
    assert wg.plan_keys(t, "flannel-wg", [k for _, k in touched], applied).empty


def test_two_leases_sharing_a_key_are_one_peer_and_removing_one_keeps_the_other():
    t = wg.PeerTable(SEP4)
    old, new = lease(2, K1), lease(3, K1, ip="198.18.0.3")
    t.update(ev(EventType.ADDED, old, new))
    p = t.desired(("flannel-wg", K1))
    assert p is not None and p.allowed_ips == {N("10.7.2.0/24"), N("10.7.3.0/24")}
    assert p.endpoint == Endpoint(A("198.18.0.3"), 51820)
    t.update(ev(EventType.REMOVED, old))
    p = t.desired(("flannel-wg", K1))
    assert p is not None and p.allowed_ips == {N("10.7.3.0/24")}      # flannel removed the peer here


def test_a_bad_update_withdraws_only_that_leases_peer():
    t = wg.PeerTable(SEP4)
    t.update(ev(EventType.ADDED, lease(2, K1), lease(3, K2)))
    broken = Lease(N("10.7.2.0/24"), LeaseAttrs(public_ip=A("198.18.0.2"), backend_type="wireguard",
                                                 backend_data='{"PublicKey":1}'))
    touched = t.update(ev(EventType.ADDED, broken))
    assert touched == {("flannel-wg", K1)}
    assert t.desired(("flannel-wg", K1)) is None and t.desired(("flannel-wg", K2)) is not None
    assert "PublicKey must be a base64 string" in t.skipped[broken.ident]


# ---- plans --------------------------------------------------------------------------------------

def test_full_plan_removes_strangers_updates_changed_and_leaves_correct_peers():
    good = PeerConfig(K1, Endpoint(A("198.18.0.2"), 51820), frozenset({N("10.7.2.0/24")}))
    moved = PeerConfig(K2, Endpoint(A("198.18.0.9"), 51820), frozenset({N("10.7.3.0/24")}))
    actual = [PeerStatus(K1, good.endpoint, good.allowed_ips, last_handshake=123.0, rx_bytes=5),
              PeerStatus(K2, Endpoint(A("198.18.0.3"), 51820), moved.allowed_ips),
              PeerStatus(K3, None, frozenset())]
    assert wg.plan({K1: good, K2: moved}, actual) == SetRequest(remove=(K3,), upsert=(moved,))


# ---- codecs -------------------------------------------------------------------------------------

def test_uapi_set_request_golden():
    peer = PeerConfig(K1, Endpoint(A6("fd00::2"), 51821), frozenset({N6("fd10::/64"), N("10.7.2.0/24")}), PSK, 25)
    req = SetRequest(private_key=ALICE_PRIV, listen_port=51820, replace_peers=True, remove=(K2,), upsert=(peer,))
    h = keys.b64_to_hex
    assert uapi.encode_set(req).decode() == (
        f"set=1\nprivate_key={h(ALICE_PRIV)}\nlisten_port=51820\nreplace_peers=true\n"
        f"public_key={h(K2)}\nremove=true\n"
        f"public_key={h(K1)}\npreshared_key={h(PSK)}\nendpoint=[fd00::2]:51821\npersistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\nallowed_ip=10.7.2.0/24\nallowed_ip=fd10::/64\n\n")
    no_psk = uapi.encode_set(SetRequest(upsert=(PeerConfig(K1, None, frozenset()),))).decode()
    assert f"preshared_key={'0' * 64}\n" in no_psk and "endpoint" not in no_psk


def test_uapi_get_answer_parses():
    h = keys.b64_to_hex
    text = (f"private_key={h(ALICE_PRIV)}\nlisten_port=51820\n"
            f"public_key={h(K1)}\npreshared_key={'0' * 64}\nprotocol_version=1\nendpoint=198.18.0.2:51820\n"
            "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\ntx_bytes=10\nrx_bytes=20\n"
            "persistent_keepalive_interval=0\nallowed_ip=10.7.2.0/24\n"
            f"public_key={h(K2)}\npreshared_key={h(PSK)}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
            "endpoint=[fd00::3]:51821\nallowed_ip=fd10::/64\nallowed_ip=10.7.3.0/24\nerrno=0\n\n")
    st = uapi.parse_get(text, "flannel-wg")
    assert st.public_key == ALICE_PUB and st.listen_port == 51820
    p1, p2 = st.peers
    assert p1 == PeerStatus(K1, Endpoint(A("198.18.0.2"), 51820), frozenset({N("10.7.2.0/24")}), None, 0,
                            1700000000.5, 20, 10)
    assert p1.handshake_age(1700000010.5) == 10.0
    assert p2.preshared_key == PSK and p2.last_handshake is None and p2.handshake_age(1.0) is None
    assert p2.allowed_ips == {N6("fd10::/64"), N("10.7.3.0/24")}


@pytest.mark.parametrize("text, msg", [
    ("errno=-22\n\n", "errno -22"),
    ("listen_port=1\n\n", "no errno"),
    ("public_key=zz\nerrno=0\n\n", "unreadable"),
])
def test_uapi_bad_answers(text, msg):
    with pytest.raises(uapi.ProtocolError, match=msg):
        uapi.parse_get(text, "flannel-wg")


def test_wg_set_args_and_dump():
    peer = PeerConfig(K1, Endpoint(A("198.18.0.2"), 51820), frozenset({N("10.7.2.0/24")}), PSK, 0)
    args = uapi.wg_set_args("flannel-wg", SetRequest(private_key=ALICE_PRIV, listen_port=51820, remove=(K2,),
                                                     upsert=(peer,)), psk_path="/dev/fd/5", key_path="/dev/fd/4")
    assert args == ["set", "flannel-wg", "listen-port", "51820", "private-key", "/dev/fd/4", "peer", K2, "remove",
                    "peer", K1, "preshared-key", "/dev/fd/5", "endpoint", "198.18.0.2:51820",
                    "persistent-keepalive", "off", "allowed-ips", "10.7.2.0/24"]
    dump = (f"{ALICE_PRIV}\t{ALICE_PUB}\t51820\toff\n"
            f"{K1}\t(none)\t198.18.0.2:51820\t10.7.2.0/24,fd10::/64\t1700000000\t20\t10\t25\n"
            f"{K2}\t{PSK}\t(none)\t(none)\t0\t0\t0\toff\n")
    st = uapi.parse_wg_dump(dump, "flannel-wg")
    assert st.public_key == ALICE_PUB and st.listen_port == 51820
    assert st.peers[0] == PeerStatus(K1, Endpoint(A("198.18.0.2"), 51820),
                                     frozenset({N("10.7.2.0/24"), N6("fd10::/64")}), None, 25, 1700000000.0, 20, 10)
    assert st.peers[1].endpoint is None and st.peers[1].allowed_ips == frozenset() and st.peers[1].preshared_key == PSK
    with pytest.raises(uapi.ProtocolError, match="want 8"):
        uapi.parse_wg_dump(f"{ALICE_PRIV}\t{ALICE_PUB}\t51820\toff\n{K1}\t(none)\n", "flannel-wg")
