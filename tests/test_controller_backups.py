"""Backups through the CSI controller of a running driver with two local backends and a
directory repository: a VolumeSnapshotClass of type backup, polled until ready, listed
with the snapshots, restored onto the other backend byte for byte, deleted; the codes for
bad requests; and a driver killed in mid-upload, whose retry makes one backup."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from csi.generated import csi_pb2 as pb
from tests.conftest import running_driver
from tests.support import NODE_ID, Driver, mount_capability

pytestmark = pytest.mark.integration

MiB = 1 << 20
CHUNK = 64 * 1024
BACKUP = {"type": "backup", "repository": "vault"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {"name": "a", "kind": "local", "path": str(tmp_path / "a")},
                    {"name": "b", "kind": "local", "path": str(tmp_path / "b")},
                ],
                "backupRepositories": [
                    {"name": "vault", "kind": "directory", "path": str(tmp_path / "vault"), "chunkSize": CHUNK}
                ],
            }
        )
    )
    return path


@pytest.fixture
def backing(tmp_path: Path, config: Path) -> Iterator[Driver]:
    with running_driver(tmp_path / "driver", ["--config", str(config)]) as instance:
        yield instance


def create(driver: Driver, name: str, backend: str, size: int, source: str = "") -> pb.Volume:
    request = pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability()],
        parameters={"backend": backend},
    )
    if source:
        request.volume_content_source.snapshot.snapshot_id = source
    made: pb.Volume = driver.controller.CreateVolume(request).volume
    return made


def image(driver: Driver, volume_id: str) -> str:
    request = pb.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=NODE_ID, volume_capability=mount_capability()
    )
    path: str = driver.controller.ControllerPublishVolume(request).publish_context["image"]
    return path


def fill(path: str, size: int, seed: int) -> None:
    with open(path, "r+b") as handle:
        handle.write(hashlib.shake_256(str(seed).encode()).digest(size))
        handle.flush()
        os.fsync(handle.fileno())


def digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def back_up(driver: Driver, name: str, volume_id: str) -> pb.Snapshot:
    """Ask as the external-snapshotter does, until the backup is ready to use."""
    request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id, parameters=BACKUP)
    deadline = time.monotonic() + 120
    while True:
        snapshot: pb.Snapshot = driver.controller.CreateSnapshot(request).snapshot
        if snapshot.ready_to_use or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.1)


def code_of(call: object, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)  # type: ignore[operator]
    code: grpc.StatusCode = caught.value.code()
    return code


def test_a_backup_restores_onto_another_backend_and_is_listed_and_deleted(backing: Driver) -> None:
    volume = create(backing, "source", "a", 4 * MiB)
    fill(image(backing, volume.volume_id), 3 * MiB, seed=1)
    backup = back_up(backing, "nightly", volume.volume_id)
    assert backup.ready_to_use and backup.snapshot_id.startswith("1:vault:")
    assert backup.source_volume_id == volume.volume_id and backup.size_bytes == 4 * MiB

    listed = backing.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries
    assert backup.snapshot_id in [e.snapshot.snapshot_id for e in listed]
    of_volume = backing.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=volume.volume_id)).entries
    assert backup.snapshot_id in [e.snapshot.snapshot_id for e in of_volume]
    got = backing.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=backup.snapshot_id)).snapshot
    assert got == backup

    restored = create(backing, "restored", "b", MiB, source=backup.snapshot_id)
    assert restored.volume_id.startswith("1:b:") and restored.capacity_bytes >= 4 * MiB
    assert restored.content_source.snapshot.snapshot_id == backup.snapshot_id
    assert digest(image(backing, restored.volume_id)) == digest(image(backing, volume.volume_id))
    # A retry answers with the same volume and writes nothing again.
    again = create(backing, "restored", "b", MiB, source=backup.snapshot_id)
    assert again.volume_id == restored.volume_id

    backing.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=backup.snapshot_id))
    assert code_of(backing.controller.GetSnapshot, pb.GetSnapshotRequest(snapshot_id=backup.snapshot_id)) == (
        grpc.StatusCode.NOT_FOUND
    )
    backing.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=backup.snapshot_id))


def test_bad_backup_requests_get_clear_codes(backing: Driver) -> None:
    volume = create(backing, "source", "a", MiB)
    snapshot = backing.controller.CreateSnapshot
    request = pb.CreateSnapshotRequest
    assert code_of(snapshot, request(name="x", source_volume_id=volume.volume_id, parameters={"type": "tape"})) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(snapshot, request(name="x", source_volume_id=volume.volume_id, parameters={"type": "backup"})) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    unknown = {"type": "backup", "repository": "attic"}
    with pytest.raises(grpc.RpcError) as caught:
        snapshot(request(name="x", source_volume_id=volume.volume_id, parameters=unknown))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "attic" in caught.value.details()
    assert code_of(snapshot, request(name="x", source_volume_id=volume.volume_id, parameters={"repository": "v"})) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    backup = back_up(backing, "small", volume.volume_id)
    too_small = pb.CreateVolumeRequest(
        name="tiny",
        capacity_range=pb.CapacityRange(required_bytes=4096, limit_bytes=4096),
        volume_capabilities=[mount_capability()],
        parameters={"backend": "b"},
    )
    too_small.volume_content_source.snapshot.snapshot_id = backup.snapshot_id
    assert code_of(backing.controller.CreateVolume, too_small) == grpc.StatusCode.OUT_OF_RANGE
    missing = pb.CreateVolumeRequest(
        name="ghost", volume_capabilities=[mount_capability()], parameters={"backend": "b"}
    )
    missing.volume_content_source.snapshot.snapshot_id = "1:vault:b-0000"
    assert code_of(backing.controller.CreateVolume, missing) == grpc.StatusCode.NOT_FOUND


def test_a_driver_killed_in_mid_upload_makes_one_backup_on_retry(tmp_path: Path, config: Path) -> None:
    size = 48 * MiB
    with running_driver(tmp_path / "driver", ["--config", str(config)]) as instance:
        volume = create(instance, "big", "a", size)
        fill(image(instance, volume.volume_id), size, seed=2)
        request = pb.CreateSnapshotRequest(name="interrupted", source_volume_id=volume.volume_id, parameters=BACKUP)
        first = instance.controller.CreateSnapshot(request).snapshot
        chunks = tmp_path / "vault" / "chunks"
        deadline = time.monotonic() + 60
        while len(list(chunks.rglob("*"))) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        instance.kill()
        assert not list((tmp_path / "vault" / "backups").glob("*")), "a partial backup is visible"
        instance.start()
        done = back_up(instance, "interrupted", volume.volume_id)
        assert done.ready_to_use and done.snapshot_id == first.snapshot_id
        assert len(list((tmp_path / "vault" / "backups").glob("*"))) == 1
        restored = create(instance, "check", "b", size, source=done.snapshot_id)
        assert digest(image(instance, restored.volume_id)) == digest(image(instance, volume.volume_id))

        # A backup killed and then deleted leaves chunks nobody uses: gc removes them.
        abandoned = pb.CreateSnapshotRequest(name="abandoned", source_volume_id=volume.volume_id, parameters=BACKUP)
        fill(image(instance, volume.volume_id), size, seed=3)
        started = instance.controller.CreateSnapshot(abandoned).snapshot
        before = {p.name for p in chunks.rglob("*") if p.is_file()}
        deadline = time.monotonic() + 60
        while len({p.name for p in chunks.rglob("*") if p.is_file()} - before) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        instance.kill()
        instance.start()
        instance.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=started.snapshot_id))
        snapshots = instance.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries
        assert [e.snapshot.snapshot_id for e in snapshots if e.snapshot.snapshot_id.startswith("1:a:")] != [], (
            "the finished backup's base snapshot should remain"
        )
        assert len([e for e in snapshots if e.snapshot.snapshot_id.startswith("1:a:")]) == 1
    gc = subprocess.run(
        [sys.executable, "-m", "csi", "client", "backups", "vault", "gc", "--grace", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gc.returncode == 0, gc.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "csi", "client", "backups", "vault", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "csi", "client", "backups", "vault", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "interrupted" in listing and "abandoned" not in listing
    # Every chunk left is one the finished backup uses.
    stored = {p.name for p in chunks.rglob("*") if p.is_file()}
    assert len(stored) <= size // CHUNK
