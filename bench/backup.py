"""Backups of a 1 GiB volume, against reading the same device raw in the same run.

For each backend that reads its snapshots' blocks (local on an XFS filesystem, where
snapshots share extents; rbd on a throw-away one-OSD cluster), with a directory
repository on the host's disk:

full backup
    A volume full of incompressible data, backed up whole: its time against reading the
    image raw (local: ``dd`` to /dev/null, 4 MiB blocks, the page cache of both dropped
    first; rbd: ``rbd export`` to /dev/null), and the throughput of each.
incremental, 1% clustered
    A second backup after rewriting 1% of the volume in one run of bytes: bytes read and
    time, against the full backup.
incremental, 1% scattered
    A third after rewriting 1% of the volume as 4 KiB writes all over it: with 4 MiB chunks
    most chunks change, and the backup reads them (what chunking costs).

Run as root: ``python bench/backup.py [--size-mib N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MiB, sh
from csi import ids
from csi.backends import local
from csi.backends.base import Backend
from csi.backup.directory import DirectoryStore
from csi.backup.engine import Backups
from csi.backup.repository import Repository
from csi.config import BackendConfig
from csi.model import AccessMode, AccessType, Capability, VolumeSpec
from csi.registry import Registry

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
BLOCK = 4096


@dataclass
class Subject:
    """One backend's volume: how to write it, read it raw and forget its cache."""

    name: str
    backend: Backend
    volume_id: str
    write: Callable[[int, bytes], None]
    raw_read: Callable[[], None]
    drop_cache: Callable[[], None]
    secrets: dict[str, str]
    raw_label: str = "raw read (dd)"


@dataclass(frozen=True)
class Result:
    label: str
    seconds: float
    read_bytes: int
    new_bytes: int


def fill(subject: Subject, size: int) -> None:
    step = 64 * MiB
    rng = random.Random(1)
    for offset in range(0, size, step):
        subject.write(offset, rng.randbytes(min(step, size - offset)))


def back_up(backups: Backups, subject: Subject, name: str) -> Result:
    subject.drop_cache()
    started = time.perf_counter()
    backups.backup("bench", name, subject.volume_id, secrets=subject.secrets)
    backups.wait()
    done = backups.backup("bench", name, subject.volume_id, secrets=subject.secrets)
    seconds = time.perf_counter() - started
    assert done.ready, f"backup {name} did not finish"
    manifest = backups.manifest(ids.encode("bench", done.local_id))
    return Result(name, seconds, manifest.read_bytes, manifest.new_bytes)


