"""The udp peer table is maintained incrementally (issue 9 item 1): any sequence of lease batches
applied one event at a time gives exactly the table built from scratch (Python view and C
layout, byte for byte), earlier snapshots are never mutated (the workers may still read them),
and lookups agree with a brute-force model."""

from __future__ import annotations

import ctypes
import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backends.udp import accel
from flannel.backends.udp.packet import Peer, PeerTable, TableBuilder

NETWORK = IPv4Network("10.0.0.0/8")
TRUSTED = (IPv4Network("198.18.9.0/24"),)


def _random_subnet(rng: random.Random) -> IPv4Network:
    plen = rng.choice((16, 20, 24, 24, 24, 26, 32))
    return IPv4Network((0x0A000000 | rng.getrandbits(20) << 8, plen), strict=False)


def _snapshot(t: PeerTable) -> tuple[object, ...]:
    """Everything a worker can see, with the shards copied out (so a later mutation would show)."""
    return ([(m, sh, [dict(d) for d in shards]) for m, sh, shards in t.routes], [dict(d) for d in t.sources],
            t.network, t.trusted, t.c_layout, t.size)


def _model_lookup(model: dict[IPv4Network, Peer], dst: int) -> str | None:
    best: Peer | None = None
    for net, peer in model.items():
        if dst & int(net.netmask) == int(net.network_address) and (best is None or
                                                                  net.prefixlen > best.subnet.prefixlen):
            best = peer
    return str(best.public_ip) if best else None


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_equal_a_table_built_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    b = TableBuilder(8285, network=NETWORK, trusted=TRUSTED)
    model: dict[IPv4Network, Peer] = {}
    pool = [_random_subnet(rng) for _ in range(120)]   # small pool: many re-adds, replacements, removes
    ips = [IPv4Address(0xC6120000 + i) for i in range(1, 40)]  # several subnets share a PublicIP
    published: list[tuple[PeerTable, tuple[object, ...]]] = []
    for _ in range(300):
        for _ in range(rng.choice((1, 1, 1, 2, 5, 20))):   # one batch
            subnet = rng.choice(pool)
            if rng.random() < 0.6:
                peer = Peer(subnet, rng.choice(ips))
                assert b.set(peer) == (model.get(subnet) != peer)
                model[subnet] = peer
            else:
                assert b.remove(subnet) == (model.pop(subnet, None) is not None)
        t = b.publish()
        fresh = PeerTable.build(rng.sample(list(model.values()), len(model)), 8285, network=NETWORK, trusted=TRUSTED)
        assert _snapshot(t) == _snapshot(fresh)
        assert len(b) == len(model) == t.size and dict(b.peers) == model
        for _ in range(20):
            dst = rng.getrandbits(32) if rng.random() < 0.3 else \
                int(rng.choice(pool).network_address) + rng.getrandbits(8)
            hit = t.lookup(dst)
            assert (hit[0] if hit else None) == _model_lookup(model, dst)
        published.append((t, _snapshot(t)))
    # copy-on-write: every snapshot handed to the workers is still exactly what it was
    for t, snap in published:
        assert _snapshot(t) == snap


def test_c_layout_of_incremental_table_answers_like_python() -> None:
    lib = accel.load()
    assert lib is not None, f"C fast path not available: {accel.load_error()}"
    rng = random.Random(9)
    b = TableBuilder(8285, network=NETWORK, trusted=TRUSTED)
    pool = [_random_subnet(rng) for _ in range(200)]
    for _ in range(2000):
        subnet = rng.choice(pool)
        if rng.random() < 0.7:
            b.set(Peer(subnet, IPv4Address(0xC6120000 + rng.randint(1, 30))))
        else:
            b.remove(subnet)
    t = b.publish()
    buf = ctypes.create_string_buffer(t.c_layout, len(t.c_layout))
    for _ in range(3000):
        dst = int(rng.choice(pool).network_address) + rng.getrandbits(6)
        hit = t.lookup(dst)
        assert lib.fl_lookup(ctypes.addressof(buf), dst) == (int(IPv4Address(hit[0])) if hit else 0)
        outer = rng.choice((0xC6120000 + rng.randint(0, 31), int(IPv4Address("198.18.9.77"))))
        assert lib.fl_source_allowed(ctypes.addressof(buf), outer, dst) == t.source_allowed(outer, dst)


def test_replaced_c_tables_are_freed_only_after_every_worker_left_them() -> None:
    """Epoch-based reclamation (fastpath.c ``fl_publish``/``fl_oldest_seen``): a worker that may
    still read a replaced table keeps it alive; once every worker is seen past the swap, it goes."""
    import socket

    from flannel.backends.udp.proxy import Proxy

    assert accel.load() is not None, f"C fast path not available: {accel.load_error()}"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        proxy = Proxy([a.fileno()], [udp], IPv4Address("10.255.0.0"), 8285, 1472, use_accel=True)  # not started
        state = proxy._c_state
        assert state is not None
        builder = TableBuilder(8285, network=NETWORK)
        for i in range(50):   # no worker holds anything: every replaced table is freed at once
            builder.set(Peer(IPv4Network((0x0A000000 + (i << 8), 24)), IPv4Address("198.18.0.2")))
            proxy.set_table(builder.publish())
        assert len(proxy._retired) == 0
        # worker 1 entered the current table (it read the generation, then the pointer)
        held = proxy._c_table
        state.seen[1] = state.gen
        for i in range(50, 60):
            builder.set(Peer(IPv4Network((0x0A000000 + (i << 8), 24)), IPv4Address("198.18.0.2")))
            proxy.set_table(builder.publish())
        assert proxy._retired[0][1] is held and len(proxy._retired) == 10
        newest = proxy._c_table
        state.seen[1] = state.gen   # it moved on to the newest table: the 10 older ones go, that one stays
        proxy.set_table(builder.publish())
        assert [buf for _, buf in proxy._retired] == [newest]
        state.seen[1] = accel.IDLE  # between batches it holds none
        proxy.set_table(builder.publish())
        assert len(proxy._retired) == 0
    finally:
        for s in (a, b, udp):
            s.close()
