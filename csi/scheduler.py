"""Choosing a backend for a new volume: cinder-scheduler, translated.

A StorageClass picks candidates with ``backend: NAME`` or ``group: NAME`` (optional when
the driver serves a single backend). Candidates then pass filters, like Cinder's:

1. parameters: a candidate must understand every backend parameter in the class, and
   offer every feature its ``requires`` parameter lists (snapshots, clones, ...);
2. capabilities: it must offer every requested access mode and type;
3. content source: a clone or restore of a snapshot stays on the source's backend; a
   restore of a backup goes to any backend that fills volumes (``Capabilities.backups``);
4. topology: its volumes must be reachable from a requisite segment;
5. health: its last health check found nothing wrong, and it can tell its free space
   (Cinder leaves out a volume service that stopped reporting); UNAVAILABLE when none is;
6. capacity: it must have the requested bytes free.

Survivors are weighed: those matching an earlier preferred segment first, then the one
with the most free space. The controller tries them in that order, moving on when a
backend reports it is out of space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from csi.backends.base import Backend
from csi.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from csi.model import Capability, Secrets, Segment, reaches, segment_matches
from csi.parameters import PARAM_BACKEND, PARAM_GROUP, backend_parameters, check_keys, required_features
from csi.registry import Registry


@dataclass(frozen=True)
class PlacementRequest:
    parameters: Mapping[str, str]
    capabilities: tuple[Capability, ...]
    required_bytes: int
    requisite: tuple[Segment, ...] = ()
    preferred: tuple[Segment, ...] = ()
    source_backend: str | None = None
    source_kind: str | None = None
    skip: frozenset[str] = field(default_factory=frozenset)
    secrets: Secrets = field(default_factory=dict)


class Scheduler:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def select(self, parameters: Mapping[str, str]) -> list[Backend]:
        """The candidates a StorageClass names, before filtering."""
        name, group = parameters.get(PARAM_BACKEND), parameters.get(PARAM_GROUP)
        if name and group:
            raise InvalidArgument(f"give parameter {PARAM_BACKEND!r} or {PARAM_GROUP!r}, not both")
        if name:
            backend = self.registry.find(name)
            if backend is None:
                raise InvalidArgument(
                    f"backend {name!r} is not configured (configured: {', '.join(self.registry.names())})"
                )
            return [backend]
        if group:
            members = [b for b in self.registry if b.group == group]
            if not members:
                raise InvalidArgument(f"backend group {group!r} is not configured")
            return members
        if len(self.registry) == 1:
            return list(self.registry)
        raise InvalidArgument(
            f"parameter {PARAM_BACKEND!r} or {PARAM_GROUP!r} is required: this driver serves "
            f"{len(self.registry)} backends ({', '.join(self.registry.names())})"
        )

    def check_parameters(self, candidates: Sequence[Backend], parameters: Mapping[str, str]) -> list[Backend]:
        """Candidates that understand every backend parameter and offer every feature
        the class requires; a parameter no candidate understands is a mistake in the
        StorageClass, and so is a requirement none meets."""
        keys = set(backend_parameters(parameters))
        check_keys(keys, {k for b in candidates for k in b.volumes.volume_parameters}, candidates, "")
        wanted = required_features(parameters)
        fitting = [
            b
            for b in candidates
            if keys <= b.volumes.volume_parameters and all(b.capabilities.offers(f) for f in wanted)
        ]
        if wanted and not fitting:
            raise InvalidArgument(f"no backend of {', '.join(b.name for b in candidates)} offers {', '.join(wanted)}")
        return fitting

    def place(self, request: PlacementRequest) -> list[Backend]:
        candidates = self.check_parameters(self.select(request.parameters), request.parameters)
        candidates = [b for b in candidates if b.name not in request.skip]
        refusals: list[str] = []
        capable = []
        for backend in candidates:
            reasons = [r for r in (backend.capabilities.unsupported(c) for c in request.capabilities) if r]
            if request.source_kind == "backup":
                if not backend.capabilities.backups:
                    reasons.append("it cannot restore a backup (no block access)")
            elif request.source_kind and not backend.capabilities.offers(
                "snapshots" if request.source_kind == "snapshot" else "clones"
            ):
                reasons.append(f"it cannot make a volume from a {request.source_kind}")
            if request.source_backend and backend.name != request.source_backend:
                reasons.append(f"the content source lives on backend {request.source_backend!r}")
            if reasons:
                refusals.append(f"{backend.name}: {'; '.join(reasons)}")
            else:
                capable.append(backend)
        if not capable:
            raise InvalidArgument("no backend can provide this volume: " + " | ".join(refusals))
        reachable = [b for b in capable if self.reachable(b, request.requisite)]
        if not reachable:
            raise ResourceExhausted(
                "no backend is reachable from the requested topology "
                f"({', '.join(f'{b.name}: {list(b.volumes.topology)}' for b in capable)})"
            )
        free, unwell = self.free_space(reachable, request.secrets, request.requisite)
        if not free:
            raise Unavailable("no backend is healthy: " + " | ".join(unwell))
        roomy = [b for b in reachable if free.get(b.name, -1) >= request.required_bytes]
        if not roomy:
            detail = ", ".join([*(f"{name}: {size} free" for name, size in free.items()), *unwell])
            raise ResourceExhausted(f"no backend has {request.required_bytes} bytes free ({detail})")
        return sorted(roomy, key=lambda b: (self._preference(b, request.preferred), -free[b.name]))

    @staticmethod
    def free_space(
        backends: Sequence[Backend], secrets: Secrets, where: tuple[Segment, ...] = ()
    ) -> tuple[dict[str, int], list[str]]:
        """Free space of each healthy backend, and why the others were left out: a backend
        whose health check failed, or that cannot say how much room it has, gets nothing."""
        free: dict[str, int] = {}
        unwell: list[str] = []
        for backend in backends:
            problem = backend.volumes.health()
            if problem is None:
                try:
                    free[backend.name] = _free_in(backend, where, secrets)
                except (Unavailable, DeadlineExceeded) as exc:
                    problem = str(exc)
            if problem is not None:
                unwell.append(f"{backend.name}: {problem}")
        return free, unwell

    @staticmethod
    def reachable(backend: Backend, requisite: tuple[Segment, ...]) -> bool:
        if not requisite or not backend.volumes.topology:
            return True
        return any(segment_matches(s, r) for s in backend.volumes.topology for r in requisite)

    @staticmethod
    def _preference(backend: Backend, preferred: tuple[Segment, ...]) -> int:
        for rank, wanted in enumerate(preferred):
            if not backend.volumes.topology or any(segment_matches(s, wanted) for s in backend.volumes.topology):
                return rank
        return len(preferred)


def _free_in(backend: Backend, where: tuple[Segment, ...], secrets: Secrets) -> int:
    """The backend's free space in the best of the segments ``where`` names that it
    reaches (a node-local backend has as much room as its roomiest such node); anywhere
    when ``where`` is empty or the backend is usable everywhere."""
    segments = [s for s in where if reaches(backend.volumes.topology, s)] if backend.volumes.topology else []
    if not segments:
        return backend.volumes.free_bytes(secrets=secrets)
    return max(backend.volumes.free_bytes(s, secrets=secrets) for s in segments)
