"""Protobuf <-> domain model, and the field checks every service shares.

Protobuf stops here: services hand the domain objects built here to the scheduler and
backends, and build their answers from domain objects with the functions below."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from csi import ids
from csi.errors import InvalidArgument
from csi.generated import csi_pb2 as pb
from csi.model import AccessMode, AccessType, Capability, FilesystemStats, Segment, Snapshot, SourceRef, Volume


def require(value: object, field: str) -> None:
    """InvalidArgument naming ``field`` when it is empty or unset."""
    if not value:
        raise InvalidArgument(f"{field} is required")


# Longest path the kernel takes (PATH_MAX counts the final NUL), longest name in it, and
# the deepest nesting accepted: kubelet's paths are a dozen levels deep.
PATH_MAX = 4095
NAME_MAX = 255
PATH_DEPTH = 128


def name(value: str, field: str) -> str:
    """A request name: required, and without control characters (backends key journals
    and records by it, and a NUL would make two names one)."""
    require(value, field)
    bad = sorted({f"{ord(c):#04x}" for c in value if ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise InvalidArgument(f"{field} {value!r} contains control characters ({', '.join(bad)})")
    return value


def path(value: str, field: str) -> str:
    """``value`` when it is an absolute path the host can take; InvalidArgument naming
    ``field`` otherwise (empty, relative, NUL, too long or too deep, or with '..')."""
    require(value, field)
    problem = path_problem(value)
    if problem:
        raise InvalidArgument(f"{field} {value!r} {problem}")
    return value


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot be a path of a CSI call, or None."""
    if not value.startswith("/"):
        return "must be an absolute path"
    if "\0" in value:
        return "contains a NUL character"
    if len(value.encode()) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes"
    names = [n for n in value.split("/") if n]
    if len(names) > PATH_DEPTH:
        return f"is nested deeper than {PATH_DEPTH} levels"
    if any(len(n.encode()) > NAME_MAX for n in names):
        return f"has a name longer than {NAME_MAX} bytes"
    if ".." in names:
        return "must not contain '..'"
    return None


MAX_GID = (1 << 31) - 1
MOUNT_OPTIONS_MAX = 4095
"""Bytes of mount options, joined by commas, the kernel takes (one page, its NUL counted)."""


def capability(message: pb.VolumeCapability, field: str = "volume_capability") -> Capability:
    if not message.HasField("access_mode") or message.access_mode.mode == pb.VolumeCapability.AccessMode.UNKNOWN:
        raise InvalidArgument(f"{field}.access_mode is required")
    number = message.access_mode.mode
    if number not in pb.VolumeCapability.AccessMode.Mode.values():
        raise InvalidArgument(f"{field}.access_mode.mode {number} is not a CSI access mode")
    mode = AccessMode(pb.VolumeCapability.AccessMode.Mode.Name(number))
    kind = message.WhichOneof("access_type")
    if kind == "block":
        return Capability(AccessType.BLOCK, mode)
    if kind == "mount":
        group = message.mount.volume_mount_group
        if group and not (group.isdigit() and group.isascii() and int(group) <= MAX_GID):
            raise InvalidArgument(f"{field}.mount.volume_mount_group {group[:64]!r} is not a numeric group ID")
        flags = tuple(message.mount.mount_flags)
        joined = len(",".join(flags).encode())
        if joined > MOUNT_OPTIONS_MAX:
            raise InvalidArgument(
                f"{field}.mount.mount_flags hold {joined} bytes; the kernel takes at most {MOUNT_OPTIONS_MAX} bytes "
                "of mount options"
            )
        if any("\0" in flag for flag in flags):
            raise InvalidArgument(f"{field}.mount.mount_flags must not hold a NUL byte")
        return Capability(AccessType.MOUNT, mode, message.mount.fs_type, flags, group)
    raise InvalidArgument(f"{field}.access_type (mount or block) is required")


def capabilities(messages: Iterable[pb.VolumeCapability], field: str = "volume_capabilities") -> tuple[Capability, ...]:
    result = tuple(capability(m, f"{field}[{i}]") for i, m in enumerate(messages))
    require(result, field)
    return result


def capacity_range(message: pb.CapacityRange) -> tuple[int, int]:
    required, limit = message.required_bytes, message.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"capacity_range.required_bytes {required} exceeds limit_bytes {limit}")
    return required, limit


def content_source(message: pb.VolumeContentSource) -> tuple[ids.ObjectId, SourceRef] | None:
    kind = message.WhichOneof("type")
    if kind is None:
        return None
    if kind == "snapshot":
        require(message.snapshot.snapshot_id, "volume_content_source.snapshot.snapshot_id")
        ref = ids.decode(message.snapshot.snapshot_id, "snapshot")
        return ref, SourceRef("snapshot", ref.local_id)
    require(message.volume.volume_id, "volume_content_source.volume.volume_id")
    ref = ids.decode(message.volume.volume_id, "volume")
    return ref, SourceRef("volume", ref.local_id)


def segments(messages: Iterable[pb.Topology]) -> tuple[Segment, ...]:
    return tuple(dict(m.segments) for m in messages)


def topology(segment: Segment) -> pb.Topology:
    return pb.Topology(segments=dict(segment))


def volume(backend: str, vol: Volume, context: Mapping[str, str]) -> pb.Volume:
    message = pb.Volume(
        volume_id=ids.encode(backend, vol.local_id),
        capacity_bytes=vol.capacity_bytes,
        volume_context={**context, **vol.context},
        accessible_topology=[topology(s) for s in vol.topology],
    )
    if vol.source is not None:
        # A backup source is named by its driver-wide ID already (it is no object of
        # the volume's backend).
        source_id = vol.source.local_id if vol.source.kind == "backup" else ids.encode(backend, vol.source.local_id)
        if vol.source.kind in ("snapshot", "backup"):
            message.content_source.snapshot.snapshot_id = source_id
        else:
            message.content_source.volume.volume_id = source_id
    return message


def volume_condition(vol: Volume) -> pb.VolumeCondition:
    return pb.VolumeCondition(abnormal=vol.condition.abnormal, message=vol.condition.message)


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def snapshot(backend: str, snap: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(
        snapshot_id=ids.encode(backend, snap.local_id),
        source_volume_id=ids.encode(backend, snap.source_volume_local_id),
        size_bytes=snap.size_bytes,
        creation_time=timestamp(snap.created_at),
        ready_to_use=snap.ready,
    )


def backup(repository: str, snap: Snapshot) -> pb.Snapshot:
    """A backup as a snapshot: its source volume is named by a driver-wide ID, as it
    lives in a backend, not in the repository."""
    return pb.Snapshot(
        snapshot_id=ids.encode(repository, snap.local_id),
        source_volume_id=snap.source_volume_local_id,
        size_bytes=snap.size_bytes,
        creation_time=timestamp(snap.created_at),
        ready_to_use=snap.ready,
    )


def usage(stats: FilesystemStats) -> list[pb.VolumeUsage]:
    return [
        pb.VolumeUsage(
            unit=pb.VolumeUsage.BYTES,
            total=stats.total_bytes,
            available=stats.available_bytes,
            used=stats.used_bytes,
        ),
        pb.VolumeUsage(
            unit=pb.VolumeUsage.INODES,
            total=stats.total_inodes,
            available=stats.available_inodes,
            used=stats.used_inodes,
        ),
    ]
