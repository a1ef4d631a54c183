"""etcd's protobuf messages (``etcdserverpb``: rpc.proto, kv.proto, auth.proto) without grpc.

Why: the generated ``rpc_pb2``/``kv_pb2``/``auth_pb2`` modules only need protobuf, but they ship
inside pyetcd, whose package ``__init__`` (and ``pyetcd.etcdrpc``'s) import grpc, whose C library
alone is ~10 MB of the agent's RSS. So the three files are loaded here by path, under a private
package name (``_flannel_etcdpb``), with that package's ``__init__`` never run: a module object
whose ``__path__`` is pyetcd's ``etcdrpc`` directory, so that ``rpc_pb2``'s own relative imports
(``from . import kv_pb2``) find their siblings there. The messages are the same upb (C) classes
pyetcd would give: decoding a page of 1000 keys is not done in Python.

The descriptors go into protobuf's default pool, as pyetcd's would: if the gRPC fallback imports
pyetcd later, its modules add the identical files again, which the pool accepts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from typing import Any

_PACKAGE = "_flannel_etcdpb"
_lock = threading.Lock()


def _load(name: str) -> Any:
    with _lock:
        if _PACKAGE not in sys.modules:
            spec = importlib.util.find_spec("pyetcd")   # finds the package without running its __init__
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("pyetcd (etcd-sdk-python) is not installed: etcd's protobuf modules are missing")
            package = types.ModuleType(_PACKAGE, "etcd's generated protobuf modules, loaded from pyetcd by path")
            package.__path__ = [os.path.join(path, "etcdrpc") for path in spec.submodule_search_locations]
            sys.modules[_PACKAGE] = package
        return importlib.import_module(f"{_PACKAGE}.{name}")


def rpc() -> Any:
    """etcd's ``rpc_pb2`` (RangeRequest, PutRequest, TxnRequest, LeaseGrantRequest, ...)."""
    return _load("rpc_pb2")
