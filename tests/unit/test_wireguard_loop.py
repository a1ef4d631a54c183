"""WireGuardNetwork's loop against a fake device: what is sent when (incremental vs full resync,
bad leases, failures). The real device path is tests/integration/test_wireguard_backend.py."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

from flannel import errors
from flannel.backends.wireguard import keys
from flannel.backends.wireguard import network as wg
from flannel.backends.wireguard.backend import DeviceSpec, WireGuardNetwork
from flannel.backends.wireguard.model import DeviceStatus, PeerStatus, SetRequest
from flannel.config import parse_network_config
from flannel.lease import Batch, EventType, Lease, LeaseAttrs, LeaseEvent

PRIV = keys.generate_private_key()


class FakeNl:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def link_index(self, name: str) -> int:
        return 7

    def ensure_address(self, index, addr, network) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(f"addr {addr}")

    def set_up(self, index: int) -> None:
        self.calls.append("up")

    def replace_link_route(self, dst, index) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(f"route {dst}")

    def close(self) -> None:
        pass


class FakeDevice:
    implementation = "wireguard-go"

    def __init__(self) -> None:
        self.name = "flannel-wg"
        self.peers: dict[str, PeerStatus] = {}
        self.sets: list[SetRequest] = []
        self.reads = 0
        self.fail_next = 0

    def set(self, req: SetRequest) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise errors.BackendError("UAPI set failed: errno -5")
        self.sets.append(req)
        for k in req.remove:
            self.peers.pop(k, None)
        for p in req.upsert:
            self.peers[p.public_key] = PeerStatus(p.public_key, p.endpoint, p.allowed_ips, p.preshared_key,
                                                  p.keepalive)

    def status(self) -> DeviceStatus:
        self.reads += 1
        return DeviceStatus("flannel-wg", 51820, keys.public_key(PRIV), tuple(self.peers.values()))

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def key(i: int) -> str:
    return keys.encode_key(i.to_bytes(2, "big") * 16)


def lease(i: int, *, data: str | None = None) -> Lease:
    return Lease(N(f"10.{i // 256}.{i % 256}.0/24"), LeaseAttrs(
        public_ip=A(f"198.18.{i // 256}.{i % 256}"), backend_type="wireguard",
        backend_data=data if data is not None else wg.encode_backend_data(key(i), 51820)))


def make() -> tuple[WireGuardNetwork, FakeDevice]:
    dev = FakeDevice()
    config = parse_network_config('{"Network":"10.0.0.0/8","Backend":{"Type":"wireguard"}}')
    own = Lease(N("10.255.255.0/24"), LeaseAttrs(public_ip=A("198.18.255.255"), backend_type="wireguard"))
    ctx = wg.Context(wg.Mode.SEPARATE, "flannel-wg", None)
    net = WireGuardNetwork(lease=own, mtu=1420, nl=FakeNl(), devices={"flannel-wg": dev},  # type: ignore[dict-item]
                           specs={"flannel-wg": DeviceSpec("flannel-wg", 51820, 4, (4,))}, ctx=ctx, config=config,
                           private_key=PRIV, resync_interval=3600)
    return net, dev


def added(*leases: Lease, synced: bool = False) -> Batch:
    return Batch(tuple(LeaseEvent(EventType.ADDED, x) for x in leases), synced=synced)


def removed(*leases: Lease) -> Batch:
    return Batch(tuple(LeaseEvent(EventType.REMOVED, x) for x in leases))


def test_nothing_is_sent_before_the_first_snapshot_ends():
    net, dev = make()
    net.step(added(lease(1), lease(2)))
    assert dev.sets == [] and dev.reads == 0
    net.step(added(lease(3), synced=True))
    assert dev.reads == 1 and len(dev.sets) == 1 and len(dev.sets[0].upsert) == 3


def test_a_batch_of_k_events_is_one_transaction_with_k_peers_and_no_device_read():
    net, dev = make()
    net.step(added(*(lease(i) for i in range(1, 2001)), synced=True))
    reads, sets = dev.reads, len(dev.sets)
    net.step(added(lease(3000), lease(3001)))
    net.step(removed(lease(5)))
    assert dev.reads == reads                      # no dump of 2000 peers per event
    assert len(dev.sets) == sets + 2
    assert [p.public_key for p in dev.sets[-2].upsert] == sorted([key(3000), key(3001)])
    assert dev.sets[-1] == SetRequest(remove=(key(5),))
    assert len(dev.peers) == 2001


def test_an_unchanged_re_announcement_sends_nothing():
    net, dev = make()
    net.step(added(lease(1), lease(2), synced=True))
    n = len(dev.sets)
    net.step(added(lease(1)))
    assert len(dev.sets) == n


def test_a_bad_lease_is_skipped_and_never_removes_anything():
    net, dev = make()
    net.step(added(lease(1), lease(2), synced=True))
    net.step(added(lease(3, data='{"PublicKey":"nope"}'), lease(4, data="null")))
    assert set(dev.peers) == {key(1), key(2)}
    assert len(net.table.skipped) == 2


def test_a_failed_transaction_is_retried_as_a_full_resync():
    net, dev = make()
    net.step(added(lease(1), synced=True))
    dev.fail_next = 1
    net.step(added(lease(2)))
    assert key(2) not in dev.peers and net._dirty
    net._retry_at = 0                              # the backoff has passed
    reads = dev.reads
    net.step(None)
    assert dev.reads == reads + 1 and key(2) in dev.peers and not net._dirty


def test_a_relist_removes_peers_no_lease_justifies_and_leaves_correct_ones():
    net, dev = make()
    net.step(added(lease(1), lease(2), synced=True))
    dev.peers[key(99)] = PeerStatus(key(99), None, frozenset({N("10.9.9.0/24")}))
    net.step(removed(lease(2)))
    net.step(added(lease(1), synced=True))
    assert dev.sets[-1] == SetRequest(remove=(key(99),))
    assert set(dev.peers) == {key(1)}
