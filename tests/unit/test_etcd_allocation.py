"""The etcd allocation policy (manager.py) against an in-memory registry (flannel's MockSubnetRegistry).

Mirrors flannel's AcquireLease / config-change cases (reference §13.2) and our fixes (§14.1, 14.4,
14.5, 14.6): a lost create race retries with another subnet, IPv4-only leases do not break a
dual-stack allocation, reservations stay reservations.
"""

from __future__ import annotations

import random
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from flannel import errors
from flannel.lease import Lease, LeaseAttrs
from flannel.options import AgentOptions
from flannel.subnet_managers.etcd import EtcdSubnetManager
from flannel.subnet_managers.etcd import manager as manager_mod
from flannel.subnet_managers.etcd.keeper import renew_at
from tests.support import FakeRegistry, acquire

FLANNEL_TEST_CONFIG = '{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.1.0", "SubnetMax": "10.3.25.0" }'


def attrs(ip: str, **kw: object) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), **kw)  # type: ignore[arg-type]


def lease(net: str, ip: str, *, reservation: bool = False, v6: str | None = None) -> Lease:
    return Lease(subnet=IPv4Network(net), ipv6_subnet=IPv6Network(v6) if v6 else None, attrs=attrs(ip),
                 expiration=None if reservation else time.time() + 3600)


def manager(reg: FakeRegistry, tmp_path: Path, *, hint: str | None = None, seed: int = 1) -> EtcdSubnetManager:
    subnet_env = tmp_path / "subnet.env"
    if hint is not None:
        subnet_env.write_text(f"FLANNEL_NETWORK=10.3.0.0/16\nFLANNEL_SUBNET={hint}\n")
    opts = AgentOptions(subnet_file=str(subnet_env), subnet_lease_ttl=300)
    return EtcdSubnetManager(opts, registry=reg, rng=random.Random(seed))  # type: ignore[arg-type]


@pytest.fixture
def flannel_reg() -> FakeRegistry:
    """flannel's TestAcquireLease registry: 10.3.1/2/4/5.0/24 and 10.3.31.0/24 held by 1.1.1.1."""
    nets = ["10.3.1.0/24", "10.3.2.0/24", "10.3.4.0/24", "10.3.5.0/24", "10.3.31.0/24"]
    return FakeRegistry(FLANNEL_TEST_CONFIG, [lease(n, "1.1.1.1") for n in nets])


def in_range(net: IPv4Network | None, lo: str, hi: str) -> bool:
    assert net is not None
    return IPv4Address(lo) <= net.network_address <= IPv4Address(hi)


def test_new_node_gets_free_subnet_in_range_and_the_same_one_again(flannel_reg, tmp_path):
    existing = set(flannel_reg.kv)
    m = manager(flannel_reg, tmp_path)
    first = acquire(m, attrs("1.2.3.4"))
    assert first.subnet is not None and first.subnet.prefixlen == 24
    assert in_range(first.subnet, "10.3.1.0", "10.3.25.0")
    assert (first.subnet, None) not in existing
    assert flannel_reg.kv[(first.subnet, None)].attrs.public_ip == IPv4Address("1.2.3.4")
    again = acquire(manager(flannel_reg, tmp_path, seed=99), attrs("1.2.3.4", backend_type="vxlan"))
    assert again.subnet == first.subnet
    assert flannel_reg.kv[(first.subnet, None)].attrs.backend_type == "vxlan"  # attrs refreshed
    assert flannel_reg.updates[-1] == ((first.subnet, None), 300)  # reused with the configured TTL


def test_previous_subnet_hint_is_used(flannel_reg, tmp_path):
    got = acquire(manager(flannel_reg, tmp_path, hint="10.3.6.1/24"), attrs("1.2.3.4"))
    assert got.subnet == IPv4Network("10.3.6.0/24")


def test_hint_outside_network_is_not_used(flannel_reg, tmp_path):
    got = acquire(manager(flannel_reg, tmp_path, hint="10.4.1.1/24"), attrs("1.2.3.4"))
    assert got.subnet != IPv4Network("10.4.1.0/24")
    assert in_range(got.subnet, "10.3.1.0", "10.3.25.0")


