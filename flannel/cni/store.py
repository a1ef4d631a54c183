"""Per-container delegate configs in ``dataDir`` (flannel's "scratch netconf").

ADD saves the exact config it gave the delegate under ``<dataDir>/<containerID>``; DEL and CHECK
use that file instead of recomputing it, so they work after the agent restarted with another lease
or after subnet.env is gone. Writes are atomic (temp file + rename) and private (0600).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from flannel.cni import errors as cerr
from flannel.cni.errors import CNIError

# libcni's ValidateContainerID; also keeps the file name inside dataDir
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_container_id(container_id: str) -> str:
    if not container_id:
        raise CNIError(cerr.INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set")
    if not _CONTAINER_ID.match(container_id):
        raise CNIError(cerr.INVALID_ENVIRONMENT,
                       f"invalid CNI_CONTAINERID {container_id!r}: must be letters, digits, '_', '.', '-'")
    return container_id


def path_for(data_dir: str, container_id: str) -> str:
    return os.path.join(data_dir, check_container_id(container_id))


def save(data_dir: str, container_id: str, conf: Mapping[str, Any]) -> str:
    path = path_for(data_dir, container_id)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{container_id}.", dir=data_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(conf, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except OSError as e:
        raise CNIError(cerr.IO_FAILURE, f"cannot save the delegate config to {path}: {e}") from None
    return path


def load(data_dir: str, container_id: str) -> bytes | None:
    """The saved config's bytes, or ``None`` when this container has none."""
    path = path_for(data_dir, container_id)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CNIError(cerr.IO_FAILURE, f"cannot read the saved delegate config {path}: {e}") from None


def remove(data_dir: str, container_id: str) -> None:
    try:
        os.unlink(path_for(data_dir, container_id))
    except FileNotFoundError:
        pass
