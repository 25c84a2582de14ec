"""One harness for the hardening suites (fuzz, crash-and-retry, concurrency), so every
backend runs the same suites: a ``Profile`` says how to start a driver on that backend,
which secrets and StorageClass parameters its calls carry, and how to list what the
backend holds (to prove a suite leaked or duplicated nothing).

A new backend joins the suites by adding a profile factory to ``PROFILES``.

A profile whose backend reads and fills blocks (local, rbd) also gets a directory backup
repository in its driver config (``repository``, ``REPOSITORY``): its backups, restores
and SnapshotMetadata calls are fuzzed, crashed and raced like the rest, and its leak
checks count what the repository holds (manifests, chunks, markers; ``config`` is the
repository's own) and the backend snapshots backups make (``cairn-backup-*``).

A profile whose node path this host cannot run (nfs: the node mounts with the kernel's
NFS client, which this host's kernel lacks; the vm tier runs that path in a guest) says so
with ``node=False``: the suites then do the data part of a mount on the server side
(``write_data``, ``read_data``), keep every controller call, and skip, with
``node_missing`` as the reason, what exists to test the node path itself."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from csi import ids, loopdev, mount
from csi.backends.nfs import tree_ops
from csi.backends.nfs.fs import opened
from csi.backends.nfs.libnfs import Client
from tests.ceph import POOL, USER, CephCluster
from tests.cluster.kube import Cluster
from tests.conftest import running_driver
from tests.nfs import EXPORT, NfsServer
from tests.support import NODE_ID, Driver, leftovers, require_root, require_tools

if TYPE_CHECKING:
    from csi.backup.repository import Repository

SEED_VARIABLE = "CAIRN_TEST_SEED"
REPOSITORY = "vault"
"""The backup repository of every profile whose backend has block access: a name no
backend or group of the suites has."""
REPOSITORY_CHUNK = 256 * 1024
"""Its chunk size: small, so that the suites' volumes of a few MiB make many chunks."""
BACKUP_SNAPSHOT_PREFIX = "cairn-backup-"
"""The names of the backend snapshots backups take (the driver's own prefix)."""
SPARE = "spare"
"""A second backend (local) that ``with_spare`` adds, to restore onto another backend."""


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
    backend: str = ""
    """The name of the profile's backend in the driver config (the second part of IDs)."""
    config: Path | None = None
    """The driver's config file."""
    repository: str = ""
    """The backup repository of the driver config ("" where the backend has no block
    access to back up from and restore to)."""
    read_volume: Callable[[str], bytes] | None = None
    """The whole content of a volume (by its CSI ID) as its backend holds it, read behind
    the driver's back (only where ``repository`` is set)."""
    write_volume: Callable[[str, int, bytes], None] | None = None
    """Write bytes at an offset of a volume (by its CSI ID) behind the driver's back, as
    a pod would through its device (only where ``repository`` is set)."""
    backup_snapshots: Callable[[], set[str]] = lambda: set()
    """The names of the backend snapshots that backups made and that still exist."""
    filling: Callable[[], set[str]] = lambda: set()
    """The local IDs of the volumes marked as waiting for content from a backup."""

    @property
    def repository_dir(self) -> Path:
        return repository_folder(self.root)

    def require_backups(self, what: str) -> None:
        """Skip a test of backups and restores, saying why, where the profile has none."""
        if not self.repository:
            pytest.skip(
                f"{what} needs a backend that reads and fills blocks, which the {self.name} profile's does not "
                "(backups read snapshots and restores fill volumes through Capabilities.blocks; nfs offers it "
                "for the image layout, tested in tests/backends/nfs/test_blocks.py and the contract suite, while "
                "this profile uses the directory layout)"
                if self.name == "nfs"
                else f"{what} needs a backend that reads and fills blocks, which {self.name} does not "
                "(backups read snapshots and restores fill volumes through Capabilities.blocks, or node_blocks where the nodes do it)"
            )

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


def repository_folder(root: Path) -> Path:
    """Where the backup repository of the profile at ``root`` keeps its objects: under the
    driver's directory, where the fuzzer's watch lets the driver write."""
    return root / "driver" / "backups"