def test_hint_held_by_another_node_is_not_used(flannel_reg, tmp_path):
    got = acquire(manager(flannel_reg, tmp_path, hint="10.3.2.1/24"), attrs("1.2.3.4"))
    assert got.subnet != IPv4Network("10.3.2.0/24")
    assert flannel_reg.kv[(IPv4Network("10.3.2.0/24"), None)].attrs.public_ip == IPv4Address("1.1.1.1")


def test_config_change_moves_lease_into_new_network(flannel_reg, tmp_path):
    m = manager(flannel_reg, tmp_path)
    old = acquire(m, attrs("1.2.3.4"))
    flannel_reg.config = '{ "Network": "10.4.0.0/16" }'  # the agent restarts with the new config
    new = acquire(manager(flannel_reg, tmp_path), attrs("1.2.3.4"))
    assert new.subnet is not None and new.subnet.subnet_of(IPv4Network("10.4.0.0/16"))
    assert (old.subnet, None) in flannel_reg.deletes  # the incompatible lease was deleted, as flannel does
    assert (old.subnet, None) not in flannel_reg.kv


def test_full_network_names_network_and_size(tmp_path):
    cfg = '{"Network": "10.9.0.0/16", "SubnetMin": "10.9.1.0", "SubnetMax": "10.9.3.0"}'
    reg = FakeRegistry(cfg, [lease(f"10.9.{i}.0/24", f"1.1.1.{i}") for i in (1, 2, 3)])
    with pytest.raises(errors.NetworkFull) as exc:
        acquire(manager(reg, tmp_path), attrs("1.2.3.4"))
    msg = str(exc.value)
    assert "10.9.0.0/16" in msg and "all 3 /24 subnets" in msg


def test_lost_create_race_retries_with_another_subnet(tmp_path):
    cfg = '{"Network": "10.9.0.0/16", "SubnetMin": "10.9.1.0", "SubnetMax": "10.9.4.0"}'
    reg = FakeRegistry(cfg)
    stolen: list[IPv4Network] = []

    def rival(subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> None:
        if not stolen:  # another node creates exactly our pick between our list and our create
            stolen.append(subnet)
            reg.kv[(subnet, ipv6_subnet)] = lease(str(subnet), "9.9.9.9")
    reg.before_create = rival
    got = acquire(manager(reg, tmp_path), attrs("1.2.3.4"))
    assert got.subnet is not None and got.subnet != stolen[0]
    assert len(reg.creates) == 2
    assert reg.kv[(stolen[0], None)].attrs.public_ip == IPv4Address("9.9.9.9")


def test_random_pick_is_among_first_100_free(tmp_path):
    reg = FakeRegistry('{"Network": "10.0.0.0/8"}', [lease("10.0.1.0/24", "1.1.1.1")])
    first_free = [IPv4Network(f"10.0.{i}.0/24") for i in range(2, 102)]  # 10.0.1.0 taken: 100 free after it
    picks = {acquire(manager(FakeRegistry(reg.config, list(reg.kv.values())), tmp_path, seed=s),
                     attrs("1.2.3.4")).subnet for s in range(40)}
    assert picks <= set(first_free)
    assert len(picks) > 5  # random, not always the first


def test_reservation_stays_a_reservation(tmp_path):
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}', [lease("10.5.7.0/24", "1.2.3.4", reservation=True)])
    got = acquire(manager(reg, tmp_path), attrs("1.2.3.4", backend_type="vxlan"))
    assert got.subnet == IPv4Network("10.5.7.0/24")
    assert got.expiration is None
    assert reg.updates == [((IPv4Network("10.5.7.0/24"), None), None)]  # re-put without a TTL
    assert renew_at(got.expiration, time.time(), 3600) is None  # never renewed


def test_incompatible_reservation_is_not_deleted(tmp_path):
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}', [lease("10.6.7.0/24", "1.2.3.4", reservation=True)])
    got = acquire(manager(reg, tmp_path), attrs("1.2.3.4"))
    assert got.subnet is not None and got.subnet.subnet_of(IPv4Network("10.5.0.0/16"))
    assert reg.deletes == []


