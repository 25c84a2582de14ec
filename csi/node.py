"""The CSI Node service: attach, format and mount once per node (stage), bind into each
pod (publish), and undo exactly that. Backend connectors make the block device; mounting
is ``mount.py``'s; what must survive a plugin restart is kept in ``nodestate.py``.

NodeStage is a small transaction: every step that succeeds registers its undo, and a
failure undoes the steps in reverse, so a failed stage leaves no device or mount behind.

A share's server may die or restart under its mounts. Nothing here stats a mount point
in this process (``mount.py`` reads network filesystems in a child with a timeout), so
no call hangs: stats report such a volume as abnormal, unpublish and unstage unmount it
by force, and a stage or publish over a stale mount (ESTALE after a server restart)
mounts the share again; one whose server does not answer is UNAVAILABLE.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Mapping

import grpc

from csi import convert, ids, mount
from csi.backends.base import Attachment, AttachRequest, Backend
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from csi.filesystems import parse_filesystem
from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.locks import InFlight
from csi.log import set_backend
from csi.model import (
    DEFAULT_FILESYSTEM,
    TOPOLOGY_NODE_KEY,
    AccessMode,
    AccessType,
    Capability,
    Filesystem,
)
from csi.nodestate import NodeState, StagedVolume
from csi.parameters import PARAM_FS_TYPE, PARAM_MKFS_OPTIONS, check_mkfs_options
from csi.registry import Registry

log = logging.getLogger(__name__)

ALWAYS = (
    pb.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME,
    pb.NodeServiceCapability.RPC.GET_VOLUME_STATS,
    pb.NodeServiceCapability.RPC.VOLUME_CONDITION,
    pb.NodeServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER,
)


def filesystem_for(cap: Capability, volume_context: dict[str, str]) -> Filesystem:
    name = cap.fs_type or volume_context.get(PARAM_FS_TYPE) or DEFAULT_FILESYSTEM.value
    return parse_filesystem(name)


def parse_mkfs_options(volume_context: dict[str, str]) -> list[str]:
    """The volume's mkfs options, checked before anything is attached (a statically
    provisioned PV's context never passed CreateVolume's check)."""
    return check_mkfs_options(volume_context.get(PARAM_MKFS_OPTIONS, ""), "volume_context")


def check_context(context: Mapping[str, str], field: str) -> None:
    """Context values reach host tools' argument lists, where a NUL cannot go."""
    for key, value in context.items():
        if "\0" in key or "\0" in value:
            raise InvalidArgument(f"{field}[{key[:64]!r}] contains a NUL character")