def repository_config(root: Path) -> dict[str, Any]:
    """The directory repository of a profile whose backend has block access."""
    return {
        "name": REPOSITORY,
        "kind": "directory",
        "path": str(repository_folder(root)),
        "chunkSize": REPOSITORY_CHUNK,
    }


def repository_objects(root: Path) -> set[str]:
    """What a profile's repository holds: every file but its ``config`` (made at the
    first use, and kept), temporary files of interrupted writes included."""
    folder = repository_folder(root)
    if not folder.exists():
        return set()
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    return {f"repository {name}" for name in found if name != "config"}


def local_files(data: Path) -> Callable[[], set[str]]:
    """The files of a local backend's objects (its journal is bookkeeping, replayed and
    dropped at each start, and kept short while it runs)."""

    def objects() -> set[str]:
        if not data.exists():
            return set()
        return {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file() and p.parent.name != "journal"}

    return objects


def local_image(data: Path, volume_id: str) -> Path:
    """The image file of a local volume, by its CSI ID (routed: its node stripped)."""
    return data / "volumes" / f"{ids.split_node(volume_id.split(':', 2)[2])[1]}.img"


def local_records(data: Path, folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The local IDs and records of a local backend's volumes or snapshots."""
    for record in sorted((data / folder).glob("*.json")):
        try:
            content = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # removed, or being replaced, meanwhile
        yield record.stem, content


def local_profile(root: Path, api: Cluster | None = None) -> Profile:
    """The local backend, named ``local`` as in the embedded default (the name every ID
    of the suites carries), given in a config file for the backup repository beside it.
    With ``api``, it is served on many nodes (a ``nodes`` list of the driver's own node):
    the controller half goes through NodeVolume objects on that API server and the
    driver's own node agent makes them, copies the backups and fills the restores (a
    crash of the driver is a crash of both)."""
    require_root()
    require_tools("losetup", "blkid", "mkfs.ext4", "fsfreeze")
    data = root / "driver" / "data"
    config = root / "cairn.yaml"
    root.mkdir(parents=True, exist_ok=True)
    backend: dict[str, Any] = {"name": "local", "kind": "local", "path": str(data)}
    args = ["--config", str(config)]
    stack = contextlib.ExitStack()
    node_objects: Callable[[], set[str]] = lambda: set()  # noqa: E731
    if api is not None:
        backend["nodes"] = [NODE_ID]
        args, node_objects = routed(api, "local", args, stack)
    config.write_text(yaml.safe_dump({"backends": [backend], "backupRepositories": [repository_config(root)]}))
    files = local_files(data)

    def objects() -> set[str]:
        return files() | repository_objects(root) | node_objects()

    def read_volume(volume_id: str) -> bytes:
        return local_image(data, volume_id).read_bytes()

    def write_volume(volume_id: str, offset: int, payload: bytes) -> None:
        with open(local_image(data, volume_id), "r+b") as handle:
            handle.seek(offset)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())

    def backup_snapshots() -> set[str]:
        names = {str(record.get("name", "")) for _, record in local_records(data, "snapshots")}
        return {name for name in names if name.startswith(BACKUP_SNAPSHOT_PREFIX)}

    def filling() -> set[str]:
        return {local_id for local_id, record in local_records(data, "volumes") if record.get("filling")}

    return Profile(
        "local-routed" if api is not None else "local",
        root,
        args,
        backend_objects=objects,
        backend="local",
        config=config,
        repository=REPOSITORY,
        read_volume=read_volume,
        write_volume=write_volume,
        backup_snapshots=backup_snapshots,
        filling=filling,
        close=stack.close,
        ready=serving if api is not None else lambda driver: None,
    )


def routed(
    api: Cluster, backend: str, args: list[str], stack: contextlib.ExitStack
) -> tuple[list[str], Callable[[], set[str]]]:
    """A routed profile's driver arguments (the API server as its node routing) and its
    NodeVolume objects, as backend objects; ``stack`` removes them when the profile closes."""
    from csi.backends.routed import VOLUMES, Objects
    from tests.support import forget_routed_objects

    objects = Objects.connect(api.client_configuration())
    selector = f"cairn.csi.io/backend={backend}"
    stack.callback(forget_routed_objects, objects, selector)

    def node_objects() -> set[str]:
        return {f"nodevolume {o['metadata']['name']}" for o in objects.list(VOLUMES, selector)[0]}

    return [*args, "--node-routing", "kubernetes", "--kubeconfig", str(api.kubeconfig)], node_objects


