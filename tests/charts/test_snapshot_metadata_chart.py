"""Changed block tracking through the chart (snapshotMetadata): off by default and then
absent from every render; on, the external-snapshot-metadata sidecar in the controller pod
beside the driver's socket, its TLS Secret, a Service, the SnapshotMetadataService clients
look up, and the few RBAC rules the sidecar needs, all valid for the Kubernetes versions the
chart supports; values it could not work with refused with a reason. The chart's own
SnapshotMetadataService CRD (files/, not crds/) is checked here too."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.charts.test_chart import (
    CHART,
    CRDS,
    KUBERNETES,
    LEAN,
    VALUES,
    cluster_rules,
    container,
    crd_schemas,
    granted,
    helm,
    render,
    strict,
    workloads,
)

CRD_FILE = CHART / "files" / "cbt.storage.k8s.io_snapshotmetadataservices.yaml"
SMS_KEY = ("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService")
SIDECAR = "csi-snapshot-metadata"
SERVICE = "cairn-csi-snapshot-metadata"
CONTROLLER = "cairn-csi-controller"
DRIVER = "cairn.csi.io"
# Never parsed by the chart or the tests beyond its armour: a stand-in for a CA's PEM.
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUc3RhbmQtaW4tb25seQ==\n-----END CERTIFICATE-----\n"
ENABLED: dict[str, Any] = {
    "snapshotMetadata": {"enabled": True, "tlsSecretName": "cairn-snapshot-metadata-tls", "caCert": CA_PEM}
}


def values_with(**settings: Any) -> dict[str, Any]:
    """ENABLED with snapshotMetadata settings changed (None removes one)."""
    values = copy.deepcopy(ENABLED)
    for key, value in settings.items():
        if value is None:
            values["snapshotMetadata"].pop(key, None)
        else:
            values["snapshotMetadata"][key] = value
    return values


def template(
    tmp_path: Path, values: dict[str, Any], *extra: str, version: str = KUBERNETES[0], namespace: str = "kube-system"
) -> tuple[int, str, str]:
    path = tmp_path / "snapshot-metadata-values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(
        "template", "cairn", str(CHART), "--namespace", namespace, "--kube-version", version,
        "--values", str(path), *extra,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def rendered(tmp_path: Path, values: dict[str, Any], *extra: str, **kwargs: Any) -> list[dict[str, Any]]:
    returncode, stdout, stderr = template(tmp_path, values, *extra, **kwargs)
    assert returncode == 0, stderr
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def refusal(tmp_path: Path, values: dict[str, Any], *extra: str) -> str:
    returncode, _, stderr = template(tmp_path, values, *extra)
    assert returncode != 0, "rendered values that should be refused"
    return stderr


def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return loaded


def sms_schema() -> dict[str, Any]:
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == "v1beta1")
    return strict(version["schema"]["openAPIV3Schema"])


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def controller_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return cluster_rules(docs, CONTROLLER)


# -- off by default ----------------------------------------------------------------------------


def test_the_default_values_leave_it_off() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["snapshotMetadata"]
    assert defaults["enabled"] is False
    assert defaults["tlsSecretName"] == defaults["caCert"] == defaults["caSecretKey"] == ""


@pytest.mark.parametrize("values", VALUES)
def test_a_render_without_it_has_none_of_it(values: str | None) -> None:
    docs = render(values, KUBERNETES[0], "--include-crds", "--set", "snapshotController.enabled=true")
    assert not [d for d in docs if d["apiVersion"].startswith("cbt.storage.k8s.io/")]
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == SERVICE]
    assert not [d for d in docs if d["metadata"]["name"].startswith("snapshotmetadataservices.")]
    pod = workloads(docs)[CONTROLLER]
    assert SIDECAR not in [c["name"] for c in pod["containers"]]
    assert "snapshot-metadata-tls" not in [v["name"] for v in pod["volumes"]]
    rules = controller_rules(docs)
    assert granted(rules, "authentication.k8s.io", "tokenreviews") == set()
    assert granted(rules, "authorization.k8s.io", "subjectaccessreviews") == set()
    assert granted(rules, "cbt.storage.k8s.io", "snapshotmetadataservices") == set()


# -- on ----------------------------------------------------------------------------------------


def test_the_sidecar_shares_the_drivers_socket_and_serves_tls(tmp_path: Path) -> None:
    pod = workloads(rendered(tmp_path, ENABLED))[CONTROLLER]
    sidecar = container(pod, SIDECAR)
    pinned = yaml.safe_load((CHART / "values.yaml").read_text())["snapshotMetadata"]["image"]
    assert sidecar["image"] == pinned == "registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.1.0"
    assert sidecar["args"] == [
        "--csi-address=/csi/csi.sock",
        "--port=50051",
        "--tls-cert=/etc/snapshot-metadata/tls/tls.crt",
        "--tls-key=/etc/snapshot-metadata/tls/tls.key",
        "--audience=cairn.csi.io",
        "--http-endpoint=:9814",
    ]
    # The socket: the same volume, at the same place, as the driver that listens on it.
    driver_socket = next(m for m in container(pod, "cairn")["volumeMounts"] if m["mountPath"] == "/csi")
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts[driver_socket["name"]]["mountPath"] == "/csi"
    assert mounts["snapshot-metadata-tls"] == {
        "name": "snapshot-metadata-tls",
        "mountPath": "/etc/snapshot-metadata/tls",
        "readOnly": True,
    }
    volume = next(v for v in pod["volumes"] if v["name"] == "snapshot-metadata-tls")
    assert volume["secret"] == {
        "secretName": "cairn-snapshot-metadata-tls",
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
    }
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"snapshot-meta": 50051, "snapmeta-http": 9814}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/health", "port": "snapmeta-http"}
    assert sidecar["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
    assert sidecar["resources"] == {"requests": {"cpu": "10m", "memory": "32Mi"}}
    # The driver's own containers are untouched.
    assert container(pod, "cairn") == container(workloads(render(None))[CONTROLLER], "cairn")


def test_the_service_and_the_snapshot_metadata_service_point_at_the_sidecar(tmp_path: Path) -> None:
    docs = rendered(tmp_path, ENABLED)
    service = one(docs, "Service", SERVICE)
    assert service["metadata"]["namespace"] == "kube-system"
    pod_labels = next(d for d in docs if d["metadata"]["name"] == CONTROLLER and d["kind"] == "Deployment")["spec"][
        "template"
    ]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "snapshot-meta", "port": 50051, "targetPort": "snapshot-meta", "protocol": "TCP"}
    ]
    sms = one(docs, "SnapshotMetadataService", DRIVER)
    assert sms["apiVersion"] == "cbt.storage.k8s.io/v1beta1"
    assert "namespace" not in sms["metadata"]  # cluster-scoped
    assert sms["spec"]["address"] == f"{SERVICE}.kube-system:50051"
    assert sms["spec"]["audience"] == DRIVER
    assert base64.b64decode(sms["spec"]["caCert"]).decode() == CA_PEM


def test_port_audience_and_namespace_follow_the_values(tmp_path: Path) -> None:
    values = values_with(port=6443, healthPort=9900, audience="backup.example.com", extraArgs=["--v=5"])
    docs = rendered(tmp_path, values, namespace="storage")
    sms = one(docs, "SnapshotMetadataService", DRIVER)
    assert sms["spec"]["address"] == f"{SERVICE}.storage:6443"
    assert sms["spec"]["audience"] == "backup.example.com"
    assert one(docs, "Service", SERVICE)["spec"]["ports"][0]["port"] == 6443
    sidecar = container(workloads(docs)[CONTROLLER], SIDECAR)
    assert "--port=6443" in sidecar["args"] and "--http-endpoint=:9900" in sidecar["args"]
    assert "--audience=backup.example.com" in sidecar["args"]
    assert sidecar["args"][-1] == "--v=5"


def test_the_controller_may_do_what_the_sidecar_does_and_no_more(tmp_path: Path) -> None:
    docs = rendered(tmp_path, ENABLED)
    rules = controller_rules(docs)
    assert granted(rules, "authentication.k8s.io", "tokenreviews") == {"create"}
    assert granted(rules, "authorization.k8s.io", "subjectaccessreviews") == {"create"}
    for resource in ("volumesnapshots", "volumesnapshotcontents", "volumesnapshotclasses"):
        assert {"get", "list"} <= granted(rules, "snapshot.storage.k8s.io", resource), resource
    own = [r for r in rules if "cbt.storage.k8s.io" in r["apiGroups"]]
    assert own == [
        {
            "apiGroups": ["cbt.storage.k8s.io"],
            "resources": ["snapshotmetadataservices"],
            "resourceNames": [DRIVER],
            "verbs": ["get"],
        }
    ]
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    # Granted to the account the sidecar runs as: the controller pod's.
    binding = one(docs, "ClusterRoleBinding", CONTROLLER)
    account = workloads(docs)[CONTROLLER]["serviceAccountName"]
    assert binding["roleRef"]["name"] == CONTROLLER
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kube-system"}]
    # Nothing else changes in the controller's rules.
    default = controller_rules(render(None))
    added = [r for r in rules if r not in default]
    assert {g for r in added for g in r["apiGroups"]} == {
        "authentication.k8s.io",
        "authorization.k8s.io",
        "snapshot.storage.k8s.io",
        "cbt.storage.k8s.io",
    }
    assert all(r in rules for r in default)


@pytest.mark.parametrize("settings", [(), LEAN], ids=["default", "lean"])
@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("values", [None, "rbd-values.yaml"])
def test_every_object_is_valid_kubernetes(
    tmp_path: Path, values: str | None, version: str, settings: tuple[str, ...]
) -> None:
    """Built-in kinds against the Kubernetes schemas (strict), snapshot kinds against the
    snapshot CRDs, the SnapshotMetadataService against the chart's CRD."""
    base = yaml.safe_load((CHART / "ci" / values).read_text()) if values else {}
    custom = {**crd_schemas(), SMS_KEY: sms_schema()}
    kinds = set()
    extra = ("--include-crds", "--set", "snapshotController.enabled=true", *settings)
    for doc in rendered(tmp_path, {**base, **ENABLED}, *extra, version=version):
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in custom:
            jsonschema.validate(doc, custom[key])
        else:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {"Deployment", "Service", "ClusterRole", "SnapshotMetadataService"} <= kinds


