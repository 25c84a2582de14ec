"""The Helm chart, proven offline: lint, render for every values file, validate every
object strictly against the Kubernetes schemas of the oldest and newest supported
versions (and snapshot objects against the snapshot CRDs' schemas), reject typos, keep
deploy/ in step with the chart."""

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
CRDS = CHART / "files" / "snapshot-crds"
VALUES = [None, *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))]
KUBERNETES = ["1.30.0", "1.37.0"]  # the oldest supported, and the newest with schemas


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


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("values", VALUES)
def test_every_object_is_valid_kubernetes(values: str | None, version: str) -> None:
    custom = crd_schemas()
    kinds = set()
    for doc in render(
        values, version, "--set", "snapshotController.installCRDs=true", "--set", "snapshotController.enabled=true"
    ):
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
    assert fetched == sorted(p.name for p in CRDS.glob("*.yaml"))
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
                flag = arg.lstrip("-").split("=")[0]
                assert f'"{flag}"' in defined, f"{name} {tag} has no flag --{flag}"
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize("values", VALUES)
def test_the_driver_accepts_the_rendered_config(values: str | None) -> None:
    from csi import config
    from csi.backends import local

    rendered = next(d for d in render(values) if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    for entry in config.parse(yaml.safe_load(rendered), "rendered config").backends:
        if entry.kind == "rbd":
            from csi.backends.rbd import settings_from

            settings_from(entry)
        else:
            assert set(entry.settings) <= local.SETTINGS
