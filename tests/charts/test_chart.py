"""The Helm chart, proven offline: lint, render for every values file (and with the lean
settings: the built-in registrar, no livenessprobe, no resizer), validate every object
strictly against the Kubernetes schemas of the oldest and newest supported versions (and
snapshot objects against the snapshot CRDs' schemas), reject typos, keep deploy/ in step
with the chart."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support import require_tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cairn-csi"
CRDS = CHART / "crds"
VALUES = [None, *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))]
KUBERNETES = ["1.30.0", "1.37.0"]  # the oldest supported, and the newest with schemas
# The chart with the fewest images: no node-driver-registrar, livenessprobe nor resizer.
LEAN = (
    "--set", "node.registrar=builtin",
    "--set", "sidecars.livenessProbe.enabled=false",
    "--set", "sidecars.resizer.enabled=false",
)  # fmt: skip


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    require_tools("helm")
    return subprocess.run([str(shutil.which("helm")), *args], capture_output=True, text=True, timeout=120, check=False)


def render(values: str | None, version: str = KUBERNETES[0], *extra: str) -> list[dict[str, Any]]:
    args = ["template", "cairn", str(CHART), "--namespace", "kube-system", "--kube-version", version, *extra]
    if values:
        args += ["--values", str(CHART / "ci" / values)]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields rejected, as the API server's strict field
    validation does for structural schemas."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
                node["properties"].setdefault("apiVersion", {"type": "string"})
                node["properties"].setdefault("kind", {"type": "string"})
                node["properties"].setdefault("metadata", {"type": "object"})
            for child in node.values():
                close(child)
        elif isinstance(node, list):
            for child in node:
                close(child)

    close(schema)
    return schema


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


@pytest.mark.parametrize("values", VALUES)
def test_lint(values: str | None) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBERNETES[0]]
    if values:
        args += ["--values", str(CHART / "ci" / values)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("settings", [(), LEAN], ids=["default", "lean"])
@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("values", VALUES)
def test_every_object_is_valid_kubernetes(values: str | None, version: str, settings: tuple[str, ...]) -> None:
    custom = crd_schemas()
    kinds = set()
    for doc in render(values, version, "--include-crds", "--set", "snapshotController.enabled=true", *settings):
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in custom:
            jsonschema.validate(doc, custom[key])
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {
        "CSIDriver",
        "Deployment",
        "DaemonSet",
        "StorageClass",
        "VolumeSnapshotClass",
        "CustomResourceDefinition",
    } <= kinds


def test_validation_can_fail() -> None:
    daemonset = next(d for d in render(None) if d["kind"] == "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES[0], strict=True)
    snapshot_class = next(d for d in render(None) if d["kind"] == "VolumeSnapshotClass")
    snapshot_class["deletionPolicyy"] = "Delete"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(snapshot_class, crd_schemas()[("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass")])


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("controller.replicaz=2", "replicaz"),
        ("backends[0].kind=tape", "kind"),
        ("backends[0].name=Bad_Name", "name"),
        ("storageClasses[0].reclaimPolicy=Keep", "reclaimPolicy"),
        ("sidecars.provisioner.timeout=5 minutes", "timeout"),
        ("metrics.serviceMonitor.enabeld=true", "enabeld"),
        ("metrics.port.controller=0", "controller"),
        ("node.registrar=sidecars", "registrar"),
        ("node.registrar=true", "registrar"),
        ("sidecars.livenessProbe.enabeld=false", "enabeld"),
        ("sidecars.resizer.enabled=no", "enabled"),
        ("storageClasses[0].name=a,storageClasses[0].fsType=ext3", "fsType"),
        # Helm's crds/ directory replaced it: --skip-crds is the way to leave the CRDs out.
        ("snapshotController.installCRDs=true", "installCRDs"),
    ],
)
def test_values_schema_rejects_typos(setting: str, complaint: str) -> None:
    result = helm("template", "cairn", str(CHART), "--kube-version", KUBERNETES[0], "--set", setting)
    assert result.returncode != 0
    assert complaint in result.stderr


METRICS_ON = ("--set", "metrics.enabled=true", "--set", "metrics.serviceMonitor.enabled=true")


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("values", VALUES)
def test_metrics_render_valid_objects(values: str | None, version: str) -> None:
    """With metrics on, both driver containers serve them on a named port their pods
    announce, and the controller's are selected by a Service and a ServiceMonitor."""
    docs = render(values, version, *METRICS_ON, "--set", "metrics.serviceMonitor.labels.release=prometheus")
    custom = crd_schemas()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in custom:
            jsonschema.validate(doc, custom[key])
        elif key != ("monitoring.coreos.com/v1", "ServiceMonitor"):
            # The Prometheus Operator's CRD is not vendored here: the ServiceMonitor is
            # checked field by field below instead.
            kubernetes_validate.validate(doc, version, strict=True)
    pods = {
        doc["metadata"]["name"]: doc["spec"]["template"] for doc in docs if doc["kind"] in ("Deployment", "DaemonSet")
    }
    for name, port in (("cairn-csi-controller", "9812"), ("cairn-csi-node", "9813")):
        cairn = next(c for c in pods[name]["spec"]["containers"] if c["name"] == "cairn")
        assert f"--metrics-port={port}" in cairn["args"]
        assert {"name": "metrics", "containerPort": int(port), "protocol": "TCP"} in cairn["ports"]
        assert len({p["containerPort"] for p in cairn["ports"]}) == len(cairn["ports"]), "ports collide"
        annotations = pods[name]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"
    service = next(d for d in docs if d["kind"] == "Service")
    selected = [
        n for n, pod in pods.items() if service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ]
    assert selected == ["cairn-csi-controller"]
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9812, "targetPort": "metrics", "protocol": "TCP"}]
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == "kube-system"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["kube-system"]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]