def test_lint_passes_with_it_on(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(ENABLED))
    result = helm("lint", str(CHART), "--strict", "--kube-version", KUBERNETES[0], "--values", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the CRD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_crd_is_a_valid_crd_for_the_kind_clients_read(version: str) -> None:
    definition = crd()
    kubernetes_validate.validate(definition, version, strict=True)
    spec = definition["spec"]
    assert definition["metadata"]["name"] == "snapshotmetadataservices.cbt.storage.k8s.io"
    # A *.k8s.io group: the API server wants the approval's address.
    assert definition["metadata"]["annotations"]["api-approved.kubernetes.io"].startswith("https://github.com/")
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        "cbt.storage.k8s.io",
        "Cluster",
        "SnapshotMetadataService",
    )
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [("v1beta1", True, True)]
    fields = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert sorted(fields["required"]) == ["address", "audience", "caCert"]
    assert {f["type"] for f in fields["properties"].values()} == {"string"}


def test_the_crd_is_not_installed_with_the_chart() -> None:
    """Not in crds/, which Helm would install everywhere: an operator applies it."""
    assert not list(CRDS.glob("cbt.storage.k8s.io_*"))
    shown = helm("show", "crds", str(CHART))
    assert shown.returncode == 0 and "cbt.storage.k8s.io" not in shown.stdout


