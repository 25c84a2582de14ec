"""The rbd node path through running drivers: rbd-fuse and a loop device (the mapper this
host's kernel allows), mkfs, mounts, a plugin restart, and two nodes sharing a raw block
volume."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi import loopdev, mount
from csi.generated import csi_pb2 as pb
from tests.ceph import POOL, USER, CephCluster
from tests.conftest import running_driver
from tests.support import Driver, block_capability, mount_capability, require_tools

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_pool")]
MiB = 1 << 20

# rbd-fuse works on any kernel; the vm tier runs these tests again with krbd and rbd-nbd
# (a comma-separated list runs them once per mapper).
MAPPERS = os.environ.get("CAIRN_TEST_RBD_MAPPER", "rbd-fuse").split(",")


# How each mapper shows in mappings(): a kernel rbd device, an nbd device, a fuse mount.
MAPPED_AS = {"krbd": "rbd", "rbd-nbd": "nbd", "rbd-fuse": "/"}


def credentials_dir(tmp: Path, ceph: CephCluster) -> Path:
    directory = tmp / "ceph-secret"
    directory.mkdir(exist_ok=True)
    (directory / "userID").write_text(USER)
    (directory / "userKey").write_text(ceph.user_key)
    return directory


def config_for(tmp: Path, ceph: CephCluster, node: str, mapper: str) -> list[str]:
    config = tmp / f"cairn-{node}.yaml"
    backend = {
        "name": "ceph",
        "kind": "rbd",
        "monitors": ceph.monitors,
        "pool": POOL,
        "mapper": mapper,
        "fuseDir": str(tmp / node / "fuse"),  # under the driver: its leak check covers it
        # The test cluster speaks only msgr v2; the kernel client defaults to v1.
        "mapOptions": "ms_mode=prefer-crc" if mapper == "krbd" else "",
        # For the calls that carry no secret (ControllerGetVolume, ListVolumes).
        "credentialsDir": str(credentials_dir(tmp, ceph)),
    }
    config.write_text(yaml.safe_dump({"backends": [backend]}))
    return ["--config", str(config)]


@pytest.fixture(params=MAPPERS)
def mapper(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node_a(tmp_path: Path, ceph: CephCluster, mapper: str) -> Iterator[Driver]:
    require_tools("rbd-fuse" if mapper == "rbd-fuse" else "rbd", "losetup", "mkfs.ext4")
    with running_driver(tmp_path / "a", config_for(tmp_path, ceph, "a", mapper)) as driver:
        yield driver


def create(driver: Driver, name: str, cap: pb.VolumeCapability, secrets: dict[str, str]) -> str:
    request = pb.CreateVolumeRequest(
        name=name, volume_capabilities=[cap], capacity_range={"required_bytes": 64 * MiB}, secrets=secrets
    )
    volume_id: str = driver.controller.CreateVolume(request, timeout=120).volume.volume_id
    return volume_id


def attach(
    driver: Driver, node: str, volume_id: str, cap: pb.VolumeCapability, secrets: dict[str, str], target: str
) -> str:
    publish = pb.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node, volume_capability=cap, secrets=secrets
    )
    context = driver.controller.ControllerPublishVolume(publish, timeout=60).publish_context
    staging = str(driver.root / "staging")
    stage = pb.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=staging,
        volume_capability=cap,
        publish_context=context,
        secrets=secrets,
    )
    driver.node.NodeStageVolume(stage, timeout=180)
    node_publish = pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
    )
    driver.node.NodePublishVolume(node_publish, timeout=60)
    return staging


def detach(driver: Driver, node: str, volume_id: str, secrets: dict[str, str], staging: str, target: str) -> None:
    driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=60)
    driver.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging), timeout=120
    )
    # Unstaged means the image is let go: an rbd-fuse still exiting keeps it open, and
    # Ceph refuses the DeleteVolume that follows (the image is busy).
    assert fuse_daemons(driver.root) == [], "unstage answered while rbd-fuse still held the image"
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node, secrets=secrets)
    driver.controller.ControllerUnpublishVolume(unpublish, timeout=60)


def fuse_daemons(root: Path) -> list[str]:
    """The rbd-fuse processes still running with a mount point under ``root``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if entry.isdigit() else []
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0] if argv else "Z"
        except OSError:
            continue
        if state != "Z" and os.path.basename(argv[0]) == b"rbd-fuse" and str(root).encode() in b" ".join(argv):
            found.append(f"{entry}: {b' '.join(argv).decode(errors='replace')}")
    return found


