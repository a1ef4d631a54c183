"""deploy/kube-flannel.yml, checked statically (no Kubernetes here): it parses, its names and
references agree, its command lines are ones our CLIs accept, its configs pass our parsers, and its
ClusterRole grants exactly the API calls the kube subnet manager's code makes. Every object is also
validated against the Kubernetes API schemas (``kubernetes-validate`` ships them: offline), strictly,
for every Kubernetes version the package knows.

The CLIs are imported at module level on purpose: a CLI that does not import fails these tests.
"""

from __future__ import annotations

import ast
import configparser
import copy
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

import flannel
from flannel import cli, plugins
from flannel.cni import netconf as cni_netconf
from flannel.cni.plugin import build_parser as cni_parser
from flannel.config import parse_network_config

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kube-flannel.yml"
KUBE_SM = ROOT / "subnet_managers" / "kube"

# CoreV1Api method → the (verb, resource) RBAC needs for it. list_node(watch=True), or a list
# method handed to kubernetes.watch.Watch().stream(), is the "watch" verb on the same resource.
METHOD_RBAC: dict[str, tuple[str, str]] = {
    "read_node": ("get", "nodes"),
    "list_node": ("list", "nodes"),
    "patch_node": ("patch", "nodes"),
    "replace_node": ("update", "nodes"),
    "read_node_status": ("get", "nodes/status"),
    "patch_node_status": ("patch", "nodes/status"),
    "replace_node_status": ("update", "nodes/status"),
    "read_namespaced_pod": ("get", "pods"),
    "list_namespaced_pod": ("list", "pods"),
    "list_pod_for_all_namespaces": ("list", "pods"),
    "read_namespace": ("get", "namespaces"),
    "list_namespace": ("list", "namespaces"),
    "create_namespaced_event": ("create", "events"),
}
_API_METHOD = re.compile(r"^(list|read|patch|create|replace|delete|connect)_\w+$")


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]


def one(docs, kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs) -> dict[str, Any]:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def container(docs, name: str) -> dict[str, Any]:
    spec = pod_spec(docs)
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    out = {}
    for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        out[name.strip()] = target.strip()
    return out


def parse_agent_argv(argv: list[str], monkeypatch, env: dict[str, str] | None = None):
    """Parse a daemon command line with the real click command without running the daemon."""
    assert console_scripts().get(argv[0]) == "flannel.cli:main", f"{argv[0]} is not the agent's console script"
    for k in list(os.environ):
        if k.startswith(cli.ENV_PREFIX):
            monkeypatch.delenv(k)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    ctx = cli.command.make_context(argv[0], cli.normalize_argv(argv[1:]))
    kw = dict(ctx.params)
    kw.pop("log_backtrace_at", None)
    return cli.build_options(kw)


def volume_for_path(c: dict[str, Any], path: str) -> tuple[str, str]:
    """(volume name, path relative to its mount) for the mount holding ``path`` in container c."""
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (best is None or len(mp) > len(best[2])):
            best = (m["name"], posixpath.relpath(path, mp), mp)
    assert best is not None, f"{path} is not on any volume of container {c['name']}"
    return best[0], best[1]


def volume(docs, name: str) -> dict[str, Any]:
    vols = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert name in vols, f"volume {name} is not defined"
    return vols[name]


# ---- the Kubernetes schemas ----------------------------------------------------------------------

def minor_versions() -> list[str]:
    """Every Kubernetes minor version kubernetes-validate ships schemas for (1.25 … latest)."""
    return sorted({".".join(v.split(".")[:2]) for v in all_versions()}, key=lambda v: tuple(map(int, v.split("."))))