def test_the_crd_schema_rejects_what_the_api_server_would(tmp_path: Path) -> None:
    sms = one(rendered(tmp_path, ENABLED), "SnapshotMetadataService", DRIVER)
    schema = sms_schema()
    jsonschema.validate(sms, schema)
    for field in ("address", "audience", "caCert"):
        broken = copy.deepcopy(sms)
        del broken["spec"][field]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
        broken["spec"][field] = ""
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    typo = copy.deepcopy(sms)
    typo["spec"]["adress"] = typo["spec"]["address"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("snapshotMetadata.enabeld=true", "enabeld"),
        ("snapshotMetadata.enabled=yes", "enabled"),
        ("snapshotMetadata.port=0", "port"),
        ("snapshotMetadata.port=70000", "port"),
        ("snapshotMetadata.healthPort=-1", "healthPort"),
        ("snapshotMetadata.caCert=Zm9v", "caCert"),
        ("snapshotMetadata.tlsSecretName=Bad_Name", "tlsSecretName"),
        ("snapshotMetadata.caSecretKey=ca/crt", "caSecretKey"),
        ("snapshotMetadata.audience=two words", "audience"),
        ("snapshotMetadata.image=", "image"),
        ("snapshotMetadata.extraArgs[0]=1", "extraArgs"),
        ("snapshotMetadata.tag=v1.1.0", "tag"),
    ],
)
def test_the_values_schema_rejects(setting: str, complaint: str) -> None:
    result = helm("template", "cairn", str(CHART), "--kube-version", KUBERNETES[0], "--set", setting)
    assert result.returncode != 0
    assert "snapshotMetadata" in result.stderr and complaint in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "extra", "complaint"),
    [
        (
            values_with(tlsSecretName=None),
            (),
            "snapshotMetadata.enabled needs snapshotMetadata.tlsSecretName: an existing kubernetes.io/tls Secret "
            "in namespace kube-system (keys tls.crt and tls.key) whose certificate names "
            "cairn-csi-snapshot-metadata.kube-system",
        ),
        (
            values_with(caCert=None),
            (),
            "snapshotMetadata.enabled needs the CA that signed the sidecar's certificate",
        ),
        (
            values_with(caSecretKey="ca.crt"),
            (),
            "snapshotMetadata: set caCert or caSecretKey, not both",
        ),
        (
            values_with(caCert=None, caSecretKey="ca.crt"),
            (),
            "snapshotMetadata.caSecretKey: could not read key ca.crt of Secret cairn-snapshot-metadata-tls in "
            "namespace kube-system",
        ),
        (
            values_with(port=9810),
            (),
            "snapshotMetadata.port: port 9810 is controller.grpcHealthPort already",
        ),
        (
            values_with(healthPort=9808),
            (),
            "snapshotMetadata.healthPort: port 9808 is controller.healthPort already",
        ),
        (
            values_with(healthPort=9812),
            ("--set", "metrics.enabled=true"),
            "snapshotMetadata.healthPort: port 9812 is metrics.port.controller already",
        ),
        (
            values_with(healthPort=50051),
            (),
            "snapshotMetadata.healthPort: port 50051 is snapshotMetadata.port already",
        ),
    ],
    ids=[
        "no-tls-secret",
        "no-ca",
        "two-cas",
        "ca-key-unreadable-offline",
        "port-taken",
        "health-port-taken-by-livenessprobe",
        "health-port-taken-by-metrics",
        "ports-equal",
    ],
)
def test_values_it_could_not_work_with_are_refused_with_a_reason(
    tmp_path: Path, values: dict[str, Any], extra: tuple[str, ...], complaint: str
) -> None:
    assert complaint in refusal(tmp_path, values, *extra)


def test_ports_in_use_only_by_absent_containers_are_free(tmp_path: Path) -> None:
    """9808 belongs to the livenessprobe sidecar and 9812 to the metrics: without them the
    sidecar may have them."""
    docs = rendered(tmp_path, values_with(port=9808, healthPort=9812), "--set", "sidecars.livenessProbe.enabled=false")
    assert "--port=9808" in container(workloads(docs)[CONTROLLER], SIDECAR)["args"]
