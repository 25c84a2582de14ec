"""The node service in process against a fake connector: a failed stage undoes every
step it made, and a second call on a volume in flight is ABORTED at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import status
from csi.backends.base import Attachment, AttachRequest, Backend
from csi.backends.local import CAPABILITIES
from csi.errors import CairnError
from csi.generated import csi_pb2 as pb
from csi.node import NodeService
from csi.nodestate import NodeState
from csi.registry import Registry
from tests.support import mount_capability

pytestmark = pytest.mark.unit


class RecordingConnector:
    """Attaches /dev/null (which no mkfs accepts) and records what it is asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def health(self) -> str | None:
        return None

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        self.calls.append(f"attach {local_id}")
        return Attachment(device="/dev/null")

    def detach(self, local_id: str) -> None:
        self.calls.append(f"detach {local_id}")

    def sources(self, local_id: str) -> list[str]:
        return []

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        self.calls.append("refresh")

    def problem(self, local_id: str) -> str | None:
        return None


def node(tmp_path: Path) -> tuple[NodeService, RecordingConnector]:
    connector = RecordingConnector()
    backend = Backend("fake", "fake", None, CAPABILITIES, None, connector)
    return NodeService(Registry([backend]), "node-a", NodeState(str(tmp_path / "state"))), connector


def code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except CairnError as exc:
        return status.to_status(exc)[0]
    return grpc.StatusCode.OK


def stage_request(tmp_path: Path) -> pb.NodeStageVolumeRequest:
    return pb.NodeStageVolumeRequest(
        volume_id="1:fake:vol-a",
        staging_target_path=str(tmp_path / "staging"),
        volume_capability=mount_capability("ext4"),
    )


def test_a_failed_stage_undoes_every_step(tmp_path: Path) -> None:
    service, connector = node(tmp_path)
    request = stage_request(tmp_path)
    assert code(lambda: service.NodeStageVolume(request, None)) is not grpc.StatusCode.OK  # mkfs refuses /dev/null
    assert connector.calls == ["attach vol-a", "detach vol-a"]
    assert not (tmp_path / "staging").exists(), "the staging directory it made is removed"
    assert service.state.load("1:fake:vol-a") is None


def test_a_call_on_a_volume_in_flight_is_aborted(tmp_path: Path) -> None:
    service, connector = node(tmp_path)
    with service.inflight.hold("1:fake:vol-a"):
        assert code(lambda: service.NodeStageVolume(stage_request(tmp_path), None)) is grpc.StatusCode.ABORTED
        unstage = pb.NodeUnstageVolumeRequest(volume_id="1:fake:vol-a", staging_target_path=str(tmp_path / "s"))
        assert code(lambda: service.NodeUnstageVolume(unstage, None)) is grpc.StatusCode.ABORTED
    assert connector.calls == []
