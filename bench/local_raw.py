"""The raw operations the local backend is measured against: the least a crash-safe store of
image files, and a node plugin that must find its work again after a restart, has to do
for each call, done directly by the benchmark process (no gRPC, no validation, no locks,
no logging). Each keeps the durability the driver promises, so a ratio says what the
driver costs over the work itself, not over a weaker promise.

create+delete
    Create: a temporary image file, truncated to the size and fsynced (its size is durable
    before it is visible); a small JSON record written to a temporary file, fsynced and
    renamed into place; the image renamed into place; the directory fsynced once (both
    renames are in one directory, and a journaling filesystem commits them in order, so
    after a crash the record is there whenever the image is). Delete: unlink image and
    record, fsync the directory. Three fsyncs for a create and one for a delete: the floor
    for "a retried create finds the object, a crash leaves no image without a record and
    no half-made object visible". (The driver does the same, and shares the directory's
    fsync between calls in flight.)

snapshot+delete
    The image's loop devices read from sysfs (a source in use must be frozen before it is
    copied; nothing is attached here, so nothing is frozen); ``cp --reflink=auto
    --sparse=always`` of the source image into a temporary file, fsynced; the record and
    rename as for a create. Delete as for a volume.

stage+unstage
    Stage: the image's loop devices read from sysfs (a retried stage reuses its device);
    ``losetup --find --show``; the device's first blocks read for a filesystem signature
    (formatting only a blank device); ``mkfs.ext4`` with the driver's fast options;
    ``mount``; the node's record of the stage written like a volume record. Unstage:
    ``umount``, ``losetup --detach``, wait until sysfs shows the device released, unlink
    the record.

publish+unpublish
    Publish: the mount table read (a retried publish finds its mount); the target
    directory made; ``mount --bind`` of the staging mount; the node record rewritten with
    the target. Unpublish: the mount table read, ``umount``, the target removed, the record
    rewritten without it.

Tools are run as processes where a person doing the steps by hand would run them (losetup,
mkfs, mount, cp), and files are read directly where that is what the step is.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import sh

TEMP = ".tmp"
FAST_MKFS_EXT4 = ["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(path: Path, record: Mapping[str, Any], sync_directory: bool = True) -> None:
    """Write ``record`` to a temporary file, fsync it, rename it into place; fsync the
    directory unless the caller does it after further renames."""
    temp = path.with_name(path.name + TEMP)
    with open(temp, "wb") as handle:
        handle.write(json.dumps(record, sort_keys=True).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    if sync_directory:
        fsync_path(path.parent, directory=True)


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices backed by ``image``, from sysfs."""
    wanted = str(image.resolve())
    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError), open(backing, encoding="utf-8") as handle:
            if handle.read().strip().removesuffix(" (deleted)") == wanted:
                found.append("/dev/" + backing.split("/")[3])
    return found


def is_blank(device: str) -> bool:
    """No ext4 or XFS signature in the first blocks (what formatting only a blank device
    must look at, read directly)."""
    with open(device, "rb") as handle:
        head = handle.read(64 * 1024)
    ext_magic = head[1080:1082] == b"\x53\xef"
    return not ext_magic and not head.startswith(b"XFSB")


def mounted(target: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        return any(line.split()[4] == target for line in table)


class RawLocal:
    """The raw operations, on a directory of their own on the driver's filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volumes = root / "volumes"
        self.snapshots = root / "snapshots"
        self.node = root / "node"
        for folder in (self.volumes, self.snapshots, self.node):
            folder.mkdir(parents=True, exist_ok=True)

    # -- controller ----------------------------------------------------------------

    def create(self, name: str, size: int) -> Path:
        image = self.volumes / f"{name}.img"
        temp = image.with_name(image.name + TEMP)
        with open(temp, "wb") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())
        record: dict[str, Any] = {
            "name": name,
            "source": None,
            "parameters": {},
            "created": time.time(),
            "published": {},
        }
        write_record(self.volumes / f"{name}.json", record, sync_directory=False)
        os.rename(temp, image)
        fsync_path(self.volumes, directory=True)
        return image

    def delete(self, image: Path) -> None:
        image.unlink()
        image.with_suffix(".json").unlink()
        fsync_path(image.parent, directory=True)

    def snapshot(self, name: str, source: Path) -> Path:
        loop_devices_of(source)  # none attached here: nothing to freeze
        image = self.snapshots / f"{name}.img"
        temp = image.with_name(image.name + TEMP)
        sh("cp", "--reflink=auto", "--sparse=always", str(source), str(temp))
        fsync_path(temp)
        record = {"name": name, "source": source.stem, "created": time.time()}
        write_record(self.snapshots / f"{name}.json", record, sync_directory=False)
        os.rename(temp, image)
        fsync_path(self.snapshots, directory=True)
        return image

    # -- node ----------------------------------------------------------------------

    def stage(self, image: Path, staging: str) -> str:
        existing = loop_devices_of(image)
        device = existing[0] if existing else sh("losetup", "--find", "--show", str(image))
        if is_blank(device):
            sh("mkfs.ext4", "-q", *FAST_MKFS_EXT4, device)
        os.makedirs(staging, exist_ok=True)
        sh("mount", "-t", "ext4", device, staging)
        record = {"volume": image.stem, "staging_path": staging, "device": device, "filesystem": "ext4", "targets": {}}
        write_record(self.node / f"{image.stem}.json", record)
        return device

    def unstage(self, image: Path, staging: str, device: str) -> None:
        sh("umount", staging)
        sh("losetup", "--detach", device)
        deadline = time.monotonic() + 10
        while loop_devices_of(image) and time.monotonic() < deadline:
            time.sleep(0.001)
        (self.node / f"{image.stem}.json").unlink()

    def publish(self, image: Path, staging: str, target: str) -> None:
        if mounted(target):
            return
        os.makedirs(target, exist_ok=True)
        sh("mount", "--bind", staging, target)
        self._targets(image, {target: False})

    def unpublish(self, image: Path, target: str) -> None:
        if mounted(target):
            sh("umount", target)
        os.rmdir(target)
        self._targets(image, {})

    def _targets(self, image: Path, targets: dict[str, bool]) -> None:
        path = self.node / f"{image.stem}.json"
        record = json.loads(path.read_bytes())
        record["targets"] = targets
        write_record(path, record)
