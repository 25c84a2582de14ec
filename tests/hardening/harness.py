"""One harness for the hardening suites (fuzz, crash-and-retry, concurrency), so every
backend runs the same suites: a ``Profile`` says how to start a driver on that backend,
which secrets and StorageClass parameters its calls carry, and how to list what the
backend holds (to prove a suite leaked or duplicated nothing).

A new backend joins the suites by adding a profile factory to ``PROFILES``."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from csi import loopdev, mount
from tests.ceph import POOL, USER, CephCluster
from tests.conftest import running_driver
from tests.support import Driver, leftovers, require_root, require_tools

SEED_VARIABLE = "CAIRN_TEST_SEED"


def seed(name: str) -> int:
    """The seed of one suite run: from CAIRN_TEST_SEED when set (to replay a failure),
    else fresh. Printed, so a failing run's output says how to replay it."""
    value = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(1 << 32))
    print(f"{name}: {SEED_VARIABLE}={value} replays this run")
    return value


@dataclass
class Profile:
    """One backend under test."""

    name: str
    root: Path
    """Where the driver and the backend may create files on this host."""
    driver_args: list[str]
    secrets: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    backend_objects: Callable[[], set[str]] = lambda: set()
    """What the backend holds now (files, images, journal entries), for leak checks."""

    @contextmanager
    def driver(self) -> Iterator[Driver]:
        with running_driver(self.root / "driver", self.driver_args) as instance:
            yield instance


def local_profile(root: Path) -> Profile:
    require_root()
    require_tools("losetup", "blkid", "mkfs.ext4", "fsfreeze")
    data = root / "driver" / "data"

    def objects() -> set[str]:
        if not data.exists():
            return set()
        return {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()}

    return Profile("local", root, [], backend_objects=objects)


def rbd_profile(root: Path, ceph: CephCluster) -> Profile:
    require_tools("rbd-fuse", "losetup", "mkfs.ext4")
    credentials = {"userID": USER, "userKey": ceph.user_key}
    credentials_dir = root / "ceph-secret"
    credentials_dir.mkdir(parents=True, exist_ok=True)
    for key, value in credentials.items():
        (credentials_dir / key).write_text(value)
    config = root / "cairn.yaml"
    backend = {
        "name": "ceph",
        "kind": "rbd",
        "monitors": ceph.monitors,
        "pool": POOL,
        "mapper": "rbd-fuse",
        "fuseDir": str(root / "driver" / "fuse"),  # under the driver: its leak check covers it
        "credentialsDir": str(credentials_dir),
    }
    config.write_text(yaml.safe_dump({"backends": [backend]}))

    def objects() -> set[str]:
        images = {f"image {n}" for n in ceph.rbd("ls", POOL).split()}
        trash = {f"trash {line}" for line in ceph.rbd("trash", "ls", POOL).splitlines() if line}
        try:
            journal = ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal")
        except RuntimeError:
            journal = ""
        return images | trash | {f"journal {k}" for k in journal.split()}

    return Profile("rbd", root, ["--config", str(config)], secrets=credentials, backend_objects=objects)


PROFILES = ("local", "rbd")


@dataclass(frozen=True)
class HostState:
    """What a driver may change on the host outside its own directory."""

    mounts: frozenset[str]
    loops: frozenset[str]

    @classmethod
    def now(cls) -> HostState:
        mounts = frozenset(f"{m.target} ({m.source})" for m in mount.mounts())
        loops = (
            frozenset(f"{d} -> {b}" for d, b in loopdev.attached().items()) if shutil.which("losetup") else frozenset()
        )
        return cls(mounts, loops)

    def changes_since(self, before: HostState) -> list[str]:
        return [f"new mount {m}" for m in sorted(self.mounts - before.mounts)] + [
            f"new loop device {d}" for d in sorted(self.loops - before.loops)
        ]


def frozen_filesystems(root: Path) -> list[str]:
    """Mount points under ``root`` whose filesystem is frozen. Freezing a frozen
    filesystem fails with EBUSY at once, where a write would hang; a probe that froze
    a live filesystem thaws it again straight away."""
    frozen = []
    prefix = str(root.resolve())
    for entry in mount.mounts():
        if not entry.target.startswith(prefix) or entry.fstype not in ("ext4", "xfs") or "rw" not in entry.options:
            continue
        probe = subprocess.run(["fsfreeze", "--freeze", entry.target], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            subprocess.run(["fsfreeze", "--unfreeze", entry.target], check=True)
        elif "busy" in probe.stderr.lower():
            frozen.append(entry.target)
    return frozen


def thaw(targets: list[str]) -> None:
    """Thaw what a failed test left frozen, so the host stays usable."""
    for target in targets:
        subprocess.run(["fsfreeze", "--unfreeze", target], check=False)


def host_leftovers(root: Path) -> list[str]:
    return leftovers(root) + [f"frozen {t}" for t in frozen_filesystems(root)]