def serving(driver: Driver) -> None:
    """Until the driver's health service says SERVING: a routed backend is healthy once a
    node (here the driver's own agent) has reported."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(driver.channel)
    deadline = time.monotonic() + 60
    while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != (
        health_pb2.HealthCheckResponse.SERVING
    ):
        assert time.monotonic() < deadline, "the driver's node agent did not report within 60 s"
        time.sleep(0.1)


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
    config.write_text(yaml.safe_dump({"backends": [backend], "backupRepositories": [repository_config(root)]}))

    def journal() -> list[str]:
        try:
            return ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal").split()
        except RuntimeError:
            return []

    def objects() -> set[str]:
        images = {f"image {n}" for n in ceph.rbd("ls", POOL).split()}
        trash = {f"trash {line}" for line in ceph.rbd("trash", "ls", POOL).splitlines() if line}
        return images | trash | {f"journal {k}" for k in journal()} | repository_objects(root)

    pool = AdminPool(ceph)

    def backup_snapshots() -> set[str]:
        prefix = "snapshot.name."
        names = {key.removeprefix(prefix) for key in journal() if key.startswith(prefix)}
        return {name for name in names if name.startswith(BACKUP_SNAPSHOT_PREFIX)}

    return Profile(
        "rbd",
        root,
        ["--config", str(config)],
        secrets=credentials,
        backend_objects=objects,
        backend="ceph",
        config=config,
        repository=REPOSITORY,
        read_volume=pool.read,
        write_volume=pool.write,
        backup_snapshots=backup_snapshots,
        filling=pool.filling,
        close=pool.close,
    )


class AdminPool:
    """The test pool as Ceph's admin, opened at the first use: volumes read and written
    behind the driver's back, and their metadata."""

    def __init__(self, ceph: CephCluster) -> None:
        self.ceph = ceph
        self.cluster: Any = None
        self.io: Any = None

    def _io(self) -> Any:
        if self.io is None:
            import rados

            self.cluster = rados.Rados(conffile=str(self.ceph.conf), rados_id="admin")
            self.cluster.connect()
            self.io = self.cluster.open_ioctx(POOL)
        return self.io

    @staticmethod
    def image(volume_id: str) -> str:
        return "cairn-vol-" + volume_id.rsplit("/", 1)[1]

    def read(self, volume_id: str) -> bytes:
        import rbd

        with rbd.Image(self._io(), self.image(volume_id), read_only=True) as image:
            size = int(image.size())
            return b"".join(image.read(offset, min(8 << 20, size - offset)) for offset in range(0, size, 8 << 20))

    def write(self, volume_id: str, offset: int, payload: bytes) -> None:
        import rbd

        with rbd.Image(self._io(), self.image(volume_id)) as image:
            image.write(payload, offset)
            image.flush()

    def filling(self) -> set[str]:
        import rbd

        io = self._io()
        found = set()
        for name in rbd.RBD().list(io):
            if not name.startswith("cairn-vol-"):
                continue
            with contextlib.suppress(rbd.ImageNotFound, KeyError), rbd.Image(io, name, read_only=True) as image:
                if dict(image.metadata_list()).get("cairn.filling"):
                    found.add(f"{POOL}/{name.removeprefix('cairn-vol-')}")
        return found

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
            self.cluster.shutdown()
            self.io = self.cluster = None


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
        backend=backend_name,
        config=config,
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


def lvm_profile(root: Path) -> Profile:
    """The lvm backend, thick, on a volume group of loop devices under a private LVM
    configuration: LVM metadata only, the node path and thin pools need device-mapper.
    (Served on many nodes, its controller half is the same routing the local-routed
    profile runs through the suites, and the node's agent the same LVM code this profile
    kills mid-command; tests/backends/test_routed.py cuts a routed lvm create short on
    either side.)"""
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

    def held() -> set[str]:
        return {f"lv {row['lv_name']}" for row in group.report("lvs", "lv_name")}

    return Profile(
        "lvm",
        root,
        ["--config", str(config)],
        backend_objects=held,
        backend="lvm",
        config=config,
        node=False,
        node_missing=LVM_NO_NODE,
        snapshots=False,
        no_snapshots=LVM_NO_SNAPSHOTS,
        close=stack.close,
        random_kills=8,
    )


