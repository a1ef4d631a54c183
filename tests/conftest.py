"""Shared fixtures: root/etcd skips, a real etcd server, per-test network namespaces."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator

import pytest

from flannel.lab import etcd as etcd_mod
from flannel.lab import netns as netns_mod

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_root = pytest.mark.skip(reason="needs root (network namespaces / kernel objects)")
    skip_etcd = pytest.mark.skip(reason=f"etcd binary not found at {etcd_mod.ETCD_BIN} (run scripts/setup)")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip_root)
        if "etcd" in item.keywords and not etcd_mod.etcd_available():
            item.add_marker(skip_etcd)


@pytest.fixture
def etcd_server(tmp_path):
    """A fresh real etcd on a free loopback port, with a temp data dir (its WAL and database on
    tmpfs: tests lease for seconds, and a slow shared disk must not make a lease expire)."""
    if not etcd_mod.etcd_available():
        pytest.skip("etcd not installed")
    srv = etcd_mod.EtcdServer(str(tmp_path / "etcd"), memory=True)
    os.makedirs(srv.data_dir, exist_ok=True)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def ns_prefix():
    """A per-test namespace prefix; everything under it is deleted afterwards."""
    prefix = netns_mod.run_prefix()
    yield prefix
    netns_mod.cleanup_prefix(prefix)


@pytest.fixture
def netns(ns_prefix):
    """One fresh network namespace (root only)."""
    if not IS_ROOT:
        pytest.skip("needs root")
    ns = netns_mod.NetNS(ns_prefix + "a")
    yield ns
    ns.delete()


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Remove the log handlers an in-process agent run installed (flannel.logsetup marks them)."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_flannel", False):
            root.removeHandler(h)
