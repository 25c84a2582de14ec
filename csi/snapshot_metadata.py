"""The CSI SnapshotMetadata service (changed-block tracking, Kubernetes' KEP-3314): the
ranges of a snapshot that hold data, and the ranges that changed between two snapshots
of one volume, streamed for backup tools. Served by the controller for the backends that
read their snapshots' blocks (``Capabilities.blocks``); the external-snapshot-metadata
sidecar puts it behind the Kubernetes API's authentication."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc

from csi import convert, ids
from csi.backends.base import Backend
from csi.errors import InvalidArgument, NotFound, OutOfRange
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.log import set_backend
from csi.model import Extent, Secrets
from csi.registry import Registry

DEFAULT_RESULTS = 256
"""Ranges per message when the caller leaves max_results at 0."""


def offered(registry: Registry) -> bool:
    return any(b.capabilities.blocks and b.controller is not None for b in registry)


def batches(extents: Iterable[Extent], max_results: int) -> Iterator[list[pb.BlockMetadata]]:
    """The ranges in messages of at most ``max_results`` (DEFAULT_RESULTS for 0)."""
    size = max_results or DEFAULT_RESULTS
    batch: list[pb.BlockMetadata] = []
    for extent in extents:
        batch.append(pb.BlockMetadata(byte_offset=extent.offset, size_bytes=extent.length))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class SnapshotMetadataService(pb_grpc.SnapshotMetadataServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _snapshot(self, snapshot_id: str, field: str, secrets: Secrets) -> tuple[Backend, str, int]:
        """The snapshot's backend, local ID and size; NotFound for no such snapshot
        (a backup, which lives in a repository, has no blocks to tell)."""
        convert.require(snapshot_id, field)
        ref = ids.decode(snapshot_id, "snapshot")
        backend = self.registry.find(ref.backend)
        if backend is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist or has no block metadata (not a backend snapshot)")
        set_backend(backend.name)
        blocks_offered = backend.blocks  # FailedPrecondition naming the backend when it has none
        del blocks_offered
        snapshot = backend.volumes.get_snapshot(ref.local_id, secrets=secrets)
        return backend, ref.local_id, snapshot.size_bytes

    @staticmethod
    def _check(starting_offset: int, max_results: int, size: int, snapshot_id: str) -> None:
        if max_results < 0:
            raise InvalidArgument("max_results must not be negative")
        if starting_offset < 0 or starting_offset > size:
            raise OutOfRange(f"starting_offset {starting_offset} is outside snapshot {snapshot_id!r} ({size} bytes)")

    def GetMetadataAllocated(
        self, request: pb.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetMetadataAllocatedResponse]:
        secrets = dict(request.secrets)
        backend, local_id, size = self._snapshot(request.snapshot_id, "snapshot_id", secrets)
        self._check(request.starting_offset, request.max_results, size, request.snapshot_id)
        extents = backend.blocks.allocated(local_id, request.starting_offset, secrets=secrets)
        for batch in batches(extents, request.max_results):
            yield pb.GetMetadataAllocatedResponse(
                block_metadata_type=pb.VARIABLE_LENGTH, volume_capacity_bytes=size, block_metadata=batch
            )

    def GetMetadataDelta(
        self, request: pb.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetMetadataDeltaResponse]:
        secrets = dict(request.secrets)
        base_backend, base, _ = self._snapshot(request.base_snapshot_id, "base_snapshot_id", secrets)
        backend, target, size = self._snapshot(request.target_snapshot_id, "target_snapshot_id", secrets)
        if base_backend.name != backend.name:
            raise InvalidArgument(
                f"snapshots {request.base_snapshot_id!r} and {request.target_snapshot_id!r} are not of one volume "
                "(they live on different backends)"
            )
        self._check(request.starting_offset, request.max_results, size, request.target_snapshot_id)
        extents = backend.blocks.changed(base, target, request.starting_offset, secrets=secrets)
        for batch in batches(extents, request.max_results):
            yield pb.GetMetadataDeltaResponse(
                block_metadata_type=pb.VARIABLE_LENGTH, volume_capacity_bytes=size, block_metadata=batch
            )
