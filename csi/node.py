"""The CSI Node service: attach, format and mount once per node (stage), bind into each
pod (publish), and undo exactly that. Backend connectors make the block device; mounting
is ``mount.py``'s; what must survive a plugin restart is kept in ``nodestate.py``.

NodeStage is a small transaction: every step that succeeds registers its undo, and a
failure undoes the steps in reverse, so a failed stage leaves no device or mount behind.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
from collections.abc import Callable

import grpc

from csi import convert, ids, mount
from csi.backends.base import Backend
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.locks import InFlight
from csi.model import (
    DEFAULT_FILESYSTEM,
    TOPOLOGY_NODE_KEY,
    AccessMode,
    AccessType,
    Capability,
    Filesystem,
)
from csi.nodestate import NodeState, StagedVolume
from csi.scheduler import PARAM_FS_TYPE, PARAM_MKFS_OPTIONS, Scheduler

log = logging.getLogger(__name__)

CAPABILITIES = (
    pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME,
    pb.NodeServiceCapability.RPC.GET_VOLUME_STATS,
    pb.NodeServiceCapability.RPC.EXPAND_VOLUME,
    pb.NodeServiceCapability.RPC.VOLUME_CONDITION,
    pb.NodeServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER,
)


def filesystem_for(cap: Capability, volume_context: dict[str, str]) -> Filesystem:
    name = cap.fs_type or volume_context.get(PARAM_FS_TYPE) or DEFAULT_FILESYSTEM.value
    return mount.parse_filesystem(name)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, scheduler: Scheduler, node_id: str, state: NodeState, max_volumes: int = 0) -> None:
        self.scheduler = scheduler
        self.node_id = node_id
        self.state = state
        self.max_volumes = max_volumes
        self.inflight = InFlight()

    def _route(self, volume_id: str) -> tuple[Backend, str]:
        ref = ids.decode(volume_id)
        return self.scheduler.backend(ref.backend, "volume", volume_id), ref.local_id

    def _capability(self, request: pb.NodeStageVolumeRequest | pb.NodePublishVolumeRequest) -> Capability:
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        return convert.capability(request.volume_capability)

    # -- stage ----------------------------------------------------------------------

    def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeStageVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.staging_target_path, "staging_target_path")
        cap = self._capability(request)
        backend, local_id = self._route(request.volume_id)
        reason = backend.volumes.unsupported(cap)
        if reason:
            raise InvalidArgument(f"volume {request.volume_id}: {reason}")
        volume_context = dict(request.volume_context)
        fs = filesystem_for(cap, volume_context) if cap.access_type is AccessType.MOUNT else None
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            if staged is not None and self._still_staged(staged, request.staging_target_path, cap, fs):
                return pb.NodeStageVolumeResponse()
            self._stage(backend, local_id, request, cap, fs)
        return pb.NodeStageVolumeResponse()

    def _still_staged(self, staged: StagedVolume, staging_path: str, cap: Capability, fs: Filesystem | None) -> bool:
        """True when an earlier stage is intact and matches; False when it must be redone
        (the mount vanished, for example after a reboot)."""
        if staged.staging_path != staging_path:
            raise FailedPrecondition(f"volume {staged.volume_id} is already staged at {staged.staging_path}")
        if staged.access_type is not cap.access_type or (fs and staged.filesystem != fs.value):
            raise AlreadyExists(
                f"volume {staged.volume_id} is staged as {staged.access_type.value} {staged.filesystem}".rstrip()
            )
        if cap.access_type is AccessType.BLOCK:
            return os.path.exists(staged.device)
        return mount.is_mounted(staging_path)

    def _stage(
        self,
        backend: Backend,
        local_id: str,
        request: pb.NodeStageVolumeRequest,
        cap: Capability,
        fs: Filesystem | None,
    ) -> None:
        undo: list[Callable[[], None]] = []
        try:
            device = backend.connector.attach(local_id, dict(request.publish_context), secrets=request.secrets)
            undo.append(lambda: backend.connector.detach(local_id))
            if fs is not None:
                mkfs_options = shlex.split(request.volume_context.get(PARAM_MKFS_OPTIONS, ""))
                mount_options = [*cap.mount_flags, *(["ro"] if cap.access_mode.read_only else [])]
                os.makedirs(request.staging_target_path, exist_ok=True)
                formatted = mount.format_and_mount(device, request.staging_target_path, fs, mkfs_options, mount_options)
                undo.append(lambda: mount.unmount(request.staging_target_path))
                log.info("staged", extra={"volume_id": request.volume_id, "device": device, "formatted": formatted})
            self.state.save(
                StagedVolume(
                    volume_id=request.volume_id,
                    staging_path=request.staging_target_path,
                    device=device,
                    access_type=cap.access_type,
                    access_mode=cap.access_mode,
                    filesystem=fs.value if fs else "",
                )
            )
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    log.exception("undoing a failed stage of %s left something behind", request.volume_id)
            raise

    def NodeUnstageVolume(
        self, request: pb.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnstageVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.staging_target_path, "staging_target_path")
        backend, local_id = self._route(request.volume_id)
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            if staged is not None:
                busy = [t for t in staged.targets if mount.is_mounted(t)]
                if busy:
                    raise FailedPrecondition(f"volume {request.volume_id} is still published at {', '.join(busy)}")
            mount.unmount(request.staging_target_path)
            backend.connector.detach(local_id)
            self.state.delete(request.volume_id)
        return pb.NodeUnstageVolumeResponse()

    # -- publish --------------------------------------------------------------------

    def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodePublishVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.target_path, "target_path")
        cap = self._capability(request)
        convert.require(request.staging_target_path, "staging_target_path")
        self._route(request.volume_id)
        target = request.target_path
        readonly = request.readonly or cap.access_mode.read_only
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            if staged is None or staged.staging_path != request.staging_target_path:
                raise FailedPrecondition(f"volume {request.volume_id} is not staged at {request.staging_target_path}")
            if staged.access_type is not cap.access_type:
                raise FailedPrecondition(f"volume {request.volume_id} is staged for {staged.access_type.value} access")
            if mount.is_mounted(target):
                if staged.targets.get(target, readonly) != readonly:
                    raise AlreadyExists(
                        f"volume {request.volume_id} is already published at {target} with other options"
                    )
            else:
                self._check_single_writer(staged, cap, target)
                self._bind(staged, cap, target, readonly)
            staged.targets[target] = readonly
            self.state.save(staged)
        return pb.NodePublishVolumeResponse()

    @staticmethod
    def _check_single_writer(staged: StagedVolume, cap: Capability, target: str) -> None:
        single = AccessMode.SINGLE_NODE_SINGLE_WRITER
        if single not in (cap.access_mode, staged.access_mode):
            return
        others = [t for t in staged.targets if t != target and mount.is_mounted(t)]
        if others:
            raise FailedPrecondition(
                f"volume {staged.volume_id} is {single.value} and already published at {', '.join(others)}"
            )

    @staticmethod
    def _bind(staged: StagedVolume, cap: Capability, target: str, readonly: bool) -> None:
        created = not os.path.exists(target)
        if staged.access_type is AccessType.BLOCK:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
            source = staged.device
        else:
            os.makedirs(target, exist_ok=True)
            source = staged.staging_path
        try:
            mount.bind(source, target, readonly, cap.mount_flags)
        except BaseException:
            if created:
                mount.remove_path(target)
            raise

    def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnpublishVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.target_path, "target_path")
        # Only the ID's form is checked: unmounting needs no backend, so a pod can still be
        # torn down after its backend left the configuration.
        ids.decode(request.volume_id)
        with self.inflight.hold(request.volume_id):
            mount.unmount(request.target_path)
            mount.remove_path(request.target_path)
            staged = self.state.load(request.volume_id)
            if staged is not None and staged.targets.pop(request.target_path, None) is not None:
                self.state.save(staged)
        return pb.NodeUnpublishVolumeResponse()

    # -- stats and expansion --------------------------------------------------------

    def _staged_at(self, volume_id: str, path: str) -> StagedVolume:
        if not os.path.exists(path):
            raise NotFound(f"path {path} of volume {volume_id} does not exist")
        staged = self.state.load(volume_id)
        if staged is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        known = {os.path.realpath(p) for p in (staged.staging_path, *staged.targets)}
        if os.path.realpath(path) not in known:
            raise NotFound(f"volume {volume_id} is not staged or published at {path}")
        return staged

    def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetVolumeStatsResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.volume_path, "volume_path")
        backend, local_id = self._route(request.volume_id)
        path = request.volume_path
        staged = self._staged_at(request.volume_id, path)
        problems = []
        if not backend.connector.present(local_id):
            problems.append("the volume's backing data is gone")
        if staged.access_type is AccessType.MOUNT and not mount.is_mounted(path):
            problems.append(f"{path} is no longer mounted")
        condition = pb.VolumeCondition(abnormal=bool(problems), message="; ".join(problems) or "volume is healthy")
        if stat.S_ISBLK(os.stat(path).st_mode):
            usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=mount.device_size(path))]
        else:
            usage = convert.usage(mount.filesystem_stats(path))
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def NodeExpandVolume(
        self, request: pb.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeExpandVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.volume_path, "volume_path")
        convert.capacity_range(request.capacity_range)
        backend, local_id = self._route(request.volume_id)
        with self.inflight.hold(request.volume_id):
            staged = self._staged_at(request.volume_id, request.volume_path)
            backend.connector.refresh_size(local_id, staged.device)
            if staged.access_type is AccessType.MOUNT:
                mount.grow_filesystem(staged.device, staged.staging_path, Filesystem(staged.filesystem))
            capacity = mount.device_size(staged.device)
        return pb.NodeExpandVolumeResponse(capacity_bytes=capacity)

    # -- node information -----------------------------------------------------------

    def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=c)) for c in CAPABILITIES]
        )

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(
            node_id=self.node_id,
            max_volumes_per_node=self.max_volumes,
            accessible_topology=pb.Topology(segments={TOPOLOGY_NODE_KEY: self.node_id}),
        )
