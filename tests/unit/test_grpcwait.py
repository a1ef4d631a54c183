"""grpcwait: gRPC's signal-check period is lengthened when reachable, and nothing breaks when not."""

from __future__ import annotations

import pytest
from grpc._cython import cygrpc

from flannel.subnet_managers.etcd import grpcwait


def test_the_period_is_raised_never_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpcwait, "_done", False)
    slot = grpcwait._period_slot(cygrpc)
    assert slot is not None, "this grpcio does not export its signal-check period: idle watches wake 5×/s"
    old = slot.value
    try:
        slot.value = 200
        assert grpcwait.lengthen_signal_checks(cygrpc, 5000) is True
        assert grpcwait.signal_check_ms(cygrpc) == 5000
        monkeypatch.setattr(grpcwait, "_done", False)
        slot.value = 9000
        assert grpcwait.lengthen_signal_checks(cygrpc, 5000) is True
        assert grpcwait.signal_check_ms(cygrpc) == 9000
    finally:
        slot.value = old


def test_a_grpcio_without_the_capsule_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpcwait, "_done", False)
    monkeypatch.setattr(cygrpc, "__pyx_capi__", {}, raising=False)
    assert grpcwait.signal_check_ms(cygrpc) is None
    assert grpcwait.lengthen_signal_checks(cygrpc) is False
