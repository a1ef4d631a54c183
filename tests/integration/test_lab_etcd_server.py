"""flannel.lab.etcd.EtcdServer's own promises that tests rely on: ``memory=True`` keeps etcd's data on
tmpfs across a stop and start, and removes it on close; ``log_tail`` shows etcd's log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flannel.lab import etcd as etcd_mod
from flannel.lab.etcd import EtcdServer

pytestmark = pytest.mark.etcd


@pytest.mark.skipif(not os.path.isdir(etcd_mod.MEMORY_DIR), reason=f"no {etcd_mod.MEMORY_DIR} on this machine")
def test_memory_keeps_the_data_on_tmpfs_across_a_restart_and_close_removes_it(tmp_path: Path) -> None:
    srv = EtcdServer(str(tmp_path / "etcd"), memory=True)
    try:
        assert Path(srv.store_dir).is_relative_to(etcd_mod.MEMORY_DIR)
        srv.start()
        assert (Path(srv.store_dir) / "member" / "wal").is_dir()  # etcd writes there, not in data_dir
        assert not (tmp_path / "etcd" / "data").exists()
        srv.etcdctl("put", "/k", "kept")
        srv.stop()
        srv.start()
        assert srv.etcdctl("get", "/k", "--print-value-only").strip() == "kept"
    finally:
        srv.close()
    assert not Path(srv.store_dir).parent.exists()
    assert (tmp_path / "etcd").is_dir()  # a data_dir the caller gave stays (its log is there)


def test_without_memory_the_data_is_in_the_data_dir_and_log_tail_shows_the_log(tmp_path: Path) -> None:
    srv = EtcdServer(str(tmp_path / "etcd"))
    try:
        assert srv.store_dir == str(tmp_path / "etcd" / "data")
        Path(srv.log_path).write_text("one\ntwo\nthree\n")
        tail = srv.log_tail(2)
        assert tail.endswith("two\nthree") and srv.log_path in tail and "one" not in tail
    finally:
        srv.close()
    os.remove(srv.log_path)
    assert "no etcd log" in srv.log_tail()