def test_dual_stack_with_ipv4_only_leases(tmp_path):
    cfg = '{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48"}'
    reg = FakeRegistry(cfg, [lease("10.5.1.0/24", "1.1.1.1"),
                             lease("10.5.2.0/24", "1.1.1.2", v6="fc00:0:0:1::/64")])
    got = acquire(manager(reg, tmp_path), attrs("1.2.3.4", public_ipv6=IPv6Address("fd00::4")))
    assert got.subnet not in (IPv4Network("10.5.1.0/24"), IPv4Network("10.5.2.0/24"))
    assert got.ipv6_subnet is not None and got.ipv6_subnet.prefixlen == 64
    assert got.ipv6_subnet.subnet_of(IPv6Network("fc00::/48"))
    assert got.ipv6_subnet != IPv6Network("fc00:0:0:1::/64")


def test_ipv6_only_nodes_do_not_share_the_unspecified_ipv4(tmp_path):
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}', [
        Lease(subnet=IPv4Network("10.5.3.0/24"), attrs=LeaseAttrs(public_ipv6=IPv6Address("fd00::1")),
              expiration=time.time() + 60)])
    got = acquire(manager(reg, tmp_path), LeaseAttrs(public_ipv6=IPv6Address("fd00::2")))
    assert got.subnet != IPv4Network("10.5.3.0/24")


def test_renew_time_uses_margin_or_half_the_remaining_time():
    now = 1000.0
    assert renew_at(now + 86400, now, 3600) == now + 86400 - 3600  # the margin (60 min) before expiry
    assert renew_at(now + 4, now, 3600) == now + 2  # margin longer than the time left: half-way
    assert renew_at(now - 5, now, 3600) == now  # already expired: at once


@pytest.mark.parametrize("config,error", [
    (None, errors.ConfigNotFound),
    ('{"Network": "10.5.0.0/30"}', errors.ConfigError),
    ("not json", errors.ConfigError),
    ('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48"}', errors.ConfigError),
])
def test_network_config_errors(tmp_path, config, error):
    with pytest.raises(error):
        manager(FakeRegistry(config), tmp_path).get_network_config()


def test_free_candidates_respect_other_prefix_lengths():
    taken = [IPv4Network("10.5.0.0/22")]  # covers 10.5.0-3.0/24
    free = manager_mod._free_candidates(range(int(IPv4Address("10.5.1.0")), int(IPv4Address("10.5.8.0")) + 1, 256),
                                        24, 4, taken)
    assert [str(IPv4Address(c)) for c in free] == [f"10.5.{i}.0" for i in range(4, 9)]


# -- no crash loops: unreadable keys and failed hints ---------------------------------------------

def test_hint_on_an_unreadable_key_is_dropped_and_another_subnet_is_taken(tmp_path):
    """subnet.env names a subnet whose key exists but cannot be decoded: flannel retried it 50 times
    and exited, on every restart. We try it once, drop the hint, and take another subnet."""
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}')
    reg.unreadable.add((IPv4Network("10.5.6.0/24"), None))
    m = manager(reg, tmp_path, hint="10.5.6.1/24")
    got = acquire(m, attrs("1.2.3.4"))
    assert got.subnet is not None and got.subnet != IPv4Network("10.5.6.0/24")
    assert reg.creates.count((IPv4Network("10.5.6.0/24"), None)) <= 1
    assert len(reg.creates) <= 2
    # the hint is gone for good: a later acquisition (a re-acquire) does not try it again
    reg.kv.clear()
    acquire(m, attrs("1.2.3.4"))
    assert reg.creates.count((IPv4Network("10.5.6.0/24"), None)) <= 1


def test_hint_whose_create_fails_is_dropped(tmp_path):
    """The hinted key appears between our listing and our create (any reason): not retried."""
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}')

    def appears(subnet: IPv4Network, ipv6_subnet: IPv6Network | None) -> None:
        if subnet == IPv4Network("10.5.6.0/24"):
            reg.unreadable.add((subnet, ipv6_subnet))
    reg.before_create = appears
    got = acquire(manager(reg, tmp_path, hint="10.5.6.1/24"), attrs("1.2.3.4"))
    assert got.subnet != IPv4Network("10.5.6.0/24")
    assert reg.creates[0] == (IPv4Network("10.5.6.0/24"), None) and len(reg.creates) == 2