def make_path(path: str, field: str) -> None:
    """Make the directory ``path`` (and its parents); a file in the way is the caller's
    mistake, not the host's."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InvalidArgument(f"{field} {path!r} cannot be a directory: {exc.strerror} ({exc.filename})") from exc


def describe(access_type: AccessType, filesystem: str, mode: AccessMode, flags: list[str]) -> str:
    words = [access_type.value, filesystem, mode.value, f"with mount flags {flags}" if flags else ""]
    return " ".join(w for w in words if w)


class NodeService(pb_grpc.NodeServicer):
    def __init__(
        self, registry: Registry, node_id: str, state: NodeState, max_volumes: int = 0, mount_group: bool = False
    ) -> None:
        """``mount_group``: apply the pod's fsGroup to a volume ourselves (VOLUME_MOUNT_GROUP),
        so the kubelet does not walk every file of it."""
        self.registry = registry
        self.capabilities = list(ALWAYS)
        if any(b.capabilities.node_expansion for b in registry):
            self.capabilities.append(pb.NodeServiceCapability.RPC.EXPAND_VOLUME)
        self.mount_group = mount_group
        if mount_group:
            self.capabilities.append(pb.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP)
        self.node_id = node_id
        self.state = state
        self.max_volumes = max_volumes
        self.inflight = InFlight()

    def _route(self, volume_id: str) -> tuple[Backend, str]:
        ref = ids.decode(volume_id)
        backend = self.registry.route(ref.backend, "volume", volume_id)
        set_backend(backend.name)
        return backend, ref.local_id

    def _capability(self, request: pb.NodeStageVolumeRequest | pb.NodePublishVolumeRequest) -> Capability:
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        return convert.capability(request.volume_capability)

    # -- stage ----------------------------------------------------------------------

    def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeStageVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.path(request.staging_target_path, "staging_target_path")
        cap = self._capability(request)
        backend, local_id = self._route(request.volume_id)
        reason = backend.capabilities.unsupported(cap)
        if reason:
            raise InvalidArgument(f"volume {request.volume_id}: {reason}")
        volume_context = dict(request.volume_context)
        # Only a backend whose node formats its volumes has a filesystem to choose; a share
        # arrives with its own.
        formats = bool(backend.capabilities.filesystems)
        fs = filesystem_for(cap, volume_context) if cap.access_type is AccessType.MOUNT and formats else None
        check_context(volume_context, "volume_context")
        check_context(request.publish_context, "publish_context")
        mkfs_options = parse_mkfs_options(volume_context)
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            if staged is not None and self._still_staged(staged, request.staging_target_path, cap, fs):
                return pb.NodeStageVolumeResponse()
            self._stage(backend, local_id, request, cap, fs, mkfs_options, staged.targets if staged else None)
        return pb.NodeStageVolumeResponse()

    @staticmethod
    def _mount_share(attachment: Attachment, staging: str, mount_flags: tuple[str, ...], read_only: bool) -> None:
        options = list(dict.fromkeys([*attachment.options, *mount_flags, *(["ro"] if read_only else [])]))
        mount.mount(attachment.source, staging, attachment.fstype, options)

    def _still_staged(self, staged: StagedVolume, staging_path: str, cap: Capability, fs: Filesystem | None) -> bool:
        """True when an earlier stage is intact and matches; False when it must be redone
        (the mount vanished, for example after a reboot). A stage with another capability
        is ALREADY_EXISTS, as the spec asks: it would change nothing."""
        if staged.staging_path != staging_path:
            raise FailedPrecondition(f"volume {staged.volume_id} is already staged at {staged.staging_path}")
        wanted_fs = fs.value if fs else (staged.filesystem if staged.shared_source else "")
        wanted = (cap.access_type, wanted_fs, cap.access_mode, sorted(cap.mount_flags))
        have = (staged.access_type, staged.filesystem, staged.access_mode, sorted(staged.mount_flags))
        if wanted != have:
            raise AlreadyExists(
                f"volume {staged.volume_id} is staged at {staging_path} as {describe(*have)}, "
                f"not as the {describe(*wanted)} asked for"
            )
        if cap.access_type is AccessType.BLOCK:
            return os.path.exists(staged.device)
        entry = mount.find_mount(staging_path)
        return entry is not None and self._answers(staged.volume_id, staging_path, entry)

    @staticmethod
    def _answers(volume_id: str, path: str, entry: mount.MountEntry) -> bool:
        """Whether the mount ``entry`` at ``path`` can be used as it is. A network mount is
        probed (never touched here): a stale one (its server restarted) is unmounted, and
        False tells the caller to mount it again; one whose server does not answer is
        Unavailable, and stays mounted for when it answers again (its pods' binds of it
        carry on then)."""
        if not mount.is_network(entry):
            return True
        health = mount.probe(path, entry=entry)
        if health.condition is mount.Condition.STALE:
            log.warning("mounting %s again: %s", path, health.message, extra={"volume_id": volume_id})
            mount.unmount(path)
            return False
        if health.condition is mount.Condition.HUNG:
            raise Unavailable(f"volume {volume_id}: {health.message}")
        return True

    def _stage(
        self,
        backend: Backend,
        local_id: str,
        request: pb.NodeStageVolumeRequest,
        cap: Capability,
        fs: Filesystem | None,
        mkfs_options: list[str],
        targets: dict[str, bool] | None = None,
    ) -> None:
        """Stage the volume; ``targets`` are the publications an earlier stage at the same
        path recorded (a stale share mounted again still has them)."""
        undo: list[Callable[[], None]] = []
        staging = request.staging_target_path
        try:
            attach = AttachRequest(cap, dict(request.volume_context), dict(request.publish_context), request.secrets)
            attachment = backend.connector.attach(local_id, attach)
            undo.append(lambda: backend.connector.detach(local_id))
            if attachment.source and cap.access_type is AccessType.BLOCK:
                raise InvalidArgument(f"volume {request.volume_id} is a shared filesystem: it has no block access")
            mount_options = [*cap.mount_flags, *(["ro"] if cap.access_mode.read_only else [])]
            existing = mount.find_mount(staging) if cap.access_type is AccessType.MOUNT else None
            ours = existing is not None and mount.source_of(existing) == attachment.shown_as
            if ours and existing is not None and not self._answers(request.volume_id, staging, existing):
                ours = False  # stale, and unmounted now: mounted again below
            if ours:
                # Mounted by a stage that crashed before it recorded it: the mount is this
                # volume's, and only the record is missing.
                log.info("found the volume mounted at %s already", staging)
            elif cap.access_type is AccessType.MOUNT:
                if not os.path.exists(staging):
                    make_path(staging, "staging_target_path")
                    undo.append(lambda: mount.remove_path(staging))
                elif not os.path.isdir(staging):
                    raise InvalidArgument(f"staging_target_path {staging!r} exists and is not a directory")
                if attachment.source:
                    self._mount_share(attachment, staging, cap.mount_flags, cap.access_mode.read_only)
                else:
                    assert fs is not None
                    formatted = mount.format_and_mount(attachment.device, staging, fs, mkfs_options, mount_options)
                    log.info("formatted" if formatted else "mounted", extra={"device": attachment.device})
                undo.append(lambda: mount.unmount(staging))
            self.state.save(
                StagedVolume(
                    volume_id=request.volume_id,
                    staging_path=staging,
                    device=attachment.shown_as,
                    access_type=cap.access_type,
                    access_mode=cap.access_mode,
                    filesystem=fs.value if fs else attachment.fstype,
                    mount_flags=cap.mount_flags,
                    shared_source=bool(attachment.source),
                    targets=dict(targets or {}),
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
        path = convert.path(request.staging_target_path, "staging_target_path")
        backend, local_id = self._route(request.volume_id)
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            if staged is None:
                self._unstage_unrecorded(backend, local_id, path)
            elif staged.staging_path != path:
                # Not staged there: the stage at the recorded path is not this call's to undo.
                log.info(
                    "volume %s is staged at %s, not %s: nothing to do", request.volume_id, staged.staging_path, path
                )
            else:
                busy = [t for t in staged.targets if mount.is_mounted(t)]
                if busy:
                    raise FailedPrecondition(f"volume {request.volume_id} is still published at {', '.join(busy)}")
                mount.unmount(path)
                backend.connector.detach(local_id)
                self.state.delete(request.volume_id)
        return pb.NodeUnstageVolumeResponse()

    @staticmethod
    def _unstage_unrecorded(backend: Backend, local_id: str, path: str) -> None:
        """Undo a stage whose record is lost (or never was): unmount ``path`` only when
        the volume's own device is mounted there, and detach the volume only when no
        mount uses it any more. A foreign mount at the path stays."""
        sources = backend.connector.sources(local_id)
        entry = mount.find_mount(path)
        if entry is not None and mount.source_of(entry) in sources:
            mount.unmount(path)
        if not any(mount.users_of(source) for source in sources):
            backend.connector.detach(local_id)

    # -- publish --------------------------------------------------------------------

    def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodePublishVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        target = convert.path(request.target_path, "target_path")
        cap = self._capability(request)
        convert.path(request.staging_target_path, "staging_target_path")
        backend, local_id = self._route(request.volume_id)
        readonly = request.readonly or cap.access_mode.read_only
        if cap.mount_group and not self.mount_group:
            raise InvalidArgument(
                f"volume {request.volume_id}: volume_mount_group is not offered by this node plugin "
                "(start it with --volume-mount-group)"
            )
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            if staged is None or staged.staging_path != request.staging_target_path:
                raise FailedPrecondition(f"volume {request.volume_id} is not staged at {request.staging_target_path}")
            if staged.access_type is not cap.access_type:
                raise FailedPrecondition(f"volume {request.volume_id} is staged for {staged.access_type.value} access")
            if staged.shared_source:
                self._mend_staging(backend, local_id, staged, request, cap)
            entry = mount.find_mount(target)
            if entry is not None:
                if mount.source_of(entry) != staged.device:
                    raise FailedPrecondition(
                        f"{target} is a mount point of something other than volume {staged.volume_id}"
                    )
                if staged.targets.get(target, readonly) != readonly:
                    raise AlreadyExists(
                        f"volume {request.volume_id} is already published at {target} with other options"
                    )
                if not self._answers(request.volume_id, target, entry):
                    entry = None  # a bind of a stale mount, unmounted now: bound again below
            if entry is None:
                self._check_single_writer(staged, cap, target)
                self._bind(staged, cap, target, readonly)
            if cap.mount_group and cap.access_type is AccessType.MOUNT and not readonly:
                mount.give_group(target, cap.mount_group)
            staged.targets[target] = readonly
            self.state.save(staged)
        return pb.NodePublishVolumeResponse()

    def _mend_staging(
        self,
        backend: Backend,
        local_id: str,
        staged: StagedVolume,
        request: pb.NodePublishVolumeRequest,
        cap: Capability,
    ) -> None:
        """Mount a share's staging path again when its mount went stale (its server
        restarted) or is gone (a stage that unmounted a stale one failed to mount it
        again): the publish request carries what attaching needs, and a share's source is
        all a mount needs. Unavailable when its server does not answer; a foreign mount
        on the path is left alone."""
        path = staged.staging_path
        entry = mount.find_mount(path)
        if entry is not None and (
            mount.source_of(entry) != staged.device or self._answers(staged.volume_id, path, entry)
        ):
            return
        attach = AttachRequest(cap, dict(request.volume_context), dict(request.publish_context), request.secrets)
        attachment = backend.connector.attach(local_id, attach)
        if attachment.shown_as != staged.device:
            raise FailedPrecondition(
                f"volume {staged.volume_id} was staged from {staged.device} and is now {attachment.shown_as}: "
                f"its stale mount at {path} is unmounted; stage it again"
            )
        make_path(path, "staging_target_path")
        self._mount_share(attachment, path, staged.mount_flags, staged.access_mode.read_only)
        log.info("mounted %s again", path, extra={"volume_id": staged.volume_id})

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
            make_path(os.path.dirname(target), "target_path")
            if os.path.isdir(target):
                raise InvalidArgument(f"target_path {target!r} is a directory: a raw block volume is bound on a file")
            open(target, "a").close()
            source = staged.device
        else:
            make_path(target, "target_path")
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
        target = request.target_path
        convert.require(target, "target_path")
        if not target.startswith("/") or ".." in target.split("/"):
            convert.path(target, "target_path")  # raises, naming the problem
        if convert.path_problem(target):
            log.info("target_path of volume %s cannot exist on this host: nothing to unpublish", request.volume_id)
            return pb.NodeUnpublishVolumeResponse()
        # Only the ID's form is checked: unmounting needs no backend, so a pod can still be
        # torn down after its backend left the configuration.
        ref = ids.decode(request.volume_id)
        with self.inflight.hold(request.volume_id):
            staged = self.state.load(request.volume_id)
            recorded = staged is not None and target in staged.targets
            if recorded or self._publishes(target, staged, ref.backend, ref.local_id):
                mount.unmount(target)
                mount.remove_path(target)
            if staged is not None and staged.targets.pop(target, None) is not None:
                self.state.save(staged)
        return pb.NodeUnpublishVolumeResponse()

    def _publishes(self, target: str, staged: StagedVolume | None, backend_name: str, local_id: str) -> bool:
        """Whether the mount at ``target`` shows this volume (a publish whose record was
        lost). Without a record or a configured backend nothing proves it, and a mount
        that is not provably this driver's is never touched."""
        entry = mount.find_mount(target)
        if entry is None:
            return False
        if staged is not None:
            sources = [staged.device]
        elif (backend := self.registry.find(backend_name)) is not None:
            sources = backend.connector.sources(local_id)
        else:
            return False
        return mount.source_of(entry) in sources

    # -- stats and expansion --------------------------------------------------------

    def _staged_at(self, volume_id: str, path: str) -> StagedVolume:
        """The volume's record when it is staged or published at ``path``; NotFound
        otherwise, also for a path no host could have (the spec's code for a volume that
        is not at the path)."""
        problem = convert.path_problem(path)
        if problem:
            raise NotFound(f"volume {volume_id} is not at volume_path {path!r}: it {problem}")
        # A mount point exists; only another path is looked at (a stat of a dead share blocks).
        if mount.find_mount(path) is None and not os.path.exists(path):
            raise NotFound(f"path {path} of volume {volume_id} does not exist")
        staged = self.state.load(volume_id)
        if staged is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        known = {mount.canonical(p) for p in (staged.staging_path, *staged.targets)}
        if mount.canonical(path) not in known:
            raise NotFound(f"volume {volume_id} is not staged or published at {path}")
        return staged

    def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetVolumeStatsResponse:
        convert.require(request.volume_id, "volume_id")
        path = request.volume_path
        convert.require(path, "volume_path")
        if request.staging_target_path:
            convert.path(request.staging_target_path, "staging_target_path")
        backend, local_id = self._route(request.volume_id)
        staged = self._staged_at(request.volume_id, path)
        problems = []
        problem = backend.connector.problem(local_id)
        if problem:
            problems.append(problem)
        entry = mount.find_mount(path)
        if staged.access_type is AccessType.MOUNT and entry is None:
            problems.append(f"{path} is no longer mounted")
        if entry is not None and mount.is_network(entry):
            # Read in a child with a timeout: a dead server answers abnormal, never a hang.
            health = mount.probe(path, entry=entry)
            if health.stats is None:
                problems.append(health.message)
                # Zeros rather than nothing: the kubelet drops a response without usage,
                # and the condition with it.
                usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES)]
            else:
                usage = convert.usage(health.stats)
        elif stat.S_ISBLK(os.stat(path).st_mode):
            usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=mount.device_size(path))]
        else:
            usage = convert.usage(mount.filesystem_stats(path))
        condition = pb.VolumeCondition(abnormal=bool(problems), message="; ".join(problems) or "volume is healthy")
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def NodeExpandVolume(
        self, request: pb.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeExpandVolumeResponse:
        convert.require(request.volume_id, "volume_id")
        convert.require(request.volume_path, "volume_path")
        if request.staging_target_path:
            convert.path(request.staging_target_path, "staging_target_path")
        convert.capacity_range(request.capacity_range)
        if request.HasField("volume_capability"):
            convert.capability(request.volume_capability)
        backend, local_id = self._route(request.volume_id)
        with self.inflight.hold(request.volume_id):
            staged = self._staged_at(request.volume_id, request.volume_path)
            if staged.shared_source:
                # A share grows on its server; nothing on the node changes size.
                health = mount.health(staged.staging_path)
                if health.stats is None:
                    raise Unavailable(f"volume {request.volume_id}: {health.message}")
                capacity = health.stats.total_bytes
            else:
                backend.connector.refresh_size(local_id, staged.device, request.capacity_range.required_bytes)
                if staged.access_type is AccessType.MOUNT:
                    mount.grow_filesystem(staged.device, staged.staging_path, Filesystem(staged.filesystem))
                capacity = mount.device_size(staged.device)
        return pb.NodeExpandVolumeResponse(capacity_bytes=capacity)

    # -- node information -----------------------------------------------------------

    def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=c)) for c in self.capabilities]
        )

    def NodeGetInfo(self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(
            node_id=self.node_id,
            max_volumes_per_node=self.max_volumes,
            accessible_topology=pb.Topology(segments={TOPOLOGY_NODE_KEY: self.node_id}),
        )
