"""The nfs node path through running drivers and the kernel's NFS client: directory
volumes shared by two node plugins (ReadWriteMany), image volumes through the export
mounted once per node and a loop device, in filesystem and raw block mode.

This host's kernel may lack the NFS client; the vm tier runs these tests in a guest with
a stock kernel against the host's test server."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import yaml

from csi import loopdev, mount
from csi.backends.nfs.libnfs import Client
from csi.generated import csi_pb2 as pb
from tests.conftest import running_driver
from tests.nfs import EXPORT, RUNNING_SERVER, NfsServer, kernel_has_nfs
from tests.support import Driver, block_capability, mount_capability, require_tools

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(autouse=True)
def kernel_client() -> None:
    require_tools("mount.nfs", "losetup", "mkfs.ext4")
    if not kernel_has_nfs():
        # A kernel feature, not a package `make test` could install: the vm tier runs them.
        pytest.skip("this kernel has no NFS client (the vm tier runs these tests)")


def config_for(tmp: Path, server: NfsServer, node: str) -> list[str]:
    config = tmp / f"cairn-{node}.yaml"
    common = {"kind": "nfs", "server": "127.0.0.1", "share": EXPORT, "port": server.port, "timeout": 10}
    backends = [
        {"name": "shared", **common, "subDir": f"{tmp.name}/${{pv.metadata.name}}"},
        {"name": "images", **common, "layout": "image", "nodeMountDir": str(tmp / node / "nfs")},
    ]
    config.write_text(yaml.safe_dump({"backends": backends}))
    return ["--config", str(config)]


@pytest.fixture
def node_a(tmp_path: Path, nfs_server: NfsServer) -> Iterator[Driver]:
    with running_driver(tmp_path / "a", config_for(tmp_path, nfs_server, "a")) as driver:
        yield driver


def create(driver: Driver, name: str, cap: pb.VolumeCapability, backend: str) -> str:
    request = pb.CreateVolumeRequest(
        name=name,
        volume_capabilities=[cap],
        capacity_range={"required_bytes": 64 * MiB},
        parameters={"backend": backend},
    )
    volume_id: str = driver.controller.CreateVolume(request, timeout=120).volume.volume_id
    return volume_id


def attach(driver: Driver, node: str, volume_id: str, cap: pb.VolumeCapability, target: str) -> str:
    publish = pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node, volume_capability=cap)
    context = driver.controller.ControllerPublishVolume(publish, timeout=60).publish_context
    staging = str(driver.root / f"staging-{volume_id.rsplit(':', 1)[1]}")
    stage = pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=cap, publish_context=context
    )
    driver.node.NodeStageVolume(stage, timeout=180)
    node_publish = pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
    )
    driver.node.NodePublishVolume(node_publish, timeout=60)
    return staging


def detach(driver: Driver, node: str, volume_id: str, staging: str, target: str) -> None:
    driver.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=60)
    driver.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging), timeout=120
    )
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node)
    driver.controller.ControllerUnpublishVolume(unpublish, timeout=60)


def nfs_mounts(root: Path) -> list[str]:
    return [m.target for m in mount.mounts() if m.target.startswith(str(root)) and m.fstype.startswith("nfs")]


def test_two_nodes_share_a_directory_volume(tmp_path: Path, nfs_server: NfsServer, node_a: Driver) -> None:
    shared = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
    volume_id = create(node_a, "rwx", shared, "shared")
    with running_driver(tmp_path / "b", ["--node-id", "node-b", *config_for(tmp_path, nfs_server, "b")]) as node_b:
        target_a, target_b = str(node_a.root / "pod-a"), str(node_b.root / "pod-b")
        staging_a = attach(node_a, "test-node", volume_id, shared, target_a)
        staging_b = attach(node_b, "node-b", volume_id, shared, target_b)
        Path(target_a, "from-a").write_text("written on node a")
        Path(target_b, "from-b").write_text("written on node b")
        assert Path(target_b, "from-a").read_text() == "written on node a"
        assert Path(target_a, "from-b").read_text() == "written on node b"
        # The data is a folder of the export, as the server sees it.
        assert (nfs_server.export_dir / tmp_path.name / "rwx" / "from-a").read_text() == "written on node a"
        stats = node_a.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target_a), timeout=60
        )
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
        detach(node_b, "node-b", volume_id, staging_b, target_b)
        detach(node_a, "test-node", volume_id, staging_a, target_a)
    assert nfs_mounts(tmp_path) == [], "unstage must unmount the share"
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)
    assert not (nfs_server.export_dir / tmp_path.name / "rwx").exists(), "delete must remove the folder"


def test_a_read_only_publication_cannot_write(node_a: Driver) -> None:
    cap = mount_capability(mode="MULTI_NODE_READER_ONLY")
    volume_id = create(node_a, "readers", cap, "shared")
    target = str(node_a.root / "pod")
    staging = attach(node_a, "test-node", volume_id, cap, target)
    with pytest.raises(OSError):
        Path(target, "nope").write_text("must fail")
    detach(node_a, "test-node", volume_id, staging, target)
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)


def test_image_volumes_share_one_export_mount(tmp_path: Path, node_a: Driver) -> None:
    fs_cap, raw_cap = mount_capability("ext4"), block_capability()
    fs_volume = create(node_a, "image-fs", fs_cap, "images")
    raw_volume = create(node_a, "image-raw", raw_cap, "images")
    fs_target, raw_target = str(node_a.root / "pod-fs"), str(node_a.root / "pod-raw")
    fs_staging = attach(node_a, "test-node", fs_volume, fs_cap, fs_target)
    raw_staging = attach(node_a, "test-node", raw_volume, raw_cap, raw_target)
    exports = nfs_mounts(tmp_path)
    assert len(exports) == 1, f"one export mount per node, shared by its image volumes: {exports}"
    Path(fs_target, "data").write_bytes(b"on an image on the export")
    with open(raw_target, "r+b") as device:
        device.seek(3 * MiB)
        device.write(b"raw bytes")
        device.flush()
        os.fsync(device.fileno())
    detach(node_a, "test-node", fs_volume, fs_staging, fs_target)
    assert len(nfs_mounts(tmp_path)) == 1, "the export stays mounted while an image on it is attached"
    detach(node_a, "test-node", raw_volume, raw_staging, raw_target)
    assert nfs_mounts(tmp_path) == [], "the export is unmounted with its last image"
    assert [d for d, back in loopdev.attached().items() if back.startswith(str(tmp_path))] == []
    # Staged again, the data is there: it lives in the image on the server.
    fs_staging = attach(node_a, "test-node", fs_volume, fs_cap, fs_target)
    assert Path(fs_target, "data").read_bytes() == b"on an image on the export"
    detach(node_a, "test-node", fs_volume, fs_staging, fs_target)
    for volume_id in (fs_volume, raw_volume):
        node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)


def test_a_filesystem_on_an_image_is_not_shared_read_write(node_a: Driver) -> None:
    request = pb.CreateVolumeRequest(
        name="rwx-fs",
        volume_capabilities=[mount_capability("ext4", "MULTI_NODE_MULTI_WRITER")],
        parameters={"backend": "images"},
    )
    with pytest.raises(grpc.RpcError) as caught:
        node_a.controller.CreateVolume(request, timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "corrupt" in (caught.value.details() or "")


# -- a server that dies under its mounts --------------------------------------------------

UNREACHABLE_TABLE = "cairn_test_unreachable"


@contextmanager
def unreachable(port: int) -> Iterator[None]:
    """Drop every packet this host sends to the server's port, as a server that died or
    a network that failed would: calls wait for answers that never come. Only in the vm
    tier's guest, which reaches the host's server through its own NAT (a firewall rule
    there touches nothing else)."""
    if not os.environ.get(RUNNING_SERVER):
        pytest.skip("blocks the server's port with nftables: only in the vm tier's guest")
    require_tools("nft")
    rules = f"""table ip {UNREACHABLE_TABLE} {{
  chain out {{
    type filter hook output priority 0;
    tcp dport {port} drop
  }}
}}
"""
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "ip", UNREACHABLE_TABLE], check=True)


def test_a_server_out_of_reach_hangs_no_call(tmp_path: Path, nfs_server: NfsServer, node_a: Driver) -> None:
    """The server stops answering under a published share (hard-mounted, so whatever
    touches the mount waits for it for ever): stats answer abnormal, naming the server;
    a new stage is UNAVAILABLE; the kubelet's unpublish and unstage complete, forcing
    the mounts away. Nothing waits for the server."""
    cap = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
    volume_id = create(node_a, "unreachable", cap, "shared")
    target = str(node_a.root / "pod")
    staging = attach(node_a, "test-node", volume_id, cap, target)
    Path(target, "before").write_text("written while the server answered")
    stats_request = pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target)
    with unreachable(nfs_server.port):
        started = time.monotonic()
        stats = node_a.node.NodeGetVolumeStats(stats_request, timeout=60)
        message = stats.volume_condition.message
        assert stats.volume_condition.abnormal, message
        assert f"NFS server 127.0.0.1:{EXPORT}/{tmp_path.name}/unreachable" in message, message
        assert "not responding" in message, message
        stage = pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap)
        with pytest.raises(grpc.RpcError) as caught:
            node_a.node.NodeStageVolume(stage, timeout=60)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
        node_a.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=60
        )
        node_a.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging), timeout=120
        )
        assert nfs_mounts(tmp_path) == [], "unstage must take the share's mounts away"
        assert not os.path.exists(target)
        print(f"stats, stage, unpublish and unstage without the server: {time.monotonic() - started:.1f}s")
    unpublish = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id="test-node")
    node_a.controller.ControllerUnpublishVolume(unpublish, timeout=60)
    assert (nfs_server.export_dir / tmp_path.name / "unreachable" / "before").exists()
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)


def replace_folder(server: NfsServer, path: str) -> None:
    """Remove the empty folder ``path`` of the export and make it again, through the
    server (as another client), so the server forgets the old folder's file handle."""
    client = Client("127.0.0.1", EXPORT, port=server.port, timeout=10)
    try:
        client.rmdir(path)
        client.mkdir(path, 0o777)
        client.open(f"{path}/restored", os.O_WRONLY | os.O_CREAT, 0o644).close()
    finally:
        client.close()


