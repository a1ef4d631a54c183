"""The stand-in API server's patch semantics (merge patch, strategic merge for node lists)."""

from __future__ import annotations

import pytest

from flannel.lab.kubeapi.patch import merge_patch, strategic_merge_patch

NODE = {"metadata": {"annotations": {"a": "1", "b": "2"}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                   "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}


def test_merge_patch_merges_maps_and_null_deletes():
    out = merge_patch(NODE, {"metadata": {"annotations": {"a": None, "c": "3"}}})
    assert out["metadata"]["annotations"] == {"b": "2", "c": "3"}
    assert NODE["metadata"]["annotations"] == {"a": "1", "b": "2"}  # input untouched


def test_merge_patch_replaces_lists():
    out = merge_patch(NODE, {"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}})
    assert [c["type"] for c in out["status"]["conditions"]] == ["NetworkUnavailable"]


def test_strategic_merge_merges_conditions_by_type():
    patch = {"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]}}
    out = strategic_merge_patch(NODE, patch)
    assert [c["type"] for c in out["status"]["conditions"]] == ["Ready", "NetworkUnavailable"]
    out2 = strategic_merge_patch(out, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    ready = out2["status"]["conditions"][0]
    assert ready == {"type": "Ready", "status": "False", "reason": "KubeletReady"}


def test_strategic_merge_delete_directive():
    out = strategic_merge_patch(NODE, {"status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}})
    assert out["status"]["conditions"] == []


def test_strategic_merge_element_without_merge_key_is_an_error():
    with pytest.raises(ValueError, match="merge key"):
        strategic_merge_patch(NODE, {"status": {"conditions": [{"status": "True"}]}})


def test_strategic_merge_replace_directive_on_a_map():
    out = strategic_merge_patch(NODE, {"metadata": {"annotations": {"$patch": "replace", "z": "9"}}})
    assert out["metadata"]["annotations"] == {"z": "9"}
