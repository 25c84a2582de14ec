"""Backups that move volumes between backends, against real components: a local volume
backed up into an encrypted S3 repository (a real RADOS gateway) and restored onto rbd,
and an rbd volume backed up twice into a directory repository (the second time reading
only what changed, through RBD's own diff) and restored onto local, byte for byte."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rados
import rbd

from csi import ids
from csi.backends import local
from csi.backends.base import Backend
from csi.backends.rbd import CAPABILITIES
from csi.backends.rbd.cluster import Clusters
from csi.backends.rbd.common import RbdSettings, image_name
from csi.backends.rbd.controller import RbdVolumes
from csi.backup.directory import DirectoryStore
from csi.backup.engine import Backups
from csi.backup.repository import Repository
from csi.backup.s3 import S3Settings, S3Store
from csi.config import BackendConfig
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec
from csi.registry import Registry
from tests.backup.conftest import S3Server
from tests.ceph import POOL, USER, CephCluster

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_pool")]

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
SIZE = 16 * MiB
CHUNK = 256 * 1024


@pytest.fixture
def registry(ceph: CephCluster, tmp_path: Path) -> Iterator[Registry]:
    settings = RbdSettings(monitors=tuple(ceph.monitors), pool=POOL)
    volumes = RbdVolumes(settings, Clusters(settings.monitors))
    ceph_backend = Backend("ceph", "rbd", None, CAPABILITIES, volumes, None)
    files = local.build(BackendConfig("files", "local", None, {"path": str(tmp_path / "files")}), "n", True, False)
    yield Registry([ceph_backend, files])
    volumes.clusters.shutdown()


@pytest.fixture
def secrets(ceph: CephCluster) -> dict[str, str]:
    return {"userID": USER, "userKey": ceph.user_key}


@pytest.fixture
def pool_io(ceph: CephCluster) -> Iterator[Any]:
    """The test pool as the admin, to write and read volumes behind the backend's back."""
    cluster = rados.Rados(conffile=str(ceph.conf), rados_id="admin")
    cluster.connect()
    io = cluster.open_ioctx(POOL)
    yield io
    io.close()
    cluster.shutdown()


def local_image(registry: Registry, volume_id: str) -> str:
    backend = registry.find("files")
    assert backend is not None
    layout = backend.volumes.layout  # type: ignore[attr-defined]
    path: str = layout.image("volume", ids.decode(volume_id).local_id)
    return path


def rbd_image(io: Any, volume_id: str) -> rbd.Image:
    uuid = ids.decode(volume_id).local_id.split("/", 1)[1]
    return rbd.Image(io, image_name("volume", uuid))


def rbd_digest(io: Any, volume_id: str, size: int) -> str:
    with rbd_image(io, volume_id) as image:
        return hashlib.sha256(image.read(0, size)).hexdigest()


def local_digest(registry: Registry, volume_id: str, size: int) -> str:
    with open(local_image(registry, volume_id), "rb") as handle:
        return hashlib.sha256(handle.read(size)).hexdigest()


def back_up(backups: Backups, repository: str, name: str, volume_id: str, secrets: dict[str, str]) -> str:
    backups.backup(repository, name, volume_id, secrets=secrets)
    backups.wait()
    done = backups.backup(repository, name, volume_id, secrets=secrets)
    assert done.ready
    return ids.encode(repository, done.local_id)


def restore(backups: Backups, registry: Registry, backup: str, backend_name: str, secrets: dict[str, str]) -> str:
    backend = registry.find(backend_name)
    assert backend is not None
    spec = VolumeSpec(f"from-{backup[-8:]}", SIZE, 0, (RWO,), source=SourceRef("backup", backup), secrets=secrets)
    volume = backend.volumes.create_volume(spec)
    backups.restore(backup, backend, volume, secrets=secrets)
    return ids.encode(backend_name, volume.local_id)


def test_local_to_encrypted_s3_to_rbd(registry: Registry, pool_io: Any, rgw: S3Server, secrets: dict[str, str]) -> None:
    settings = S3Settings(endpoint=rgw.endpoint, bucket=rgw.bucket, prefix=f"round-trip-{os.getpid()}")
    store = S3Store(settings, rgw.access_key, rgw.secret_key)
    repository = Repository("offsite", store, key=os.urandom(32), chunk_size=CHUNK)
    backups = Backups(registry, {"offsite": repository})
    files = registry.find("files")
    assert files is not None
    made = files.volumes.create_volume(VolumeSpec("source", SIZE, 0, (RWO,)))
    volume_id = ids.encode("files", made.local_id)
    with open(local_image(registry, volume_id), "r+b") as handle:
        rng = random.Random(11)
        for _ in range(20):
            handle.seek(rng.randrange(SIZE - 70000))
            handle.write(rng.randbytes(rng.randint(1, 70000)))

    backup = back_up(backups, "offsite", "local-1", volume_id, {})
    restored = restore(backups, registry, backup, "ceph", secrets)
    assert rbd_digest(pool_io, restored, SIZE) == local_digest(registry, volume_id, SIZE)
    assert repository.verify().ok
    backups.delete("offsite", ids.decode(backup, "snapshot").local_id)
    registry.find("ceph").volumes.delete_volume(ids.decode(restored).local_id, secrets=secrets)  # type: ignore[union-attr]


def test_rbd_to_directory_to_local_incrementally(
    registry: Registry, pool_io: Any, tmp_path: Path, secrets: dict[str, str]
) -> None:
    repository = Repository("vault", DirectoryStore(str(tmp_path / "vault")), chunk_size=CHUNK)
    backups = Backups(registry, {"vault": repository})
    ceph_backend = registry.find("ceph")
    assert ceph_backend is not None
    made = ceph_backend.volumes.create_volume(VolumeSpec("source", SIZE, 0, (RWO,), secrets=secrets))
    volume_id = ids.encode("ceph", made.local_id)
    with rbd_image(pool_io, volume_id) as image:
        image.write(random.Random(12).randbytes(SIZE // 2), 0)
        image.write(b"end" * 1000, SIZE - 3000)

    first = back_up(backups, "vault", "rbd-1", volume_id, secrets)
    # RBD tells allocation per object (4 MiB): the half written, and the object of the end.
    assert backups.manifest(first).read_bytes <= SIZE // 2 + 4 * MiB
    with rbd_image(pool_io, volume_id) as image:
        image.write(b"changed", 3 * MiB + 5)
    second = back_up(backups, "vault", "rbd-2", volume_id, secrets)
    manifest = backups.manifest(second)
    assert manifest.parent == ids.decode(first, "snapshot").local_id
    assert manifest.read_bytes <= 2 * CHUNK, f"the incremental backup read {manifest.read_bytes} bytes"

    restored = restore(backups, registry, second, "files", secrets)
    assert local_digest(registry, restored, SIZE) == rbd_digest(pool_io, volume_id, SIZE)
    for backup in (first, second):
        backups.delete("vault", ids.decode(backup, "snapshot").local_id, secrets=secrets)
    assert ceph_backend.volumes.list_snapshots(secrets=secrets) == []
    ceph_backend.volumes.delete_volume(made.local_id, secrets=secrets)