def test_a_stale_share_is_mounted_again(tmp_path: Path, nfs_server: NfsServer, node_a: Driver) -> None:
    """The share's folder is replaced on the server (removed and made again, as a
    restored backup leaves it): the mount's file handle is stale (ESTALE), as after a
    server restart that lost its handles. Stats report it, and the next stage and
    publish mount the share again instead of answering OK over the stale mount."""
    cap = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
    volume_id = create(node_a, "replaced", cap, "shared")
    target = str(node_a.root / "pod")
    staging = attach(node_a, "test-node", volume_id, cap, target)
    replace_folder(nfs_server, f"{tmp_path.name}/replaced")
    folder = nfs_server.export_dir / tmp_path.name / "replaced"
    deadline = time.monotonic() + 60
    while True:  # the pod meets the stale handle first (the server's cache may hide it a moment)
        try:
            os.listdir(target)
        except OSError as exc:
            assert exc.errno == errno.ESTALE, exc
            break
        assert time.monotonic() < deadline, "the replaced folder's old handle never went stale"
        time.sleep(1)
    stats = node_a.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target), timeout=60
    )
    assert stats.volume_condition.abnormal, stats.volume_condition.message
    assert "is stale (Stale file handle)" in stats.volume_condition.message
    # The kubelet stages and publishes again (a pod restarting): both mount the share anew.
    publish = pb.ControllerPublishVolumeRequest(volume_id=volume_id, node_id="test-node", volume_capability=cap)
    context = node_a.controller.ControllerPublishVolume(publish, timeout=60).publish_context
    stage = pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=cap, publish_context=context
    )
    node_a.node.NodeStageVolume(stage, timeout=120)
    assert Path(staging, "restored").exists()
    node_publish = pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=cap
    )
    node_a.node.NodePublishVolume(node_publish, timeout=60)
    Path(target, "after").write_text("written after the remount")
    assert (folder / "after").read_text() == "written after the remount"
    for path in (staging, target):
        stats = node_a.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path), timeout=60
        )
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
    detach(node_a, "test-node", volume_id, staging, target)
    assert nfs_mounts(tmp_path) == []
    node_a.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)


def test_the_pods_group_is_given_to_a_shared_folder(tmp_path: Path, nfs_server: NfsServer) -> None:
    """VOLUME_MOUNT_GROUP on a share: the folder gets the pod's group and setgid through
    the mount, without the kubelet's walk over every file on the server."""
    args = ["--volume-mount-group", *config_for(tmp_path, nfs_server, "g")]
    with running_driver(tmp_path / "g", args) as driver:
        cap = mount_capability(mode="MULTI_NODE_MULTI_WRITER")
        volume_id = create(driver, "grouped", cap, "shared")
        grouped = pb.VolumeCapability()
        grouped.CopyFrom(cap)
        grouped.mount.volume_mount_group = "4321"
        target = str(driver.root / "pod")
        staging = attach(driver, "test-node", volume_id, grouped, target)
        folder = nfs_server.export_dir / tmp_path.name / "grouped"
        assert folder.stat().st_gid == 4321 and folder.stat().st_mode & 0o2070 == 0o2070
        Path(target, "made-by-the-pod").write_text("x")
        assert (folder / "made-by-the-pod").stat().st_gid == 4321
        detach(driver, "test-node", volume_id, staging, target)
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=120)
