"""The domain model: frozen dataclasses and enums shared by services and backends.

Nothing here knows about protobuf or gRPC; ``convert.py`` translates at the service edge.
Backends see volumes and snapshots by their *local* ID (unique within the backend); the
services turn local IDs into driver-wide IDs with ``ids.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

GiB = 1 << 30
MiB = 1 << 20

TOPOLOGY_NODE_KEY = "topology.cairn.csi.io/node"

Segment = Mapping[str, str]
"""One topology segment, for example {"topology.cairn.csi.io/node": "worker-1"}."""


def segment_matches(offered: Segment, requested: Segment) -> bool:
    """Whether a volume usable in ``offered`` is usable where ``requested`` says: every
    key the offer names has the requested value."""
    return all(requested.get(key) == value for key, value in offered.items())


def reaches(topology: tuple[Segment, ...], segment: Segment | None) -> bool:
    """Whether a backend (or volume) usable in ``topology`` (empty: everywhere) serves
    ``segment`` (None: anywhere)."""
    return segment is None or not topology or any(segment_matches(s, segment) for s in topology)


Secrets = Mapping[str, str]
"""The CSI secrets of a request (for Ceph: userID and userKey). Never logged."""
NO_SECRETS: Secrets = MappingProxyType({})


class AccessMode(enum.Enum):
    SINGLE_NODE_WRITER = "SINGLE_NODE_WRITER"
    SINGLE_NODE_READER_ONLY = "SINGLE_NODE_READER_ONLY"
    MULTI_NODE_READER_ONLY = "MULTI_NODE_READER_ONLY"
    MULTI_NODE_SINGLE_WRITER = "MULTI_NODE_SINGLE_WRITER"
    MULTI_NODE_MULTI_WRITER = "MULTI_NODE_MULTI_WRITER"
    SINGLE_NODE_SINGLE_WRITER = "SINGLE_NODE_SINGLE_WRITER"
    SINGLE_NODE_MULTI_WRITER = "SINGLE_NODE_MULTI_WRITER"

    @property
    def multi_node(self) -> bool:
        return self.name.startswith("MULTI_NODE")

    @property
    def read_only(self) -> bool:
        return self.name.endswith("READER_ONLY")


class AccessType(enum.Enum):
    MOUNT = "mount"
    BLOCK = "block"


class Filesystem(enum.Enum):
    EXT4 = "ext4"
    XFS = "xfs"


DEFAULT_FILESYSTEM = Filesystem.EXT4


@dataclass(frozen=True)
class Capability:
    """One requested volume capability: how the volume is accessed and by whom."""

    access_type: AccessType
    access_mode: AccessMode
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    mount_group: str = field(default="", compare=False)
    """The group a publication must give the volume (the pod's fsGroup; VOLUME_MOUNT_GROUP),
    or empty. Not part of what a capability is: two publications may give different groups."""


@dataclass(frozen=True)
class SourceRef:
    """The content source of a new volume: a snapshot or volume by local ID within the
    same backend, or a backup by its driver-wide snapshot ID (a backup lives in a
    repository, not in a backend, and restores onto any backend that can fill volumes)."""

    kind: Literal["snapshot", "volume", "backup"]
    local_id: str


@dataclass(frozen=True, order=True)
class Extent:
    """A byte range of a volume or snapshot."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class VolumeSpec:
    """What CreateVolume asks of a backend, validated and normalised by the service."""

    name: str
    required_bytes: int
    limit_bytes: int
    capabilities: tuple[Capability, ...]
    parameters: Mapping[str, str] = field(default_factory=dict)
    source: SourceRef | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)
    requisite: tuple[Segment, ...] = ()
    """Where the volume must be usable (one of these segments); empty: anywhere."""
    preferred: tuple[Segment, ...] = ()
    """Where it should be usable, best first."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """What the CO says about the claim (``csi.storage.k8s.io/pvc/name``, ``.../pvc/namespace``,
    ``.../pv/name``, passed with the external-provisioner's --extra-create-metadata)."""


@dataclass(frozen=True)
class VolumeCondition:
    abnormal: bool
    message: str


HEALTHY = VolumeCondition(False, "volume is healthy")


@dataclass(frozen=True)
class Volume:
    local_id: str
    name: str
    capacity_bytes: int
    source: SourceRef | None = None
    context: Mapping[str, str] = field(default_factory=dict)
    topology: tuple[Segment, ...] = ()
    published_nodes: tuple[str, ...] = ()
    condition: VolumeCondition = field(default_factory=lambda: HEALTHY)
    filling: bool = False
    """Made from a backup whose content is not all written yet (see ``SnapshotBlocks``)."""


@dataclass(frozen=True)
class Snapshot:
    local_id: str
    name: str
    source_volume_local_id: str
    size_bytes: int
    created_at: float
    ready: bool = True


@dataclass(frozen=True)
class BackupOrder:
    """One backup's copy, for whoever reads the snapshot's blocks: the controller, or the
    node that holds a routed backend's volume. The snapshot is taken before the order."""

    repository: str
    backup_id: str
    """Repository-local ID of the backup (``backup.engine.backup_id``)."""
    name: str
    """The request name the backup is made for."""
    volume_id: str
    """Driver-wide ID of the volume backed up."""
    snapshot_id: str
    """Driver-wide ID of the backend snapshot to copy (kept as the next backup's base)."""
    base: str = ""
    """Local ID of the previous backup's snapshot to diff against ("": read what the
    snapshot holds)."""
    parent: str = ""
    """The backup ID of that previous backup ("" with no base)."""
    started: float = 0.0


@dataclass(frozen=True)
class FilesystemStats:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    available_inodes: int
    used_inodes: int
