"""Backup repositories through the chart: rendered into the driver config the driver
takes, their Secrets and volumes mounted in the controller where the config says, and
values the driver or the pod would refuse stopped at install time with a reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.charts.test_chart import CHART, KUBERNETES, container, crd_schemas, driver_config, helm, workloads

DIRECTORY: dict[str, Any] = {
    "name": "offsite",
    "kind": "directory",
    "path": "/backups",
    "chunkSize": 1048576,
    "volume": {"nfs": {"server": "nfs.example.internal", "path": "/exports/cairn-backups"}},
    "secretName": "cairn-backup-offsite",
}
S3: dict[str, Any] = {
    "name": "s3-store",
    "kind": "s3",
    "endpoint": "https://s3.example.com",
    "bucket": "cairn-backups",
    "prefix": "cluster-a/",
    "region": "",
    "verifyTLS": True,
    "secretName": "cairn-backup-s3",
}
BACKUP_CLASS: dict[str, Any] = {
    "name": "cairn-backup",
    "deletionPolicy": "Retain",
    "parameters": {"type": "backup", "repository": "offsite"},
}
CHART_ONLY = {"secretName", "volume"}


def template(tmp_path: Path, values: dict[str, Any], version: str = KUBERNETES[0]) -> tuple[int, str, str]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(
        "template", "cairn", str(CHART), "--namespace", "kube-system", "--kube-version", version,
        "--values", str(path),
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def render_values(tmp_path: Path, values: dict[str, Any], version: str = KUBERNETES[0]) -> list[dict[str, Any]]:
    returncode, stdout, stderr = template(tmp_path, values, version)
    assert returncode == 0, stderr
    return [doc for doc in yaml.safe_load_all(stdout) if doc]


def refusal(tmp_path: Path, values: dict[str, Any]) -> str:
    """helm's complaint about ``values``, which it must refuse."""
    returncode, _, stderr = template(tmp_path, values)
    assert returncode != 0, "rendered values that should be refused"
    return stderr


TWO_REPOSITORIES: dict[str, Any] = {
    "backupRepositories": [DIRECTORY, S3],
    "volumeSnapshotClasses": [{"name": "cairn-local"}, BACKUP_CLASS],
}


def test_the_driver_builds_the_rendered_repositories(tmp_path: Path) -> None:
    """The rendered config passes the driver's own loader, carries no key of the chart's
    own, and, with its credentials folders standing in for the mounted Secrets, opens as
    the repositories the values describe."""
    from csi import config
    from csi.backup.configured import REPOSITORY_SETTINGS, build_repositories

    rendered = driver_config(render_values(tmp_path, TWO_REPOSITORIES))
    parsed = config.parse(rendered, "rendered config")
    assert [b.name for b in parsed.backends] == ["local"], "the backends are left as they were"
    entries = {r.name: r for r in parsed.repositories}
    assert [(r.name, r.kind) for r in parsed.repositories] == [("offsite", "directory"), ("s3-store", "s3")]
    for wanted in (DIRECTORY, S3):
        entry = entries[str(wanted["name"])]
        assert set(entry.settings) <= REPOSITORY_SETTINGS[entry.kind]
        assert not CHART_ONLY & set(entry.settings)
        assert entry.settings["credentials"] == f"/etc/cairn/backup/{wanted['name']}"
        assert {k: v for k, v in entry.settings.items() if k != "credentials"} == {
            k: v for k, v in wanted.items() if k not in CHART_ONLY | {"name", "kind"}
        }

    # What the kubelet would put in the folders: the Secrets' keys as files.
    secrets = {
        "offsite": {"encryptionKey": "k" * 44},
        "s3-store": {"accessKeyID": "AKIAEXAMPLE", "secretAccessKey": "secret"},
    }
    local = []
    for entry in parsed.repositories:
        folder = tmp_path / "secrets" / entry.name
        folder.mkdir(parents=True)
        for key, value in secrets[entry.name].items():
            (folder / key).write_text(value + "\n")
        local.append(config.RepositoryConfig(entry.name, entry.kind, {**entry.settings, "credentials": str(folder)}))
    repositories = build_repositories(local)
    assert repositories["offsite"].encrypted and repositories["offsite"].chunk_size == 1048576
    assert repositories["offsite"].store.where == "/backups"
    assert not repositories["s3-store"].encrypted
    assert repositories["s3-store"].store.where == "s3://cairn-backups/cluster-a/ at https://s3.example.com"


def test_without_repositories_the_config_names_none(tmp_path: Path) -> None:
    docs = render_values(tmp_path, {})
    assert set(driver_config(docs)) == {"backends"}
    controller = workloads(docs)["cairn-csi-controller"]
    assert not [v for v in controller["volumes"] if v["name"].startswith("backup-")]


