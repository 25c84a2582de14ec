"""The subjects of the contract suite: every backend, wrapped in an adapter that gives
the suite what differs between them (secrets, StorageClass parameters, which nodes can
reach the volumes), so the tests themselves are written once against ``VolumeBackend``.

A new backend joins the suite by adding a factory to ``SUBJECTS`` (and a parameter to
``subject``): it passes when it behaves like the others."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi.backends.base import Capabilities, VolumeBackend
from csi.errors import CairnError
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec
from tests.fakes import FAKE_CAPABILITIES, FakeVolumes

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
SIZE = 8 * MiB
"""What the suite's volumes ask for unless a test needs another size."""


@dataclass
class Subject:
    """One backend under test, and what the suite must know to drive it."""

    kind: str
    volumes: VolumeBackend
    capabilities: Capabilities
    secrets: Mapping[str, str] = field(default_factory=dict)
    """Sent with every call that carries secrets."""
    parameters: Mapping[str, str] = field(default_factory=dict)
    """StorageClass parameters every spec carries (valid values of declared keys)."""
    snapshot_parameters: Mapping[str, str] = field(default_factory=dict)
    nodes: tuple[str, str] = ("node-a", "node-b")
    """Two nodes that can reach the volumes; for a node-local backend, the owner twice."""
    stranger: str | None = None
    """A node that cannot reach the volumes (a node-local backend's other nodes), if any."""
    close: Callable[[], None] = lambda: None

    def spec(
        self,
        name: str,
        size: int = SIZE,
        limit: int = 0,
        source: SourceRef | None = None,
        capabilities: tuple[Capability, ...] = (RWO,),
    ) -> VolumeSpec:
        return VolumeSpec(name, size, limit, capabilities, dict(self.parameters), source, dict(self.secrets))


def fake_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    volumes = FakeVolumes(volume_parameters={"tier"}, snapshot_parameters={"retention"})
    return Subject(
        "fake", volumes, FAKE_CAPABILITIES, parameters={"tier": "gold"}, snapshot_parameters={"retention": "7d"}
    )


def local_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    from csi.backends.local import CAPABILITIES
    from csi.backends.local.controller import PARAM_PREALLOCATE, LocalVolumes

    volumes = LocalVolumes(str(tmp_path / "local"), "node-a")
    return Subject(
        "local",
        volumes,
        CAPABILITIES,
        parameters={PARAM_PREALLOCATE: "false"},
        nodes=("node-a", "node-a"),
        stranger="node-b",
    )


def rbd_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    from csi.backends.rbd import CAPABILITIES
    from csi.backends.rbd.cluster import Clusters
    from csi.backends.rbd.common import RbdSettings
    from csi.backends.rbd.controller import PARAM_FEATURES, PARAM_MAPPER, RbdVolumes
    from tests.ceph import POOL, USER, CephCluster

    ceph: CephCluster = request.getfixturevalue("ceph")
    request.getfixturevalue("clean_pool")
    secrets = {"userID": USER, "userKey": ceph.user_key}
    credentials = tmp_path / "credentials"  # for the calls that carry no secret (ListVolumes...)
    credentials.mkdir()
    (credentials / "userID").write_text(USER)
    (credentials / "userKey").write_text(ceph.user_key)
    settings = RbdSettings(monitors=tuple(ceph.monitors), pool=POOL, credentials_dir=str(credentials))
    volumes = RbdVolumes(settings, Clusters(settings.monitors, settings.credentials_dir))
    return Subject(
        "rbd",
        volumes,
        CAPABILITIES,
        secrets=secrets,
        parameters={PARAM_MAPPER: "krbd"},
        snapshot_parameters={PARAM_FEATURES: "layering,exclusive-lock"},
        close=volumes.clusters.shutdown,
    )


def _nfs_subject(request: pytest.FixtureRequest, layout: str, through: str) -> Subject:
    """An nfs backend on the test server, under a backend name and folder of its own; the
    controller reaches the export through the user-space client, or (``exportRoot``) on
    the exported directory itself."""
    import shutil
    import uuid

    from csi.backends.nfs import DIRECTORY_CAPABILITIES, IMAGE_CAPABILITIES
    from csi.backends.nfs.common import NfsSettings
    from csi.backends.nfs.controller import NfsVolumes
    from csi.backends.nfs.fs import LocalTree, Tree
    from tests.nfs import EXPORT, NfsServer

    server: NfsServer = request.getfixturevalue("nfs_server")
    name = f"nfs-{uuid.uuid4().hex[:8]}"
    settings = NfsSettings(
        backend=name,
        server="127.0.0.1",
        share=EXPORT,
        port=server.port,
        layout=layout,
        sub_dir=f"{name}/${{pv.metadata.name}}",
    )
    tree: Tree
    if through == "exportRoot":
        tree = LocalTree(str(server.export_dir))
    else:
        from csi.backends.nfs.libnfs import Client

        tree = Client("127.0.0.1", EXPORT, port=server.port, timeout=10)
    volumes = NfsVolumes(settings, tree)

    def close() -> None:
        tree.close()
        shutil.rmtree(server.export_dir / ".cairn" / name, ignore_errors=True)
        shutil.rmtree(server.export_dir / name, ignore_errors=True)

    return Subject(
        f"nfs-{layout}",
        volumes,
        DIRECTORY_CAPABILITIES if layout == "directory" else IMAGE_CAPABILITIES,
        close=close,
    )