def test_metrics_are_off_by_default_and_annotations_optional() -> None:
    for doc in render(None):
        assert doc["kind"] not in ("Service", "ServiceMonitor")
        if doc["kind"] in ("Deployment", "DaemonSet"):
            template = doc["spec"]["template"]
            assert not any(k.startswith("prometheus.io/") for k in template["metadata"].get("annotations", {}))
            for container in template["spec"]["containers"]:
                assert not any("metrics" in arg for arg in container.get("args", []))
    docs = render(None, KUBERNETES[0], "--set", "metrics.enabled=true", "--set", "metrics.annotations=false")
    assert not [d for d in docs if d["kind"] in ("Service", "ServiceMonitor")]
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            assert "prometheus.io/scrape" not in doc["spec"]["template"]["metadata"]["annotations"]
            cairn = doc["spec"]["template"]["spec"]["containers"][0]
            assert any(arg.startswith("--metrics-port=") for arg in cairn["args"])


def test_older_kubernetes_is_refused() -> None:
    result = helm("template", "cairn", str(CHART), "--kube-version", "1.29.9")
    assert result.returncode != 0 and "kubeVersion" in result.stderr


def test_local_backends_on_two_nodes_are_refused_with_a_reason() -> None:
    result = helm(
        "template", "cairn", str(CHART), "--kube-version", KUBERNETES[0],
        "--set", "backends[0].name=a,backends[0].kind=local,backends[0].path=/a,backends[0].node=n1",
        "--set", "backends[1].name=b,backends[1].kind=local,backends[1].path=/b,backends[1].node=n2",
    )  # fmt: skip
    assert result.returncode != 0 and "several nodes (n1, n2)" in result.stderr


def test_a_pinned_local_backend_pins_the_controller() -> None:
    controller = next(
        d
        for d in render("local-values.yaml")
        if d["kind"] == "Deployment"
        and "controller" in d["metadata"]["name"]
        and "snapshot" not in d["metadata"]["name"]
    )
    assert controller["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "kind-worker"}
    assert controller["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("values", VALUES)
def test_rbac_is_least_privilege(values: str | None) -> None:
    for doc in render(values, KUBERNETES[0], "--set", "snapshotController.enabled=true"):
        for rule in doc.get("rules", []) if doc["kind"] in ("ClusterRole", "Role") else []:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule


@pytest.mark.parametrize("values", VALUES)
def test_privilege_only_where_a_node_plugin_needs_it(values: str | None) -> None:
    for doc in render(values):
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            privileged = container.get("securityContext", {}).get("privileged", False)
            if privileged:
                assert container["name"] == "cairn", f"{doc['metadata']['name']}/{container['name']} is privileged"


def test_credentials_are_referenced_never_inlined() -> None:
    docs = render("rbd-values.yaml")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    assert "userKey" not in config and "key" not in yaml.safe_load(config)["backends"][0]
    assert yaml.safe_load(config)["backends"][0]["credentialsDir"] == "/etc/cairn/secrets/ceph"
    controller = next(d for d in docs if d["kind"] == "Deployment")
    mounted = {v["name"]: v for v in controller["spec"]["template"]["spec"]["volumes"]}
    assert mounted["secret-ceph"]["secret"]["secretName"] == "ceph-cairn"
    storage_class = next(d for d in docs if d["kind"] == "StorageClass")
    assert storage_class["parameters"]["csi.storage.k8s.io/provisioner-secret-name"] == "ceph-cairn"
    assert storage_class["parameters"]["csi.storage.k8s.io/node-stage-secret-namespace"] == "kube-system"
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_the_controller_may_read_exactly_the_secrets_its_classes_name() -> None:
    """The sidecars fetch a class's Secret by name to pass it in the CSI calls (a
    provisioner without the right answers "forbidden" and no rbd volume is made); the
    controller may get those Secrets, in their namespace, and no other."""
    docs = render("rbd-values.yaml")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-secrets")]
    assert [(r["metadata"]["namespace"], r["rules"]) for r in roles] == [
        (
            "kube-system",
            [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["ceph-cairn"], "verbs": ["get"]}],
        )
    ]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-secrets")]
    assert binding["metadata"]["namespace"] == "kube-system"
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    assert binding["subjects"][0]["name"].endswith("-controller")
    assert not [d for d in render(None) if d["kind"] == "Role" and d["metadata"]["name"].endswith("-secrets")]


def test_deploy_manifests_are_rendered_from_the_chart() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "deploy" / "render.sh"), "--stdout"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "deploy" / "cairn-csi.yaml").read_text(), "deploy/ is stale: run deploy/render.sh"


