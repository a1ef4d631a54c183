"""udp TUN sysctls on a read-only /proc/sys (a container's): a value that is already right is not
written (no warning); one that is wrong and cannot be written is reported."""

from __future__ import annotations

import errno
import io
import logging
from typing import Any

import pytest

from flannel.backends.udp import tun


def read_only_proc(current: str) -> Any:
    """``open`` for tun's module namespace: reads give ``current``, writes fail like a ro mount."""
    writes: list[str] = []

    def fake_open(path: str, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if "w" in mode:
            writes.append(path)
            raise OSError(errno.EROFS, "Read-only file system", path)
        return io.StringIO(current + "\n")

    fake_open.writes = writes  # type: ignore[attr-defined]
    return fake_open


def test_value_already_set_is_left_alone(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake = read_only_proc("1")
    monkeypatch.setattr(tun, "open", fake, raising=False)
    with caplog.at_level(logging.WARNING, logger=tun.__name__):
        tun._sysctl("/proc/sys/net/ipv4/conf/flannel0/accept_local", "1")
    assert fake.writes == [] and caplog.records == []


def test_wrong_value_that_cannot_be_written_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    fake = read_only_proc("0")
    monkeypatch.setattr(tun, "open", fake, raising=False)
    with caplog.at_level(logging.WARNING, logger=tun.__name__):
        tun._sysctl("/proc/sys/net/ipv4/conf/flannel0/accept_local", "1")
    assert fake.writes == ["/proc/sys/net/ipv4/conf/flannel0/accept_local"]
    assert any("cannot set" in r.getMessage() and "accept_local" in r.getMessage() for r in caplog.records)