def measure(subject: Subject, registry: Registry, repository_root: Path, size: int) -> list[str]:
    repository = Repository("bench", DirectoryStore(str(repository_root)))
    backups = Backups(registry, {"bench": repository})
    fill(subject, size)
    subject.drop_cache()
    started = time.perf_counter()
    subject.raw_read()
    raw = time.perf_counter() - started

    full = back_up(backups, subject, "full")
    rng = random.Random(2)
    one_percent = size // 100
    start = rng.randrange(0, size - one_percent) // BLOCK * BLOCK
    subject.write(start, rng.randbytes(one_percent))
    clustered = back_up(backups, subject, "clustered")
    for _ in range(one_percent // BLOCK):
        subject.write(rng.randrange(0, size // BLOCK) * BLOCK, rng.randbytes(BLOCK))
    scattered = back_up(backups, subject, "scattered")

    def rate(count: int, seconds: float) -> str:
        return f"{count / MiB / seconds:8.1f} MiB/s"

    lines = [
        f"{subject.name}: {size // MiB} MiB volume, 4 MiB chunks, directory repository",
        f"  {subject.raw_label:<25}{raw:7.2f} s  {rate(size, raw)}",
        f"  full backup              {full.seconds:7.2f} s  {rate(size, full.seconds)}  "
        f"{full.seconds / raw:5.1f}x raw  read {full.read_bytes // MiB} MiB, stored {full.new_bytes // MiB} MiB",
    ]
    for result in (clustered, scattered):
        lines.append(
            f"  incremental, 1% {result.label:<9}{result.seconds:7.2f} s  "
            f"{result.seconds / full.seconds:5.2f}x full  read {result.read_bytes / MiB:7.1f} MiB "
            f"({100 * result.read_bytes / size:4.1f}% of the volume), stored {result.new_bytes / MiB:6.1f} MiB"
        )
    for manifest in repository.manifests():
        backups.delete("bench", manifest.backup_id, secrets=subject.secrets)
    return lines


def drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def xfs(root: Path, size: int) -> Iterator[Path]:
    """An XFS filesystem (reflink on) on a loop device over a sparse file."""
    backing = root / "xfs.img"
    with open(backing, "wb") as handle:
        handle.truncate(size)
    device = sh("losetup", "--find", "--show", str(backing))
    mountpoint = root / "xfs"
    mountpoint.mkdir()
    try:
        sh("mkfs.xfs", "-q", "-m", "reflink=1", device)
        sh("mount", device, str(mountpoint))
        try:
            yield mountpoint
        finally:
            sh("umount", str(mountpoint))
    finally:
        sh("losetup", "--detach", device)


def local_subject(root: Path, size: int) -> tuple[Subject, Registry]:
    backend = local.build(BackendConfig("files", "local", None, {"path": str(root / "files")}), "n", True, False)
    made = backend.volumes.create_volume(VolumeSpec("bench", size, 0, (RWO,)))
    image: str = backend.volumes.layout.image("volume", made.local_id)  # type: ignore[attr-defined]

    def write(offset: int, data: bytes) -> None:
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def drop() -> None:
        # The images' pages, and those of the file under the loop device beneath them.
        for path in Path(root / "files").rglob("*"):
            if path.is_file():
                drop_file_cache(str(path))
        drop_file_cache(str(root.parent / "xfs.img"))

    def raw_read() -> None:
        subprocess.run(["dd", f"if={image}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)

    subject = Subject("local on XFS", backend, ids.encode("files", made.local_id), write, raw_read, drop, {})
    return subject, Registry([backend])


def rbd_subject(root: Path, size: int) -> Iterator[tuple[Subject, Registry]]:
    import rados
    import rbd

    from csi.backends.rbd import CAPABILITIES
    from csi.backends.rbd.cluster import Clusters
    from csi.backends.rbd.common import RbdSettings, image_name
    from csi.backends.rbd.controller import RbdVolumes
    from tests.ceph import POOL, USER, CephCluster

    cluster = CephCluster(root / "ceph").start()
    try:
        settings = RbdSettings(monitors=tuple(cluster.monitors), pool=POOL)
        volumes = RbdVolumes(settings, Clusters(settings.monitors))
        backend = Backend("ceph", "rbd", None, CAPABILITIES, volumes, None)
        secrets = {"userID": USER, "userKey": cluster.user_key}
        made = volumes.create_volume(VolumeSpec("bench", size, 0, (RWO,), secrets=secrets))
        admin = rados.Rados(conffile=str(cluster.conf), rados_id="admin")
        admin.connect()
        io = admin.open_ioctx(POOL)
        name = image_name("volume", made.local_id.split("/", 1)[1])

        def write(offset: int, data: bytes) -> None:
            with rbd.Image(io, name) as image:
                image.write(data, offset)

        def raw_read() -> None:
            command = ["rbd", "--conf", str(cluster.conf), "export", f"{POOL}/{name}", "-", "--no-progress"]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        volume_id = ids.encode("ceph", made.local_id)
        subject = Subject(
            "rbd (one memstore OSD)",
            backend,
            volume_id,
            write,
            raw_read,
            lambda: None,
            secrets,
            "raw read (rbd export)",
        )
        try:
            yield subject, Registry([backend])
        finally:
            volumes.delete_volume(made.local_id, secrets=secrets)
            io.close()
            admin.shutdown()
            volumes.clusters.shutdown()
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--backend", choices=("local", "rbd", "all"), default="all")
    args = parser.parse_args()
    size = args.size_mib * MiB
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cairn-bench-") as tmp:
        root = Path(tmp)
        if args.backend in ("local", "all"):
            with xfs(root, 4 * size + 512 * MiB) as mounted:
                subject, registry = local_subject(mounted, size)
                lines += measure(subject, registry, root / "repository-local", size)
        if args.backend in ("rbd", "all"):
            for subject, registry in rbd_subject(root, size):
                lines += measure(subject, registry, root / "repository-rbd", size)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
