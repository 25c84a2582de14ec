"""The node service with a backend whose volumes are filesystems mounted as they are (a
share, like an NFS export): no formatting, stage mounts the source, publish binds it,
stats and expansion work without a device, and unstage takes it away. The share here is
a tmpfs, so the path is real (mounts, binds) without a server; the service runs in
process, as the driver runs it."""

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
from tests.support import block_capability, mount_capability, require_root

pytestmark = pytest.mark.integration
SHARES = Capabilities(access={AccessType.MOUNT: frozenset(AccessMode)}, filesystems=frozenset(), node_expansion=False)


class TmpfsShare:
    """A connector whose volumes are shares: attach names the source, mounting is the
    node service's job."""

    def __init__(self) -> None:
        self.requests: list[AttachRequest] = []

    def health(self) -> str | None:
        return None

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        self.requests.append(request)
        return Attachment(source=f"share-{local_id}", fstype="tmpfs", options=("size=4m",))

    def detach(self, local_id: str) -> None:
        pass

    def sources(self, local_id: str) -> list[str]:
        return [f"share-{local_id}"]

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        raise AssertionError("a share has no device to refresh")

    def problem(self, local_id: str) -> str | None:
        return None


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[NodeService, TmpfsShare]]:
    require_root()
    connector = TmpfsShare()
    backend = Backend("share", "share", None, SHARES, None, connector)
    yield NodeService(Registry([backend]), "node-a", NodeState(str(tmp_path / "state"))), connector
    for entry in reversed(mount.mounts()):
        if entry.target.startswith(str(tmp_path)):
            mount.unmount(entry.target)


def code(call: Any, request: Any) -> grpc.StatusCode:
    try:
        call(request, None)
    except CairnError as exc:
        return status.to_status(exc)[0]
    return grpc.StatusCode.OK


def test_a_share_is_mounted_as_it_is_published_measured_and_taken_away(
    service: tuple[NodeService, TmpfsShare], tmp_path: Path
) -> None:
    node, connector = service
    volume_id, staging, target = "1:share:vol-a", str(tmp_path / "staging"), str(tmp_path / "pod")
    rwx = mount_capability("", "MULTI_NODE_MULTI_WRITER")
    stage = pb.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=rwx, volume_context={"k": "v"}
    )
    node.NodeStageVolume(stage, None)
    node.NodeStageVolume(stage, None)  # idempotent
    entry = mount.find_mount(staging)
    assert entry is not None and entry.fstype == "tmpfs" and entry.source == "share-vol-a"
    assert connector.requests[0].capability.access_mode is AccessMode.MULTI_NODE_MULTI_WRITER
    assert connector.requests[0].volume_context == {"k": "v"}
    publish = pb.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target, volume_capability=rwx
    )
    node.NodePublishVolume(publish, None)
    Path(target, "file").write_text("shared")
    assert Path(staging, "file").read_text() == "shared"
    stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target), None)
    assert stats.usage[0].total == 4 << 20 and not stats.volume_condition.abnormal
    expanded = node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=target), None)
    assert expanded.capacity_bytes == 4 << 20
    caps = node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), None).capabilities
    assert pb.NodeServiceCapability.RPC.EXPAND_VOLUME not in [c.rpc.type for c in caps]
    unstage = pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging)
    assert code(node.NodeUnstageVolume, unstage) is grpc.StatusCode.FAILED_PRECONDITION  # still published
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), None)
    assert not os.path.exists(target)
    node.NodeUnstageVolume(unstage, None)
    assert not mount.is_mounted(staging)


def test_a_share_has_no_block_access_and_no_filesystem_choice(
    service: tuple[NodeService, TmpfsShare], tmp_path: Path
) -> None:
    node, _ = service
    staging = str(tmp_path / "staging")
    block = pb.NodeStageVolumeRequest(
        volume_id="1:share:vol-b", staging_target_path=staging, volume_capability=block_capability()
    )
    assert code(node.NodeStageVolume, block) is grpc.StatusCode.INVALID_ARGUMENT
    ext4 = pb.NodeStageVolumeRequest(
        volume_id="1:share:vol-b", staging_target_path=staging, volume_capability=mount_capability("ext4")
    )
    assert code(node.NodeStageVolume, ext4) is grpc.StatusCode.INVALID_ARGUMENT
    assert not mount.is_mounted(staging)
