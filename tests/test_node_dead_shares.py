"""The node service over a share whose server dies or restarts (the service in process,
as the driver runs it). The share is a FUSE filesystem (``tests.test_mount_dead``)
that the connector names by its mount point and the service bind-mounts: its mounts
name their source the way NFS mounts name their server, and when it stops answering,
whatever touches them blocks. A server that stops answering must never hang a call:
stats say abnormal, unpublish and unstage force the mounts away, stage and publish are
UNAVAILABLE. A server that restarted (its old mounts stale) is mended by the next
stage or publish, which mount it again. The vm tier does the same on NFS."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import mount, status
from csi.backends.base import Attachment, AttachRequest, Backend, Capabilities
from csi.errors import CairnError
from csi.generated import csi_pb2 as pb
from csi.model import AccessMode, AccessType
from csi.node import NodeService
from csi.nodestate import NodeState
from csi.registry import Registry
from tests.support import mount_capability
from tests.test_mount_dead import BLOCK, BLOCKS, FuseServer, bounded, servers, under

pytestmark = pytest.mark.integration
__all__ = ["servers"]  # the fixture, used here

SHARES = Capabilities(access={AccessType.MOUNT: frozenset(AccessMode)}, filesystems=frozenset(), node_expansion=False)
VOLUME = "1:share:vol-a"
RWX = mount_capability("", "MULTI_NODE_MULTI_WRITER")
CALL = 30  # seconds any call may take here; the probe's timeout is 1 s


class FuseShare:
    """A connector whose volume is the directory a FUSE server serves."""

    def __init__(self, server: Path) -> None:
        self.server = server
        self.attached = 0
        self.refuse = False

    def health(self) -> str | None:
        return None

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        if self.refuse:
            raise CairnError("the backend cannot attach now")
        self.attached += 1
        return Attachment(source=str(self.server), fstype="none", options=("bind",))

    def detach(self, local_id: str) -> None:
        pass

    def sources(self, local_id: str) -> list[str]:
        return [str(self.server)]

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        raise AssertionError("a share has no device to refresh")

    def problem(self, local_id: str) -> str | None:
        return None


class Pod:
    """A node service with the volume staged and published once."""

    def __init__(self, tmp_path: Path, server: FuseServer) -> None:
        self.connector = FuseShare(server.mountpoint)
        backend = Backend("share", "share", None, SHARES, None, self.connector)
        self.node = NodeService(Registry([backend]), "node-a", NodeState(str(tmp_path / "state")))
        self.staging, self.target = str(tmp_path / "staging"), str(tmp_path / "pod")
        self.node.NodeStageVolume(self.stage_request(), None)
        self.node.NodePublishVolume(self.publish_request(self.target), None)

    def stage_request(self) -> pb.NodeStageVolumeRequest:
        return pb.NodeStageVolumeRequest(volume_id=VOLUME, staging_target_path=self.staging, volume_capability=RWX)

    def publish_request(self, target: str) -> pb.NodePublishVolumeRequest:
        return pb.NodePublishVolumeRequest(
            volume_id=VOLUME, staging_target_path=self.staging, target_path=target, volume_capability=RWX
        )

    def stats(self, path: str) -> pb.NodeGetVolumeStatsResponse:
        request = pb.NodeGetVolumeStatsRequest(volume_id=VOLUME, volume_path=path)
        return bounded(CALL, self.node.NodeGetVolumeStats, request, None)

    def unpublish_and_unstage(self) -> None:
        unpublish = pb.NodeUnpublishVolumeRequest(volume_id=VOLUME, target_path=self.target)
        assert code(self.node.NodeUnpublishVolume, unpublish) is grpc.StatusCode.OK
        assert not os.path.exists(self.target)
        unstage = pb.NodeUnstageVolumeRequest(volume_id=VOLUME, staging_target_path=self.staging)
        assert code(self.node.NodeUnstageVolume, unstage) is grpc.StatusCode.OK
        assert not mount.is_mounted(self.staging)


def code(call: Any, request: Any) -> grpc.StatusCode:
    """The call's status code; the call must return (or fail) within CALL seconds."""
    try:
        bounded(CALL, call, request, None)
    except CairnError as exc:
        return status.to_status(exc)[0]
    return grpc.StatusCode.OK


