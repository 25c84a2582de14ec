"""One harness for the hardening suites (fuzz, crash-and-retry, concurrency), so every
backend runs the same suites: a ``Profile`` says how to start a driver on that backend,
which secrets and StorageClass parameters its calls carry, and how to list what the
backend holds (to prove a suite leaked or duplicated nothing).

A new backend joins the suites by adding a profile factory to ``PROFILES``.

A profile whose node path this host cannot run (nfs: the node mounts with the kernel's
NFS client, which this host's kernel lacks; the vm tier runs that path in a guest) says so
with ``node=False``: the suites then do the data part of a mount on the server side
(``write_data``, ``read_data``), keep every controller call, and skip, with
``node_missing`` as the reason, what exists to test the node path itself."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from csi import loopdev, mount
from csi.backends.nfs import tree_ops
from csi.backends.nfs.fs import opened
from csi.backends.nfs.libnfs import Client
from tests.ceph import POOL, USER, CephCluster
from tests.cluster.kube import Cluster
from tests.conftest import running_driver
from tests.nfs import EXPORT, NfsServer
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
    fs_type: str = "ext4"
    """The filesystem a mount capability asks for ("" where the backend formats nothing)."""
    block: bool = True
    """Whether the backend offers raw block volumes."""
    node: bool = True
    """Whether this host can run the backend's node path (NodeStage, NodePublish)."""
    node_missing: str = ""
    """Why it cannot: the reason every test of the node path is skipped with."""
    write_data: Callable[[Mapping[str, str], str, bytes], None] | None = None
    """Without a node path: write a file into a volume (by its volume context) on the
    server side, in place of a pod writing to its mount."""
    read_data: Callable[[Mapping[str, str], str], bytes] | None = None
    """Without a node path: read a file of a volume (by its volume context) on the server side."""
    strays: Callable[[], set[str]] = lambda: set()
    """What the backend made outside the places it may use there (nfs: anything new on
    the export besides the profile's folder and the backend's own folder), checked
    after every fuzz batch; ``backend_objects`` lists it too."""
    close: Callable[[], None] = lambda: None
    """Remove what the profile made outside its root, once its test is over."""
    random_kills: int = 4
    """Kills at seeded random delays per crash scenario, besides its milestones."""
    snapshots: bool = True
    """Whether the backend as configured here offers snapshots and clones."""
    no_snapshots: str = ""
    """Why it does not: the reason every test of snapshots and clones is skipped with."""
    ready: Callable[[Driver], None] = lambda driver: None
    """Return once a freshly started driver can place volumes (a routed backend: once
    its node agent has reported)."""
    known_defects: Mapping[str, str] = field(default_factory=dict)
    """Test (function name) -> a defect of the backend that makes it fail every time:
    that test is marked ``xfail(strict=True)`` with it as the reason, so that it says
    when the defect is gone."""

    @contextmanager
    def driver(self) -> Iterator[Driver]:
        with running_driver(self.root / "driver", self.driver_args) as instance:
            self.ready(instance)
            yield instance

    def require_snapshots(self, what: str) -> None:
        """Skip a test of snapshots or clones, saying why, where the profile offers none."""
        if not self.snapshots:
            pytest.skip(f"{what} needs snapshots, which {self.name} does not offer here: {self.no_snapshots}")

    def require_node(self, what: str) -> None:
        """Skip a test that exists to exercise the node path, saying why, where this host
        cannot run it."""
        if not self.node:
            pytest.skip(f"{what} exercises the node path, which {self.name} cannot run here: {self.node_missing}")


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


