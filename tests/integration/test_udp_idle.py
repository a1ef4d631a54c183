"""Idle udp workers sleep: no periodic wake-up while no packet moves, yet a packet and a stop
still reach them at once (issue 9's idle CPU, for udp agents). Pure Python and C, plain and
offload (GSO/GRO) workers, on the loopback rig of test_udp_wire (no root needed)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from flannel.backends.udp import accel
from tests.support import Rig, ip_packet, wait_for, wakeups

#: long enough for the old 200 ms polls to show several times
WINDOW = 1.5
#: the virtio-net header in front of every packet on an offload TUN (all zero: no offload metadata)
VNET_HDR_LEN = 10


@pytest.fixture(params=[("python", False), ("c", False), ("c", True)], ids=["python", "c", "c-offload"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kind, offload = request.param
    if kind == "c":
        assert accel.load() is not None, f"C fast path not available: {accel.load_error()}"
    r = Rig(use_accel=kind == "c", offload=offload)
    yield r
    r.close()


def _quiet(rig: Rig) -> bool:
    before = [wakeups(t) for t in rig.proxy._threads]
    time.sleep(WINDOW)   # the measuring window
    return [wakeups(t) for t in rig.proxy._threads] == before


def test_idle_workers_do_not_wake_and_still_forward_and_stop(rig: Rig) -> None:
    assert len(rig.proxy._threads) == 2 and all(t.is_alive() for t in rig.proxy._threads)
    wait_for(lambda: _quiet(rig), "an idle window without a wake-up of any udp worker", timeout=20)

    # a packet from the "TUN" still goes out at once, and one from the peer comes in
    vnet = bytes(VNET_HDR_LEN) if rig.proxy.offload else b""    # offload: a TUN with IFF_VNET_HDR
    rig.tun_test.send(vnet + ip_packet("10.244.1.5", "10.244.2.7", payload=b"out"))
    data, _ = rig.peer.recvfrom(65535)
    assert data.endswith(b"out")
    rig.peer.sendto(ip_packet("10.244.2.7", "10.244.1.5", payload=b"in"), (rig.sock.getsockname()[0], rig.port))
    got = rig.tun_test.recv(65535)
    assert got.endswith(b"in") and got.startswith(vnet)

    started = time.monotonic()
    rig.proxy.stop(timeout=5)
    assert not any(t.is_alive() for t in rig.proxy._threads)
    assert time.monotonic() - started < 2, "idle workers must end on stop without a poll period"


def test_workers_started_again_after_a_stop_still_sleep() -> None:
    """The stop signal is consumed by ``start``: restarted workers do not spin on it."""
    r = Rig(use_accel=accel.load() is not None)
    try:
        r.proxy.stop(timeout=5)
        r.proxy.start()
        assert all(t.is_alive() for t in r.proxy._threads)
        wait_for(lambda: _quiet(r), "an idle window after the restart", timeout=20)
    finally:
        r.close()