@pytest.fixture
def pod(tmp_path: Path, servers: list[FuseServer]) -> Iterator[tuple[Pod, FuseServer]]:
    server = FuseServer(tmp_path / "server").start()
    servers.append(server)
    published = Pod(tmp_path, server)
    stats = published.stats(published.target)
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert stats.usage[0].total == BLOCKS * BLOCK
    yield published, server


def test_a_server_that_stops_answering_hangs_no_call(pod: tuple[Pod, FuseServer], tmp_path: Path) -> None:
    published, server = pod
    server.freeze()
    for path in (published.target, published.staging):
        stats = published.stats(path)
        assert stats.volume_condition.abnormal
        assert f"filesystem {server.mountpoint} (mounted at {path}) not responding" in stats.volume_condition.message
        assert [(u.unit, u.total) for u in stats.usage] == [(pb.VolumeUsage.BYTES, 0)]
    # Nothing new is built on a mount whose server does not answer.
    assert code(published.node.NodeStageVolume, published.stage_request()) is grpc.StatusCode.UNAVAILABLE
    second = published.publish_request(str(tmp_path / "pod-2"))
    assert code(published.node.NodePublishVolume, second) is grpc.StatusCode.UNAVAILABLE
    expand = pb.NodeExpandVolumeRequest(volume_id=VOLUME, volume_path=published.target)
    assert code(published.node.NodeExpandVolume, expand) is grpc.StatusCode.UNAVAILABLE
    # The kubelet tears the pod down: forced (lazy at worst), and done.
    published.unpublish_and_unstage()
    assert under(tmp_path) == [str(server.mountpoint)]


def restart(server: FuseServer) -> None:
    """The server restarts: the old connection is gone (its mounts stale), a new one
    serves the same directory."""
    server.disconnect()
    mount.unmount(str(server.mountpoint))
    server.start()


def test_a_stage_after_a_server_restart_mounts_the_share_again(pod: tuple[Pod, FuseServer]) -> None:
    published, server = pod
    restart(server)
    stats = published.stats(published.staging)
    assert stats.volume_condition.abnormal and "is stale" in stats.volume_condition.message
    assert code(published.node.NodeStageVolume, published.stage_request()) is grpc.StatusCode.OK
    assert published.connector.attached == 2, "the stale mount must be mounted again, not reported staged"
    assert not published.stats(published.staging).volume_condition.abnormal
    # The pod's bind of the old mount is still stale; publishing it again mends it.
    assert published.stats(published.target).volume_condition.abnormal
    assert code(published.node.NodePublishVolume, published.publish_request(published.target)) is grpc.StatusCode.OK
    assert not published.stats(published.target).volume_condition.abnormal
    published.unpublish_and_unstage()


def test_a_publish_after_a_server_restart_mounts_the_share_again(pod: tuple[Pod, FuseServer], tmp_path: Path) -> None:
    published, server = pod
    restart(server)
    second = str(tmp_path / "pod-2")
    assert code(published.node.NodePublishVolume, published.publish_request(second)) is grpc.StatusCode.OK
    assert published.connector.attached == 2
    for path in (published.staging, second):
        stats = published.stats(path)
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id=VOLUME, target_path=second)
    assert code(published.node.NodeUnpublishVolume, unpublish) is grpc.StatusCode.OK
    # The first pod's bind is still of the old mount: torn down all the same.
    published.unpublish_and_unstage()


def test_a_publish_mounts_the_share_again_when_a_stage_could_not(pod: tuple[Pod, FuseServer]) -> None:
    """A stage unmounted the stale mount, then failed to attach: the staging path is
    bare. A publish meanwhile mounts the share again rather than bind the bare folder."""
    published, server = pod
    restart(server)
    published.connector.refuse = True
    assert code(published.node.NodeStageVolume, published.stage_request()) is grpc.StatusCode.INTERNAL
    assert not mount.is_mounted(published.staging)
    published.connector.refuse = False
    assert code(published.node.NodePublishVolume, published.publish_request(published.target)) is grpc.StatusCode.OK
    entry = mount.find_mount(published.staging)
    assert entry is not None and entry.source == str(server.mountpoint)
    for path in (published.staging, published.target):
        stats = published.stats(path)
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
    published.unpublish_and_unstage()