def test_the_controller_mounts_each_repository_where_the_config_says(tmp_path: Path) -> None:
    """The driver container of the controller, and no other container, gets each
    repository's Secret read-only at its credentials folder and a directory repository's
    volume at its path."""
    docs = render_values(tmp_path, TWO_REPOSITORIES)
    pods = workloads(docs)
    controller = pods["cairn-csi-controller"]
    mounts = {m["mountPath"]: m for m in container(controller, "cairn")["volumeMounts"]}
    volumes = {v["name"]: v for v in controller["volumes"]}
    repositories = {r["name"]: r for r in driver_config(docs)["backupRepositories"]}

    offsite = mounts[repositories["offsite"]["credentials"]]
    assert offsite["readOnly"] is True
    assert volumes[offsite["name"]]["secret"] == {"secretName": "cairn-backup-offsite"}
    data = mounts[repositories["offsite"]["path"]]
    assert not data.get("readOnly"), "the repository is written"
    assert {k: v for k, v in volumes[data["name"]].items() if k != "name"} == DIRECTORY["volume"]

    s3 = mounts[repositories["s3-store"]["credentials"]]
    assert s3["readOnly"] is True
    assert volumes[s3["name"]]["secret"] == {"secretName": "cairn-backup-s3"}

    backup_volumes = {v["name"] for v in controller["volumes"] if v["name"].startswith("backup-")}
    assert backup_volumes == {offsite["name"], data["name"], s3["name"]}
    assert len(volumes) == len(controller["volumes"]), "volume names collide"
    for each in controller["containers"]:
        if each["name"] != "cairn":
            assert not {m["name"] for m in each.get("volumeMounts", [])} & backup_volumes, each["name"]
    node = pods["cairn-csi-node"]
    assert not [v for v in node["volumes"] if v["name"].startswith("backup-")], "no node copies backups here"


def test_with_a_routed_backend_the_node_plugins_mount_the_repositories_too(tmp_path: Path) -> None:
    """An lvm backend on many nodes: each node copies the backups of its volumes and
    fills the restores made on it, so its driver container gets the same Secrets and
    volumes at the same paths as the controller's."""
    values = {**TWO_REPOSITORIES, "backends": [{"name": "disks", "kind": "lvm", "volumeGroup": "vg0"}]}
    pods = workloads(render_values(tmp_path, values))

    def backup_mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {m["mountPath"]: m for m in container(pod, "cairn")["volumeMounts"] if m["name"].startswith("backup-")}

    def backup_volumes(pod: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted((v for v in pod["volumes"] if v["name"].startswith("backup-")), key=lambda v: v["name"])

    node, controller = pods["cairn-csi-node"], pods["cairn-csi-controller"]
    assert backup_mounts(node) and backup_mounts(node) == backup_mounts(controller)
    assert backup_volumes(node) == backup_volumes(controller)
    assert len({v["name"] for v in node["volumes"]}) == len(node["volumes"]), "volume names collide"


def test_a_claim_volume_and_a_repository_without_a_secret(tmp_path: Path) -> None:
    directory = {
        "name": "nearby",
        "kind": "directory",
        "path": "/srv/backups/",
        "volume": {"persistentVolumeClaim": {"claimName": "cairn-backups"}},
    }
    docs = render_values(tmp_path, {"backupRepositories": [directory]})
    (entry,) = driver_config(docs)["backupRepositories"]
    assert entry == {"name": "nearby", "kind": "directory", "path": "/srv/backups/"}, "no credentials without a Secret"
    controller = workloads(docs)["cairn-csi-controller"]
    (mount,) = [m for m in container(controller, "cairn")["volumeMounts"] if m["name"].startswith("backup-")]
    assert mount["mountPath"] == "/srv/backups/"
    volume = next(v for v in controller["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "cairn-backups"}


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_objects_with_repositories_are_valid_kubernetes(tmp_path: Path, version: str) -> None:
    custom = crd_schemas()
    classes = 0
    for doc in render_values(tmp_path, TWO_REPOSITORIES, version):
        key = (doc["apiVersion"], doc["kind"])
        if key in custom:
            jsonschema.validate(doc, custom[key])
        else:
            kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] == "VolumeSnapshotClass" and doc["metadata"]["name"] == "cairn-backup":
            assert doc["parameters"] == {"type": "backup", "repository": "offsite"}
            assert doc["deletionPolicy"] == "Retain"
            classes += 1
    assert classes == 1


def repository(**changes: Any) -> dict[str, Any]:
    """The s3 repository with ``changes`` (None removes a key)."""
    return {k: v for k, v in {**S3, **changes}.items() if v is not None}


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        (repository(kind="tape"), "/backupRepositories/0/kind"),
        (repository(kind=None), "kind"),
        (repository(name="Off_Site"), "/backupRepositories/0/name"),
        (repository(chunkSize=1000), "chunkSize"),
        (repository(chunkSize=128 * 1024 * 1024), "chunkSize"),
        (repository(endpoint="s3.example.com"), "endpoint"),
        (repository(verifyTLS="yes"), "verifyTLS"),
        (repository(caBundle="ca.crt"), "caBundle"),
        (repository(credentials="/etc/cairn/backup/s3-store"), "credentials"),  # the chart's to set
        (repository(volume={"emptyDir": {}}), "volume"),  # an s3 repository has no files here
        (repository(path="/backups"), "path"),
        ({**DIRECTORY, "bucket": "b"}, "bucket"),
        ({**DIRECTORY, "path": "backups"}, "path"),
        ({**DIRECTORY, "volume": {}}, "volume"),
    ],
)
def test_the_values_schema_checks_repositories(tmp_path: Path, entry: dict[str, Any], complaint: str) -> None:
    stderr = refusal(tmp_path, {"backupRepositories": [entry]})
    assert "schema" in stderr and complaint in stderr


