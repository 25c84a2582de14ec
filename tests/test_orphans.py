"""Orphans against a real kube-apiserver: PersistentVolumes and VolumeSnapshotContents
made there, volumes and snapshots made by a real driver (or backend), and what the client
command and the controller's periodic check make of them."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi import DRIVER_NAME, ids
from csi.backends.local import build as build_local
from csi.config import BackendConfig
from csi.model import AccessMode, AccessType, Capability, MiB, Volume, VolumeSpec
from csi.orphans import Orphan, OrphanWatch, References
from csi.registry import Registry
from tests.cluster.kube import Cluster
from tests.conftest import running_driver

pytestmark = pytest.mark.integration


def references(cluster: Cluster) -> References:
    return References.connect(cluster.client_configuration())


def pv(name: str, handle: str, driver: str = DRIVER_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "csi": {"driver": driver, "volumeHandle": handle},
        },
    }


def content(name: str, handle: str) -> dict[str, Any]:
    """A VolumeSnapshotContent imported by hand (the status is the snapshotter's to write)."""
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": name},
        "spec": {
            "driver": DRIVER_NAME,
            "deletionPolicy": "Retain",
            "source": {"snapshotHandle": handle},
            "volumeSnapshotRef": {"name": name, "namespace": "default"},
        },
    }


@pytest.fixture
def clean_api(api_server: Cluster) -> Iterator[Cluster]:
    yield api_server
    # No controller-manager runs to drop the PVs' protection finalizer: drop it here.
    for kind in ("pv", "volumesnapshotcontents", "nodestorages"):
        for name in api_server.kubectl("get", kind, "-o", "name").split():
            api_server.kubectl("patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
            api_server.kubectl("delete", name, "--wait=true", check=False)


def test_the_client_lists_what_no_kubernetes_object_names(clean_api: Cluster, tmp_path: Path) -> None:
    with running_driver(tmp_path / "driver") as driver:
        endpoint = f"unix://{driver.socket}"

        def client(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "csi", "client", "--endpoint", endpoint, *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        made = {}
        for name in ("kept", "claimed", "foreign"):
            done = client("create", name, "--size", "1Mi")
            assert done.returncode == 0, done.stderr
            made[name] = next(line.split()[-1] for line in done.stdout.splitlines() if line.startswith("volume id"))
        snapshots = {}
        for name in ("snap-kept", "snap-imported"):
            done = client("snapshot", name, made["claimed"])
            assert done.returncode == 0, done.stderr
            snapshots[name] = next(
                line.split()[-1] for line in done.stdout.splitlines() if line.startswith("snapshot id")
            )
        clean_api.create(
            pv("pv-claimed", made["claimed"]),
            pv("pv-of-another-driver", made["foreign"], driver="other.csi.example.com"),
            content("snapcontent-imported", snapshots["snap-imported"]),
            {
                "apiVersion": "cairn.csi.io/v1alpha1",
                "kind": "NodeStorage",
                "metadata": {"name": "lvm.somewhere"},
                "spec": {"backend": "lvm", "node": "worker-9", "orphans": ["worker-9@vol-left"], "heartbeat": 0},
            },
        )

        done = client("orphans", "--kubeconfig", str(clean_api.kubeconfig), "--settle", "0.2")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert sorted(lines) == sorted(
            [
                f"volume    {made['kept']}  (no PersistentVolume names it)",
                f"volume    {made['foreign']}  (no PersistentVolume names it)",
                f"snapshot  {snapshots['snap-kept']}  (no VolumeSnapshotContent names it)",
                "on node   worker-9: worker-9@vol-left of backend lvm (no NodeVolume names it)",
            ]
        ), done.stdout
        assert "4 orphan(s); nothing was deleted" in done.stderr
        listed = client("list")
        assert all(volume_id in listed.stdout for volume_id in made.values()), "nothing was deleted"
        for snapshot_id in snapshots.values():
            client("delete-snapshot", snapshot_id)
        for volume_id in made.values():
            client("delete", volume_id)


def test_the_controller_reports_an_orphan_found_twice_and_only_once(
    clean_api: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = build_local(BackendConfig("files", "local", None, {"path": str(tmp_path)}), "node-a", True, False)
    volumes = backend.volumes
    rwo = (Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER),)
    claimed: Volume = volumes.create_volume(VolumeSpec("claimed", MiB, 0, rwo))
    watch = OrphanWatch(Registry([backend]), references(clean_api), interval=3600)
    clean_api.create(pv("pv-files-claimed", ids.encode("files", claimed.local_id)))

    assert watch.check() == set()
    late: Volume = volumes.create_volume(VolumeSpec("late", MiB, 0, rwo))
    late_id = ids.encode("files", late.local_id)
    assert watch.check() == set(), "a volume first seen unreferenced is not an orphan yet (its PV may be coming)"
    with caplog.at_level(logging.WARNING, logger="csi.orphans"):
        assert watch.check() == {Orphan("volume", late_id)}
        assert watch.check() == {Orphan("volume", late_id)}
    warnings = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
    assert len(warnings) == 1 and late_id in warnings[0], "logged once, when found"
    samples = {(s.labels["backend"], s.labels["kind"]): s.value for m in watch.collect() for s in m.samples}
    assert samples == {("files", "volume"): 1.0, ("files", "snapshot"): 0.0}

    clean_api.create(pv("pv-files-late", late_id))
    assert watch.check() == set()
    samples = {(s.labels["backend"], s.labels["kind"]): s.value for m in watch.collect() for s in m.samples}
    assert samples[("files", "volume")] == 0.0
    assert [v.local_id for v in volumes.list_volumes()] == sorted([claimed.local_id, late.local_id])
    for volume in (claimed, late):
        volumes.delete_volume(volume.local_id)