@pytest.mark.parametrize("seed", range(8))
def test_an_unreadable_key_occupies_its_subnet(tmp_path, seed):
    """Never allocate over an existing key: with two subnets left, one held by an unreadable key,
    every pick is the other one, first time."""
    cfg = '{"Network": "10.9.0.0/16", "SubnetMin": "10.9.1.0", "SubnetMax": "10.9.2.0"}'
    reg = FakeRegistry(cfg)
    reg.unreadable.add((IPv4Network("10.9.1.0/24"), None))
    got = acquire(manager(reg, tmp_path, seed=seed), attrs("1.2.3.4"))
    assert got.subnet == IPv4Network("10.9.2.0/24")
    assert reg.creates == [(IPv4Network("10.9.2.0/24"), None)]


def test_unreadable_keys_count_when_the_network_is_full(tmp_path):
    cfg = '{"Network": "10.9.0.0/16", "SubnetMin": "10.9.1.0", "SubnetMax": "10.9.2.0"}'
    reg = FakeRegistry(cfg, [lease("10.9.2.0/24", "1.1.1.2")])
    reg.unreadable.add((IPv4Network("10.9.1.0/24"), None))
    with pytest.raises(errors.NetworkFull):
        acquire(manager(reg, tmp_path), attrs("1.2.3.4"))
    assert reg.creates == []


# -- several leases with our public IP -------------------------------------------------------------

def test_the_lease_we_held_wins_over_a_stray_with_our_ip(tmp_path, caplog):
    """A stray lease carrying our public IP comes first in key order; flannel adopted it (and our
    pods' subnet became a "remote" one). We keep subnet.env's subnet and leave the stray alone."""
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}', [lease("10.5.1.0/24", "1.2.3.4"),
                                                       lease("10.5.9.0/24", "1.2.3.4")])
    got = acquire(manager(reg, tmp_path, hint="10.5.9.1/24"), attrs("1.2.3.4"))
    assert got.subnet == IPv4Network("10.5.9.0/24")
    assert reg.deletes == [] and (IPv4Network("10.5.1.0/24"), None) in reg.kv
    assert [k for k, _ in reg.updates] == [(IPv4Network("10.5.9.0/24"), None)]  # the stray is not rewritten
    assert "2 leases carry our public IP 1.2.3.4" in caplog.text and "10.5.1.0/24" in caplog.text


def test_without_a_hint_a_reservation_then_the_latest_renewed_lease_is_ours(tmp_path):
    now = time.time()
    older = Lease(subnet=IPv4Network("10.5.1.0/24"), attrs=attrs("1.2.3.4"), expiration=now + 100)
    newer = Lease(subnet=IPv4Network("10.5.2.0/24"), attrs=attrs("1.2.3.4"), expiration=now + 80000)
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}', [older, newer])
    assert acquire(manager(reg, tmp_path), attrs("1.2.3.4")).subnet == newer.subnet
    reserved = lease("10.5.3.0/24", "1.2.3.4", reservation=True)
    reg = FakeRegistry('{"Network": "10.5.0.0/16"}', [older, newer, reserved])
    assert acquire(manager(reg, tmp_path), attrs("1.2.3.4")).subnet == reserved.subnet


def test_choose_own_is_deterministic_and_lists_the_strays():
    a = lease("10.5.1.0/24", "1.2.3.4")
    b = lease("10.5.2.0/24", "1.2.3.4")
    chosen, strays = manager_mod.choose_own([b, a], IPv4Network("10.5.2.0/24"))
    assert chosen == b and strays == [a]
    same_expiry = [Lease(subnet=IPv4Network(f"10.5.{i}.0/24"), attrs=attrs("1.2.3.4"), expiration=5.0)
                   for i in (3, 1, 2)]
    assert manager_mod.choose_own(same_expiry, None)[0].subnet == IPv4Network("10.5.1.0/24")