@pytest.mark.parametrize("version", minor_versions())
def test_every_object_is_valid_against_the_kubernetes_schemas(docs, version):
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} is invalid for Kubernetes {version}: "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def test_schema_validation_catches_a_misplaced_field(docs):
    """The check above can fail: a field in the wrong place (strict) or of the wrong type is rejected."""
    ds = copy.deepcopy(one(docs, "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["hostNetwork"] = True  # belongs to the pod spec
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, minor_versions()[-1], strict=True)
    ds = copy.deepcopy(one(docs, "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [8081]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, minor_versions()[-1], strict=True)


# ---- structure and references -------------------------------------------------------------------

def test_every_document_parses_and_is_named(docs):
    assert {d["kind"] for d in docs} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                         "ConfigMap", "DaemonSet"}
    for d in docs:
        assert d.get("apiVersion") and d["metadata"].get("name"), d


def test_namespaced_objects_live_in_the_namespace(docs):
    ns = one(docs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for d in docs:
        if d["kind"] in ("ServiceAccount", "ConfigMap", "DaemonSet"):
            assert d["metadata"]["namespace"] == ns["metadata"]["name"], d["kind"]


def test_service_account_binding_role_and_daemonset_agree(docs):
    sa, role, binding = one(docs, "ServiceAccount"), one(docs, "ClusterRole"), one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert pod_spec(docs)["serviceAccountName"] == sa["metadata"]["name"]


def test_daemonset_selector_matches_its_pods(docs):
    ds = one(docs, "DaemonSet")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_mounts_volumes_and_configmap_keys_agree(docs):
    spec = pod_spec(docs)
    names = {v["name"] for v in spec["volumes"]}
    used = set()
    for c in spec.get("initContainers", []) + spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in names, f"{c['name']} mounts undefined volume {m['name']}"
            used.add(m["name"])
    assert used == names, f"unused volumes: {names - used}"
    cm = one(docs, "ConfigMap")
    for v in spec["volumes"]:
        if "configMap" in v:
            assert v["configMap"]["name"] == cm["metadata"]["name"]
            for item in v["configMap"].get("items", []):
                assert item["key"] in cm["data"], f"volume {v['name']} wants missing key {item['key']}"


def test_one_image_tagged_with_the_project_version(docs):
    spec = pod_spec(docs)
    images = {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}
    assert images == {f"pyflannel:{flannel.__version__}"}


def test_daemonset_runs_on_every_linux_node_with_host_network(docs):
    spec = pod_spec(docs)
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]} in term["matchExpressions"]


# ---- configs ------------------------------------------------------------------------------------

def test_net_conf_is_a_valid_network_config(docs):
    text = one(docs, "ConfigMap")["data"]["net-conf.json"]
    cfg = parse_network_config(text, source="ConfigMap net-conf.json")
    assert cfg.network is not None and cfg.subnet_len == 24
    assert cfg.backend_type in plugins.available(plugins.BACKENDS), "backend is not an installed plugin"


def test_cni_conf_is_a_conflist_our_plugin_accepts(docs):
    conflist = json.loads(one(docs, "ConfigMap")["data"]["cni-conf.json"])
    assert conflist["cniVersion"] in cni_netconf.SUPPORTED_VERSIONS
    first = conflist["plugins"][0]
    assert first["type"] == "flannel"
    # what the runtime hands the plugin: the plugin entry plus the list's name and cniVersion
    conf = cni_netconf.parse_netconf(json.dumps(dict(first, name=conflist["name"], cniVersion=conflist["cniVersion"])))
    env = cni_netconf.parse_subnet_env("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n"
                                       "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", source="sample")
    delegate = cni_netconf.build_delegate(conf, env)
    assert delegate["type"] == "bridge" and delegate["hairpinMode"] is True and delegate["isDefaultGateway"] is True
    assert [p["type"] for p in conflist["plugins"][1:]] == ["portmap"]


# ---- command lines ------------------------------------------------------------------------------

def test_agent_command_line_is_accepted_and_consistent(docs, monkeypatch):
    c = container(docs, "kube-flannel")
    opts = parse_agent_argv(c["command"] + c.get("args", []), monkeypatch)
    assert opts.subnet_manager == "kube"
    assert opts.healthz_port > 0
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": opts.healthz_port}
    # net-conf.json: the path the agent reads is the ConfigMap key mounted there
    vol_name, rel = volume_for_path(c, opts.net_config_path)
    assert rel == "net-conf.json"
    assert any(i["key"] == rel for i in volume(docs, vol_name)["configMap"]["items"])
    # subnet.env: written into a host directory, where the CNI plugin on the node reads it
    vol_name, rel = volume_for_path(c, opts.subnet_file)
    host_path = posixpath.join(volume(docs, vol_name)["hostPath"]["path"], rel)
    assert host_path == cni_netconf.DEFAULT_SUBNET_FILE
    # the kube subnet manager finds its node from POD_NAME/POD_NAMESPACE (downward API)
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    # what the data plane needs without being privileged (the udp backend needs privileged: docs)
    assert set(c["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert volume_for_path(c, "/run/xtables.lock")[0] == "xtables-lock"


def test_kube_manager_env_lookups_are_provided(docs):
    src = "\n".join(p.read_text() for p in sorted(KUBE_SM.glob("*.py")))
    read = set(re.findall(r"""environ\.get\(\s*["']([A-Z_]+)["']""", src))
    provided = {e["name"] for e in container(docs, "kube-flannel")["env"]}
    assert "NODE_NAME" in provided or {"POD_NAME", "POD_NAMESPACE"} <= provided
    assert read >= {"POD_NAME", "POD_NAMESPACE"}, "the manifest relies on POD_NAME/POD_NAMESPACE"


def test_init_containers_install_plugin_and_conflist(docs):
    assert console_scripts()["flannel-cni"] == "flannel.cni.plugin:main"
    parser = cni_parser()
    # 1: the plugin binary into the host's CNI bin dir, named "flannel" (the conflist's type)
    c = container(docs, "install-cni-plugin")
    assert c["command"][0] == "flannel-cni"
    args = parser.parse_args(c["command"][1:])
    assert args.cmd == "install" and args.name == "flannel"
    vol_name, rel = volume_for_path(c, args.bin_dir)
    assert posixpath.normpath(posixpath.join(volume(docs, vol_name)["hostPath"]["path"], rel)) == "/opt/cni/bin"
    # 2: cni-conf.json from the ConfigMap into the host's CNI config dir, as a .conflist
    c = container(docs, "install-cni")
    args = parser.parse_args(c["command"][1:])
    assert args.cmd == "install-conf"
    vol_name, rel = volume_for_path(c, args.src)
    assert rel == "cni-conf.json" and "configMap" in volume(docs, vol_name)
    vol_name, rel = volume_for_path(c, args.dst)
    assert volume(docs, vol_name)["hostPath"]["path"] == "/etc/cni/net.d"
    assert rel.endswith(".conflist") and "/" not in rel


# ---- RBAC = exactly what the code calls -----------------------------------------------------------

def required_permissions() -> set[tuple[str, str]]:
    core = kubernetes.client.CoreV1Api
    needed: set[tuple[str, str]] = set()
    for path in sorted(KUBE_SM.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        called: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and re.fullmatch(r"\w+V\d\w*Api", node.attr):
                assert node.attr == "CoreV1Api", (
                    f"{path.name} uses {node.attr}: add its API group to the ClusterRole and to this test")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if _API_METHOD.match(name) and hasattr(core, name):
                    called.add(id(node.func))
                    assert name in METHOD_RBAC, f"{path.name} calls CoreV1Api.{name}: add it to METHOD_RBAC"
                    verb, resource = METHOD_RBAC[name]
                    watch = any(k.arg == "watch" and isinstance(k.value, ast.Constant) and k.value.value is True
                                for k in node.keywords)
                    needed.add(("watch" if watch else verb, resource))
        # a method passed along instead of called: to kubernetes.watch.Watch().stream(...) it is a
        # watch; to anything else (a retry helper calling it later) it is the method's own verb
        streamed = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr == "stream" for a in n.args}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and id(node) not in called and _API_METHOD.match(node.attr)
                    and hasattr(core, node.attr) and isinstance(node.ctx, ast.Load)):
                assert node.attr in METHOD_RBAC, f"{path.name} uses CoreV1Api.{node.attr}: add it to METHOD_RBAC"
                verb, resource = METHOD_RBAC[node.attr]
                needed.add(("watch" if id(node) in streamed else verb, resource))
    return needed


def test_cluster_role_grants_exactly_what_the_code_calls(docs):
    needed = required_permissions()
    granted: set[tuple[str, str]] = set()
    for rule in one(docs, "ClusterRole")["rules"]:
        assert rule["apiGroups"] == [""], "only the core API group is used"
        granted |= {(v, r) for v in rule["verbs"] for r in rule["resources"]}
    assert needed - granted == set(), f"missing permissions: {sorted(needed - granted)}"
    assert granted - needed == set(), f"granted but never used: {sorted(granted - needed)}"
    assert {("list", "nodes"), ("watch", "nodes"), ("patch", "nodes/status")} <= needed  # sanity of the scan
