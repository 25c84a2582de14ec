"""An in-memory backend for the tests that need a backend but not its storage: the
service tests, and the contract suite's reference subject.

``FakeVolumes`` implements the whole ``VolumeBackend`` protocol with the rules the real
backends follow (idempotent by name, AlreadyExists on a mismatch, NotFound for a missing
source, deletes of what is gone succeed, snapshots that outlive their source, the
publication rules of local and rbd), over a pool of ``size_limit`` bytes: every volume
and snapshot takes its full size, so free space shrinks as they are made and a full pool
is ResourceExhausted. It honours the ``Capabilities`` it is given: a fake declared
without snapshots takes none (Unimplemented), so a service that forgets to check is
caught. Use ``fake_backend`` to get one wrapped in a ``Backend``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from csi.backends.base import Backend, Capabilities, Expansion, check_publication, matching, page_of
from csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)
from csi.model import (
    NO_SECRETS,
    AccessMode,
    AccessType,
    Capability,
    GiB,
    Secrets,
    Segment,
    Snapshot,
    SourceRef,
    Volume,
    VolumeSpec,
    reaches,
)
from csi.sizes import choose_size

FAKE_CAPABILITIES = Capabilities(access={kind: frozenset(AccessMode) for kind in AccessType})
"""Everything: both access types in every mode, snapshots, clones, online expansion."""

DEFAULT_SIZE_LIMIT = 64 * GiB


@dataclass
class _Record:
    volume: Volume
    published: dict[str, bool] = field(default_factory=dict)
    """Node -> published read-only."""


class FakeVolumes:
    """An in-memory ``VolumeBackend``; see the module docstring for its rules."""

    def __init__(
        self,
        *,
        capabilities: Capabilities = FAKE_CAPABILITIES,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        topology: tuple[Segment, ...] = (),
        nodes: Iterable[str] | None = None,
        volume_parameters: Iterable[str] = (),
        snapshot_parameters: Iterable[str] = (),
        reports_free: int | None = None,
        problem: str | None = None,
    ) -> None:
        """``nodes`` are the nodes that can reach the backend (None: every node);
        ``reports_free`` is what ``free_bytes`` answers instead of the truth, like a pool
        whose statistics lag behind what it holds; ``problem`` is what ``health`` says."""
        self.capabilities = capabilities
        self.size_limit = size_limit
        self.topology: tuple[Segment, ...] = tuple(topology)
        self.nodes = None if nodes is None else frozenset(nodes)
        self.volume_parameters: frozenset[str] = frozenset(volume_parameters)
        self.snapshot_parameters: frozenset[str] = frozenset(snapshot_parameters)
        self.reports_free = reports_free
        self.problem = problem
        self.calls: list[str] = []
        self.specs: list[VolumeSpec] = []
        """Every CreateVolume request, as the backend received it."""
        """The name of every method that changes something, in the order it was called."""
        self._volumes: dict[str, _Record] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._lock = threading.RLock()

    # -- capacity -------------------------------------------------------------------

    def settle(self) -> None:
        """Nothing to settle: the fake keeps everything in memory."""

    def health(self) -> str | None:
        return self.problem

    def _free(self) -> int:
        used = sum(r.volume.capacity_bytes for r in self._volumes.values())
        used += sum(s.size_bytes for s in self._snapshots.values())
        return max(0, self.size_limit - used)

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        if not reaches(self.topology, segment):
            return 0
        with self._lock:
            return self._free() if self.reports_free is None else self.reports_free

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return self.free_bytes(segment, secrets=secrets)

    def _take(self, size: int, what: str) -> None:
        free = self._free()
        if size > free:
            raise ResourceExhausted(f"fake backend: {what} needs {size} bytes, {free} free")

    # -- volumes --------------------------------------------------------------------

    def create_volume(self, spec: VolumeSpec) -> Volume:
        with self._lock:
            self.calls.append("create_volume")
            self.specs.append(spec)
            self._check_parameters(spec.parameters, self.volume_parameters, "")
            existing = self._by_name(spec.name)
            if existing is not None:
                return matching(existing, spec)
            minimum = self._source_size(spec.source)
            size = choose_size(spec.required_bytes, spec.limit_bytes, minimum)
            self._take(size, f"volume {spec.name!r}")
            local_id = f"vol-{uuid.uuid4()}"
            volume = Volume(
                local_id=local_id, name=spec.name, capacity_bytes=size, source=spec.source, topology=self.topology
            )
            self._volumes[local_id] = _Record(volume)
            return volume

    def _by_name(self, name: str) -> Volume | None:
        return next((r.volume for r in self._volumes.values() if r.volume.name == name), None)

    def _source_size(self, source: SourceRef | None) -> int:
        if source is None:
            return 0
        if source.kind == "snapshot":
            if not self.capabilities.snapshots:
                raise Unimplemented("fake backend: declared without snapshots, so it restores none")
            snapshot = self._snapshots.get(source.local_id)
            if snapshot is None:
                raise NotFound(f"source snapshot {source.local_id!r} does not exist")
            return snapshot.size_bytes
        if not self.capabilities.clones:
            raise Unimplemented("fake backend: declared without clones, so it clones nothing")
        record = self._volumes.get(source.local_id)
        if record is None:
            raise NotFound(f"source volume {source.local_id!r} does not exist")
        return record.volume.capacity_bytes

    @staticmethod
    def _check_parameters(parameters: Mapping[str, str], declared: frozenset[str], what: str) -> None:
        """The services pass on only the keys a backend declared; anything else here
        is a bug in a service."""
        unknown = sorted(set(parameters) - declared)
        if unknown:
            raise InvalidArgument(f"fake backend: undeclared {what}parameter(s) {unknown} reached the backend")

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        with self._lock:
            self.calls.append("delete_volume")
            record = self._volumes.get(local_id)
            if record is None:
                return
            if record.published:
                nodes = ", ".join(sorted(record.published))
                raise FailedPrecondition(f"volume {local_id} is still published to node(s) {nodes}")
            del self._volumes[local_id]

    def _record(self, local_id: str) -> _Record:
        record = self._volumes.get(local_id)
        if record is None:
            raise NotFound(f"volume {local_id!r} does not exist")
        return record

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        with self._lock:
            return self._record(local_id).volume

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        with self._lock:
            return self._by_name(name)

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        with self._lock:
            return page_of((record.volume for record in self._volumes.values()), after, limit)

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        with self._lock:
            self.calls.append("expand_volume")
            if self.capabilities.expansion is Expansion.NONE:
                raise Unimplemented("fake backend: declared without expansion, so it grows nothing")
            record = self._record(local_id)
            current = record.volume.capacity_bytes
            if required_bytes <= current:
                return current
            size = choose_size(required_bytes, limit_bytes)
            if size - current > self._free():
                raise OutOfRange(
                    f"volume {local_id}: growing to {size} bytes needs {size - current} more, {self._free()} free"
                )
            if self.capabilities.expansion is Expansion.OFFLINE and record.published:
                raise FailedPrecondition(f"volume {local_id} grows only while unpublished")
            record.volume = replace(record.volume, capacity_bytes=size)
            return size

    # -- snapshots ------------------------------------------------------------------

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        with self._lock:
            self.calls.append("create_snapshot")
            if not self.capabilities.snapshots:
                raise Unimplemented("fake backend: declared without snapshots, so it takes none")
            self._check_parameters(parameters, self.snapshot_parameters, "snapshot ")
            existing = next((s for s in self._snapshots.values() if s.name == name), None)
            if existing is not None:
                if existing.source_volume_local_id != source_local_id:
                    raise AlreadyExists(f"snapshot {name!r} exists for another source volume")
                return existing
            source = self._volumes.get(source_local_id)
            if source is None:
                raise NotFound(f"source volume {source_local_id!r} does not exist")
            size = source.volume.capacity_bytes
            self._take(size, f"snapshot {name!r}")
            snapshot = Snapshot(
                local_id=f"snap-{uuid.uuid4()}",
                name=name,
                source_volume_local_id=source_local_id,
                size_bytes=size,
                created_at=time.time(),
            )
            self._snapshots[snapshot.local_id] = snapshot
            return snapshot

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        with self._lock:
            self.calls.append("delete_snapshot")
            self._snapshots.pop(local_id, None)

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        with self._lock:
            snapshot = self._snapshots.get(local_id)
        if snapshot is None:
            raise NotFound(f"snapshot {local_id!r} does not exist")
        return snapshot

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        with self._lock:
            return page_of(self._snapshots.values(), after, limit)

    # -- publication ----------------------------------------------------------------

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        with self._lock:
            self.calls.append("publish_volume")
            record = self._record(local_id)
            if self.nodes is not None and node_id not in self.nodes:
                raise NotFound(f"node {node_id!r} cannot reach volume {local_id}")
            published = record.published
            check_publication(local_id, published, node_id, capability, readonly)
            if node_id not in published:
                published[node_id] = readonly
                record.volume = replace(record.volume, published_nodes=tuple(sorted(published)))
            return {"volume": local_id}

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        with self._lock:
            self.calls.append("unpublish_volume")
            record = self._volumes.get(local_id)
            if record is None or node_id not in record.published:
                return
            del record.published[node_id]
            record.volume = replace(record.volume, published_nodes=tuple(sorted(record.published)))


def fake_backend(
    name: str,
    group: str | None = None,
    capabilities: Capabilities = FAKE_CAPABILITIES,
    *,
    size_limit: int = DEFAULT_SIZE_LIMIT,
    topology: tuple[Segment, ...] = (),
    nodes: Iterable[str] | None = None,
    volume_parameters: Iterable[str] = (),
    snapshot_parameters: Iterable[str] = (),
    reports_free: int | None = None,
    problem: str | None = None,
) -> Backend:
    """A ``Backend`` serving the controller with a new ``FakeVolumes`` that honours
    ``capabilities`` (the other arguments are ``FakeVolumes``')."""
    volumes = FakeVolumes(
        capabilities=capabilities,
        size_limit=size_limit,
        topology=topology,
        nodes=nodes,
        volume_parameters=volume_parameters,
        snapshot_parameters=snapshot_parameters,
        reports_free=reports_free,
        problem=problem,
    )
    return Backend(name, "fake", group, capabilities, volumes, None)


def fake_volumes(backend: Backend) -> FakeVolumes:
    """The ``FakeVolumes`` of a backend made by ``fake_backend``."""
    assert isinstance(backend.controller, FakeVolumes)
    return backend.controller