def test_snapshot_crds_are_the_released_ones(tmp_path: Path) -> None:
    require_tools("go")
    result = subprocess.run(
        ["bash", str(CHART / "files" / "update-snapshot-crds.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fetched = sorted(p.name for p in tmp_path.glob("*.yaml"))
    # The chart's own kinds (cairn.csi.io) are Cairn's, not the snapshot controller's.
    assert fetched == sorted(p.name for p in CRDS.glob("*.yaml") if not p.name.startswith("cairn.csi.io_"))
    for name in fetched:
        assert (tmp_path / name).read_bytes() == (CRDS / name).read_bytes(), name


# Sidecar image -> Go module; livenessprobe and node-driver-registrar are not published as
# versioned modules, so their few flags are checked by the kind workflow only.
SIDECAR_MODULES = {
    "csi-provisioner": "external-provisioner",
    "csi-attacher": "external-attacher",
    "csi-snapshotter": "external-snapshotter",
    "csi-resizer": "external-resizer",
    "snapshot-controller": "external-snapshotter",
}


def module_dir(module: str) -> Path:
    result = subprocess.run(
        ["go", "mod", "download", "-json", module],
        capture_output=True, text=True, timeout=600, check=True, env={**os.environ, "GOFLAGS": "-mod=mod"}, cwd="/",
    )  # fmt: skip
    return Path(json.loads(result.stdout)["Dir"])


def go_sources(directory: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in directory.rglob("*.go") if not p.name.endswith("_test.go"))


def test_every_sidecar_flag_exists_in_the_pinned_release() -> None:
    require_tools("go")
    docs = render("local-values.yaml")
    checked = 0
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            name, _, tag = container["image"].rpartition("/")[2].partition(":")
            if name not in SIDECAR_MODULES:
                continue
            major = tag.split(".")[0]
            suffix = f"/{major}" if major not in ("v0", "v1") else ""
            source = module_dir(f"github.com/kubernetes-csi/{SIDECAR_MODULES[name]}{suffix}@{tag}")
            go_mod = (source / "go.mod").read_text()
            lib_version = re.search(r"github.com/kubernetes-csi/csi-lib-utils (v\S+)", go_mod)
            defined = go_sources(source / "cmd") + go_sources(source / "pkg")
            if lib_version:
                defined += go_sources(
                    module_dir(f"github.com/kubernetes-csi/csi-lib-utils@{lib_version.group(1)}") / "standardflags"
                )
            for arg in container.get("args", []):
                flag, _, value = arg.lstrip("-").partition("=")
                assert f'"{flag}"' in defined, f"{name} {tag} has no flag --{flag}"
                checked += 1
                if flag == "feature-gates":
                    for gate in value.split(","):
                        gate_name = gate.split("=")[0]
                        assert f'"{gate_name}"' in defined, f"{name} {tag} has no feature gate {gate_name}"
    assert checked >= 20


@pytest.mark.parametrize("values", VALUES)
def test_the_driver_accepts_the_rendered_config(values: str | None) -> None:
    from csi import config
    from csi.backends import local, lvm, nfs

    rendered = next(d for d in render(values) if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    for entry in config.parse(yaml.safe_load(rendered), "rendered config").backends:
        if entry.kind == "rbd":
            from csi.backends.rbd import settings_from

            settings_from(entry)
        elif entry.kind == "nfs":
            nfs.settings_from(entry)
        elif entry.kind == "lvm":
            lvm.build(entry, "worker-1", True, True)  # builds both halves; runs no LVM command
        else:
            assert entry.kind == "local", entry.kind
            assert set(entry.settings) <= local.SETTINGS
            local.build(entry, "worker-1", False, False)


# -- lean settings, CRDs, fstype, leases -----------------------------------------------------


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs of the Deployments and DaemonSets, by object name."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
    }


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def names(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["containers"]]


REGISTRATION_ARGS = [
    "--registration-dir=/registration",
    "--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/cairn.csi.io/csi.sock",
]


def test_the_node_plugin_registers_itself_with_the_builtin_registrar() -> None:
    kubelet = ("--set", "node.kubeletDir=/var/lib/k0s/kubelet")
    node = workloads(render(None, KUBERNETES[0], *kubelet))["cairn-csi-node"]
    assert "node-driver-registrar" in names(node), "the official sidecar is the default"
    assert not set(REGISTRATION_ARGS) & set(container(node, "cairn")["args"])

    node = workloads(render(None, KUBERNETES[0], *kubelet, "--set", "node.registrar=builtin"))["cairn-csi-node"]
    assert names(node) == ["cairn", "liveness-probe"]
    cairn = container(node, "cairn")
    assert set(REGISTRATION_ARGS) <= set(cairn["args"])
    mounts = {m["name"]: m for m in cairn["volumeMounts"]}
    assert mounts["registration-dir"] == {"name": "registration-dir", "mountPath": "/registration"}
    volumes = {v["name"]: v for v in node["volumes"]}
    assert volumes["registration-dir"]["hostPath"]["path"] == "/var/lib/k0s/kubelet/plugins_registry"
    # The path the kubelet is told is where the plugin directory puts the driver's socket.
    plugin_dir = volumes[next(m["name"] for m in cairn["volumeMounts"] if m["mountPath"] == "/csi")]
    assert f"{plugin_dir['hostPath']['path']}/csi.sock" == REGISTRATION_ARGS[1].split("=", 1)[1]
    assert "--endpoint=unix:///csi/csi.sock" in cairn["args"]


def test_without_the_livenessprobe_the_kubelet_probes_the_driver_natively() -> None:
    pods = workloads(render(None))
    for name in ("cairn-csi-controller", "cairn-csi-node"):
        assert "liveness-probe" in names(pods[name])
        assert container(pods[name], "cairn")["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}

    pods = workloads(render(None, KUBERNETES[0], "--set", "sidecars.livenessProbe.enabled=false"))
    for name, health_port in (("cairn-csi-controller", 9810), ("cairn-csi-node", 9811)):
        assert "liveness-probe" not in names(pods[name])
        cairn = container(pods[name], "cairn")
        assert cairn["livenessProbe"]["grpc"] == {"port": health_port, "service": "liveness"}
        assert "httpGet" not in cairn["livenessProbe"]
        assert f"--health-port={health_port}" in cairn["args"]
        ports = {p["name"]: p["containerPort"] for p in cairn["ports"]}
        assert ports == {"grpc-health": health_port}, "no port left for a sidecar that is not there"
        assert cairn["readinessProbe"]["grpc"] == {"port": health_port}, "readiness stays on service ''"


def test_the_resizer_is_optional_and_its_absence_refuses_expansion() -> None:
    docs = render(None)
    assert "csi-resizer" in names(workloads(docs)["cairn-csi-controller"])
    assert all(d["allowVolumeExpansion"] for d in docs if d["kind"] == "StorageClass")

    docs = render(None, KUBERNETES[0], "--set", "sidecars.resizer.enabled=false")
    assert "csi-resizer" not in names(workloads(docs)["cairn-csi-controller"])
    classes = [d for d in docs if d["kind"] == "StorageClass"]
    assert classes and not any(d["allowVolumeExpansion"] for d in classes)


def cluster_rules(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == name)
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def granted(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {v for r in rules if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


def test_the_controller_role_holds_the_resizers_rules_only_with_the_resizer() -> None:
    with_resizer = cluster_rules(render(None), "cairn-csi-controller")
    assert granted(with_resizer, "", "pods") == {"get", "list", "watch"}
    assert granted(with_resizer, "storage.k8s.io", "volumeattributesclasses") == {"get", "list", "watch"}
    without = cluster_rules(
        render(None, KUBERNETES[0], "--set", "sidecars.resizer.enabled=false"), "cairn-csi-controller"
    )
    assert granted(without, "", "pods") == set()
    assert granted(without, "storage.k8s.io", "volumeattributesclasses") == set()
    assert granted(without, "storage.k8s.io", "volumeattachments") == granted(
        with_resizer, "storage.k8s.io", "volumeattachments"
    )


def test_the_snapshot_controller_may_serve_volume_group_snapshots() -> None:
    """snapshot-controller v8.7.0 lists the group snapshot kinds at start-up and waits 30 s
    for them; its ClusterRole grants what its upstream RBAC does there, and no wildcard."""
    rules = cluster_rules(
        render(None, KUBERNETES[0], "--set", "snapshotController.enabled=true"), "cairn-csi-snapshot-controller"
    )
    group = "groupsnapshot.storage.k8s.io"
    assert granted(rules, group, "volumegroupsnapshotclasses") == {"get", "list", "watch"}
    assert granted(rules, group, "volumegroupsnapshotcontents") == {
        "create", "get", "list", "watch", "update", "delete", "patch",
    }  # fmt: skip
    assert granted(rules, group, "volumegroupsnapshotcontents/status") == {"patch"}
    assert granted(rules, group, "volumegroupsnapshots") == {"get", "list", "watch", "update", "patch"}
    assert granted(rules, group, "volumegroupsnapshots/status") == {"update", "patch"}
    assert "create" in granted(rules, "snapshot.storage.k8s.io", "volumesnapshots"), "group members are snapshots"
    for path in CRDS.glob("*snapshot*.yaml"):  # every snapshot kind the chart installs is one it may read
        crd = yaml.safe_load(path.read_text())
        assert {"get", "list", "watch"} <= granted(rules, crd["spec"]["group"], crd["spec"]["names"]["plural"])


def test_lvm_on_many_nodes_gives_each_side_only_what_it_uses() -> None:
    """An lvm backend that pins no node is routed through NodeVolume objects: the node
    plugins then get a token and a role for their objects alone; without one, the node
    plugin has no token at all."""
    docs = render("lvm-values.yaml")
    controller = cluster_rules(docs, "cairn-csi-controller")
    assert granted(controller, "cairn.csi.io", "nodevolumes") == {"get", "list", "create", "update", "delete"}
    assert granted(controller, "cairn.csi.io", "nodestorages") == {"list"}
    assert "get" in granted(controller, "", "nodes"), "a lost node is told by its Node object"
    node = cluster_rules(docs, "cairn-csi-node")
    assert {(g, r) for rule in node for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("cairn.csi.io", "nodevolumes"),
        ("cairn.csi.io", "nodestorages"),
        ("", "nodes"),  # lvm-fast's nodeSelector: each plugin reads its own Node's labels
    }
    assert granted(node, "", "nodes") == {"get"}
    assert granted(node, "cairn.csi.io", "nodevolumes") == {"get", "list", "watch", "update"}
    assert granted(node, "cairn.csi.io", "nodestorages") == {"get", "create", "update"}
    pod = workloads(docs)["cairn-csi-node"]
    assert pod["automountServiceAccountToken"] is True
    mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
    assert {"/etc/lvm", "/run/lvm", "/run/lock/lvm"} <= mounts
    classes = [d for d in docs if d["kind"] == "StorageClass"]
    assert classes and all(d["volumeBindingMode"] == "WaitForFirstConsumer" for d in classes)
    assert next(d for d in docs if d["kind"] == "CSIDriver")["spec"]["storageCapacity"] is True

    plain = render(None)
    assert not [d for d in plain if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "cairn-csi-node"]
    assert workloads(plain)["cairn-csi-node"]["automountServiceAccountToken"] is False
    assert granted(cluster_rules(plain, "cairn-csi-controller"), "cairn.csi.io", "nodevolumes") == set()


def test_a_local_backend_on_listed_nodes_is_served_by_the_node_plugins() -> None:
    docs = render("local-nodes-values.yaml")
    pods = workloads(docs)
    controller, node = pods["cairn-csi-controller"], pods["cairn-csi-node"]
    assert "kubernetes.io/hostname" not in (controller.get("nodeSelector") or {}), "the controller may run anywhere"
    assert not [v for v in controller["volumes"] if v["name"].startswith("local-")], "the files are the nodes'"
    assert [v["hostPath"]["path"] for v in node["volumes"] if v["name"].startswith("local-")] == [
        "/var/lib/cairn-csi/local"
    ]
    assert node["automountServiceAccountToken"] is True
    assert granted(cluster_rules(docs, "cairn-csi-node"), "", "nodes") == set(), "no nodeSelector, no Node reads"
    assert granted(cluster_rules(docs, "cairn-csi-node"), "cairn.csi.io", "nodevolumes") == {
        "get",
        "list",
        "watch",
        "update",
    }

    pinned = workloads(render("local-values.yaml"))
    assert [v for v in pinned["cairn-csi-controller"]["volumes"] if v["name"].startswith("local-")]
    assert pinned["cairn-csi-node"]["automountServiceAccountToken"] is False


def test_the_crds_come_from_helms_crds_directory() -> None:
    """Helm installs crds/ before the templates, so one `helm install` may create the
    VolumeSnapshotClasses too; no template renders a CRD, and --skip-crds leaves them out."""
    plain = render(None, KUBERNETES[0], "--set", "snapshotController.enabled=true")
    assert not [d for d in plain if d["kind"] == "CustomResourceDefinition"]
    assert [d for d in plain if d["kind"] == "VolumeSnapshotClass"]
    included = render(None, KUBERNETES[0], "--include-crds")
    crds = {d["metadata"]["name"] for d in included if d["kind"] == "CustomResourceDefinition"}
    assert crds == {
        "volumesnapshotclasses.snapshot.storage.k8s.io",
        "volumesnapshotcontents.snapshot.storage.k8s.io",
        "volumesnapshots.snapshot.storage.k8s.io",
        "volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io",
        "volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io",
        "volumegroupsnapshots.groupsnapshot.storage.k8s.io",
        "nodevolumes.cairn.csi.io",
        "nodestorages.cairn.csi.io",
    }
    shown = helm("show", "crds", str(CHART))
    assert shown.returncode == 0 and shown.stdout.count("kind: CustomResourceDefinition") == len(crds)
    for template in (CHART / "templates").iterdir():
        assert "CustomResourceDefinition" not in template.read_text(), template.name


@pytest.mark.parametrize("values", VALUES)
def test_storage_classes_name_the_filesystem_the_way_the_provisioner_expects(values: str | None) -> None:
    wanted = (
        yaml.safe_load((CHART / "ci" / values).read_text())
        if values
        else yaml.safe_load((CHART / "values.yaml").read_text())
    )
    fs_types = {c["name"]: c.get("fsType") for c in wanted["storageClasses"]}
    for doc in render(values):
        if doc["kind"] != "StorageClass":
            continue
        parameters = doc["parameters"]
        assert not [k for k in parameters if k.lower() == "fstype"], "the deprecated key makes a warning per volume"
        assert parameters.get("csi.storage.k8s.io/fstype") == fs_types[doc["metadata"]["name"]]


def test_the_deprecated_fstype_parameter_is_refused_with_a_pointer(tmp_path: Path) -> None:
    for key in ("fsType", "csi.storage.k8s.io/fstype"):
        values = tmp_path / "old.yaml"
        values.write_text(
            yaml.safe_dump({"storageClasses": [{"name": "old", "backend": "local", "parameters": {key: "xfs"}}]})
        )
        result = helm("template", "cairn", str(CHART), "--kube-version", KUBERNETES[0], "--values", str(values))
        assert result.returncode != 0
        assert f"StorageClass old: parameters.{key} is not used; set the class's fsType" in result.stderr


@pytest.mark.parametrize("values", VALUES)
def test_every_leader_elected_container_gives_its_lease_back_on_exit(values: str | None) -> None:
    """With the lease released on SIGTERM, a reinstall or a rollout leads at once instead of
    waiting for the old Lease to expire (15 s)."""
    elected = 0
    for pod in workloads(render(values, KUBERNETES[0], "--set", "snapshotController.enabled=true")).values():
        for each in pod["containers"]:
            args = each.get("args", [])
            if any(a.startswith("--leader-election") and "namespace" not in a for a in args):
                assert "--feature-gates=ReleaseLeaderElectionOnExit=true" in args, each["name"]
                elected += 1
    assert elected == 5  # provisioner, attacher, snapshotter, resizer, snapshot-controller


# -- nfs ---------------------------------------------------------------------------------------

NFS_VALUES = "nfs-values.yaml"
PROVISIONER_FSTYPE = "csi.storage.k8s.io/fstype"


def nfs_backends(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The nfs backends of the rendered driver config, as the driver reads them."""
    from csi import config
    from csi.backends import nfs

    rendered = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    parsed = config.parse(yaml.safe_load(rendered), "rendered config")
    return {entry.name: nfs.settings_from(entry) for entry in parsed.backends if entry.kind == "nfs"}


def test_the_nfs_values_make_one_backend_per_layout_on_one_export() -> None:
    """The driver's own loader and nfs.settings_from take every backend of the rendered
    config; the two layouts share the server's export and each has a StorageClass."""
    docs = render(NFS_VALUES)
    backends = nfs_backends(docs)
    assert {b.layout for b in backends.values()} == {"directory", "image"}
    assert len({(b.server, b.share, b.port) for b in backends.values()}) == 1
    assert {b.node_mount_dir for b in backends.values()} == {
        "/var/lib/kubelet/plugins/cairn.csi.io/nfs"
    }  # the chart places it
    classes = {d["parameters"]["backend"]: d for d in docs if d["kind"] == "StorageClass"}
    assert set(classes) == set(backends)
    assert [d for d in docs if d["kind"] == "VolumeSnapshotClass"]


def test_every_nfs_class_asks_for_what_its_backend_offers() -> None:
    """What the provisioner would send for each class (its filesystem, or the default it
    was given, in the capability; the class's parameters) is what the backend accepts: a
    share takes no filesystem, so no default filesystem may be forced on it."""
    from csi.backends import nfs
    from csi.backends.nfs.controller import NfsVolumes
    from csi.model import AccessMode, AccessType, Capability
    from csi.parameters import backend_parameters

    docs = render(NFS_VALUES)
    backends = nfs_backends(docs)
    provisioner = container(workloads(docs)["cairn-csi-controller"], "csi-provisioner")
    default_fs = next((a.split("=", 1)[1] for a in provisioner["args"] if a.startswith("--default-fstype=")), "")
    for storage_class in (d for d in docs if d["kind"] == "StorageClass"):
        parameters = storage_class["parameters"]
        settings = backends[parameters["backend"]]
        fs_type = parameters.get(PROVISIONER_FSTYPE) or default_fs
        if settings.layout == "directory":
            capabilities = nfs.DIRECTORY_CAPABILITIES
            wanted = [Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER, fs_type, ())]
        else:
            capabilities = nfs.IMAGE_CAPABILITIES
            wanted = [
                Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER, fs_type, ()),
                Capability(AccessType.BLOCK, AccessMode.MULTI_NODE_MULTI_WRITER, "", ()),
            ]
        for capability in wanted:
            assert capabilities.unsupported(capability) is None, (storage_class["metadata"]["name"], capability)
        assert set(backend_parameters(parameters)) <= NfsVolumes.volume_parameters
    for snapshot_class in (d for d in docs if d["kind"] == "VolumeSnapshotClass"):
        assert set(backend_parameters(snapshot_class.get("parameters", {}))) <= NfsVolumes.snapshot_parameters


@pytest.mark.parametrize("values", VALUES)
def test_the_provisioner_passes_the_claims_names(values: str | None) -> None:
    """subDir templates name ${pvc.metadata.name} and ${pvc.metadata.namespace}, which
    reach CreateVolume only with --extra-create-metadata; and no default filesystem is
    forced on classes without one (a share refuses any)."""
    provisioner = container(workloads(render(values))["cairn-csi-controller"], "csi-provisioner")
    assert "--extra-create-metadata" in provisioner["args"]
    assert not [a for a in provisioner["args"] if a.startswith("--default-fstype")]


def driver_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    return config


def node_mounts(docs: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The node plugin driver's mounts by path, and its pod's volumes by name."""
    node = workloads(docs)["cairn-csi-node"]
    mounts = {m["mountPath"]: m for m in container(node, "cairn")["volumeMounts"]}
    return mounts, {v["name"]: v for v in node["volumes"]}


def test_the_nfs_mount_dir_is_under_the_kubelet_directory_unless_named() -> None:
    """Image volumes' exports are mounted under nodeMountDir and directory volumes' sources
    recorded there, so mounts made there must reach the host: by default it is a folder of
    the driver's in the kubelet's plugins directory, which the node plugin mounts with
    Bidirectional propagation already (and which is on a shared mount on any node, where a
    folder elsewhere may not be); a folder named outside it gets a mount of its own."""
    docs = render(NFS_VALUES)
    default = "/var/lib/kubelet/plugins/cairn.csi.io/nfs"
    for backend in driver_config(docs)["backends"]:
        if backend["kind"] == "nfs":
            assert backend["nodeMountDir"] == default
    mounts, _ = node_mounts(docs)
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert not [m for m in mounts.values() if m["name"].startswith("nfs-")], "no mount of its own is needed"

    docs = render(NFS_VALUES, KUBERNETES[0], "--set", "backends[1].nodeMountDir=/srv/cairn-nfs")
    mounts, volumes = node_mounts(docs)
    assert mounts["/srv/cairn-nfs"]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts["/srv/cairn-nfs"]["name"]]["hostPath"]["path"] == "/srv/cairn-nfs"
    assert len([m for m in mounts.values() if m["name"].startswith("nfs-")]) == 1


def deployment(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def test_the_nfs_controller_runs_alone() -> None:
    """An nfs backend sweeps its export when the controller starts: never two controllers."""
    controller = deployment(render(NFS_VALUES), "cairn-csi-controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"]["type"] == "Recreate"
    cairn = container(controller["spec"]["template"]["spec"], "cairn")
    assert cairn["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
    result = helm(
        "template", "cairn", str(CHART), "--kube-version", KUBERNETES[0],
        "--values", str(CHART / "ci" / NFS_VALUES), "--set", "controller.replicas=2",
    )  # fmt: skip
    assert result.returncode != 0 and "nfs backends need controller.replicas=1" in result.stderr
    rbd = deployment(render("rbd-values.yaml"), "cairn-csi-controller")
    assert "strategy" not in rbd["spec"], "other backends keep the rolling update"


def test_an_nfs_export_root_is_mounted_into_the_controller_once() -> None:
    docs = render(
        NFS_VALUES,
        KUBERNETES[0],
        "--set",
        "backends[0].exportRoot=/srv/export",
        "--set",
        "backends[1].exportRoot=/srv/export",
    )
    assert {b.export_root for b in nfs_backends(docs).values()} == {"/srv/export"}
    pod = workloads(docs)["cairn-csi-controller"]
    mounts = [m for m in container(pod, "cairn")["volumeMounts"] if m["mountPath"] == "/srv/export"]
    assert len(mounts) == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[0]["name"]]["hostPath"] == {"path": "/srv/export", "type": "Directory"}
    for version in KUBERNETES:
        for doc in render(NFS_VALUES, version, "--set", "backends[0].exportRoot=/srv/export"):
            if doc["kind"] == "Deployment":
                kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("backend", "complaint"),
    [
        ({"layout": "block"}, "layout"),
        ({"onDelete": "keep"}, "onDelete"),
        ({"mountPermissions": 0o777}, "mountPermissions"),  # an unquoted 0777: the number 511
        ({"share": "export"}, "share"),
        ({"port": 0}, "port"),
        ({"timeout": 0}, "timeout"),
        ({"mountOptions": "nfsvers=4.1"}, "mountOptions"),
        ({"nodeMountDir": "relative"}, "nodeMountDir"),
        ({"path": "/srv"}, "path"),  # a local backend's setting: the driver would refuse it
        ({"controllerSecret": "s"}, "controllerSecret"),
        ({"server": None}, "server"),
    ],
)
def test_the_values_schema_checks_nfs_backends(tmp_path: Path, backend: dict[str, Any], complaint: str) -> None:
    entry = {"name": "nfs-a", "kind": "nfs", "server": "nfs.example.internal", "share": "/export", **backend}
    values = tmp_path / "nfs.yaml"
    values.write_text(
        yaml.safe_dump({"backends": [{k: v for k, v in entry.items() if v is not None}], "storageClasses": []})
    )
    result = helm("template", "cairn", str(CHART), "--kube-version", KUBERNETES[0], "--values", str(values))
    assert result.returncode != 0
    assert complaint in result.stderr


def test_the_values_schema_wants_nfs_class_permissions_quoted(tmp_path: Path) -> None:
    values = tmp_path / "nfs.yaml"
    values.write_text("storageClasses:\n  - {name: x, backend: local, parameters: {mountPermissions: 0775}}\n")
    result = helm("template", "cairn", str(CHART), "--kube-version", KUBERNETES[0], "--values", str(values))
    assert result.returncode != 0 and "mountPermissions" in result.stderr


def test_volume_mount_group_is_opt_in() -> None:
    """The driver applies fsGroup itself only when asked: advertising VOLUME_MOUNT_GROUP
    makes the kubelet leave every volume's group to the driver."""
    args = container(workloads(render(None))["cairn-csi-node"], "cairn")["args"]
    assert "--volume-mount-group" not in args
    docs = render(None, KUBERNETES[0], "--set", "node.volumeMountGroup=true")
    assert "--volume-mount-group" in container(workloads(docs)["cairn-csi-node"], "cairn")["args"]
