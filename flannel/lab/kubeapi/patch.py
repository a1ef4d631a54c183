"""JSON merge patch (RFC 7386) and the subset of Kubernetes strategic merge patch nodes need.

Strategic merge differs from a merge patch only for lists: lists that the Kubernetes API declares
with a ``patchMergeKey`` (node ``status.conditions`` and ``status.addresses`` by ``type``,
``spec.taints`` by ``key``) are merged element by element instead of replaced, and an element
``{"$patch": "delete", <key>: ...}`` removes one. ``{"$patch": "replace"}`` in a map replaces it.
"""

from __future__ import annotations

import copy
from typing import Any

#: list field name → merge key, as declared in the Kubernetes OpenAPI for the Node type.
MERGE_KEYS = {"conditions": "type", "addresses": "type", "taints": "key"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge for the fields of a Node (see module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue  # $retainKeys, $setElementOrder/...: ordering directives, not data
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
        elif isinstance(value, list):
            out[key] = [copy.deepcopy(v) for v in value if not (isinstance(v, dict) and v.get("$patch"))]
        else:
            out[key] = strategic_merge_patch(out.get(key), value)
    return out


def _merge_list(current: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    out = [copy.deepcopy(e) for e in current]
    index = {e.get(merge_key): i for i, e in enumerate(out) if isinstance(e, dict)}
    deleted = set()
    for elem in patch:
        if not isinstance(elem, dict) or merge_key not in elem:
            raise ValueError(f"list element {elem!r} has no merge key {merge_key!r}")
        key = elem[merge_key]
        if elem.get("$patch") == "delete":
            deleted.add(key)
        elif key in index:
            out[index[key]] = strategic_merge_patch(out[index[key]], elem)
        else:
            index[key] = len(out)
            out.append(strategic_merge_patch({}, elem))
    return [e for e in out if not (isinstance(e, dict) and e.get(merge_key) in deleted)]
