"""The CSI Controller service: validate the request, take the in-flight lock, let the
scheduler or the volume's backend do the work, answer in protobuf. No backend-specific
code lives here; every error is a domain error that ``status.py`` maps to a code."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf.wrappers_pb2 import Int64Value

from csi import convert, ids
from csi.backends.base import Backend, Expansion
from csi.backup.engine import Backups
from csi.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from csi.filesystems import MINIMUM_BYTES, parse_filesystem
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.locks import InFlight
from csi.log import set_backend
from csi.model import AccessType, Capability, Secrets, Segment, Snapshot, SourceRef, Volume, VolumeSpec
from csi.nodes import NodeDirectory
from csi.parameters import (
    PARAM_BACKEND,
    PARAM_FS_TYPE,
    PARAM_GROUP,
    PARAM_MKFS_OPTIONS,
    PARAM_REPOSITORY,
    PARAM_TYPE,
    SNAPSHOT_TYPES,
    backend_parameters,
    check_keys,
    check_mkfs_options,
    claim_metadata,
)
from csi.registry import Registry
from csi.scheduler import PlacementRequest, Scheduler
from csi.sizes import MAX_BYTES

log = logging.getLogger(__name__)

ALWAYS = (
    pb.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME,
    pb.ControllerServiceCapability.RPC.PUBLISH_UNPUBLISH_VOLUME,
    pb.ControllerServiceCapability.RPC.LIST_VOLUMES,
    pb.ControllerServiceCapability.RPC.GET_CAPACITY,
    pb.ControllerServiceCapability.RPC.PUBLISH_READONLY,
    pb.ControllerServiceCapability.RPC.LIST_VOLUMES_PUBLISHED_NODES,
    pb.ControllerServiceCapability.RPC.VOLUME_CONDITION,
    pb.ControllerServiceCapability.RPC.GET_VOLUME,
    pb.ControllerServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER,
)
SNAPSHOTS = (
    pb.ControllerServiceCapability.RPC.CREATE_DELETE_SNAPSHOT,
    pb.ControllerServiceCapability.RPC.LIST_SNAPSHOTS,
    pb.ControllerServiceCapability.RPC.GET_SNAPSHOT,
)


def controller_capabilities(registry: Registry) -> list[pb.ControllerServiceCapability.RPC.Type]:
    """What the controller advertises: what every deployment offers, and what at least
    one of its backends declares (a call on a backend without it is refused by name)."""
    offered = [b.capabilities for b in registry]
    found: list[pb.ControllerServiceCapability.RPC.Type] = list(ALWAYS)
    if any(c.snapshots for c in offered):
        found += SNAPSHOTS
    if any(c.clones for c in offered):
        found.append(pb.ControllerServiceCapability.RPC.CLONE_VOLUME)
    if any(c.expansion is not Expansion.NONE for c in offered):
        found.append(pb.ControllerServiceCapability.RPC.EXPAND_VOLUME)
    return found


TOKEN_PREFIX = "after:"
T = TypeVar("T")


def volume_context(parameters: Mapping[str, str]) -> dict[str, str]:
    """What the node needs from the StorageClass, checked here so a typo fails at
    CreateVolume rather than at the first mount."""
    context = {}
    if PARAM_FS_TYPE in parameters:
        context[PARAM_FS_TYPE] = parse_filesystem(parameters[PARAM_FS_TYPE]).value
    if PARAM_MKFS_OPTIONS in parameters:
        check_mkfs_options(parameters[PARAM_MKFS_OPTIONS], "parameter")
        context[PARAM_MKFS_OPTIONS] = parameters[PARAM_MKFS_OPTIONS]
    return context


def check_filesystems(capabilities: Iterable[Capability]) -> None:
    for cap in capabilities:
        if cap.fs_type:
            parse_filesystem(cap.fs_type)


def size_for_filesystem(
    name: str, required: int, limit: int, capabilities: Iterable[Capability], context: Mapping[str, str]
) -> int:
    """The required size, raised to the smallest device the volume's filesystem accepts,
    so a small XFS claim fails (or grows) here rather than at its first mount."""
    names = {c.fs_type or context.get(PARAM_FS_TYPE, "") for c in capabilities if c.access_type is AccessType.MOUNT}
    minimum = max((MINIMUM_BYTES[parse_filesystem(n)] for n in names if n), default=0)
    if limit and limit < minimum:
        wanted = ", ".join(sorted(n.upper() for n in names))
        raise OutOfRange(f"volume {name!r}: {wanted} needs at least {minimum >> 20} MiB, above limit_bytes {limit}")
    return max(required, minimum)


def cursor(token: str) -> str:
    """The ID a page starts after: the last ID of the previous page, so deletions between
    pages neither skip nor repeat entries. "" for the first page."""
    if not token:
        return ""
    if not token.startswith(TOKEN_PREFIX):
        raise Aborted(f"starting_token {token!r} is not a token this driver issued")
    return token.removeprefix(TOKEN_PREFIX)


def paginate(
    names: Iterable[str],
    listing: Callable[[str, str, int], Sequence[T]],
    local_id: Callable[[T], str],
    max_entries: int,
    token: str,
) -> tuple[list[tuple[str, T]], str]:
    """One page of a listing that spans backends (and backup repositories), in ID order,
    after the cursor in ``token``. Each is asked only for the entries the page still
    needs after its part of the cursor (``listing(name, after, limit)``; limit 0 is all),
    so a page costs what its entries cost wherever the backend keeps an ordered index.
    One entry more than the page is read to know whether another page follows."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    after = cursor(token)
    found: list[tuple[str, T]] = []
    # IDs are "1:<name>:<local ID>": names in the order of that prefix, each one's
    # entries in local-ID order, give the IDs in order.
    for name in sorted(names, key=lambda n: ids.encode(n, "-")):
        prefix = ids.encode(name, "-")[:-1]
        if after.startswith(prefix):
            start = after.removeprefix(prefix)
        elif after > prefix:
            continue  # every ID of this one sorts before the cursor
        else:
            start = ""
        wanted = max_entries + 1 - len(found) if max_entries else 0
        found += [(name, item) for item in listing(name, start, wanted)]
        if max_entries and len(found) > max_entries:
            page = found[:max_entries]
            return page, TOKEN_PREFIX + ids.encode(page[-1][0], local_id(page[-1][1]))
    return found, ""


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(
        self,
        registry: Registry,
        scheduler: Scheduler,
        nodes: NodeDirectory | None = None,
        backups: Backups | None = None,
    ) -> None:
        """``nodes`` tells which node IDs exist (in Kubernetes: the CSINode objects);
        without it ControllerPublishVolume accepts any node ID. ``backups`` serves the
        configured backup repositories (none without it)."""
        self.registry = registry
        self.scheduler = scheduler
        self.nodes = nodes
        self.backups = backups or Backups(registry, {})
        self.inflight = InFlight()
        self.capabilities = controller_capabilities(registry)

    def _route(self, object_id: str, what: str = "volume") -> tuple[Backend, str]:
        ref = ids.decode(object_id, what)
        backend = self.registry.route(ref.backend, what, object_id)
        set_backend(backend.name)
        return backend, ref.local_id

    # -- volumes --------------------------------------------------------------------

    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext) -> pb.CreateVolumeResponse:
        convert.name(request.name, "name")
        caps = convert.capabilities(request.volume_capabilities)
        check_filesystems(caps)
        required, limit = convert.capacity_range(request.capacity_range)
        if request.mutable_parameters:
            raise InvalidArgument("mutable_parameters are not supported: Cairn does not offer ControllerModifyVolume")
        parameters = dict(request.parameters)
        vol_context = volume_context(parameters)
        source = convert.content_source(request.volume_content_source)
        restoring = source is not None and source[0].backend in self.backups
        if source is not None and restoring:
            # A backup lives in a repository: any backend that fills volumes restores it.
            backup = self.backups.manifest(str(source[0]))
            if limit and limit < backup.size:
                raise OutOfRange(
                    f"volume {request.name!r}: backup {str(source[0])!r} holds {backup.size} bytes, above limit_bytes {limit}"
                )
            required = max(required, backup.size)
            source = (source[0], SourceRef("backup", str(source[0])))
        required = size_for_filesystem(request.name, required, limit, caps, vol_context)
        spec = VolumeSpec(
            name=request.name,
            required_bytes=required,
            limit_bytes=limit,
            capabilities=caps,
            parameters=backend_parameters(parameters),
            source=source[1] if source else None,
            secrets=dict(request.secrets),
            requisite=convert.segments(request.accessibility_requirements.requisite),
            preferred=convert.segments(request.accessibility_requirements.preferred),
            metadata=claim_metadata(parameters),
        )
        # The source's lock too: a delete of the source waits (ABORTED) until the copy is made.
        # A backup is a snapshot to DeleteSnapshot, which holds it as one; its restores only
        # read the repository, so many run at once (one backup restored into many volumes).
        source_lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if source and restoring:
            source_lock = self.inflight.share(str(source[0]), "snapshot")
        elif source:
            source_lock = self.inflight.hold(str(source[0]), source[1].kind)
        with self.inflight.hold(request.name, "volume name"), source_lock:
            candidates = self.scheduler.select(parameters)
            # A retry goes back to the backend that made the volume, whatever the scheduler
            # would choose now. With one candidate and no source, that is where placement
            # leads anyway, and the backend's create answers a retry from what it made: the
            # lookup (a round trip on a remote backend) is only needed if placement fails.
            direct = len(candidates) == 1 and source is None
            if not direct:
                for backend in candidates:
                    if (retried := self._retried(backend, spec, vol_context)) is not None:
                        return retried
            if source and not restoring:
                self.registry.route(source[0].backend, source[1].kind, str(source[0]))
            placement = PlacementRequest(
                parameters=parameters,
                capabilities=caps,
                required_bytes=required,
                requisite=spec.requisite,
                preferred=spec.preferred,
                source_backend=source[0].backend if source and not restoring else None,
                source_kind=source[1].kind if source else None,
                secrets=spec.secrets,
            )
            try:
                placed = self.scheduler.place(placement)
            except (ResourceExhausted, Unavailable):
                # A retry of a volume that filled its backend, or of one on a backend that
                # cannot say how much room it has now: answered from what was made.
                if direct and (retried := self._retried(candidates[0], spec, vol_context)) is not None:
                    return retried
                raise
            full: ResourceExhausted | None = None
            for backend in placed:
                try:
                    volume = backend.volumes.create_volume(spec)
                except ResourceExhausted as exc:
                    log.warning("backend full, trying the next", extra={"backend": backend.name, "error": str(exc)})
                    full = exc
                    continue
                return self._created(backend, self._filled(backend, volume, spec), vol_context)
            assert full is not None
            raise full

    def _retried(
        self, backend: Backend, spec: VolumeSpec, vol_context: dict[str, str]
    ) -> pb.CreateVolumeResponse | None:
        """The answer to a retry of a creation ``backend`` made (the backend compares the
        request with what it made), or None when it holds no volume of that name."""
        if backend.volumes.lookup_volume(spec.name, secrets=spec.secrets) is None:
            return None
        return self._created(backend, self._filled(backend, backend.volumes.create_volume(spec), spec), vol_context)

    def _filled(self, backend: Backend, volume: Volume, spec: VolumeSpec) -> Volume:
        """A volume restored from a backup, with its content written: by this call, or
        again after a call that did not finish (a crash, a damaged chunk)."""
        if volume.filling and spec.source is not None and spec.source.kind == "backup":
            self.backups.restore(spec.source.local_id, backend, volume, secrets=spec.secrets)
            volume = backend.volumes.get_volume(volume.local_id, secrets=spec.secrets)
        return volume

    @staticmethod
    def _created(backend: Backend, volume: Volume, vol_context: Mapping[str, str]) -> pb.CreateVolumeResponse:
        set_backend(backend.name)
        return pb.CreateVolumeResponse(volume=convert.volume(backend.name, volume, vol_context))

    def DeleteVolume(self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext) -> pb.DeleteVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        try:
            backend, local_id = self._route(request.volume_id)
            with self.inflight.hold(request.volume_id):
                backend.volumes.delete_volume(local_id, secrets=request.secrets)
        except NotFound as exc:
            log.info("nothing to delete: %s", exc)
        return pb.DeleteVolumeResponse()

    def ControllerPublishVolume(
        self, request: pb.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerPublishVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = convert.capability(request.volume_capability)
        check_filesystems([cap])
        backend, local_id = self._route(request.volume_id)
        if self.nodes is not None:
            self.nodes.require(request.node_id)  # NOT_FOUND for a node that does not exist
        reason = backend.capabilities.unsupported(cap)
        if reason:
            raise InvalidArgument(f"volume {request.volume_id}: {reason}")
        with self.inflight.hold(request.volume_id):
            publish_context = backend.volumes.publish_volume(
                local_id, request.node_id, cap, request.readonly, secrets=request.secrets
            )
        return pb.ControllerPublishVolumeResponse(publish_context=publish_context)

    def ControllerUnpublishVolume(
        self, request: pb.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerUnpublishVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        try:
            backend, local_id = self._route(request.volume_id)
            with self.inflight.hold(request.volume_id):
                secrets = request.secrets
                if request.node_id:
                    nodes: Sequence[str] = [request.node_id]
                else:
                    nodes = backend.volumes.get_volume(local_id, secrets=secrets).published_nodes
                for node in nodes:
                    backend.volumes.unpublish_volume(local_id, node, secrets=secrets)
        except NotFound as exc:
            # Nothing can be published from a volume that does not exist; answering OK
            # lets the attacher release its VolumeAttachment instead of retrying forever.
            log.info("unpublishing a volume that does not exist: %s", exc)
        return pb.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        convert.require(request.volume_id, "volume_id")
        caps = convert.capabilities(request.volume_capabilities)
        backend, local_id = self._route(request.volume_id)
        backend.volumes.get_volume(local_id, secrets=request.secrets)
        problems = [r for r in (backend.capabilities.unsupported(c) for c in caps) if r]
        try:
            check_keys(backend_parameters(request.parameters), backend.volumes.volume_parameters, [backend], "")
        except InvalidArgument as exc:
            problems.append(str(exc))
        try:
            check_filesystems(caps)
        except InvalidArgument as exc:
            problems.append(str(exc))
        if problems:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters,
        )
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(self, request: pb.ListVolumesRequest, context: grpc.ServicerContext) -> pb.ListVolumesResponse:
        page, next_token = paginate(
            self.registry.names(),
            lambda name, after, limit: self.registry.route(name, "volume", name).volumes.list_volumes(
                after=after, limit=limit
            ),
            lambda volume: volume.local_id,
            request.max_entries,
            request.starting_token,
        )
        entries = [
            pb.ListVolumesResponse.Entry(
                volume=convert.volume(name, volume, {}),
                status=pb.ListVolumesResponse.VolumeStatus(
                    published_node_ids=volume.published_nodes, volume_condition=convert.volume_condition(volume)
                ),
            )
            for name, volume in page
        ]
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    def ControllerGetVolume(
        self, request: pb.ControllerGetVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        backend, local_id = self._route(request.volume_id)
        volume = backend.volumes.get_volume(local_id)
        return pb.ControllerGetVolumeResponse(
            volume=convert.volume(backend.name, volume, {}),
            status=pb.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=volume.published_nodes, volume_condition=convert.volume_condition(volume)
            ),
        )

    def GetCapacity(self, request: pb.GetCapacityRequest, context: grpc.ServicerContext) -> pb.GetCapacityResponse:
        caps = tuple(
            convert.capability(c, f"volume_capabilities[{i}]") for i, c in enumerate(request.volume_capabilities)
        )
        parameters = dict(request.parameters)
        volume_context(parameters)
        # Without a selector the question is "how much could any backend take".
        named = PARAM_BACKEND in parameters or PARAM_GROUP in parameters
        candidates = self.scheduler.select(parameters) if named else list(self.registry)
        candidates = self.scheduler.check_parameters(candidates, parameters)
        candidates = [b for b in candidates if not any(b.capabilities.unsupported(c) for c in caps)]
        where: tuple[Segment, ...] = ()
        if request.HasField("accessible_topology"):
            where = (dict(request.accessible_topology.segments),)
            candidates = [b for b in candidates if self.scheduler.reachable(b, where)]
        # As placement sees it: an unwell member, or one that cannot say, offers nothing,
        # and the others still answer for the group.
        free, unwell = self.scheduler.free_space(candidates, {}, where)
        if unwell:
            log.info("capacity leaves out unwell backends", extra={"problems": unwell})
        healthy = [b for b in candidates if b.name in free]
        if not healthy:
            return pb.GetCapacityResponse(available_capacity=0)
        return pb.GetCapacityResponse(
            available_capacity=max(free.values()),
            maximum_volume_size=Int64Value(
                value=max(b.volumes.max_volume_bytes(where[0] if where else None) for b in healthy)
            ),
        )

    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[
                pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=c))
                for c in self.capabilities
            ]
        )

    def ControllerExpandVolume(
        self, request: pb.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerExpandVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        required, limit = convert.capacity_range(request.capacity_range)
        if request.HasField("volume_capability"):
            check_filesystems([convert.capability(request.volume_capability)])
        backend, local_id = self._route(request.volume_id)
        expansion = backend.capabilities.expansion
        if expansion is Expansion.NONE:
            raise InvalidArgument(f"volume {request.volume_id}: backend {backend.name!r} cannot grow volumes")
        with self.inflight.hold(request.volume_id):
            volume = self._check_growth(backend, local_id, request.volume_id, required, request.secrets)
            if expansion is Expansion.OFFLINE and volume.published_nodes and required > volume.capacity_bytes:
                raise FailedPrecondition(
                    f"volume {request.volume_id}: backend {backend.name!r} grows volumes only while unpublished, "
                    f"and it is published to {', '.join(volume.published_nodes)}"
                )
            capacity = backend.volumes.expand_volume(local_id, required, limit, secrets=request.secrets)
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=capacity, node_expansion_required=backend.capabilities.node_expansion
        )

    @staticmethod
    def _check_growth(backend: Backend, local_id: str, volume_id: str, required: int, secrets: Secrets) -> Volume:
        """The volume, after the capacity check CreateVolume makes, for the bytes an
        expansion adds."""
        volume = backend.volumes.get_volume(local_id, secrets=secrets)
        current = volume.capacity_bytes
        if required <= current:
            return volume
        if required > MAX_BYTES:
            raise OutOfRange(f"volume {volume_id}: {required} bytes exceeds the largest size CSI can carry")
        free = backend.volumes.free_bytes(secrets=secrets)
        if required - current > free:
            raise OutOfRange(
                f"volume {volume_id}: growing from {current} to {required} bytes needs {required - current} more, "
                f"and backend {backend.name!r} has {free} free"
            )
        return volume

    def ControllerModifyVolume(
        self, request: pb.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerModifyVolumeResponse:
        raise Unimplemented("ControllerModifyVolume is not offered by Cairn")

    # -- snapshots ------------------------------------------------------------------

    def CreateSnapshot(
        self, request: pb.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.CreateSnapshotResponse:
        convert.name(request.name, "name")
        convert.require(request.source_volume_id, "source_volume_id")
        kind = request.parameters.get(PARAM_TYPE, "snapshot")
        if kind not in SNAPSHOT_TYPES:
            raise InvalidArgument(
                f"snapshot parameter {PARAM_TYPE!r} must be one of {', '.join(SNAPSHOT_TYPES)}, got {kind!r}"
            )
        repository = request.parameters.get(PARAM_REPOSITORY, "")
        if kind == "snapshot" and repository:
            raise InvalidArgument(f"snapshot parameter {PARAM_REPOSITORY!r} is for snapshots of type backup")
        backend, local_id = self._route(request.source_volume_id)
        if kind == "backup":
            if not repository:
                raise InvalidArgument(f"a snapshot of type backup needs the parameter {PARAM_REPOSITORY!r}")
            self.backups.repository(repository)
            check_keys(backend_parameters(request.parameters), (), [backend], "snapshot")
            with self.inflight.hold(request.name, "snapshot name"):
                snapshot = self.backups.backup(
                    repository, request.name, request.source_volume_id, secrets=request.secrets
                )
            return pb.CreateSnapshotResponse(snapshot=convert.backup(repository, snapshot))
        if not backend.capabilities.snapshots:
            raise InvalidArgument(f"volume {request.source_volume_id}: backend {backend.name!r} takes no snapshots")
        parameters = backend_parameters(request.parameters)
        check_keys(parameters, backend.volumes.snapshot_parameters, [backend], "snapshot")
        with self.inflight.hold(request.name, "snapshot name"), self.inflight.hold(request.source_volume_id):
            snapshot = backend.volumes.create_snapshot(request.name, local_id, parameters, secrets=request.secrets)
        return pb.CreateSnapshotResponse(snapshot=convert.snapshot(backend.name, snapshot))

    def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSnapshotResponse:
        convert.require(request.snapshot_id, "snapshot_id")
        try:
            ref = ids.decode(request.snapshot_id, "snapshot")
            if ref.backend in self.backups:
                with self.inflight.hold(request.snapshot_id, "snapshot"):
                    self.backups.delete(ref.backend, ref.local_id, secrets=request.secrets)
                return pb.DeleteSnapshotResponse()
            backend, local_id = self._route(request.snapshot_id, "snapshot")
            with self.inflight.hold(request.snapshot_id, "snapshot"):
                backend.volumes.delete_snapshot(local_id, secrets=request.secrets)
        except NotFound as exc:
            log.info("nothing to delete: %s", exc)
        return pb.DeleteSnapshotResponse()

    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext) -> pb.GetSnapshotResponse:
        convert.require(request.snapshot_id, "snapshot_id")
        ref = ids.decode(request.snapshot_id, "snapshot")
        if ref.backend in self.backups:
            return pb.GetSnapshotResponse(
                snapshot=convert.backup(ref.backend, self.backups.get(ref.backend, ref.local_id))
            )
        backend, local_id = self._route(request.snapshot_id, "snapshot")
        snapshot = backend.volumes.get_snapshot(local_id, secrets=request.secrets)
        return pb.GetSnapshotResponse(snapshot=convert.snapshot(backend.name, snapshot))

    def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> pb.ListSnapshotsResponse:
        secrets, source = request.secrets, request.source_volume_id
        names: list[str] = [*self.registry.names(), *self.backups.repositories]
        wanted: Snapshot | None = None
        try:
            if request.snapshot_id:
                ref = ids.decode(request.snapshot_id, "snapshot")
                if ref.backend in self.backups:
                    wanted = self.backups.get(ref.backend, ref.local_id)
                else:
                    backend, local_id = self._route(request.snapshot_id, "snapshot")
                    wanted = backend.volumes.get_snapshot(local_id, secrets=secrets)
                names = [ref.backend]
            elif source:
                # A volume's snapshots live on its backend; its backups in any repository.
                names = [self._route(source)[0].name, *self.backups.repositories]
        except NotFound:
            names = []

        def source_of(name: str, snapshot: Snapshot) -> str:
            if name in self.backups:
                return snapshot.source_volume_local_id  # a backup's source is a driver-wide ID
            return ids.encode(name, snapshot.source_volume_local_id)

        def of_source(name: str, snapshots: Sequence[Snapshot]) -> list[Snapshot]:
            return [s for s in snapshots if not source or source_of(name, s) == source]

        def list_some(name: str, after: str, limit: int) -> Sequence[Snapshot]:
            if name in self.backups:
                return self.backups.list(name, after=after, limit=limit)
            return self.registry.route(name, "snapshot", name).volumes.list_snapshots(
                after=after, limit=limit, secrets=secrets
            )

        def listing(name: str, after: str, limit: int) -> Sequence[Snapshot]:
            if wanted is not None:
                return of_source(name, [wanted] if wanted.local_id > after else [])
            if not source:
                return list_some(name, after, limit)
            # Only the source's snapshots: read on until the page is full.
            found: list[Snapshot] = []
            while True:
                chunk = list_some(name, after, max(limit, 100))
                found += of_source(name, chunk)
                if not chunk or (limit and len(found) >= limit):
                    return found[:limit] if limit else found
                after = chunk[-1].local_id

        page, next_token = paginate(names, listing, lambda s: s.local_id, request.max_entries, request.starting_token)
        return pb.ListSnapshotsResponse(
            entries=[
                pb.ListSnapshotsResponse.Entry(
                    snapshot=convert.backup(n, s) if n in self.backups else convert.snapshot(n, s)
                )
                for n, s in page
            ],
            next_token=next_token,
        )
