"""``UDPNetwork.run`` is re-enterable: the daemon restarts a failed network thread by calling ``run``
again, and the data path must still forward afterwards (no root: the "TUN" is a socketpair and the
peer a loopback UDP socket, as in test_udp_wire.py). Both data paths."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel.backends.udp import accel
from flannel.backends.udp.backend import UDPNetwork
from flannel.backends.udp.packet import TableBuilder
from flannel.backends.udp.tun import TunDevice
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent
from tests.support import UDP_LOCAL as LOCAL
from tests.support import UDP_PEER as PEER
from tests.support import Rig, ip_packet, wait_for

OWN = IPv4Network("10.244.1.0/24")
REMOTE = IPv4Network("10.244.2.0/24")
LATER = IPv4Network("10.244.3.0/24")


@pytest.fixture(params=["python", "c"])
def net(request: pytest.FixtureRequest) -> Iterator[tuple[UDPNetwork, Rig]]:
    if request.param == "c":
        assert accel.load() is not None, f"C fast path not available: {accel.load_error()}"
    rig = Rig(use_accel=request.param == "c", start=False)
    tun = TunDevice([os.dup(rig.tun_ours.fileno())], "fake0")
    rig.proxy.tun_fds = tun.fds
    lease = Lease(subnet=OWN, attrs=LeaseAttrs(public_ip=IPv4Address(LOCAL)))
    n = UDPNetwork(lease, 1472, rig.port, tun, [], rig.proxy, TableBuilder(rig.port))
    yield n, rig
    n.close()
    rig.close()


def _added(subnet: IPv4Network) -> Batch:
    return Batch(events=(LeaseEvent(EventType.ADDED, Lease(subnet=subnet, attrs=LeaseAttrs(
        public_ip=IPv4Address(PEER)))),))


def _run(n: UDPNetwork, batches: queue.Queue[Batch | None], stop: threading.Event) -> threading.Thread:
    t = threading.Thread(target=n.run, args=(batches, stop), daemon=True)
    t.start()
    return t


def _forwards(rig: Rig, dst: str) -> bool:
    pkt = ip_packet("10.244.1.5", dst, payload=os.urandom(64))
    rig.tun_test.send(pkt)
    data = rig.peer.recv(65536)
    return data[12:20] == pkt[12:20] and data[20:] == pkt[20:]


def test_run_again_after_it_returned_keeps_forwarding(net: tuple[UDPNetwork, Rig]) -> None:
    n, rig = net
    batches: queue.Queue[Batch | None] = queue.Queue()
    stop = threading.Event()
    t = _run(n, batches, stop)
    batches.put(_added(REMOTE))
    wait_for(lambda: REMOTE in n.peers, "the first run applied the batch")
    assert _forwards(rig, "10.244.2.9")
    stop.set()                        # the network thread ends (as when it fails) ...
    t.join(5)
    assert not t.is_alive()
    stop2 = threading.Event()         # ... and the daemon's supervisor calls run() again
    t2 = _run(n, batches, stop2)
    assert _forwards(rig, "10.244.2.9"), "no forwarding after run() was re-entered"
    batches.put(_added(LATER))        # and the second run applies new leases
    wait_for(lambda: LATER in n.peers, "the second run applied the batch")
    assert _forwards(rig, "10.244.3.9")
    stop2.set()
    t2.join(5)
    assert not t2.is_alive()


def test_proxy_start_after_stop_restarts_the_workers(net: tuple[UDPNetwork, Rig]) -> None:
    n, rig = net
    n.apply(_added(REMOTE))
    rig.proxy.start()
    assert _forwards(rig, "10.244.2.9")
    rig.proxy.stop()
    assert not any(t.is_alive() for t in rig.proxy._threads)
    before = rig.proxy.counters()["tx_packets"]
    rig.proxy.start()
    rig.proxy.start()                 # idempotent: no second set of workers
    assert len(rig.proxy._threads) == 2
    assert _forwards(rig, "10.244.2.9")
    wait_for(lambda: rig.proxy.counters()["tx_packets"] == before + 1, "counters kept across the restart")