PROFILES = ("local", "rbd", "nfs", "lvm", "local-routed")


# -- backups ---------------------------------------------------------------------------


def open_repository(profile: Profile) -> Repository:
    """The profile's backup repository, opened from its driver config as the driver and
    ``cairn-csi client backups`` open it: to read its manifests in the test."""
    from csi import config as driver_config
    from csi.backup.configured import build_repositories

    assert profile.config is not None and profile.repository
    entries = [r for r in driver_config.load(str(profile.config)).repositories if r.name == profile.repository]
    return build_repositories(entries)[profile.repository]


def collect_garbage(profile: Profile) -> str:
    """``cairn-csi client backups --config F REPOSITORY gc --grace 0``, as an operator
    runs it: every chunk no manifest references goes, whatever its age. Its report."""
    assert profile.config is not None and profile.repository
    argv = [sys.executable, "-m", "csi", "client", "backups", "--config", str(profile.config)]
    done = subprocess.run(
        [*argv, profile.repository, "gc", "--grace", "0"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"gc failed ({done.returncode}): {done.stdout}{done.stderr}"
    return done.stdout.strip()


def repository_leftovers(profile: Profile) -> list[str]:
    """What the repository holds besides its config and what its manifests need: markers
    of backups or collections in progress (none may be, when this is asked), temporary
    files of interrupted writes, chunks no manifest references."""
    if not profile.repository:
        return []
    repository = open_repository(profile)
    referenced = {digest for manifest in repository.manifests() for digest in manifest.chunks if digest}
    found = []
    for entry in sorted(repository_objects(profile.root)):
        key = entry.removeprefix("repository ")
        folder, _, name = key.rpartition("/")
        if folder == "backups" or (folder.startswith("chunks/") and name in referenced):
            continue
        found.append(key)
    return found


def pending_backups(profile: Profile, wait: float = 30.0) -> list[str]:
    """The backups marked in progress in the profile's repository, once none is or after
    ``wait`` seconds. A backup is ready to use once its manifest is saved, and it ends
    after that (it removes the backend snapshot of the volume's previous backup, then its
    marker): what a test checks of a backup that is ready waits for that end."""
    folder = profile.repository_dir / "pending"
    deadline = time.monotonic() + wait
    while True:
        # (A name with "~" is the temporary file of a put a kill cut short: no marker, and
        # the next collection sweeps it.)
        found = sorted(p.name for p in folder.glob("*") if "~" not in p.name) if folder.exists() else []
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def manifests(profile: Profile) -> dict[str, str]:
    """The saved backups of the profile's repository: backup ID -> request name."""
    return {m.backup_id: m.name for m in open_repository(profile).manifests()}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_spare(profile: Profile) -> Profile:
    """The profile with a second backend in its driver config: a local one named
    ``SPARE`` beside the profile's own, so that one backup can be restored onto two
    backends. Volumes name their backend in their parameters then; the spare's files
    count among the backend's objects."""
    assert profile.config is not None
    spare_data = profile.root / "driver" / SPARE
    document = yaml.safe_load(profile.config.read_text())
    document["backends"].append({"name": SPARE, "kind": "local", "path": str(spare_data)})
    config = profile.root / "cairn-with-spare.yaml"
    config.write_text(yaml.safe_dump(document))
    own_objects, own_read = profile.backend_objects, profile.read_volume
    spare_files = local_files(spare_data)

    def objects() -> set[str]:
        return own_objects() | {f"{SPARE} {name}" for name in spare_files()}

    def read_volume(volume_id: str) -> bytes:
        if volume_id.split(":", 2)[1] == SPARE:
            return local_image(spare_data, volume_id).read_bytes()
        assert own_read is not None
        return own_read(volume_id)

    args = [*profile.driver_args]
    args[args.index("--config") + 1] = str(config)
    return dataclasses.replace(
        profile, driver_args=args, config=config, backend_objects=objects, read_volume=read_volume
    )


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