NFS_CONTROL_FOLDERS = frozenset({"volumes", "snapshots", "tmp", "trash", "archived"})
"""The folders of the nfs backend's own folder (``.cairn/<backend>``): each entry in one
is an object (a record, an image, a snapshot's data, what a crash left in tmp or trash)."""
NFS_NO_NODE = (
    "its node mounts with the kernel NFS client, which this host's kernel lacks (`mount -t nfs` fails here); "
    "the vm tier runs the nfs node path in a guest with a stock kernel"
)


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def nfs_profile(root: Path, server: NfsServer) -> Profile:
    """The nfs backend, directory layout, on the session's test server: the controller
    reaches the export through its user-space client. Each profile puts its volumes in a
    folder of its own on the export (``subDir``) and removes it, and the backend's own
    folder, once its test is over.

    The node path needs the kernel's NFS client, which this host lacks: the data part of a
    mount is done on the server side instead. A payload is written through an NFS client
    of the test's own (the server caches what it serves, so a file written behind its back,
    on the exported directory, may stay invisible to it and to the driver's copies), and
    read back from the exported directory itself: what a snapshot or clone holds has
    travelled through the server, and is checked where the server stored it."""
    backend_name = "nfs"
    folder = f"hardening-{uuid.uuid4().hex[:12]}"
    export = server.export_dir
    control = export / ".cairn" / backend_name
    before = set(_names(export))
    before_control = set(_names(export / ".cairn"))
    config = root / "cairn.yaml"
    backend = {
        "name": backend_name,
        "kind": "nfs",
        "server": "127.0.0.1",
        "share": EXPORT,
        "port": server.port,
        "subDir": f"{folder}/${{pv.metadata.name}}",
        "timeout": 20,
        # Under the driver: its leak check covers what a node call leaves there.
        "nodeMountDir": str(root / "driver" / "nfs"),
    }
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"backends": [backend]}))

    @contextmanager
    def client() -> Iterator[Client]:
        """A client of the test's own, for one task, connected anew each time."""
        made = Client("127.0.0.1", EXPORT, port=server.port, timeout=20)
        try:
            yield made
        finally:
            with contextlib.suppress(OSError):
                made.close()

    def strays() -> set[str]:
        """New entries at the export's root and in ``.cairn``, but the profile's folder
        and the backend's own: where a path that escaped its folder would land."""
        found = {f"outside {name}" for name in _names(export) if name not in before | {".cairn", folder}}
        return found | {
            f"outside .cairn/{name}"
            for name in _names(export / ".cairn")
            if name not in before_control | {backend_name}
        }

    def objects() -> set[str]:
        """Entries of the backend's folders (a snapshot's data folder is one object), the
        volume folders in the profile's folder, and the strays."""
        found = strays()
        for name in _names(control):
            if name in NFS_CONTROL_FOLDERS and (control / name).is_dir():
                found |= {f"{name}/{entry}" for entry in _names(control / name)}
            else:
                found.add(name)
        return found | {f"folder {name}" for name in _names(export / folder)}

    def write_data(context: Mapping[str, str], name: str, payload: bytes) -> None:
        with client() as nfs, opened(nfs, f"{context['subDir']}/{name}", os.O_WRONLY | os.O_CREAT, 0o644) as handle:
            handle.truncate(0)
            handle.pwrite(payload, 0)
            handle.fsync()

    def read_data(context: Mapping[str, str], name: str) -> bytes:
        return (export / context["subDir"] / name).read_bytes()

    def close() -> None:
        """Remove the profile's folders through the server, so that it forgets them too
        (the next profile's driver makes ``.cairn/nfs`` again), else behind its back."""
        made = [name for name in _names(export) if name not in before | {".cairn"}]
        made += [f".cairn/{name}" for name in _names(export / ".cairn") if name not in before_control]
        paths = list(dict.fromkeys([*made, f".cairn/{backend_name}"]))
        try:
            with client() as nfs:
                for path in paths:
                    tree_ops.remove_tree(nfs, path)
        except OSError:
            for path in paths:
                shutil.rmtree(export / path, ignore_errors=True)

    return Profile(
        "nfs",
        root,
        ["--config", str(config)],
        backend_objects=objects,
        fs_type="",
        block=False,
        node=False,
        node_missing=NFS_NO_NODE,
        write_data=write_data,
        read_data=read_data,
        strays=strays,
        close=close,
        random_kills=12,  # no child process marks a milestone, and a round takes under half a second
    )


LVM_NO_NODE = (
    "its node activates logical volumes with device-mapper, which this host's kernel lacks; "
    "the vm tier runs the lvm node path in a guest with a stock kernel"
)
LVM_NO_SNAPSHOTS = (
    "the lvm profile here is thick (thin pools need device-mapper, which this host's kernel lacks); "
    "the vm tier runs lvm's thin snapshots, restores and clones"
)


def lvm_profile(root: Path, api: Cluster | None = None) -> Profile:
    """The lvm backend, thick, on a volume group of loop devices under a private LVM
    configuration: LVM metadata only, the node path and thin pools need device-mapper.
    With ``api``, the backend is served on many nodes: the driver's controller half goes
    through NodeVolume objects on that API server, and its own node agent makes them (a
    crash of the driver is a crash of both)."""
    from tests.lvm import loop_volume_group

    require_root()
    require_tools("lvm")
    stack = contextlib.ExitStack()
    root.mkdir(parents=True, exist_ok=True)
    # The physical volumes' files and loop devices are the test's, not the driver's: they
    # live beside the profile's root, whose leftovers the suites check.
    disks = root.parent / f"pvs-of-{root.name}"
    disks.mkdir(exist_ok=True)
    group = stack.enter_context(loop_volume_group(disks, size=2048 * 1024 * 1024))
    config = root / "cairn.yaml"
    backend = {"name": "lvm", "kind": "lvm", "volumeGroup": group.name, "lvmConfig": group.config}
    config.write_text(yaml.safe_dump({"backends": [backend]}))
    args = ["--config", str(config)]
    node_objects: Callable[[], set[str]] = lambda: set()  # noqa: E731
    if api is not None:
        from csi.backends.routed import VOLUMES, Objects
        from tests.support import forget_routed_objects

        objects = Objects.connect(api.client_configuration())
        args += ["--node-routing", "kubernetes", "--kubeconfig", str(api.kubeconfig)]
        stack.callback(forget_routed_objects, objects, "cairn.csi.io/backend=lvm")

        def node_objects() -> set[str]:
            return {f"nodevolume {o['metadata']['name']}" for o in objects.list(VOLUMES, "cairn.csi.io/backend=lvm")[0]}

    def held() -> set[str]:
        return {f"lv {row['lv_name']}" for row in group.report("lvs", "lv_name")} | node_objects()

    def ready(driver: Driver) -> None:
        """Until the driver's health service says SERVING: a routed backend is healthy
        once a node (here the driver's own agent) has reported."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(driver.channel)
        deadline = time.monotonic() + 60
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != (
            health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline, "the driver's node agent did not report within 60 s"
            time.sleep(0.1)

    return Profile(
        "lvm-routed" if api is not None else "lvm",
        root,
        args,
        backend_objects=held,
        node=False,
        node_missing=LVM_NO_NODE,
        snapshots=False,
        no_snapshots=LVM_NO_SNAPSHOTS,
        close=stack.close,
        # Routed, each kill also lands in the agent or the API; the milestones and fewer
        # random kills keep the suite's time in bounds.
        random_kills=8 if api is None else 4,
        ready=ready if api is not None else lambda driver: None,
    )


PROFILES = ("local", "rbd", "nfs", "lvm", "lvm-routed")


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
