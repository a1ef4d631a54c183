"""``Rtnl.send`` over many chunks: the chunks go to the kernel from a sender thread while the next
ones are encoded (the kernel's work overlaps ours at a cold start). What must not change: every
refusal comes back with its own tag whichever chunk it was in, every accepted entry is in the
kernel, and a failure -- of the socket or of our own encoding -- reaches the caller with no thread
left behind. Real neighbour entries on a veth in a fresh namespace.
"""

from __future__ import annotations

import json
import threading
from ipaddress import IPv4Address as A
from typing import Any

import pytest

from flannel.backends.routed import model as rm
from flannel.backends.routed import rtnl
from tests.support import in_ns, make_ns

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

COUNT = 3000        # neighbours: ~60 bytes each, so ~6 chunks of rtnl.CHUNK
MISSING_IFINDEX = 999_999


@pytest.fixture
def ns(ns_prefix):
    n = make_ns(ns_prefix)
    yield n
    n.delete()


def neigh(i: int) -> rm.Neigh:
    return rm.Neigh(A(f"10.77.{i // 250}.{i % 250 + 1}"), f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", "eth0")


def kernel_neighbours(ns: Any) -> set[str]:
    return {n["dst"] for n in json.loads(ns.ip("-j", "neigh", "show", "dev", "eth0", "nud", "permanent") or "[]")}


def senders() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "netlink-send"]


def test_a_many_chunk_send_reports_each_refusal_with_its_tag_and_writes_the_rest(ns):
    ifindex = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
    bad = set(range(7, COUNT, 401))     # refused (no such device) in every chunk
    seen_threads: list[list[str]] = []

    def encode(entry: rm.Neigh, index: int, seq: int) -> bytes:
        if entry == neigh(1000):     # past the first chunk: the sender thread is at work
            seen_threads.append(senders())
        return rtnl.neigh_set_msg(entry, index, seq)

    def body() -> list[tuple[object, int, str]]:
        rt = rtnl.Rtnl()
        try:
            return rt.send((i, encode, neigh(i), MISSING_IFINDEX if i in bad else ifindex) for i in range(COUNT))
        finally:
            rt.close()

    refused = in_ns(ns, body)
    assert sorted(tag for tag, _code, _text in refused) == sorted(bad)
    assert all(code == 19 for _tag, code, _text in refused), refused[:3]   # ENODEV, with the kernel's text
    assert kernel_neighbours(ns) == {str(neigh(i).ip) for i in range(COUNT) if i not in bad}
    assert seen_threads == [["netlink-send"]]
    assert not senders()


def test_a_one_chunk_send_starts_no_thread(ns):
    ifindex = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
    during: list[list[str]] = []

    def encode(entry: rm.Neigh, index: int, seq: int) -> bytes:
        during.append(senders())
        return rtnl.neigh_set_msg(entry, index, seq)

    def body() -> list[tuple[object, int, str]]:
        rt = rtnl.Rtnl()
        try:
            return rt.send((i, encode, neigh(i), ifindex) for i in range(5))
        finally:
            rt.close()

    assert in_ns(ns, body) == []
    assert during and not any(during)
    assert len(kernel_neighbours(ns)) == 5


def test_a_socket_failing_mid_send_raises_netlink_failure_and_leaves_no_thread(ns):
    ifindex = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])

    def body() -> None:
        rt = rtnl.Rtnl()
        sent = 0

        def encode(entry: rm.Neigh, index: int, seq: int) -> bytes:
            nonlocal sent
            sent += 1
            if sent == COUNT // 2:      # several chunks are out: the socket goes away under the sender
                rt.sock.close()
            return rtnl.neigh_set_msg(entry, index, seq)

        try:
            with pytest.raises(rtnl.NetlinkFailure):
                rt.send((i, encode, neigh(i), ifindex) for i in range(COUNT))
        finally:
            rt.close()

    in_ns(ns, body)
    assert not senders()


def test_our_own_encoding_error_is_raised_as_itself_after_the_sent_chunks_are_answered(ns):
    ifindex = int(json.loads(ns.ip("-j", "link", "show", "eth0"))[0]["ifindex"])
    stop_at = COUNT // 2

    def encode(entry: rm.Neigh, index: int, seq: int) -> bytes:
        if entry == neigh(stop_at):
            raise ValueError("bad entry")
        return rtnl.neigh_set_msg(entry, index, seq)

    def body() -> None:
        rt = rtnl.Rtnl()
        try:
            with pytest.raises(ValueError, match="bad entry"):
                rt.send((i, encode, neigh(i), ifindex) for i in range(COUNT))
        finally:
            rt.close()

    in_ns(ns, body)
    assert not senders()
    have = kernel_neighbours(ns)
    # what was handed to the sender before the error went in whole; nothing after it did
    assert str(neigh(0).ip) in have and str(neigh(stop_at).ip) not in have
    assert str(neigh(stop_at + 1).ip) not in have
