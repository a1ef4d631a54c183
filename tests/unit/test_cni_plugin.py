"""The CNI plugin as the runtime sees it (a process: CNI_* env, stdin, stdout, exit status).

These cases fail or finish before any delegate touches the network, so they need no root. Where a
delegate must run, it is a real executable (``/bin/false``, ``/bin/true``) from CNI_PATH.
The bridge/host-local cases with real namespaces are in tests/integration/test_cni_bridge.py.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flannel.cni import errors as cerr
from flannel.cni import install, store

V4_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
PLUGIN = [sys.executable, "-m", "flannel.cni"]


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "subnet.env").write_text(V4_ENV)
    (tmp_path / "bin").mkdir()
    return tmp_path


def netconf(ctx: Path, **extra) -> dict:
    c = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
         "subnetFile": str(ctx / "subnet.env"), "dataDir": str(ctx / "data")}
    c.update(extra)
    return c


def invoke(command: str, conf, *, cmd=PLUGIN, cid: str = "c1", cni_path: str = "/nonexistent", **env_over):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": "/run/netns/none", "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    env.update(env_over)
    env = {k: v for k, v in env.items() if v is not None}
    stdin = conf if isinstance(conf, (bytes, str)) else json.dumps(conf)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    res = subprocess.run(cmd, input=stdin, env=env, capture_output=True, timeout=30)
    out = json.loads(res.stdout) if res.stdout.strip() else None
    return res.returncode, out, res.stderr.decode()


def assert_error(rc, out, code, *needles, version="1.0.0"):
    assert rc != 0, out
    assert out is not None and out["code"] == code, out
    assert out["cniVersion"] == version
    for n in needles:
        assert n in out["msg"], out


def test_version_lists_supported_versions(ctx):
    rc, out, _ = invoke("VERSION", b'{"cniVersion":"1.0.0"}')
    assert rc == 0
    assert out["cniVersion"] == "1.0.0"
    assert {"0.3.1", "0.4.0", "1.0.0"} <= set(out["supportedVersions"])


def test_add_without_subnet_env_is_try_again_and_saves_nothing(ctx):
    os.unlink(ctx / "subnet.env")
    rc, out, err = invoke("ADD", netconf(ctx, cniVersion="0.4.0"))
    assert_error(rc, out, cerr.TRY_AGAIN_LATER, str(ctx / "subnet.env"), version="0.4.0")
    assert "is the flannel agent running" in out["msg"]
    assert not (ctx / "data").exists()
    assert "subnet.env" in err  # also logged for the runtime's log


def test_add_bad_json_is_decode_failure(ctx):
    rc, out, _ = invoke("ADD", b'{"cniVersion": "1.0.0", "name": ')
    assert_error(rc, out, cerr.DECODE_FAILURE, "failed to decode")


def test_add_unknown_delegate_is_invalid_config_and_saves_nothing(ctx):
    rc, out, _ = invoke("ADD", netconf(ctx, delegate={"type": "nosuchplugin"}), cni_path=str(ctx / "bin"))
    assert_error(rc, out, cerr.INVALID_NETWORK_CONFIG, "nosuchplugin", str(ctx / "bin"))
    assert not (ctx / "data" / "c1").exists()


def test_add_incomplete_subnet_env(ctx):
    (ctx / "subnet.env").write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_MTU=1472\n")
    rc, out, _ = invoke("ADD", netconf(ctx))
    assert_error(rc, out, cerr.INVALID_SUBNET_ENV, "FLANNEL_SUBNET", "FLANNEL_IPMASQ")


@pytest.mark.parametrize("missing", ["CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])
def test_add_missing_env_is_invalid_environment(ctx, missing):
    rc, out, _ = invoke("ADD", netconf(ctx), **{missing: None})
    assert_error(rc, out, cerr.INVALID_ENVIRONMENT, missing)


def test_container_id_cannot_escape_data_dir(ctx):
    rc, out, _ = invoke("ADD", netconf(ctx), cid="../escape", cni_path="/bin")
    assert_error(rc, out, cerr.INVALID_ENVIRONMENT, "CNI_CONTAINERID")
    assert not (ctx / "escape").exists()


def test_unknown_command(ctx):
    rc, out, _ = invoke("FROB", netconf(ctx))
    assert_error(rc, out, cerr.INVALID_ENVIRONMENT, "FROB")


def test_delegate_failing_without_cni_json_is_delegate_failed(ctx):
    # /bin/false is a real "plugin" that fails and prints nothing
    rc, out, _ = invoke("ADD", netconf(ctx, delegate={"type": "false"}), cni_path="/usr/bin:/bin")
    assert_error(rc, out, cerr.DELEGATE_FAILED, "delegate false ADD failed", "exit status 1")
    # the saved config stays so the runtime's DEL can clean up after the failed ADD ...
    saved = json.loads((ctx / "data" / "c1").read_text())
    assert saved["type"] == "false" and saved["ipam"]["ranges"] == [[{"subnet": "10.1.17.0/24"}]]
    # ... and DEL runs the delegate named there (false again): the failure keeps the file for a retry
    rc, out, _ = invoke("DEL", netconf(ctx), cni_path="/usr/bin:/bin")
    assert_error(rc, out, cerr.DELEGATE_FAILED, "delegate false DEL failed")
    assert (ctx / "data" / "c1").exists()


def test_del_runs_the_saved_delegate_then_forgets_the_container(ctx):
    store.save(str(ctx / "data"), "c1", {"type": "true", "cniVersion": "1.0.0", "name": "cbr0"})
    os.unlink(ctx / "subnet.env")  # DEL needs only the saved config
    rc, out, _ = invoke("DEL", netconf(ctx, delegate={"type": "false"}), cni_path="/usr/bin:/bin")
    assert (rc, out) == (0, None)  # the saved delegate (true) ran, not the one in today's config
    assert not (ctx / "data" / "c1").exists()


def test_delegate_with_no_result_on_add(ctx):
    rc, out, _ = invoke("ADD", netconf(ctx, delegate={"type": "true"}), cni_path="/usr/bin:/bin")
    assert_error(rc, out, cerr.DELEGATE_FAILED, "printed no result")


def test_del_of_unknown_container_succeeds_silently(ctx):
    rc, out, _ = invoke("DEL", netconf(ctx), cid="never-added")
    assert (rc, out) == (0, None)


def test_del_with_corrupt_saved_config_succeeds_and_removes_it(ctx):
    (ctx / "data").mkdir()
    (ctx / "data" / "c1").write_text("{garbage")
    rc, out, err = invoke("DEL", netconf(ctx))
    assert (rc, out) == (0, None)
    assert not (ctx / "data" / "c1").exists()
    assert "corrupt" in err


def test_check_needs_cni_version_040(ctx):
    rc, out, _ = invoke("CHECK", netconf(ctx, cniVersion="0.3.1", prevResult={}))
    assert_error(rc, out, cerr.INCOMPATIBLE_VERSION, "CHECK", version="0.3.1")


def test_check_needs_prev_result(ctx):
    rc, out, _ = invoke("CHECK", netconf(ctx), cni_path="/bin")
    assert_error(rc, out, cerr.INVALID_NETWORK_CONFIG, "prevResult")


def test_check_of_unknown_container(ctx):
    rc, out, _ = invoke("CHECK", netconf(ctx, prevResult={"cniVersion": "1.0.0", "ips": []}), cni_path="/bin")
    assert_error(rc, out, cerr.UNKNOWN_CONTAINER, "c1")


def test_check_reports_address_outside_node_subnet(ctx):
    store.save(str(ctx / "data"), "c1", {"type": "true", "cniVersion": "1.0.0", "name": "cbr0"})
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.99.2/24", "gateway": "10.1.99.1"}]}
    rc, out, _ = invoke("CHECK", netconf(ctx, prevResult=prev), cni_path="/usr/bin:/bin")
    assert_error(rc, out, cerr.CHECK_MISMATCH, "10.1.99.2", "10.1.17.0/24")
    prev["ips"][0]["address"] = "10.1.17.5/24"
    rc, out, _ = invoke("CHECK", netconf(ctx, prevResult=prev), cni_path="/usr/bin:/bin")
    assert (rc, out) == (0, None)  # in the subnet, and the delegate (true) is happy


# ---- installing as the `flannel` CNI binary -----------------------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"


def _system_python_lacks_project() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    res = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import flannel"], capture_output=True)
    return res.returncode != 0


def test_plugin_sources_import_only_stdlib_and_themselves():
    files = install.plugin_sources()
    modules = {n[:-3].replace("/__init__", "").replace("/", ".") for n in files}
    for name, src in files.items():
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                names = [n for n in names if n.split(".")[0] != "flannel" or n in modules or n == node.module]
            else:
                continue
            for mod in names:
                top = mod.split(".")[0]
                if top == "flannel":
                    assert mod in modules, f"{name} imports {mod}, which the zipapp does not contain"
                else:
                    assert top in sys.stdlib_module_names or top == "__future__", f"{name} imports {mod}"


@pytest.mark.skipif(not _system_python_lacks_project(), reason="needs a system python3 without the project installed")
def test_zipapp_runs_with_the_hosts_python_alone(ctx):
    path = install.install_plugin(str(ctx / "bin"), mode="zipapp", python=SYSTEM_PYTHON)
    assert path == ctx / "bin" / "flannel"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert zipfile.is_zipfile(path)
    rc, out, _ = invoke("VERSION", b"{}", cmd=[str(path)])
    assert rc == 0 and "1.0.0" in out["supportedVersions"]
    os.unlink(ctx / "subnet.env")
    rc, out, _ = invoke("ADD", netconf(ctx), cmd=[str(path)])
    assert_error(rc, out, cerr.TRY_AGAIN_LATER, "subnet.env")


def test_install_command_line_and_wrapper(ctx):
    res = subprocess.run([*PLUGIN, "install", str(ctx / "bin"), "--mode", "wrapper", "--name", "flannel"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    wrapper = ctx / "bin" / "flannel"
    text = wrapper.read_text()
    assert text.startswith("#!/bin/sh\n") and sys.executable in text and "-m flannel.cni" in text
    rc, out, _ = invoke("VERSION", b"{}", cmd=[str(wrapper)])
    assert rc == 0 and out["cniVersion"] == "1.0.0"


def test_install_conf_is_atomic_and_keeps_mode(ctx):
    src = ctx / "cni-conf.json"
    src.write_text('{"name": "cbr0"}\n')
    os.chmod(src, 0o640)
    dst_dir = ctx / "net.d"
    res = subprocess.run([*PLUGIN, "install-conf", str(src), str(dst_dir / "10-flannel.conflist")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dst = dst_dir / "10-flannel.conflist"
    assert dst.read_text() == src.read_text()
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640
    assert sorted(p.name for p in dst_dir.iterdir()) == ["10-flannel.conflist"]  # no temp file left


def test_install_conf_missing_source_is_an_error(ctx):
    res = subprocess.run([*PLUGIN, "install-conf", str(ctx / "nope.json"), str(ctx / "x.conflist")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "nope.json" in res.stderr
    assert not (ctx / "x.conflist").exists()


def test_no_command_prints_about(ctx):
    res = subprocess.run(PLUGIN, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0
    assert "CNI protocol versions supported" in res.stderr and "1.0.0" in res.stderr
