"""The contracts every backend implements.

A backend has two halves, like a Cinder volume driver and its os-brick connector:

* ``VolumeBackend`` runs in the controller: it creates, deletes, grows, snapshots and
  clones volumes and tracks which nodes they are published to.
* ``NodeConnector`` runs on the node: it makes a published volume appear as a block
  device on this host and takes it away again.

Every method is idempotent. Objects are named by their *local* ID (unique within the
backend); the services add and strip the backend name. Methods raise the domain errors
of ``csi.errors`` and never anything from grpc.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from csi.model import NO_SECRETS, Capability, Secrets, Segment, Snapshot, Volume, VolumeSpec


class VolumeBackend(Protocol):
    topology: tuple[Segment, ...]
    """Where this backend's volumes can be used; empty means from every node."""

    parameter_keys: frozenset[str]
    """StorageClass and VolumeSnapshotClass parameters this backend understands."""

    def unsupported(self, capability: Capability) -> str | None:
        """Why this backend cannot offer ``capability``, or None when it can."""

    def health(self) -> str | None:
        """What is wrong with the backend now (unreachable, not writable), or None."""

    def free_bytes(self, *, secrets: Secrets = NO_SECRETS) -> int:
        """Space available for new volumes now."""

    def max_volume_bytes(self, *, secrets: Secrets = NO_SECRETS) -> int:
        """The largest volume this backend could create now."""

    def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create the volume named ``spec.name``. When a volume of that name exists and
        matches the spec, return it; when it does not match, raise AlreadyExists. A
        source that does not exist is NotFound; a size the backend cannot give is
        OutOfRange. A failure at any step leaves nothing behind, and a retry after a
        crash finishes or cleans up what the crashed call began."""

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        """Delete the volume; it is not an error when no such volume exists."""

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        """The volume, or NotFound."""

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        """The volume created for request name ``name``, or None."""

    def list_volumes(self, *, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        """Every volume, sorted by local ID."""

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

    def list_snapshots(self, *, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        """Every snapshot, sorted by local ID."""

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


class NodeConnector(Protocol):
    def attach(self, local_id: str, publish_context: Mapping[str, str], *, secrets: Secrets = NO_SECRETS) -> str:
        """Make the volume a block device on this host and return its path; when it is
        attached already, return the existing device."""

    def detach(self, local_id: str) -> None:
        """Remove the volume's block device from this host; not attached is fine."""

    def devices(self, local_id: str) -> list[str]:
        """The block devices on this host that carry the volume now, attaching nothing.
        The node service uses them to tell its own mounts from anyone else's when its
        records are lost."""

    def refresh_size(self, local_id: str, device: str) -> None:
        """Make ``device`` show the volume's current size after a controller expand."""

    def present(self, local_id: str) -> bool:
        """Whether the volume's backing data still exists, for volume health."""


@dataclass(frozen=True)
class Backend:
    """One configured backend: its name (part of every ID it issues), its group, and
    its two halves."""

    name: str
    kind: str
    group: str | None
    volumes: VolumeBackend
    connector: NodeConnector
