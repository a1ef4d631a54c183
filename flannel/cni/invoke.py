"""Running the delegate plugin the way libcni's DelegateAdd/Del/Check do.

The delegate binary is looked up by its ``type`` in the ``CNI_PATH`` directories, run with our own
environment (so ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH`` are
the runtime's) and ``CNI_COMMAND`` set to the operation, its config on stdin. Its stderr goes to
ours (the runtime's log); its stdout is the result or a CNI error object.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from flannel.cni import errors as cerr
from flannel.cni.errors import CNIError


def find_in_path(plugin: str, cni_path: str) -> str:
    """The executable for ``plugin`` in the ``:``-separated ``cni_path``; CNIError 7 if none."""
    if not plugin or "/" in plugin or plugin in (".", ".."):
        raise CNIError(cerr.INVALID_NETWORK_CONFIG, f"invalid delegate plugin type {plugin!r}")
    dirs = [d for d in cni_path.split(os.pathsep) if d]
    for d in dirs:
        candidate = os.path.join(d, plugin)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(cerr.INVALID_NETWORK_CONFIG,
                   f"failed to find delegate plugin {plugin!r} in CNI_PATH {dirs}",
                   "set delegate.type to an installed CNI plugin or fix CNI_PATH")


def exec_plugin(path: str, command: str, conf: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any] | None:
    """Run one plugin operation; return its parsed JSON result (``None`` when it printed nothing).

    A non-zero exit becomes a CNIError with the plugin's own code and message (prefixed with its
    name), or code 101 with its output when that is not a CNI error object.
    """
    name = os.path.basename(path)
    run_env = dict(env)
    run_env["CNI_COMMAND"] = command
    try:
        proc = subprocess.run([path], input=json.dumps(conf).encode(), env=run_env,
                              stdout=subprocess.PIPE, stderr=None, check=False)
    except OSError as e:
        raise CNIError(cerr.DELEGATE_FAILED, f"cannot execute delegate plugin {path}: {e}") from None
    out = proc.stdout.decode("utf-8", "replace").strip()
    parsed: Any = None
    if out:
        try:
            parsed = json.loads(out)
        except ValueError:
            parsed = None
    if proc.returncode != 0:
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), int) and "msg" in parsed:
            raise CNIError(parsed["code"], f"delegate {name} {command} failed: {parsed['msg']}",
                           str(parsed.get("details") or ""))
        raise CNIError(cerr.DELEGATE_FAILED,
                       f"delegate {name} {command} failed with exit status {proc.returncode}",
                       out[:2000])
    if not out:
        return None
    if not isinstance(parsed, dict):
        raise CNIError(cerr.DELEGATE_FAILED, f"delegate {name} {command} printed something that is not a JSON object",
                       out[:2000])
    return parsed
