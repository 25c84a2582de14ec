"""The contracts every backend implements.

A backend has two halves, like a Cinder volume driver and its os-brick connector, and a
declaration of what it offers:

* ``Capabilities`` says, once, what the backend can do: access types and modes,
  filesystems, snapshots, clones, expansion, whether volumes live on one node. The
  scheduler filters on it, the services derive what they advertise from it, and both
  halves are checked against it by the contract suite.
* ``VolumeBackend`` runs in the controller: it creates, deletes, grows, snapshots and
  clones volumes and tracks which nodes they are published to.
* ``SnapshotBlocks`` (optional, declared by ``Capabilities.blocks``) lets the controller
  read a snapshot's blocks and the ranges that hold data or changed between two
  snapshots (changed-block tracking, backups), and fill a new volume restored from a
  backup.
* ``NodeConnector`` runs on the node: it makes a published volume appear on this host,
  as a block device (which the node formats and mounts) or as a filesystem to mount as
  it is (a share), and takes it away again.

A process builds only the halves its role needs (``--mode``): a node plugin has no
``VolumeBackend``, a controller no ``NodeConnector``.

Every method is idempotent. Objects are named by their *local* ID (unique within the
backend); the services add and strip the backend name. Methods raise the domain errors
of ``csi.errors`` and never anything from grpc.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unimplemented
from csi.model import (
    NO_SECRETS,
    AccessMode,
    AccessType,
    BackupOrder,
    Capability,
    Extent,
    Filesystem,
    Secrets,
    Segment,
    Snapshot,
    Volume,
    VolumeSpec,
)


class Expansion(enum.Enum):
    NONE = "none"
    OFFLINE = "offline"
    """Only while no node has the volume staged."""
    ONLINE = "online"
    """Also while it is staged and published."""


# What a StorageClass may require of the backends it names (the ``requires`` parameter).
FEATURES = ("snapshots", "clones", "expansion", "online-expansion", "block", "shared")


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers."""

    access: Mapping[AccessType, frozenset[AccessMode]]
    """For each access type offered, the access modes offered with it."""
    filesystems: frozenset[Filesystem] = frozenset(Filesystem)
    """Filesystems the node may format on its volumes (none for a backend of shares)."""
    snapshots: bool = True
    clones: bool = True
    expansion: Expansion = Expansion.ONLINE
    node_expansion: bool = True
    """Whether the node must act after a controller expansion (grow a filesystem,
    refresh a device): ControllerExpandVolume's node_expansion_required."""
    node_local: bool = False
    """Volumes live on one node and are usable only there."""
    blocks: bool = False
    """The controller half implements ``SnapshotBlocks``: changed-block tracking, backups
    of its volumes and restores of backups onto it."""
    node_blocks: bool = False
    """The nodes that hold the volumes read and fill their blocks (a routed backend whose
    nodes declare ``blocks``; its controller half implements ``NodeBlocks``): backups of
    its volumes and restores of backups onto it, no changed-block tracking service."""
    refusals: Mapping[tuple[AccessType, AccessMode], str] = field(default_factory=dict)
    """Why a combination is not offered, where the reason helps the user."""

    def unsupported(self, capability: Capability) -> str | None:
        """Why ``capability`` is not offered, or None when it is."""
        modes = self.access.get(capability.access_type, frozenset())
        if capability.access_mode not in modes:
            reason = self.refusals.get((capability.access_type, capability.access_mode))
            if reason:
                return reason
            offered = ", ".join(sorted(m.value for m in modes)) or "none"
            return (
                f"{capability.access_type.value} access in mode {capability.access_mode.value} is not offered "
                f"(modes offered for {capability.access_type.value}: {offered})"
            )
        if capability.access_type is AccessType.MOUNT and capability.fs_type:
            offered_fs = {f.value for f in self.filesystems}
            if capability.fs_type not in offered_fs:
                return f"filesystem {capability.fs_type!r} is not offered (offered: {', '.join(sorted(offered_fs))})"
        return None

    @property
    def backups(self) -> bool:
        """Whether volumes of the backend can be backed up and backups restored onto it."""
        return self.blocks or self.node_blocks

    def offers(self, feature: str) -> bool:
        """Whether the backend offers one of FEATURES."""
        if feature == "snapshots":
            return self.snapshots
        if feature == "clones":
            return self.clones
        if feature == "expansion":
            return self.expansion is not Expansion.NONE
        if feature == "online-expansion":
            return self.expansion is Expansion.ONLINE
        if feature == "block":
            return AccessType.BLOCK in self.access
        if feature == "shared":
            return any(m.multi_node for modes in self.access.values() for m in modes)
        raise InvalidArgument(f"unknown feature {feature!r} (known: {', '.join(FEATURES)})")


