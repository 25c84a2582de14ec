"""Backups of thin LVs, against a real thin pool: a thin volume backed up twice into a
directory repository (the second time reading only what the pool's metadata says
changed) and restored onto local, and a local volume's backup restored onto the thin
pool, byte for byte.

A thin pool needs the kernel's device-mapper, which this host may lack: the vm tier runs
these tests in a guest with a stock kernel."""

from __future__ import annotations

import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import ids
from csi.backends import local, lvm
from csi.backends.lvm.lvm import mapper_path
from csi.backends.lvm.volumes import lv_name
from csi.backup.directory import DirectoryStore
from csi.backup.engine import Backups
from csi.backup.repository import Repository
from csi.config import BackendConfig
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec
from csi.registry import Registry
from tests.lvm import LoopVolumeGroup, has_device_mapper, thin_pool_group
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
SIZE = 16 * MiB
CHUNK = 256 * 1024
NODE = "test-node"


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LoopVolumeGroup]:
    require_root()
    require_tools("lvm", "dmsetup", "thin_dump", "thin_delta")
    if not has_device_mapper():
        pytest.skip(
            "thin pools need the kernel's device-mapper, which this kernel lacks (the vm tier runs these tests)"
        )
    with thin_pool_group(tmp_path) as made:
        yield made


@pytest.fixture
def registry(group: LoopVolumeGroup, tmp_path: Path) -> Registry:
    settings = {"volumeGroup": group.name, "thinPool": "pool", "lvmConfig": group.config, "node": NODE}
    thin = lvm.build(BackendConfig("thin", "lvm", None, settings), NODE, True, False)
    files = local.build(BackendConfig("files", "local", None, {"path": str(tmp_path / "files")}), NODE, True, False)
    return Registry([thin, files])


class ThinDevice:
    """A thin volume's device, active for the block, behind the backend's back."""

    def __init__(self, group: LoopVolumeGroup, volume_id: str) -> None:
        self.group = group
        self.lv = lv_name(ids.split_node(ids.decode(volume_id).local_id)[1])

    def __enter__(self) -> str:
        made = self.group.run("lvchange", "--activate", "y", "--ignoreactivationskip", f"{self.group.name}/{self.lv}")
        assert made.returncode == 0, made.stderr
        return mapper_path(self.group.name, self.lv)

    def __exit__(self, *exc: object) -> None:
        done = self.group.run("lvchange", "--activate", "n", f"{self.group.name}/{self.lv}")
        assert done.returncode == 0, done.stderr


def write(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b", buffering=0) as device:
        device.seek(offset)
        device.write(data)
        device.flush()
    subprocess.run(["sync"], check=True)


def digest(path: str) -> str:
    with open(path, "rb") as device:
        return hashlib.sha256(device.read(SIZE)).hexdigest()


def local_image(registry: Registry, volume_id: str) -> str:
    backend = registry.find("files")
    assert backend is not None
    path: str = backend.volumes.layout.image("volume", ids.decode(volume_id).local_id)  # type: ignore[attr-defined]
    return path


def back_up(backups: Backups, name: str, volume_id: str) -> str:
    backups.backup("vault", name, volume_id)
    backups.wait()
    done = backups.backup("vault", name, volume_id)
    assert done.ready
    return ids.encode("vault", done.local_id)


def restore(backups: Backups, registry: Registry, backup: str, backend_name: str) -> str:
    backend = registry.find(backend_name)
    assert backend is not None
    spec = VolumeSpec(f"from-{backup[-8:]}", SIZE, 0, (RWO,), source=SourceRef("backup", backup))
    volume = backend.volumes.create_volume(spec)
    assert volume.filling
    backups.restore(backup, backend, volume, secrets={})
    assert not backend.volumes.get_volume(volume.local_id).filling
    return ids.encode(backend_name, volume.local_id)


def test_a_thin_volume_backed_up_incrementally_and_restored_onto_local(
    registry: Registry, group: LoopVolumeGroup, tmp_path: Path
) -> None:
    backups = Backups(
        registry, {"vault": Repository("vault", DirectoryStore(str(tmp_path / "vault")), chunk_size=CHUNK)}
    )
    thin = registry.find("thin")
    assert thin is not None and thin.capabilities.blocks
    made = thin.volumes.create_volume(VolumeSpec("source", SIZE, 0, (RWO,)))
    volume_id = ids.encode("thin", made.local_id)
    with ThinDevice(group, volume_id) as device:
        write(device, 0, random.Random(5).randbytes(SIZE // 4))
        write(device, SIZE - 3000, b"end" * 1000)

    first = back_up(backups, "thin-1", volume_id)
    # The pool maps 64 KiB blocks: the quarter written, and the block of the end.
    assert backups.manifest(first).read_bytes <= SIZE // 4 + CHUNK
    with ThinDevice(group, volume_id) as device:
        write(device, 3 * MiB + 5, b"changed")
        expected = digest(device)
    second = back_up(backups, "thin-2", volume_id)
    manifest = backups.manifest(second)
    assert manifest.parent == ids.decode(first, "snapshot").local_id
    assert manifest.read_bytes <= CHUNK, f"the incremental backup read {manifest.read_bytes} bytes"

    restored = restore(backups, registry, second, "files")
    with open(local_image(registry, restored), "rb") as image:
        assert hashlib.sha256(image.read(SIZE)).hexdigest() == expected
    for backup in (first, second):
        backups.delete("vault", ids.decode(backup, "snapshot").local_id)
    assert thin.volumes.list_snapshots() == [], "the base kept for the next backup goes with the last backup"
    thin.volumes.delete_volume(made.local_id)
    registry.find("files").volumes.delete_volume(ids.decode(restored).local_id)  # type: ignore[union-attr]


def test_a_local_backup_restored_onto_the_thin_pool(registry: Registry, group: LoopVolumeGroup, tmp_path: Path) -> None:
    backups = Backups(
        registry, {"vault": Repository("vault", DirectoryStore(str(tmp_path / "vault")), chunk_size=CHUNK)}
    )
    files = registry.find("files")
    assert files is not None
    made = files.volumes.create_volume(VolumeSpec("source", SIZE, 0, (RWO,)))
    volume_id = ids.encode("files", made.local_id)
    rng = random.Random(6)
    with open(local_image(registry, volume_id), "r+b") as image:
        for _ in range(10):
            image.seek(rng.randrange(SIZE - 70000))
            image.write(rng.randbytes(rng.randint(1, 70000)))
    with open(local_image(registry, volume_id), "rb") as image:
        expected = hashlib.sha256(image.read(SIZE)).hexdigest()

    backup = back_up(backups, "files-1", volume_id)
    restored = restore(backups, registry, backup, "thin")
    with ThinDevice(group, restored) as device:
        assert digest(device) == expected
    backups.delete("vault", ids.decode(backup, "snapshot").local_id)
    registry.find("thin").volumes.delete_volume(ids.decode(restored).local_id)  # type: ignore[union-attr]
    files.volumes.delete_volume(made.local_id)
