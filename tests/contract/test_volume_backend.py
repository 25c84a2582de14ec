"""The ``VolumeBackend`` contract, once, for every backend: what the services and the
Kubernetes sidecars rely on whichever backend serves a call. Each test starts from an
empty backend and must leave it empty (the ``subject`` fixture checks)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

import pytest

from csi.backends.base import FEATURES, Expansion
from csi.errors import AlreadyExists, CairnError, FailedPrecondition, NotFound, OutOfRange
from csi.model import AccessMode, AccessType, Capability, MiB, Snapshot, SourceRef, Volume
from csi.parameters import KUBERNETES_PREFIX, SERVICE_PARAMETERS
from tests.contract.conftest import RWO, SIZE, Subject

T = TypeVar("T")

GARBAGE = (
    "nonsense",
    "-",
    "../../../etc/passwd",
    "vol-../../../etc/passwd",
    "cairn/../../etc/passwd",
    "vol-00000000-0000-0000-0000-00000000000g",
    "no-such-pool/00000000-0000-0000-0000-000000000000",
    "cairn/00000000-0000-0000-0000-000000000000/extra",
    "x" * 120,
    "%00%2e%2e",
)
"""Local IDs no backend issues: a client can send any of them inside a well-formed ID."""


# -- helpers ------------------------------------------------------------------------------


def needs(subject: Subject, feature: str) -> None:
    if not subject.capabilities.offers(feature):
        pytest.skip(f"{subject.kind} does not declare {feature}")


def ghost_volume(subject: Subject, name: str = "ghost") -> str:
    """The local ID of a volume that existed and is gone: well-formed, and missing."""
    volume = subject.volumes.create_volume(subject.spec(name))
    subject.volumes.delete_volume(volume.local_id, secrets=subject.secrets)
    return volume.local_id


def ghost_snapshot(subject: Subject) -> str:
    source = subject.volumes.create_volume(subject.spec("ghost-source"))
    snapshot = snap(subject, "ghost-snapshot", source.local_id)
    subject.volumes.delete_snapshot(snapshot.local_id, secrets=subject.secrets)
    subject.volumes.delete_volume(source.local_id, secrets=subject.secrets)
    return snapshot.local_id


def snap(subject: Subject, name: str, source: str) -> Snapshot:
    return subject.volumes.create_snapshot(name, source, subject.snapshot_parameters, secrets=subject.secrets)


def delete(subject: Subject, *objects: Volume | Snapshot) -> None:
    for item in objects:
        if isinstance(item, Snapshot):
            subject.volumes.delete_snapshot(item.local_id, secrets=subject.secrets)
        else:
            subject.volumes.delete_volume(item.local_id, secrets=subject.secrets)


def volume_ids(subject: Subject) -> list[str]:
    return [v.local_id for v in subject.volumes.list_volumes(secrets=subject.secrets)]


def snapshot_ids(subject: Subject) -> list[str]:
    return [s.local_id for s in subject.volumes.list_snapshots(secrets=subject.secrets)]


@contextmanager
def leaves_nothing(subject: Subject, name: str) -> Iterator[None]:
    """The block fails, and leaves the backend as it was: no volume of ``name``."""
    before_volumes, before_snapshots = volume_ids(subject), snapshot_ids(subject)
    yield
    assert subject.volumes.lookup_volume(name, secrets=subject.secrets) is None
    assert volume_ids(subject) == before_volumes
    assert snapshot_ids(subject) == before_snapshots


def check_volume(subject: Subject, volume: Volume, name: str) -> None:
    """What every volume a backend answers with must satisfy."""
    assert volume.name == name
    assert isinstance(volume.capacity_bytes, int) and volume.capacity_bytes > 0
    assert all(segment in subject.volumes.topology for segment in volume.topology), (
        "a volume lives where its backend does"
    )
    if subject.volumes.topology:
        assert volume.topology, "a backend with a topology must tell where each of its volumes is reachable"
    assert list(volume.published_nodes) == sorted(set(volume.published_nodes))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in volume.context.items())


def walk(
    listing: Callable[[str, int], Sequence[T]], key: Callable[[T], str], between: Callable[[], object] | None = None
) -> list[str]:
    """Page through a backend's listing two entries at a time, as ListVolumes does, each
    page after the last ID of the one before (``between`` runs between pages)."""
    seen: list[str] = []
    after = ""
    while True:
        page = listing(after, 2)
        assert len(page) <= 2, "a page holds at most the limit"
        seen += [key(item) for item in page]
        if len(page) < 2:
            return seen
        after = key(page[-1])
        if between is not None:
            between()


# -- declarations -------------------------------------------------------------------------


def test_declared_parameters_are_frozensets_of_the_backends_own_keys(subject: Subject) -> None:
    for declared in (subject.volumes.volume_parameters, subject.volumes.snapshot_parameters):
        assert isinstance(declared, frozenset)
        assert all(isinstance(key, str) and key for key in declared)
        assert not declared & SERVICE_PARAMETERS, "the services read these keys themselves"
        assert not any(key.startswith(KUBERNETES_PREFIX) for key in declared), "the sidecars' keys never reach it"
    assert set(subject.parameters) <= subject.volumes.volume_parameters
    assert set(subject.snapshot_parameters) <= subject.volumes.snapshot_parameters


def test_topology_and_health(subject: Subject) -> None:
    topology = subject.volumes.topology
    assert isinstance(topology, tuple)
    assert all(all(isinstance(k, str) and isinstance(v, str) for k, v in s.items()) for s in topology)
    assert subject.volumes.health() is None, "a working backend reports nothing wrong"


def test_capacity_is_a_non_negative_int(subject: Subject) -> None:
    for secrets in (subject.secrets, {}):  # GetCapacity carries no secret
        free = subject.volumes.free_bytes(secrets=secrets)
        largest = subject.volumes.max_volume_bytes(secrets=secrets)
        assert type(free) is int and free >= 0
        assert type(largest) is int and largest >= 0


# -- create and delete --------------------------------------------------------------------


def test_create_is_idempotent_on_name(subject: Subject) -> None:
    volume = subject.volumes.create_volume(subject.spec("pvc-1"))
    check_volume(subject, volume, "pvc-1")
    assert volume.capacity_bytes >= SIZE and volume.source is None and volume.published_nodes == ()
    assert subject.volumes.create_volume(subject.spec("pvc-1")) == volume
    assert subject.volumes.create_volume(subject.spec("pvc-1", size=SIZE // 2, limit=SIZE)) == volume
    assert subject.volumes.get_volume(volume.local_id, secrets=subject.secrets) == volume
    assert subject.volumes.lookup_volume("pvc-1", secrets=subject.secrets) == volume
    assert subject.volumes.list_volumes(secrets=subject.secrets) == [volume]
    delete(subject, volume)


def test_sizes_follow_the_capacity_range(subject: Subject) -> None:
    ranged = subject.volumes.create_volume(subject.spec("ranged", size=5 * MiB + 1, limit=8 * MiB))
    assert 5 * MiB + 1 <= ranged.capacity_bytes <= 8 * MiB
    capped = subject.volumes.create_volume(subject.spec("capped", size=0, limit=4 * MiB))
    assert 0 < capped.capacity_bytes <= 4 * MiB, "no required size: a default that respects the limit"
    with leaves_nothing(subject, "impossible"), pytest.raises(OutOfRange):
        subject.volumes.create_volume(subject.spec("impossible", size=MiB + 1, limit=MiB + 2))
    delete(subject, ranged, capped)


def test_same_name_with_another_size_is_already_exists(subject: Subject) -> None:
    volume = subject.volumes.create_volume(subject.spec("pvc-1"))
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("pvc-1", size=volume.capacity_bytes + 8 * MiB))
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("pvc-1", size=MiB, limit=volume.capacity_bytes - MiB))
    assert subject.volumes.list_volumes(secrets=subject.secrets) == [volume], "the volume is left as it was"
    delete(subject, volume)


def test_same_name_with_another_volume_source_is_already_exists(subject: Subject) -> None:
    needs(subject, "clones")
    a = subject.volumes.create_volume(subject.spec("a"))
    b = subject.volumes.create_volume(subject.spec("b"))
    clone = subject.volumes.create_volume(subject.spec("clone", source=SourceRef("volume", a.local_id)))
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("clone"))
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("clone", source=SourceRef("volume", b.local_id)))
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("a", source=SourceRef("volume", b.local_id)))
    assert subject.volumes.create_volume(subject.spec("clone", source=SourceRef("volume", a.local_id))) == clone
    delete(subject, clone, a, b)


def test_same_name_with_a_snapshot_source_is_already_exists(subject: Subject) -> None:
    needs(subject, "snapshots")
    volume = subject.volumes.create_volume(subject.spec("pvc-1"))
    snapshot = snap(subject, "snap-1", volume.local_id)
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("pvc-1", source=SourceRef("snapshot", snapshot.local_id)))
    restored = subject.volumes.create_volume(subject.spec("restored", source=SourceRef("snapshot", snapshot.local_id)))
    with pytest.raises(AlreadyExists):
        subject.volumes.create_volume(subject.spec("restored"))
    delete(subject, restored, snapshot, volume)


def test_a_missing_source_is_not_found_and_leaves_nothing(subject: Subject) -> None:
    sources: list[SourceRef] = []
    if subject.capabilities.clones:
        sources += [SourceRef("volume", ghost_volume(subject)), *(SourceRef("volume", g) for g in GARBAGE)]
    if subject.capabilities.snapshots:
        sources += [SourceRef("snapshot", ghost_snapshot(subject)), *(SourceRef("snapshot", g) for g in GARBAGE)]
    for source in sources:
        with leaves_nothing(subject, "orphan"), pytest.raises(NotFound):
            subject.volumes.create_volume(subject.spec("orphan", source=source))


def test_delete_of_what_is_gone_is_fine_and_repeatable(subject: Subject) -> None:
    volume = subject.volumes.create_volume(subject.spec("pvc-1"))
    delete(subject, volume)
    delete(subject, volume)
    assert subject.volumes.lookup_volume("pvc-1", secrets=subject.secrets) is None
    with pytest.raises(NotFound):
        subject.volumes.get_volume(volume.local_id, secrets=subject.secrets)
    if subject.capabilities.snapshots:
        source = subject.volumes.create_volume(subject.spec("source"))
        snapshot = snap(subject, "snap-1", source.local_id)
        delete(subject, snapshot)
        delete(subject, snapshot)
        with pytest.raises(NotFound):
            subject.volumes.get_snapshot(snapshot.local_id, secrets=subject.secrets)
        delete(subject, source)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_delete_of_a_garbage_id_changes_nothing(subject: Subject, garbage: str) -> None:
    """A local ID the backend never issued: it returns, or says NotFound (which the
    services answer as OK); nothing else, and nothing is touched."""
    keep = subject.volumes.create_volume(subject.spec("keep"))
    for remove in (subject.volumes.delete_volume, subject.volumes.delete_snapshot):
        with suppress(NotFound):
            remove(garbage, secrets=subject.secrets)
    with suppress(NotFound):
        subject.volumes.unpublish_volume(garbage, subject.nodes[0], secrets=subject.secrets)
    assert subject.volumes.list_volumes(secrets=subject.secrets) == [keep]
    delete(subject, keep)


def test_a_missing_or_garbage_id_is_not_found(subject: Subject) -> None:
    missing_volumes = [ghost_volume(subject), *GARBAGE]
    for local_id in missing_volumes:
        with pytest.raises(NotFound):
            subject.volumes.get_volume(local_id, secrets=subject.secrets)
        with pytest.raises(NotFound):
            subject.volumes.expand_volume(local_id, 2 * SIZE, 0, secrets=subject.secrets)
        with pytest.raises(NotFound):
            subject.volumes.publish_volume(local_id, subject.nodes[0], RWO, False, secrets=subject.secrets)
        if subject.capabilities.snapshots:
            with leaves_nothing(subject, "never"), pytest.raises(NotFound):
                snap(subject, "snap-of-nothing", local_id)
    if subject.capabilities.snapshots:
        for local_id in [ghost_snapshot(subject), *GARBAGE]:
            with pytest.raises(NotFound):
                subject.volumes.get_snapshot(local_id, secrets=subject.secrets)


def test_a_volume_id_names_no_snapshot_and_a_snapshot_id_no_volume(subject: Subject) -> None:
    needs(subject, "snapshots")
    volume = subject.volumes.create_volume(subject.spec("pvc-1"))
    snapshot = snap(subject, "snap-1", volume.local_id)
    with pytest.raises(NotFound):
        subject.volumes.get_snapshot(volume.local_id, secrets=subject.secrets)
    with pytest.raises(NotFound):
        subject.volumes.get_volume(snapshot.local_id, secrets=subject.secrets)
    delete(subject, snapshot, volume)


# -- snapshots and clones -----------------------------------------------------------------


def test_create_snapshot_is_idempotent_and_a_name_for_another_source_is_already_exists(subject: Subject) -> None:
    needs(subject, "snapshots")
    a = subject.volumes.create_volume(subject.spec("a"))
    b = subject.volumes.create_volume(subject.spec("b"))
    snapshot = snap(subject, "snap-1", a.local_id)
    assert snapshot.name == "snap-1" and snapshot.source_volume_local_id == a.local_id
    assert snapshot.size_bytes == a.capacity_bytes and snapshot.ready
    assert snapshot.created_at > 0
    assert snap(subject, "snap-1", a.local_id) == snapshot
    assert subject.volumes.get_snapshot(snapshot.local_id, secrets=subject.secrets) == snapshot
    with pytest.raises(AlreadyExists):
        snap(subject, "snap-1", b.local_id)
    assert subject.volumes.list_snapshots(secrets=subject.secrets) == [snapshot]
    delete(subject, snapshot, a, b)


def test_a_snapshot_outlives_its_source_and_restores_after_it_is_gone(subject: Subject) -> None:
    needs(subject, "snapshots")
    volume = subject.volumes.create_volume(subject.spec("origin"))
    snapshot = snap(subject, "snap-1", volume.local_id)
    delete(subject, volume)
    assert subject.volumes.get_snapshot(snapshot.local_id, secrets=subject.secrets) == snapshot
    assert subject.volumes.list_snapshots(secrets=subject.secrets) == [snapshot]
    source = SourceRef("snapshot", snapshot.local_id)
    restored = subject.volumes.create_volume(subject.spec("restored", size=2 * SIZE, source=source))
    check_volume(subject, restored, "restored")
    assert restored.source == source and restored.capacity_bytes >= 2 * SIZE
    assert subject.volumes.create_volume(subject.spec("restored", size=2 * SIZE, source=source)) == restored
    small = subject.volumes.create_volume(subject.spec("small", size=MiB, source=source))
    assert small.capacity_bytes >= snapshot.size_bytes, "a restored volume is never smaller than its snapshot"
    with leaves_nothing(subject, "too-small"), pytest.raises(OutOfRange):
        subject.volumes.create_volume(subject.spec("too-small", size=MiB, limit=2 * MiB, source=source))
    delete(subject, snapshot)
    assert subject.volumes.get_volume(restored.local_id, secrets=subject.secrets) == restored, (
        "a restored volume outlives its snapshot"
    )
    delete(subject, restored, small)


def test_clone_of_a_volume(subject: Subject) -> None:
    needs(subject, "clones")
    volume = subject.volumes.create_volume(subject.spec("origin", size=16 * MiB))
    source = SourceRef("volume", volume.local_id)
    clone = subject.volumes.create_volume(subject.spec("clone", size=MiB, source=source))
    check_volume(subject, clone, "clone")
    assert clone.source == source and clone.capacity_bytes >= volume.capacity_bytes
    assert subject.volumes.create_volume(subject.spec("clone", size=MiB, source=source)) == clone
    bigger = subject.volumes.create_volume(subject.spec("bigger", size=32 * MiB, source=source))
    assert bigger.capacity_bytes >= 32 * MiB
    with leaves_nothing(subject, "too-small"), pytest.raises(OutOfRange):
        subject.volumes.create_volume(subject.spec("too-small", size=MiB, limit=2 * MiB, source=source))
    delete(subject, volume)
    assert subject.volumes.get_volume(clone.local_id, secrets=subject.secrets) == clone, "a clone outlives its source"
    delete(subject, clone, bigger)


def test_a_retry_answers_the_volume_made_after_its_source_is_gone(subject: Subject) -> None:
    """The answer to a finished CreateVolume can be lost; the sidecar retries, maybe after
    the source was deleted meanwhile. The volume exists, so the retry must return it."""
    needs(subject, "clones")
    volume = subject.volumes.create_volume(subject.spec("origin"))
    clone_spec = subject.spec("clone", source=SourceRef("volume", volume.local_id))
    clone = subject.volumes.create_volume(clone_spec)
    restored: list[Volume] = []
    if subject.capabilities.snapshots:
        snapshot = snap(subject, "snap-1", volume.local_id)
        restore_spec = subject.spec("restored", source=SourceRef("snapshot", snapshot.local_id))
        restored.append(subject.volumes.create_volume(restore_spec))
        delete(subject, snapshot)
        assert subject.volumes.create_volume(restore_spec) == restored[0]
    delete(subject, volume)
    assert subject.volumes.create_volume(clone_spec) == clone
    delete(subject, clone, *restored)


# -- listings -----------------------------------------------------------------------------


def test_listings_are_sorted_complete_and_stable(subject: Subject) -> None:
    names = [f"pvc-{i}" for i in range(5)]
    random.shuffle(names)
    made: list[Volume] = []
    for name in names:
        made.append(subject.volumes.create_volume(subject.spec(name)))
        assert made[-1].local_id in volume_ids(subject), "a volume is listed once it is created"
    listed = subject.volumes.list_volumes(secrets=subject.secrets)
    ids = [v.local_id for v in listed]
    assert ids == sorted(ids) and sorted(ids) == sorted(v.local_id for v in made), "each volume once, sorted"
    assert list(listed) == [subject.volumes.get_volume(i, secrets=subject.secrets) for i in ids]
    assert subject.volumes.list_volumes(secrets=subject.secrets) == listed, "the order is stable"

    def pages(after: str, limit: int) -> Sequence[Volume]:
        return subject.volumes.list_volumes(after=after, limit=limit, secrets=subject.secrets)

    assert walk(pages, lambda v: v.local_id) == ids
    assert pages(ids[1], 0) == listed[2:], "limit 0 is everything after the cursor"

    # A volume deleted between two pages, and the last one of the page before: the walk
    # neither skips nor repeats another.
    doomed = [v for v in made if v.local_id in (ids[1], ids[3])]

    def churn() -> None:
        for volume in doomed:
            delete(subject, volume)  # before the second page; deleting again later is fine

    # The first page (ids 0, 1) is read before the deletions, the second starts after 1.
    assert walk(pages, lambda v: v.local_id, churn) == [ids[0], ids[1], ids[2], ids[4]]

    snapshots: list[Snapshot] = []
    if subject.capabilities.snapshots:
        for i, volume in enumerate(made[:3]):
            if volume not in doomed:
                snapshots.append(snap(subject, f"snap-{i}", volume.local_id))
                assert snapshots[-1].local_id in snapshot_ids(subject), "a snapshot is listed once it is taken"
        listed_snapshots = subject.volumes.list_snapshots(secrets=subject.secrets)
        snap_ids = [s.local_id for s in listed_snapshots]
        assert snap_ids == sorted(s.local_id for s in snapshots)
        assert list(listed_snapshots) == [subject.volumes.get_snapshot(i, secrets=subject.secrets) for i in snap_ids]
        assert subject.volumes.list_snapshots(secrets=subject.secrets) == listed_snapshots
        assert (
            walk(
                lambda after, limit: subject.volumes.list_snapshots(after=after, limit=limit, secrets=subject.secrets),
                lambda s: s.local_id,
            )
            == snap_ids
        )
        for snapshot in snapshots:
            delete(subject, snapshot)
            assert snapshot.local_id not in snapshot_ids(subject), "a deleted snapshot is no longer listed"
    for volume in made:
        delete(subject, volume)
        assert volume.local_id not in volume_ids(subject), "a deleted volume is no longer listed"


def test_the_services_secretless_reads_work(subject: Subject) -> None:
    """ListVolumes, ListSnapshots and ControllerGetVolume carry no secret: a backend that
    needs credentials must have its own for them."""
    volume = subject.volumes.create_volume(subject.spec("pvc-1"))
    assert subject.volumes.list_volumes() == [volume]
    assert subject.volumes.get_volume(volume.local_id) == volume
    if subject.capabilities.snapshots:
        snapshot = snap(subject, "snap-1", volume.local_id)
        assert subject.volumes.list_snapshots() == [snapshot]
        delete(subject, snapshot)
    delete(subject, volume)


# -- expansion ----------------------------------------------------------------------------


def test_expansion_grows_and_asking_for_less_changes_nothing(subject: Subject) -> None:
    needs(subject, "expansion")
    volume = subject.volumes.create_volume(subject.spec("grow"))
    grown = subject.volumes.expand_volume(volume.local_id, 2 * SIZE + 1, 0, secrets=subject.secrets)
    assert grown >= 2 * SIZE + 1
    assert subject.volumes.get_volume(volume.local_id, secrets=subject.secrets).capacity_bytes == grown
    for less in (SIZE, grown, 1):
        assert subject.volumes.expand_volume(volume.local_id, less, 0, secrets=subject.secrets) == grown
    assert subject.volumes.get_volume(volume.local_id, secrets=subject.secrets).capacity_bytes == grown
    with pytest.raises(OutOfRange):
        subject.volumes.expand_volume(volume.local_id, grown + MiB + 1, grown + MiB + 2, secrets=subject.secrets)
    assert subject.volumes.get_volume(volume.local_id, secrets=subject.secrets).capacity_bytes == grown
    delete(subject, volume)


def test_online_expansion_grows_a_published_volume(subject: Subject) -> None:
    needs(subject, "online-expansion")
    volume = subject.volumes.create_volume(subject.spec("grow"))
    subject.volumes.publish_volume(volume.local_id, subject.nodes[0], RWO, False, secrets=subject.secrets)
    grown = subject.volumes.expand_volume(volume.local_id, 2 * SIZE, 0, secrets=subject.secrets)
    assert subject.volumes.get_volume(volume.local_id, secrets=subject.secrets).capacity_bytes == grown >= 2 * SIZE
    subject.volumes.unpublish_volume(volume.local_id, subject.nodes[0], secrets=subject.secrets)
    delete(subject, volume)


# -- publication --------------------------------------------------------------------------


def test_publication_bookkeeping(subject: Subject) -> None:
    volumes, secrets = subject.volumes, subject.secrets
    first, second = subject.nodes
    volume = volumes.create_volume(subject.spec("pvc-1"))
    context = volumes.publish_volume(volume.local_id, first, RWO, False, secrets=secrets)
    assert isinstance(context, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
    assert volumes.publish_volume(volume.local_id, first, RWO, False, secrets=secrets) == context, "same answer"
    assert volumes.get_volume(volume.local_id, secrets=secrets).published_nodes == (first,)
    assert [v.published_nodes for v in volumes.list_volumes(secrets=secrets)] == [(first,)]
    with pytest.raises(AlreadyExists):
        volumes.publish_volume(volume.local_id, first, RWO, True, secrets=secrets)
    if second != first:
        with pytest.raises(FailedPrecondition):
            volumes.publish_volume(volume.local_id, second, RWO, False, secrets=secrets)
    if subject.stranger is not None:
        with pytest.raises(NotFound):
            volumes.publish_volume(volume.local_id, subject.stranger, RWO, False, secrets=secrets)
    assert volumes.get_volume(volume.local_id, secrets=secrets).published_nodes == (first,)
    with pytest.raises(FailedPrecondition):
        volumes.delete_volume(volume.local_id, secrets=secrets)
    assert volumes.get_volume(volume.local_id, secrets=secrets).published_nodes == (first,), "still there"
    volumes.unpublish_volume(volume.local_id, "never-published", secrets=secrets)
    volumes.unpublish_volume(volume.local_id, first, secrets=secrets)
    volumes.unpublish_volume(volume.local_id, first, secrets=secrets)
    assert volumes.get_volume(volume.local_id, secrets=secrets).published_nodes == ()
    delete(subject, volume)
    volumes.unpublish_volume(volume.local_id, first, secrets=secrets)  # the volume is gone: fine


def test_readonly_publication(subject: Subject) -> None:
    volumes, secrets, node = subject.volumes, subject.secrets, subject.nodes[0]
    reader = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_READER_ONLY)
    volume = volumes.create_volume(subject.spec("pvc-1"))
    context = volumes.publish_volume(volume.local_id, node, reader, True, secrets=secrets)
    assert volumes.publish_volume(volume.local_id, node, reader, True, secrets=secrets) == context
    with pytest.raises(AlreadyExists):
        volumes.publish_volume(volume.local_id, node, RWO, False, secrets=secrets)
    volumes.unpublish_volume(volume.local_id, node, secrets=secrets)
    delete(subject, volume)


def test_a_shared_mode_publishes_to_several_nodes(subject: Subject) -> None:
    shared = [
        Capability(kind, mode)
        for kind, modes in subject.capabilities.access.items()
        for mode in sorted(modes, key=lambda m: m.value)
        if mode.multi_node
    ]
    if not shared or subject.nodes[0] == subject.nodes[1]:
        pytest.skip(f"{subject.kind} offers no mode shared between nodes")
    volumes, secrets = subject.volumes, subject.secrets
    volume = volumes.create_volume(subject.spec("shared", capabilities=(shared[0],)))
    for node in reversed(subject.nodes):
        volumes.publish_volume(volume.local_id, node, shared[0], shared[0].access_mode.read_only, secrets=secrets)
    assert volumes.get_volume(volume.local_id, secrets=secrets).published_nodes == tuple(sorted(subject.nodes))
    for node in subject.nodes:
        volumes.unpublish_volume(volume.local_id, node, secrets=secrets)
    delete(subject, volume)


# -- declared capabilities ----------------------------------------------------------------


def test_every_declared_access_mode_can_be_published(subject: Subject) -> None:
    volumes, secrets, node = subject.volumes, subject.secrets, subject.nodes[0]
    volume = volumes.create_volume(subject.spec("modes"))
    for kind, modes in subject.capabilities.access.items():
        for mode in modes:
            capability = Capability(kind, mode)
            assert subject.capabilities.unsupported(capability) is None
            volumes.publish_volume(volume.local_id, node, capability, mode.read_only, secrets=secrets)
            volumes.unpublish_volume(volume.local_id, node, secrets=secrets)
    delete(subject, volume)


def test_declared_capabilities_match_what_the_backend_does(subject: Subject) -> None:
    declared = subject.capabilities
    for feature in FEATURES:
        assert isinstance(declared.offers(feature), bool)
    assert declared.access, "a backend offers at least one access type"
    assert declared.node_local == bool(subject.volumes.topology), "node-local volumes say which node they are on"
    assert declared.node_local == (subject.stranger is not None), "node-local volumes are unreachable elsewhere"
    volume = subject.volumes.create_volume(subject.spec("origin"))
    made: list[Volume | Snapshot] = []
    try:
        snapshot = snap(subject, "snap-1", volume.local_id)
    except CairnError:
        assert not declared.snapshots, "snapshots are declared, and create_snapshot failed"
    else:
        assert declared.snapshots, "create_snapshot works, and snapshots are not declared"
        made.append(snapshot)
    try:
        clone = subject.volumes.create_volume(subject.spec("clone", source=SourceRef("volume", volume.local_id)))
    except CairnError:
        assert not declared.clones, "clones are declared, and cloning failed"
    else:
        assert declared.clones, "cloning works, and clones are not declared"
        made.insert(0, clone)
    try:
        subject.volumes.expand_volume(volume.local_id, 2 * SIZE, 0, secrets=subject.secrets)
    except CairnError:
        assert declared.expansion is Expansion.NONE, "expansion is declared, and expand_volume failed"
    else:
        assert declared.expansion is not Expansion.NONE, "expand_volume works, and expansion is not declared"
    delete(subject, *made, volume)