def mappings(root: Path) -> list[str]:
    """What maps an image on this host: rbd-fuse mounts under ``root``, or rbd devices."""
    found = [m.target for m in mount.mounts() if m.target.startswith(str(root)) and m.fstype.startswith("fuse")]
    return (
        found
        + [d for d in os.listdir("/dev") if d.startswith("rbd") and d[3:].isdigit()]
        + [f"nbd{i}" for i in range(16) if os.path.exists(f"/sys/block/nbd{i}/pid")]
    )


def test_a_staged_volume_survives_a_plugin_restart_and_unstages_after_it(
    node_a: Driver, mapper: str, secrets: dict[str, str]
) -> None:
    cap = mount_capability("ext4")
    volume_id = create(node_a, "restart", cap, secrets)
    target = str(node_a.root / "pod")
    staging = attach(node_a, "test-node", volume_id, cap, secrets, target)
    Path(target, "before").write_text("written before the restart")
    found = mappings(node_a.root.parent)
    assert len(found) == 1 and found[0].startswith(MAPPED_AS[mapper]), f"{mapper} should map it: {found}"
    node_a.restart()
    Path(target, "after").write_text("and after it")
    os.sync()
    detach(node_a, "test-node", volume_id, secrets, staging, target)
    assert mappings(node_a.root.parent) == [], "unstage after a restart must unmap"
    assert [d for d, back in loopdev.attached().items() if back.startswith(str(node_a.root.parent))] == []
    # The data is in Ceph: stage it again and read both files.
    staging = attach(node_a, "test-node", volume_id, cap, secrets, target)
    assert Path(target, "before").read_text() == "written before the restart"
    assert Path(target, "after").read_text() == "and after it"
    detach(node_a, "test-node", volume_id, secrets, staging, target)
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets), timeout=120)


@pytest.fixture
def fuse_node(tmp_path: Path, ceph: CephCluster) -> Iterator[Driver]:
    """A driver mapping with rbd-fuse, whatever mappers the host offers."""
    require_tools("rbd-fuse", "losetup", "mkfs.ext4")
    with running_driver(tmp_path / "a", config_for(tmp_path, ceph, "a", "rbd-fuse")) as driver:
        yield driver


def test_a_stage_whose_rbd_fuse_died_exposes_the_image_again(fuse_node: Driver, secrets: dict[str, str]) -> None:
    """A node plugin killed during a stage takes its rbd-fuse with it and leaves the
    mount behind, answering nothing ("Transport endpoint is not connected"): the retry
    replaces it instead of failing on it for ever."""
    node_a = fuse_node
    cap = mount_capability("ext4")
    volume_id = create(node_a, "dead-fuse", cap, secrets)
    target = str(node_a.root / "pod")
    staging = attach(node_a, "test-node", volume_id, cap, secrets, target)
    Path(target, "kept").write_text("written before its rbd-fuse died")
    os.sync()
    node_a.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=60)
    # What the killed stage left: the filesystem not mounted yet, the loop device not
    # attached yet, and the rbd-fuse mount with its daemon gone.
    device = mount.find_mount(staging)
    assert device is not None
    subprocess.run(["umount", staging], check=True)
    subprocess.run(["losetup", "--detach", device.source], check=True)
    [daemon] = fuse_daemons(node_a.root)
    os.kill(int(daemon.split(":")[0]), signal.SIGKILL)
    [dead] = mappings(node_a.root.parent)
    with pytest.raises(OSError):
        os.listdir(dead)
    staging = attach(node_a, "test-node", volume_id, cap, secrets, target)
    assert Path(target, "kept").read_text() == "written before its rbd-fuse died"
    detach(node_a, "test-node", volume_id, secrets, staging, target)
    assert mappings(node_a.root.parent) == []
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets), timeout=120)