def test_the_values_schema_checks_backup_class_parameters(tmp_path: Path) -> None:
    stderr = refusal(tmp_path, {"volumeSnapshotClasses": [{"name": "x", "parameters": {"type": "bakup"}}]})
    assert "/volumeSnapshotClasses/0/parameters/type" in stderr


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (
            {"backupRepositories": [{k: v for k, v in DIRECTORY.items() if k != "path"}]},
            "backupRepositories: offsite (directory): set path, the absolute path",
        ),
        (
            {"backupRepositories": [{k: v for k, v in DIRECTORY.items() if k != "volume"}]},
            "backupRepositories: offsite (directory): set volume, the pod volume source mounted at /backups",
        ),
        (
            {"backupRepositories": [repository(bucket=None)]},
            "backupRepositories: s3-store (s3): set bucket, an existing bucket",
        ),
        (
            {"backupRepositories": [repository(secretName=None)]},
            "backupRepositories: s3-store (s3): set secretName, a Secret in namespace kube-system "
            "with keys accessKeyID and secretAccessKey",
        ),
        (
            {"backupRepositories": [repository(name="local")]},
            "backupRepositories: local (s3): a backend or group has this name too",
        ),
        (
            {
                "backends": [{"name": "a", "kind": "local", "path": "/a", "group": "fast"}],
                "storageClasses": [],
                "backupRepositories": [repository(name="fast")],
            },
            "backupRepositories: fast (s3): a backend or group has this name too",
        ),
        (
            {"backupRepositories": [S3, repository(bucket="other")]},
            "backupRepositories: the name s3-store is used twice",
        ),
        (
            {"backupRepositories": [DIRECTORY, {**DIRECTORY, "name": "second", "path": "/backups/"}]},
            "backupRepositories: second (directory): path /backups is mounted in the controller already",
        ),
        (
            {"backupRepositories": [{**DIRECTORY, "path": "/var/lib/cairn-csi/local/"}]},
            "backupRepositories: offsite (directory): path /var/lib/cairn-csi/local is mounted in the controller",
        ),
        (
            {"backupRepositories": [{**DIRECTORY, "path": "/etc/cairn/backups"}]},
            "path /etc/cairn/backups is in /etc/cairn, which the chart mounts for the driver itself",
        ),
        (
            {"volumeSnapshotClasses": [{"name": "b", "parameters": {"type": "backup"}}]},
            "VolumeSnapshotClass b: parameters.type is backup: set parameters.repository",
        ),
        (
            {"volumeSnapshotClasses": [BACKUP_CLASS]},
            "VolumeSnapshotClass cairn-backup: repository offsite is not in backupRepositories (none)",
        ),
        (
            {"backupRepositories": [S3], "volumeSnapshotClasses": [BACKUP_CLASS]},
            "VolumeSnapshotClass cairn-backup: repository offsite is not in backupRepositories (s3-store)",
        ),
        (
            {
                "backupRepositories": [DIRECTORY],
                "volumeSnapshotClasses": [
                    {"name": "s", "parameters": BACKUP_CLASS["parameters"] | {"type": "snapshot"}}
                ],
            },
            "VolumeSnapshotClass s: parameters.repository is for classes of type backup",
        ),
    ],
)
def test_values_the_driver_would_refuse_fail_with_a_reason(
    tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    assert complaint in refusal(tmp_path, values)