def _lvm_subject(request: pytest.FixtureRequest, tmp_path: Path, thin: bool) -> Subject:
    """An lvm backend on a volume group of loop devices. Thick volumes are metadata only
    and run on any kernel; a thin pool needs device-mapper (the vm tier)."""
    from csi.backends.lvm import capabilities
    from csi.backends.lvm.volumes import LvmVolumes
    from tests.lvm import has_device_mapper, loop_volume_group
    from tests.support import require_root, require_tools

    require_root()
    require_tools("lvm")
    if thin and not has_device_mapper():
        pytest.skip(
            "thin pools need the kernel's device-mapper, which this kernel lacks; the vm tier runs thin pools "
            "through the lvm node suite, csi-sanity and this contract's block tests (test_snapshot_blocks)"
        )
    context = contextlib.ExitStack()
    group = context.enter_context(loop_volume_group(tmp_path, size=1024 * MiB))
    pool = ""
    if thin:
        pool = "pool"
        made = group.run("lvcreate", "--type", "thin-pool", "--size", "512m", "--name", pool, group.name)
        if made.returncode != 0:
            context.close()
            raise AssertionError(f"cannot make the thin pool: {made.stderr}")
    volumes = LvmVolumes("lvm", group.lvm(), group.name, pool, "node-a")
    return Subject(
        "lvm-thin" if thin else "lvm-thick",
        volumes,
        capabilities(thin),
        nodes=("node-a", "node-a"),
        stranger="node-b",
        close=lambda: context.close(),
    )


def routed_lvm_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Subject:
    """The lvm backend on many nodes: the controller's half writes NodeVolume objects to a
    real kube-apiserver, and node-a's agent makes them in its thick volume group."""
    import functools

    from csi.backends.lvm import capabilities
    from csi.backends.lvm.volumes import LvmVolumes, rest_of
    from csi.backends.routed import NodeAgent, Objects, RoutedVolumes
    from tests.lvm import loop_volume_group
    from tests.support import forget_routed_objects, require_root, require_tools

    require_root()
    require_tools("lvm")
    cluster = request.getfixturevalue("api_server")
    objects = Objects.connect(cluster.client_configuration())
    context = contextlib.ExitStack()
    group = context.enter_context(loop_volume_group(tmp_path, size=1024 * MiB))
    rest = functools.partial(rest_of, "lvm")
    agent = NodeAgent("lvm", "node-a", objects, LvmVolumes("lvm", group.lvm(), group.name, "", "node-a"), rest)
    agent.start()
    volumes = RoutedVolumes("lvm", objects, rest, volume_parameters=LvmVolumes.volume_parameters)

    def close() -> None:
        agent.stop()
        forget_routed_objects(objects, "cairn.csi.io/backend=lvm")
        context.close()

    deadline = time.monotonic() + 60
    while not volumes.reports():
        assert time.monotonic() < deadline, "node-a's agent did not report within 60 s"
        time.sleep(0.1)
    return Subject(
        "lvm-routed", volumes, capabilities(False), nodes=("node-a", "node-a"), stranger="node-b", close=close
    )


SUBJECTS: dict[str, Callable[[pytest.FixtureRequest, Path], Subject]] = {
    "fake": fake_subject,
    "local": local_subject,
    "rbd": rbd_subject,
    "nfs-directory": lambda request, tmp_path: _nfs_subject(request, "directory", "client"),
    "nfs-image": lambda request, tmp_path: _nfs_subject(request, "image", "client"),
    "nfs-exportroot": lambda request, tmp_path: _nfs_subject(request, "directory", "exportRoot"),
    "lvm-thick": lambda request, tmp_path: _lvm_subject(request, tmp_path, thin=False),
    "lvm-thin": lambda request, tmp_path: _lvm_subject(request, tmp_path, thin=True),
    "lvm-routed": routed_lvm_subject,
}


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note whether the test itself failed: its leftovers are then no news."""
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


@pytest.fixture(
    params=[
        pytest.param("fake", marks=pytest.mark.unit),
        "local",  # files only: no root, but not a unit (real copies, real disk)
        pytest.param("rbd", marks=pytest.mark.integration),
        pytest.param("nfs-directory", marks=pytest.mark.integration),
        pytest.param("nfs-image", marks=pytest.mark.integration),
        pytest.param("nfs-exportroot", marks=pytest.mark.integration),
        pytest.param("lvm-thick", marks=pytest.mark.integration),
        pytest.param("lvm-thin", marks=pytest.mark.integration),
        pytest.param("lvm-routed", marks=pytest.mark.integration),
    ]
)
def subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    """A backend holding nothing, which every test must leave holding nothing: what is
    left is removed (so one failure does not spill into the next test) and reported."""
    made = SUBJECTS[request.param](request, tmp_path)
    try:
        assert not made.volumes.list_volumes(secrets=made.secrets), "the backend must start empty"
        assert not made.volumes.list_snapshots(secrets=made.secrets), "the backend must start empty"
        yield made
        left = empty(made)
        assert request.node.stash.get(FAILED, True) or not left, f"the test left behind: {left}"
    finally:
        made.close()


def empty(subject: Subject) -> list[str]:
    """Remove everything the backend holds; return what there was."""
    volumes, secrets = subject.volumes, subject.secrets
    left = [f"snapshot {s.local_id} ({s.name})" for s in volumes.list_snapshots(secrets=secrets)]
    left += [f"volume {v.local_id} ({v.name})" for v in volumes.list_volumes(secrets=secrets)]
    for snapshot in volumes.list_snapshots(secrets=secrets):
        volumes.delete_snapshot(snapshot.local_id, secrets=secrets)
    for volume in volumes.list_volumes(secrets=secrets):
        for node in volume.published_nodes:
            volumes.unpublish_volume(volume.local_id, node, secrets=secrets)
        try:
            volumes.delete_volume(volume.local_id, secrets=secrets)
        except CairnError as exc:
            left.append(f"cannot remove volume {volume.local_id}: {exc}")
    return left