class VolumeBackend(Protocol):
    @property
    def topology(self) -> tuple[Segment, ...]:
        """Where this backend's volumes can be used; empty means from every node."""

    volume_parameters: frozenset[str]
    """StorageClass parameters this backend understands (besides the services' own)."""

    snapshot_parameters: frozenset[str]
    """VolumeSnapshotClass parameters this backend understands; each one is honoured."""

    def health(self) -> str | None:
        """What is wrong with the backend now (unreachable, not writable), or None."""

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        """Space available now for new volumes usable in topology ``segment`` (None:
        anywhere the backend places volumes; a node-local backend answers for one of its
        nodes per segment); 0 for a segment the backend does not reach."""

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        """The largest volume this backend could create now in ``segment``."""

    def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create the volume named ``spec.name``, usable in one of ``spec.requisite``
        (when given) and in the earliest of ``spec.preferred`` it can; the volume's
        ``topology`` says where it is usable. When a volume of that name exists and
        matches the spec, return it; when it does not match, raise AlreadyExists. A
        source that does not exist is NotFound; a size the backend cannot give is
        OutOfRange. A failure at any step leaves nothing behind, and a retry after a
        crash finishes or cleans up what the crashed call began.

        A source of kind "backup" (only on a backend declaring ``Capabilities.blocks``)
        names no object of this backend: make a blank volume, record the source as given
        (a retry with another source is AlreadyExists) and report ``filling`` until
        ``fill_volume`` has written the content."""

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        """Delete the volume; it is not an error when no such volume exists."""

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        """The volume, or NotFound."""

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        """The volume created for request name ``name``, or None."""

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        """The volumes whose local ID sorts after ``after``, sorted by local ID, at most
        ``limit`` of them (0: all). A page costs what its entries cost where the backend
        keeps an ordered index (see ``page_of`` for the rest): the controller lists a
        page at a time, and the CO lists everything on every resync."""

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        """Grow the volume to at least ``required_bytes``; return the new capacity.
        Asking for less than the current size is not an error and changes nothing."""

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        """Take the snapshot named ``name`` of the volume. Idempotent on name; the same
        name for another source volume is AlreadyExists; a missing source is NotFound."""

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        """Delete the snapshot; it is not an error when no such snapshot exists."""

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        """The snapshot, or NotFound."""

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        """The snapshots whose local ID sorts after ``after``, sorted by local ID, at
        most ``limit`` of them (0: all)."""

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        """Record that ``node_id`` uses the volume and return the connection info the
        node needs (the publish context). Publishing again the same way returns the same
        answer; readonly differing from an existing publication is AlreadyExists; a
        single-node volume already published elsewhere is FailedPrecondition; a node that
        cannot reach the backend is NotFound."""

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        """Forget that ``node_id`` uses the volume; not an error if it did not."""

    def settle(self) -> None:
        """At a clean stop, with no call in flight: make durable and tidy what the
        backend keeps for a crash, so that its next start has nothing to mend (the local
        backend's journal). Nothing for a backend that keeps nothing of the kind; it does
        not end connections that the backend's own threads may still use."""


class BlockReader(Protocol):
    """A snapshot's content, open for reading."""

    @property
    def size(self) -> int:
        """The snapshot's size in bytes."""

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; fewer only where the snapshot ends."""


class BlockWriter(Protocol):
    """A new volume's content, open for writing."""

    @property
    def size(self) -> int:
        """The volume's size in bytes."""

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (within the volume's size)."""


class SnapshotBlocks(Protocol):
    """What backups and changed-block tracking need of a controller half that declares
    ``Capabilities.blocks``. Ranges are sorted, do not overlap, are merged where they
    touch, and lie within the snapshot's size; a range may hold zeros (a backend that
    cannot tell says more than it must), but a byte outside every range is known: zero
    for ``allocated``, unchanged for ``changed``."""

    def allocated(self, local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS) -> Iterator[Extent]:
        """The ranges of snapshot ``local_id`` that may hold data, from ``start`` on (a
        range that begins before it is cut to begin there). NotFound for no snapshot."""

    def changed(
        self, base_local_id: str, target_local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS
    ) -> Iterator[Extent]:
        """The ranges, from ``start`` on, where snapshot ``target_local_id`` may differ
        from the earlier snapshot ``base_local_id`` of the same volume (past the base's
        end when the volume grew). NotFound for either snapshot missing; InvalidArgument
        when they are not snapshots of one volume."""

    def read_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> AbstractContextManager[BlockReader]:
        """Snapshot ``local_id`` open for reading; NotFound when there is none."""

    def fill_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> AbstractContextManager[BlockWriter]:
        """Volume ``local_id``, made by ``create_volume`` from a source of kind "backup"
        (a blank volume of the backup's size, reported with ``filling`` set), open for
        writing its content. Leaving the block without an error makes the writes durable
        and clears ``filling``; an error leaves ``filling`` set, for a retry to write the
        content again. What is not written reads as zeros."""


class NodeBlocks(Protocol):
    """Block work done by the node that holds a volume, for a backend whose controller
    half reaches no node's storage (declared by ``Capabilities.node_blocks``). Restores
    need nothing here: the node fills a volume made from a backup before it reports the
    volume made."""

    def order_backup(self, snapshot_local_id: str, order: BackupOrder) -> None:
        """Ask the snapshot's node to copy it as ``order`` says (an order given before
        is kept: a retry finds it)."""

    def backup_progress(self, snapshot_local_id: str, backup_id: str) -> int | None:
        """The bytes of the snapshot the node has copied so far, or None once the backup
        is saved; raises the node's error when its copy failed (once: the next order
        starts it again)."""


@dataclass(frozen=True)
class AttachRequest:
    """What the node knows when it attaches a volume: how it will be used, what the
    controller said (the publish context, Cinder's connection info) and the CO's secrets."""

    capability: Capability
    volume_context: Mapping[str, str] = field(default_factory=dict)
    publish_context: Mapping[str, str] = field(default_factory=dict)
    secrets: Secrets = field(default_factory=dict)


@dataclass(frozen=True)
class Attachment:
    """What attaching made on this host: a block device, which the node formats (only
    when blank) and mounts, or binds for raw block access; or a filesystem to mount as it
    is (a share: ``source`` such as server:/export/dir, with its type and options)."""

    device: str = ""
    source: str = ""
    fstype: str = ""
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.device) == bool(self.source):
            raise ValueError("an attachment is a device or a filesystem source, exactly one")

    @property
    def shown_as(self) -> str:
        """What the mount table shows as the source of its mounts."""
        return self.device or self.source


class NodeConnector(Protocol):
    def health(self) -> str | None:
        """What keeps this node from attaching the backend's volumes now (a missing
        tool, an unreadable directory), or None. Never blocks."""

    def attach(self, local_id: str, request: AttachRequest) -> Attachment:
        """Make the volume usable on this host and say what was made; when it is
        attached already, return the existing attachment. A read-only capability
        attaches read-only where the backend can."""

    def detach(self, local_id: str) -> None:
        """Take the volume's device or filesystem away from this host; not attached is
        fine."""

    def sources(self, local_id: str) -> list[str]:
        """What the mount table shows for the volume's mounts on this host now (its block
        devices, or its filesystem source), attaching nothing. The node service uses
        them to tell its own mounts from anyone else's when its records are lost."""

    def refresh_size(self, local_id: str, device: str, size: int) -> None:
        """Make ``device`` show the volume's current size after a controller expand
        (called for device attachments only); ``size`` is what the CO expects it to show
        (0: not said), for a device that follows a resize on its own, in its own time."""

    def problem(self, local_id: str) -> str | None:
        """What is wrong with the volume's backing storage as this node sees it (its data
        gone; a thin pool nearly full), for volume health; None when nothing is."""


@dataclass(frozen=True)
class Routing:
    """What serving a node-local backend on many nodes needs to know of it, without
    building its controller half (which may touch the node's storage)."""

    rest: Callable[[str, str], str]
    """(kind, request name) -> the node-free part of the local ID the controller half
    gives that object on any node."""
    volume_parameters: frozenset[str]
    snapshot_parameters: frozenset[str]
    node_in_ids: bool = True
    """Whether the controller half's local IDs carry their node (``ids.with_node``);
    when not, the routed backend adds it on the way out and strips it on the way in."""


@dataclass(frozen=True)
class Backend:
    """One configured backend: its name (part of every ID it issues), its group, what
    it offers, and the halves this process's role built."""

    name: str
    kind: str
    group: str | None
    capabilities: Capabilities
    controller: VolumeBackend | None
    node: NodeConnector | None
    routing: Routing | None = None
    """For a node-local backend that can serve many nodes (see ``routed``); None for a
    backend that cannot."""

    @property
    def volumes(self) -> VolumeBackend:
        if self.controller is None:
            raise Unimplemented(f"backend {self.name!r}: this process does not serve the controller")
        return self.controller

    @property
    def blocks(self) -> SnapshotBlocks:
        """The controller half's block access; FailedPrecondition naming the backend when
        it offers none."""
        if not self.capabilities.blocks:
            raise FailedPrecondition(
                f"backend {self.name!r} ({self.kind}) cannot read snapshot blocks: no backups, "
                "restores from backups or changed-block tracking on it"
            )
        return cast(SnapshotBlocks, self.volumes)

    @property
    def node_blocks(self) -> NodeBlocks:
        """The controller half's way to the nodes' block work; FailedPrecondition naming
        the backend when it has none."""
        if not self.capabilities.node_blocks:
            raise FailedPrecondition(f"backend {self.name!r} ({self.kind}) has no node that reads its blocks")
        return cast(NodeBlocks, self.volumes)

    @property
    def connector(self) -> NodeConnector:
        if self.node is None:
            raise Unimplemented(f"backend {self.name!r}: this process does not serve the node")
        return self.node

    def health(self) -> str | None:
        """What is wrong with the halves this process runs, or None."""
        problems = [p for p in (h.health() for h in (self.controller, self.node) if h is not None) if p]
        return "; ".join(problems) or None


_Listed = TypeVar("_Listed", Volume, Snapshot)


def page_of(items: Iterable[_Listed], after: str = "", limit: int = 0) -> list[_Listed]:
    """One page of a listing, for a backend whose store answers only with everything
    (LVM's report of a volume group, a Kubernetes list): the items after ``after`` in
    local-ID order, at most ``limit`` (0: all). Costs the whole listing per page; a
    backend with an ordered index pages in the index instead."""
    found = sorted((item for item in items if item.local_id > after), key=lambda item: item.local_id)
    return found[:limit] if limit else found


def matching(volume: Volume, spec: VolumeSpec) -> Volume:
    """The volume a retried CreateVolume names, when the retry asks for what was made:
    the same name, content source and a size in the requested range; AlreadyExists
    naming the difference otherwise. Every backend answers retries through this."""
    if volume.name != spec.name:
        raise AlreadyExists(f"volume ID {volume.local_id} already belongs to {volume.name!r}")
    if volume.source != spec.source:
        raise AlreadyExists(f"volume {spec.name!r} exists with another content source")
    too_small = volume.capacity_bytes < spec.required_bytes
    too_large = bool(spec.limit_bytes) and volume.capacity_bytes > spec.limit_bytes
    if too_small or too_large:
        raise AlreadyExists(
            f"volume {spec.name!r} exists with {volume.capacity_bytes} bytes, outside the requested range"
        )
    return volume


def check_publication(
    local_id: str, published: Mapping[str, bool], node_id: str, capability: Capability, readonly: bool
) -> None:
    """The spec's rules for ControllerPublishVolume, given the nodes the volume is
    published to (node -> read-only): publishing again the same way is fine; the other
    read-only setting is AlreadyExists; a single-node mode published elsewhere is
    FailedPrecondition."""
    if node_id in published and published[node_id] != readonly:
        state = "read-only" if published[node_id] else "read-write"
        raise AlreadyExists(f"volume {local_id} is already published {state} to node {node_id!r}")
    others = sorted(set(published) - {node_id})
    if others and not capability.access_mode.multi_node:
        raise FailedPrecondition(
            f"volume {local_id} is {capability.access_mode.value} and already published to node(s) {', '.join(others)}"
        )