def test_a_mounted_filesystem_grows_online(node_a: Driver, secrets: dict[str, str]) -> None:
    cap = mount_capability("xfs")  # XFS grows while mounted on every kernel; ext4 needs CAP_SYS_RESOURCE
    volume_id = create(node_a, "grow", cap, secrets)
    target = str(node_a.root / "pod")
    staging = attach(node_a, "test-node", volume_id, cap, secrets, target)

    def filesystem_bytes() -> int:
        stat = os.statvfs(target)
        return stat.f_blocks * stat.f_frsize

    before = filesystem_bytes()
    expand = pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range={"required_bytes": 640 * MiB}, secrets=secrets, volume_capability=cap
    )
    assert node_a.controller.ControllerExpandVolume(expand, timeout=60).node_expansion_required
    grow = pb.NodeExpandVolumeRequest(
        volume_id=volume_id,
        volume_path=target,
        staging_target_path=staging,
        capacity_range={"required_bytes": 640 * MiB},
        volume_capability=cap,
    )
    assert node_a.node.NodeExpandVolume(grow, timeout=120).capacity_bytes == 640 * MiB
    assert filesystem_bytes() > before + 256 * MiB, f"the filesystem did not grow: {before} -> {filesystem_bytes()}"
    Path(target, "after-growth").write_bytes(os.urandom(MiB))
    detach(node_a, "test-node", volume_id, secrets, staging, target)
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets), timeout=120)


def test_two_nodes_share_a_raw_block_volume(
    tmp_path: Path, ceph: CephCluster, node_a: Driver, mapper: str, secrets: dict[str, str]
) -> None:
    shared = block_capability("MULTI_NODE_MULTI_WRITER")
    volume_id = create(node_a, "shared-raw", shared, secrets)
    with running_driver(tmp_path / "b", ["--node-id", "node-b", *config_for(tmp_path, ceph, "b", mapper)]) as node_b:
        target_a, target_b = str(node_a.root / "dev-a"), str(node_b.root / "dev-b")
        staging_a = attach(node_a, "test-node", volume_id, shared, secrets, target_a)
        staging_b = attach(node_b, "node-b", volume_id, shared, secrets, target_b)
        listed = node_a.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id), timeout=60)
        assert sorted(listed.status.published_node_ids) == ["node-b", "test-node"]
        with open(target_a, "r+b") as device:
            device.seek(7 * MiB)
            device.write(b"from node a")
            device.flush()
            os.fsync(device.fileno())
        with open(target_b, "rb", buffering=0) as device:
            device.seek(7 * MiB)
            assert device.read(11) == b"from node a"
        detach(node_b, "node-b", volume_id, secrets, staging_b, target_b)
        detach(node_a, "test-node", volume_id, secrets, staging_a, target_a)
    single = mount_capability("ext4")
    exclusive = create(node_a, "exclusive", single, secrets)
    for node in ("test-node", "node-b"):
        request = pb.ControllerPublishVolumeRequest(
            volume_id=exclusive, node_id=node, volume_capability=single, secrets=secrets
        )
        if node == "node-b":
            with pytest.raises(grpc.RpcError) as caught:
                node_a.controller.ControllerPublishVolume(request, timeout=60)
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        else:
            node_a.controller.ControllerPublishVolume(request, timeout=60)
    shared_fs = pb.CreateVolumeRequest(
        name="shared-fs", volume_capabilities=[mount_capability("ext4", "MULTI_NODE_MULTI_WRITER")], secrets=secrets
    )
    with pytest.raises(grpc.RpcError) as caught:
        node_a.controller.CreateVolume(shared_fs, timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "corrupt" in caught.value.details()
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=exclusive, node_id="test-node", secrets=secrets)
    node_a.controller.ControllerUnpublishVolume(unpublish, timeout=60)
    for volume in (volume_id, exclusive):
        node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume, secrets=secrets), timeout=120)


def test_staging_an_image_of_a_pool_that_does_not_exist_is_not_found(
    node_a: Driver, tmp_path: Path, secrets: dict[str, str]
) -> None:
    request = pb.NodeStageVolumeRequest(
        volume_id="1:ceph:nosuchpool/00000000-0000-4000-8000-000000000000",
        staging_target_path=str(tmp_path / "a" / "staging"),
        volume_capability=mount_capability(),
        secrets=secrets,
    )
    with pytest.raises(grpc.RpcError) as caught:
        node_a.node.NodeStageVolume(request, timeout=120)
    error: Any = caught.value
    assert error.code() is grpc.StatusCode.NOT_FOUND, error.details()


def test_keys_of_a_killed_node_plugin_are_removed_at_start(tmp_path: Path) -> None:
    from csi.backends.rbd.node import KEY_PREFIX, remove_orphaned_keys

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"{KEY_PREFIX}{dead.pid}-abc"
    alive = tmp_path / f"{KEY_PREFIX}{os.getpid()}-def"
    for directory in (orphan, alive):
        directory.mkdir()
        (directory / "key").write_text("secret")
    remove_orphaned_keys(str(tmp_path))
    assert not orphan.exists() and alive.exists()
