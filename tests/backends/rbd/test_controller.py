"""The rbd backend's controller half against a real Ceph cluster: idempotency, the
journal, snapshots that outlive their source, clones, trash, publication and multi-attach
rules, credentials, and crash-and-retry at every step of a creation."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import pytest
import rados
import rbd

from csi.backends.rbd import CAPABILITIES, build, controller
from csi.backends.rbd.cluster import Clusters
from csi.backends.rbd.common import FEATURES, Kind, RbdSettings, image_name
from csi.backends.rbd.controller import RbdVolumes
from csi.backends.rbd.journal import Journal
from csi.config import BackendConfig
from csi.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec
from tests.ceph import POOL, USER, CephCluster, free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_pool")]
RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
T = TypeVar("T")


def make_backend(ceph: CephCluster) -> RbdVolumes:
    settings = RbdSettings(monitors=tuple(ceph.monitors), pool=POOL, max_clone_depth=2)
    return RbdVolumes(settings, Clusters(settings.monitors))


@pytest.fixture
def volumes(ceph: CephCluster) -> Iterator[RbdVolumes]:
    backend = make_backend(ceph)
    yield backend
    backend.clusters.shutdown()


def spec(
    name: str, secrets: dict[str, str], size: int = 8 * MiB, source: SourceRef | None = None, **params: str
) -> VolumeSpec:
    return VolumeSpec(name, size, 0, (RWO,), params, source, secrets)


def write(io: Any, image: str, offset: int, data: bytes) -> None:
    with rbd.Image(io, image) as handle:
        handle.write(data, offset)


def read(io: Any, image: str, offset: int, length: int) -> bytes:
    with rbd.Image(io, image, read_only=True) as handle:
        return bytes(handle.read(offset, length))


def image_of(local_id: str, kind: str = "vol") -> str:
    return f"cairn-{kind}-{local_id.split('/')[1]}"


def test_create_is_idempotent_and_conflicts_are_refused(
    volumes: RbdVolumes, secrets: dict[str, str], ceph: CephCluster
) -> None:
    first = volumes.create_volume(spec("pvc-a", secrets))
    assert volumes.create_volume(spec("pvc-a", secrets)) == first
    assert first.capacity_bytes == 8 * MiB and first.local_id.startswith(f"{POOL}/")
    assert ceph.rbd("ls", POOL).split() == [image_of(first.local_id)]
    with pytest.raises(AlreadyExists, match="'pvc-a' exists with 8388608 bytes"):
        volumes.create_volume(spec("pvc-a", secrets, size=16 * MiB))
    assert volumes.lookup_volume("pvc-a", secrets=secrets) == first
    assert [v.local_id for v in volumes.list_volumes(secrets=secrets)] == [first.local_id]
    volumes.delete_volume(first.local_id, secrets=secrets)
    volumes.delete_volume(first.local_id, secrets=secrets)
    assert volumes.lookup_volume("pvc-a", secrets=secrets) is None


def test_snapshot_outlives_its_source_and_restores_its_data(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any
) -> None:
    origin = volumes.create_volume(spec("origin", secrets))
    write(pool_io, image_of(origin.local_id), 3 * MiB, b"precious")
    snap = volumes.create_snapshot("snap-1", origin.local_id, {}, secrets=secrets)
    assert volumes.create_snapshot("snap-1", origin.local_id, {}, secrets=secrets) == snap
    write(pool_io, image_of(origin.local_id), 3 * MiB, b"changed!")
    volumes.delete_volume(origin.local_id, secrets=secrets)  # the snapshot keeps the data alive
    restored = volumes.create_volume(
        spec("restored", secrets, size=16 * MiB, source=SourceRef("snapshot", snap.local_id))
    )
    assert restored.capacity_bytes == 16 * MiB
    assert read(pool_io, image_of(restored.local_id), 3 * MiB, 8) == b"precious"
    volumes.delete_snapshot(snap.local_id, secrets=secrets)  # the restored volume keeps reading
    assert read(pool_io, image_of(restored.local_id), 3 * MiB, 8) == b"precious"
    volumes.delete_volume(restored.local_id, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)


def test_snapshot_name_for_another_source_is_already_exists(volumes: RbdVolumes, secrets: dict[str, str]) -> None:
    a = volumes.create_volume(spec("a", secrets))
    b = volumes.create_volume(spec("b", secrets))
    snap = volumes.create_snapshot("s", a.local_id, {}, secrets=secrets)
    with pytest.raises(AlreadyExists):
        volumes.create_snapshot("s", b.local_id, {}, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    for vol in (a, b):
        volumes.delete_volume(vol.local_id, secrets=secrets)


def test_clone_from_volume_and_chain_flattening(volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any) -> None:
    current = volumes.create_volume(spec("gen-0", secrets))
    write(pool_io, image_of(current.local_id), 0, b"root")
    chain = [current]
    for generation in range(1, 5):
        current = volumes.create_volume(
            spec(f"gen-{generation}", secrets, source=SourceRef("volume", current.local_id))
        )
        chain.append(current)
        assert read(pool_io, image_of(current.local_id), 0, 4) == b"root"
        with rbd.Image(pool_io, image_of(current.local_id), read_only=True) as image:
            assert volumes._clone_depth(image, secrets) <= 2, "clones deeper than maxCloneDepth must be flattened"
    with pytest.raises(OutOfRange):
        volumes.create_volume(
            VolumeSpec("small", MiB, 2 * MiB, (RWO,), {}, SourceRef("volume", chain[0].local_id), secrets)
        )
    for vol in chain:
        volumes.delete_volume(vol.local_id, secrets=secrets)


def leave_remains(pool_io: Any, name: str, remains: str) -> None:
    """What a call killed inside librbd leaves of image ``name``: an image not yet attached
    to its parent ("unattached"), or one listed whose header was never written ("headless")."""
    rbd.RBD().create(pool_io, name, 8 * MiB, old_format=False, features=FEATURES["layering"])
    if remains == "headless":
        with rbd.Image(pool_io, name) as image:
            header = f"rbd_header.{image.id()}"
        pool_io.remove_object(header)
        with pytest.raises(rbd.ImageNotFound):
            rbd.Image(pool_io, name)
        assert name in rbd.RBD().list(pool_io), "still listed: not gone"


@pytest.mark.parametrize("remains", ["unattached", "headless"])
@pytest.mark.parametrize("kind", ["volume", "snapshot"])
def test_a_clone_a_killed_call_left_half_made_is_made_again(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, ceph: CephCluster, kind: Kind, remains: str
) -> None:
    """librbd makes a clone before it attaches it to its parent, and lists an image before
    its header exists; a call killed in between leaves remains under the reservation. The
    retry must neither take them for the clone (a volume cloned from a formatted one would
    be formatted afresh on its node) nor fail on them for ever."""
    source = volumes.create_volume(spec("half-source", secrets))
    write(pool_io, image_of(source.local_id), 0, b"the source's data")
    details = {"source": source.local_id} if kind == "snapshot" else {}
    image_uuid = Journal(pool_io).reserve(kind, "half", **details).uuid
    leave_remains(pool_io, image_name(kind, image_uuid), remains)
    if kind == "volume":
        made: Any = volumes.create_volume(spec("half", secrets, source=SourceRef("volume", source.local_id)))
    else:
        made = volumes.create_snapshot("half", source.local_id, {}, secrets=secrets)
    assert made.local_id == f"{POOL}/{image_uuid}", "the retry keeps its reservation"
    assert read(pool_io, image_name(kind, image_uuid), 0, 17) == b"the source's data"
    if kind == "volume":
        volumes.delete_volume(made.local_id, secrets=secrets)
    else:
        volumes.delete_snapshot(made.local_id, secrets=secrets)
    volumes.delete_volume(source.local_id, secrets=secrets)
    assert ceph.rbd("ls", POOL) == ""


def test_expand(volumes: RbdVolumes, secrets: dict[str, str]) -> None:
    vol = volumes.create_volume(spec("grow", secrets))
    assert volumes.expand_volume(vol.local_id, 20 * MiB, 0, secrets=secrets) == 20 * MiB
    assert volumes.expand_volume(vol.local_id, 4 * MiB, 0, secrets=secrets) == 20 * MiB
    volumes.delete_volume(vol.local_id, secrets=secrets)
    with pytest.raises(NotFound):
        volumes.expand_volume(vol.local_id, 40 * MiB, 0, secrets=secrets)


def test_publication_and_multi_attach_rules(volumes: RbdVolumes, secrets: dict[str, str]) -> None:
    vol = volumes.create_volume(spec("shared", secrets))
    context = volumes.publish_volume(vol.local_id, "node-a", RWO, False, secrets=secrets)
    assert context["pool"] == POOL and context["image"] == image_of(vol.local_id) and context["user"] == "cairn"
    assert "userKey" not in context and secrets["userKey"] not in str(context)
    with pytest.raises(FailedPrecondition, match="already published to node"):
        volumes.publish_volume(vol.local_id, "node-b", RWO, False, secrets=secrets)
    with pytest.raises(AlreadyExists):
        volumes.publish_volume(vol.local_id, "node-a", RWO, True, secrets=secrets)
    shared_block = Capability(AccessType.BLOCK, AccessMode.MULTI_NODE_MULTI_WRITER)
    volumes.publish_volume(vol.local_id, "node-b", shared_block, False, secrets=secrets)
    assert volumes.get_volume(vol.local_id, secrets=secrets).published_nodes == ("node-a", "node-b")
    with pytest.raises(FailedPrecondition, match="still published"):
        volumes.delete_volume(vol.local_id, secrets=secrets)
    for node in ("node-a", "node-b", "node-b"):
        volumes.unpublish_volume(vol.local_id, node, secrets=secrets)
    volumes.delete_volume(vol.local_id, secrets=secrets)


def test_volumes_keep_the_mapper_and_options_they_were_created_with(
    volumes: RbdVolumes, secrets: dict[str, str]
) -> None:
    """Settings left empty (no source, no map options) must not shift the others: the
    Ceph Python binding pairs listed metadata wrongly around empty values."""
    plain = volumes.create_volume(spec("plain", secrets))
    chosen = volumes.create_volume(spec("chosen", secrets, mapper="rbd-nbd", mapOptions="io_timeout=30"))
    plain_context = volumes.publish_volume(plain.local_id, "node-a", RWO, False, secrets=secrets)
    chosen_context = volumes.publish_volume(chosen.local_id, "node-a", RWO, False, secrets=secrets)
    assert plain_context["mapper"] == "krbd" and "mapOptions" not in plain_context
    assert (chosen_context["mapper"], chosen_context["mapOptions"]) == ("rbd-nbd", "io_timeout=30")
    listed = {volume.name: volume for volume in volumes.list_volumes(secrets=secrets)}
    assert listed["plain"].source is None and listed["plain"].context == {"mapper": "krbd"}
    assert listed["chosen"].context == {"mapper": "rbd-nbd"}
    for volume in (plain, chosen):
        volumes.unpublish_volume(volume.local_id, "node-a", secrets=secrets)
        volumes.delete_volume(volume.local_id, secrets=secrets)


def test_filesystems_shared_read_write_are_refused_with_the_reason() -> None:
    for mode in (AccessMode.MULTI_NODE_MULTI_WRITER, AccessMode.MULTI_NODE_SINGLE_WRITER):
        reason = CAPABILITIES.unsupported(Capability(AccessType.MOUNT, mode))
        assert reason and "corrupt" in reason
    assert CAPABILITIES.unsupported(Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_READER_ONLY)) is None
    assert CAPABILITIES.unsupported(Capability(AccessType.BLOCK, AccessMode.MULTI_NODE_SINGLE_WRITER)) is None


def test_librbd_feature_bits_are_the_ones_settings_are_checked_with() -> None:
    assert FEATURES == {
        "layering": rbd.RBD_FEATURE_LAYERING,
        "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
        "object-map": rbd.RBD_FEATURE_OBJECT_MAP,
        "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
        "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN,
    }


def test_capacity_is_the_pools_free_space(volumes: RbdVolumes, secrets: dict[str, str], ceph: CephCluster) -> None:
    assert volumes.free_bytes() == 0, "no credentials: nothing to ask Ceph with"
    free = volumes.free_bytes(secrets=secrets)
    assert 0 < free <= 4 << 30
    assert volumes.free_bytes() == 0, "GetCapacity never borrows the credentials an earlier call brought"


def test_credentials_are_required_and_checked(
    ceph: CephCluster, secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # librados retries a refused key until its timeout: a short one keeps the test short.
    monkeypatch.setattr("csi.backends.rbd.cluster.TIMEOUT_SECONDS", 5)
    backend = make_backend(ceph)
    with pytest.raises(FailedPrecondition, match="no Ceph credentials"):
        backend.create_volume(spec("x", {}))
    with pytest.raises(InvalidArgument, match="both 'userID' and 'userKey'"):
        backend.create_volume(spec("x", {"userID": "cairn"}))
    wrong = {"userID": "cairn", "userKey": "AQBv2zBnAAAAABAAWQ8fvCQ1cW9mGq3vUoT2XQ=="}
    with pytest.raises(DeadlineExceeded, match="the key refused") as caught:
        backend.create_volume(spec("x", wrong))
    assert "AQBv2zBn" not in str(caught.value)
    backend.clusters.shutdown()


def test_a_call_without_secrets_never_borrows_the_credentials_of_an_earlier_call(
    volumes: RbdVolumes, secrets: dict[str, str]
) -> None:
    """Two StorageClasses may name two Ceph users: a call that brings no secret must not
    run with the key the last call brought (tenant A's), on a backend without a
    credentialsDir of its own."""
    tenant_a = volumes.create_volume(spec("tenant-a", secrets))  # A's connection is open and cached
    try:
        # FAILED_PRECONDITION: the requests are well formed (ListVolumes and
        # ControllerGetVolume have no secrets field at all, so INVALID_ARGUMENT would blame
        # the caller for what it cannot send); what is missing is credentials only the
        # operator can provide, a StorageClass secret or the backend's credentialsDir. The
        # call must not be retried until that is fixed, which is what the code means.
        refused = r"no CSI secret with 'userID' and 'userKey'.*no credentialsDir"
        with pytest.raises(FailedPrecondition, match=refused):
            volumes.list_volumes()
        with pytest.raises(FailedPrecondition, match=refused):
            volumes.get_volume(tenant_a.local_id)
        with pytest.raises(FailedPrecondition, match=refused):
            volumes.create_volume(spec("tenant-b", {}))
        with pytest.raises(FailedPrecondition, match=refused):
            volumes.publish_volume(tenant_a.local_id, "node-b", RWO, False)
        with pytest.raises(FailedPrecondition, match=refused):
            volumes.delete_volume(tenant_a.local_id)
        assert volumes.free_bytes() == 0, "GetCapacity answers 0 rather than failing"
        assert not volumes.clusters.has_default_credentials(), "so the health check has nothing to check with"
        # Nothing ran with A's key: no volume for B, no publication, A's volume still there.
        assert volumes.lookup_volume("tenant-b", secrets=secrets) is None
        assert volumes.get_volume(tenant_a.local_id, secrets=secrets).published_nodes == ()
    finally:
        volumes.unpublish_volume(tenant_a.local_id, "node-b", secrets=secrets)
        volumes.delete_volume(tenant_a.local_id, secrets=secrets)
        leaked = volumes.lookup_volume("tenant-b", secrets=secrets)
        if leaked is not None:
            volumes.delete_volume(leaked.local_id, secrets=secrets)


@pytest.fixture
def read_only_user(ceph: CephCluster) -> Iterator[dict[str, str]]:
    """A second Ceph user, allowed to read the pool and nothing more."""
    name = f"{USER}-reader"
    key = ceph.ceph(
        "auth", "get-or-create-key", f"client.{name}", "mon", "profile rbd", "osd", f"profile rbd-read-only pool={POOL}"
    )  # fmt: skip
    yield {"userID": name, "userKey": key}
    ceph.ceph("auth", "del", f"client.{name}")


def test_a_call_without_secrets_runs_as_the_backends_own_user(
    ceph: CephCluster, secrets: dict[str, str], read_only_user: dict[str, str], tmp_path: Any
) -> None:
    """With a credentialsDir, secret-less calls run as its user (here one that may only
    read), even right after a call with another user's secret."""
    settings = RbdSettings(
        monitors=tuple(ceph.monitors), pool=POOL, credentials_dir=credentials_dir(tmp_path, read_only_user)
    )
    backend = RbdVolumes(settings, Clusters(settings.monitors, settings.credentials_dir))
    try:
        volume = backend.create_volume(spec("writer", secrets))  # the pool's user may write
        assert [v.local_id for v in backend.list_volumes()] == [volume.local_id]
        assert backend.free_bytes() > 0
        with pytest.raises(FailedPrecondition, match="may not act on"):
            backend.create_volume(spec("reader", {}))  # the reader may not, and it is the reader
        assert backend.lookup_volume("reader", secrets=secrets) is None
        backend.delete_volume(volume.local_id, secrets=secrets)
    finally:
        backend.clusters.shutdown()


# -- crash and retry ---------------------------------------------------------------


def die(*args: Any, **kwargs: Any) -> None:
    os._exit(17)


def killed_in_a_child(work: Callable[[], object]) -> None:
    """Run ``work`` in a child process that is meant to die in it (by ``die``)."""

    def child() -> None:
        # In a thread of its own: Ceph draws a client's address nonce from a per-thread
        # random engine, which a forked child's main thread shares with the parent's, so
        # the parent's next client would get the killed one's address, and be blocklisted
        # with it when the retry breaks an image lock the killed client held.
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == 17, "the child was meant to die mid-creation"


def crash_during_create(ceph: CephCluster, secrets: dict[str, str], name: str, crash_point: str) -> None:
    """Create ``name`` in a child process that dies (os._exit) at ``crash_point``."""

    def create() -> None:
        # The backend's own steps for a blank volume: after the reservation, before the
        # image exists; after the image exists, before its keys (made, complete and the
        # rest, written at once) are. A clone's steps (marked made, then complete) are
        # crashed by the hardening suite's clone and snapshot scenarios.
        if crash_point == "before-image":
            RbdVolumes._make = die  # type: ignore[method-assign]
        elif crash_point == "before-complete":
            controller._set_all_metadata = die
        make_backend(ceph).create_volume(spec(name, secrets))

    killed_in_a_child(create)


@pytest.mark.parametrize("crash_point", ["before-image", "before-complete"])
def test_a_retry_after_a_crash_finds_or_finishes_the_work(
    ceph: CephCluster, secrets: dict[str, str], pool_io: Any, crash_point: str
) -> None:
    crash_during_create(ceph, secrets, "crashy", crash_point)
    journal = ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal").split()
    assert "volume.name.crashy" in journal, "the reservation is written before the image"
    left = ceph.rbd("ls", POOL).split()
    left_id = image_id(pool_io, left[0]) if left else ""
    backend = make_backend(ceph)
    # A retry in the same process lifetime (no restart) reuses the reservation. An image
    # not marked made is removed and made again, which Ceph refuses (busy) until the
    # killed client's watch expires: the CO retries, and so does this test.
    backend.sweeper._done.add(POOL)
    volume = once_the_dead_clients_watch_expires(lambda: backend.create_volume(spec("crashy", secrets)))
    assert ceph.rbd("ls", POOL).split() == [image_of(volume.local_id)], "exactly one image"
    if crash_point == "before-complete":
        assert image_id(pool_io, image_of(volume.local_id)) != left_id, "an image never marked made is made again"
    assert volume == backend.get_volume(volume.local_id, secrets=secrets)
    journal = ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal").split()
    assert sorted(journal) == sorted(["volume.name.crashy", f"volume.uuid.{volume.local_id.split('/')[1]}"])
    once_the_dead_clients_watch_expires(lambda: backend.delete_volume(volume.local_id, secrets=secrets))
    backend.clusters.shutdown()


def image_id(io: Any, name: str) -> str:
    with rbd.Image(io, name, read_only=True) as image:
        return str(image.id())


def once_the_dead_clients_watch_expires(call: Callable[[], T]) -> T:
    """The killed process had the image open; Ceph refuses to remove it (busy) until that
    client's watch expires, and the CO retries. So does this test, a bounded number of times."""
    for _ in range(60):
        try:
            return call()
        except FailedPrecondition as exc:
            assert "in use" in str(exc)
            time.sleep(0.5)
    return call()


def test_an_abandoned_reservation_is_removed_when_a_controller_starts(
    ceph: CephCluster, secrets: dict[str, str]
) -> None:
    crash_during_create(ceph, secrets, "abandoned", "before-image")
    restarted = make_backend(ceph)  # a new process: its first use of the pool sweeps
    assert restarted.lookup_volume("abandoned", secrets=secrets) is None
    assert ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal") == ""
    assert ceph.rbd("ls", POOL) == ""
    restarted.clusters.shutdown()


def test_a_sweep_removes_the_remains_of_an_abandoned_image(ceph: CephCluster, pool_io: Any) -> None:
    """A reservation whose image a killed call left unopenable (listed, no header) is
    abandoned: the sweep removes the remains with it, or the image would leak."""
    image_uuid = Journal(pool_io).reserve("volume", "abandoned-half").uuid
    leave_remains(pool_io, image_name("volume", image_uuid), "headless")
    restarted = make_backend(ceph)  # a new process: its first use of the pool sweeps
    assert restarted.lookup_volume("abandoned-half", secrets={"userID": "admin", "userKey": ceph.admin_key}) is None
    assert ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.journal") == ""
    assert ceph.rbd("ls", POOL) == ""
    restarted.clusters.shutdown()


def test_a_failed_creation_leaves_nothing(volumes: RbdVolumes, secrets: dict[str, str], ceph: CephCluster) -> None:
    with pytest.raises(InvalidArgument):
        volumes.create_volume(spec("bad-features", secrets, imageFeatures="exclusive-lock"))
    with pytest.raises(NotFound):
        missing = SourceRef("snapshot", f"{POOL}/00000000-0000-4000-8000-000000000000")
        volumes.create_volume(spec("from-nothing", secrets, source=missing))
    assert ceph.rbd("ls", POOL) == ""


def test_calls_without_secrets_use_the_credentials_directory(
    ceph: CephCluster, secrets: dict[str, str], tmp_path: Any
) -> None:
    directory = tmp_path / "ceph-secret"
    directory.mkdir()
    (directory / "userID").write_text(secrets["userID"])
    (directory / "userKey").write_text(secrets["userKey"] + "\n")
    # Built from configuration, as the driver builds it: the first call brings no secret.
    config = BackendConfig(
        "ceph", "rbd", None, {"monitors": ceph.monitors, "pool": POOL, "credentialsDir": str(directory)}
    )
    backend = cast(RbdVolumes, build(config, "test-node", controller=True, node=False).volumes)
    assert backend.list_volumes() == []
    assert backend.free_bytes() > 0
    backend.clusters.shutdown()


def credentials_dir(tmp_path: Any, secrets: dict[str, str]) -> str:
    directory = tmp_path / "health-secret"
    directory.mkdir(exist_ok=True)
    (directory / "userID").write_text(secrets["userID"])
    (directory / "userKey").write_text(secrets["userKey"])
    return str(directory)


def test_health_reports_a_missing_pool_and_unreachable_monitors(
    ceph: CephCluster, secrets: dict[str, str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def health_of(monitors: tuple[str, ...], pool: str, directory: str) -> str | None:
        settings = RbdSettings(monitors=monitors, pool=pool, credentials_dir=directory)
        backend = RbdVolumes(settings, Clusters(settings.monitors, settings.credentials_dir))
        try:
            return backend._health.wait(timeout=60)
        finally:
            backend.clusters.shutdown()

    directory = credentials_dir(tmp_path, secrets)
    assert health_of(tuple(ceph.monitors), POOL, directory) is None
    missing = health_of(tuple(ceph.monitors), "no-such-pool", directory)
    assert missing is not None and "pool 'no-such-pool' does not exist" in missing
    # Without credentials there is nothing to check with: not a problem to report.
    assert health_of(tuple(ceph.monitors), "no-such-pool", "") is None
    monkeypatch.setattr("csi.backends.rbd.cluster.TIMEOUT_SECONDS", 2)
    silent = f"127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = health_of((silent,), POOL, directory)
    assert unreachable is not None and silent in unreachable and "did not answer" in unreachable


def test_health_notices_a_cluster_that_stops_answering(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("csi.backends.rbd.cluster.TIMEOUT_SECONDS", 3)  # librados' op timeout
    own = CephCluster(tmp_path / "own").start()
    settings = RbdSettings(
        monitors=tuple(own.monitors),
        pool=POOL,
        credentials_dir=credentials_dir(tmp_path, {"userID": USER, "userKey": own.user_key}),
    )
    backend = RbdVolumes(settings, Clusters(settings.monitors, settings.credentials_dir))
    try:
        assert backend._health.wait(timeout=60) is None
        own.stop()
        backend._health.interval = 0
        problem = backend._health.wait(timeout=60)
        assert problem is not None and "did not answer" in problem and own.monitors[0] in problem
    finally:
        own.stop()
        backend.clusters.shutdown()


def test_listings_include_volumes_a_storage_class_put_in_another_pool(ceph: CephCluster, tmp_path: Any) -> None:
    other = "cairn-other"
    admin = {"userID": "admin", "userKey": ceph.admin_key}
    ceph.ceph("osd", "pool", "create", other, "8", "8", "replicated")
    ceph.rbd("pool", "init", other)
    backend = RbdVolumes(
        RbdSettings(monitors=tuple(ceph.monitors), pool=POOL, credentials_dir=credentials_dir(tmp_path, admin)),
        Clusters(tuple(ceph.monitors), credentials_dir(tmp_path, admin)),
    )
    try:
        home = backend.create_volume(spec("in-home", admin))
        away = backend.create_volume(spec("in-other", admin, pool=other))
        assert away.local_id.startswith(f"{other}/")
        snap = backend.create_snapshot("snap-other", away.local_id, {}, secrets=admin)
        assert [v.local_id for v in backend.list_volumes()] == sorted([home.local_id, away.local_id])
        assert [s.local_id for s in backend.list_snapshots()] == [snap.local_id]
        backend.delete_snapshot(snap.local_id, secrets=admin)
        for volume in (home, away):
            backend.delete_volume(volume.local_id, secrets=admin)
        assert backend.list_volumes() == []
    finally:
        backend.clusters.shutdown()
        ceph.ceph("osd", "pool", "rm", other, other, "--yes-i-really-really-mean-it")
    assert backend.list_volumes() == []  # a deleted pool is forgotten
    assert ceph._run("rados", "-c", str(ceph.conf), "-p", POOL, "listomapkeys", "cairn.pools") == ""
    backend.clusters.shutdown()


def test_a_page_opens_only_its_own_images(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listings walk the journal from the cursor: a page of two opens two images (and
    those of reservations whose image never came, which it skips), however many exist."""
    made = sorted(volumes.create_volume(spec(f"pvc-{i}", secrets)).local_id for i in range(9))
    unfinished = Journal(pool_io).reserve("volume", "never-made")  # a creation cut short: listed by nobody
    opened: list[str] = []
    real = volumes._complete_volume

    def counted(io: Any, local_id: str) -> Any:
        opened.append(local_id)
        return real(io, local_id)

    monkeypatch.setattr(volumes, "_complete_volume", counted)
    seen: list[str] = []
    after = ""
    while True:
        if after == made[1]:
            volumes.delete_volume(made[3], secrets=secrets)  # between pages: not listed, nothing skipped
        opened.clear()
        page = [v.local_id for v in volumes.list_volumes(after=after, limit=2, secrets=secrets)]
        assert len(opened) <= 3, f"a page of 2 opened {len(opened)} images"
        if not page:
            break
        seen += page
        after = page[-1]
    assert seen == [i for i in made if i != made[3]]
    for local_id in seen:
        volumes.delete_volume(local_id, secrets=secrets)
    Journal(pool_io).release("volume", unfinished.uuid)


def test_journal_keys_are_read_a_page_at_a_time(pool_io: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from csi.backends.rbd import journal

    monkeypatch.setattr(journal, "OMAP_PAGE", 2)
    for pool in ("p1", "p2", "p3", "p4", "p5"):
        journal.remember_pool(pool_io, pool)
    try:
        assert journal.remembered_pools(pool_io) == ["p1", "p2", "p3", "p4", "p5"]
    finally:
        pool_io.remove_object(journal.POOLS)


def test_volume_condition_reports_a_lost_reservation(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any
) -> None:
    vol = volumes.create_volume(spec("watched", secrets))
    assert not volumes.get_volume(vol.local_id, secrets=secrets).condition.abnormal
    with rados.WriteOpCtx() as op:
        pool_io.remove_omap_keys(op, ("volume.name.watched",))
        pool_io.operate_write_op(op, "cairn.journal")
    condition = volumes.get_volume(vol.local_id, secrets=secrets).condition
    assert condition.abnormal and "reservation of name 'watched' is missing" in condition.message
    volumes.delete_volume(vol.local_id, secrets=secrets)


# -- what creation answers, and what it skips -------------------------------------------


def user_snapshots(io: Any, name: str) -> list[str]:
    with rbd.Image(io, name, read_only=True) as image:
        return [s["name"] for s in image.list_snaps() if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER]


def test_creation_answers_what_a_read_finds(volumes: RbdVolumes, secrets: dict[str, str]) -> None:
    """CreateVolume and CreateSnapshot answer from what they wrote instead of reading the
    image back: the answer must be what a read, a retry and a listing find."""
    specs = [
        spec("plain", secrets),
        spec("tuned", secrets, size=12 * MiB, mapper="rbd-nbd", mapOptions="io_timeout=30"),
    ]
    made = {s.name: volumes.create_volume(s) for s in specs}
    # A clone starts with its parent's metadata: map options it does not ask for must not stay.
    specs.append(spec("clone", secrets, size=16 * MiB, source=SourceRef("volume", made["tuned"].local_id)))
    made["clone"] = volumes.create_volume(specs[-1])
    snap = volumes.create_snapshot("snap", made["tuned"].local_id, {}, secrets=secrets)
    restore = spec("restored", secrets, size=20 * MiB, source=SourceRef("snapshot", snap.local_id), mapOptions="a=1")
    specs.append(restore)
    made["restored"] = volumes.create_volume(restore)
    assert made["clone"].context == {"mapper": "krbd"} and made["clone"].capacity_bytes == 16 * MiB
    assert made["restored"].source == SourceRef("snapshot", snap.local_id)
    listed = {v.local_id: v for v in volumes.list_volumes(secrets=secrets)}
    for request in specs:
        volume = made[request.name]
        assert volume == volumes.get_volume(volume.local_id, secrets=secrets) == listed[volume.local_id]
        assert volumes.create_volume(request) == volume, "a retry answers the same"
    assert snap == volumes.get_snapshot(snap.local_id, secrets=secrets) == volumes.list_snapshots(secrets=secrets)[0]
    assert volumes.create_snapshot("snap", made["tuned"].local_id, {}, secrets=secrets) == snap
    context = volumes.publish_volume(made["clone"].local_id, "node-a", RWO, False, secrets=secrets)
    assert "mapOptions" not in context, "the clone's own StorageClass asked for none"
    volumes.unpublish_volume(made["clone"].local_id, "node-a", secrets=secrets)
    volumes.delete_volume(made["restored"].local_id, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    for name in ("clone", "tuned", "plain"):
        volumes.delete_volume(made[name].local_id, secrets=secrets)


def test_a_fresh_reservation_looks_for_no_earlier_work(
    volumes: RbdVolumes, secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing can exist under a UUID the call has just drawn: a first creation neither
    looks for a finished object nor for the remains of a killed call (each look opens an
    image or asks librbd to remove one); a retry does."""
    looked: list[str] = []

    def spy(name: str) -> Any:
        original = getattr(RbdVolumes, name)

        def looking(self: RbdVolumes, *args: Any) -> Any:
            looked.append(name)
            return original(self, *args)

        return looking

    for method in ("_complete_volume", "_complete_snapshot", "_made", "_remove_image"):
        monkeypatch.setattr(RbdVolumes, method, spy(method))
    origin = volumes.create_volume(spec("fresh", secrets))
    snap = volumes.create_snapshot("fresh-snap", origin.local_id, {}, secrets=secrets)
    restored = volumes.create_volume(spec("fresh-restored", secrets, source=SourceRef("snapshot", snap.local_id)))
    clone = volumes.create_volume(spec("fresh-clone", secrets, source=SourceRef("volume", origin.local_id)))
    assert looked == []
    assert volumes.create_volume(spec("fresh", secrets)) == origin
    assert looked == ["_complete_volume"], "a retry looks"
    monkeypatch.undo()
    for volume in (restored, clone):
        volumes.delete_volume(volume.local_id, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    volumes.delete_volume(origin.local_id, secrets=secrets)


def test_a_snapshot_takes_its_rbd_snapshot_at_its_first_restore(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, ceph: CephCluster
) -> None:
    """Taking an RBD snapshot is a round of the monitors' consensus, and so is dropping
    it: a snapshot never restored has none; the first restore takes it, later restores
    find it, and deleting the snapshot drops it."""
    origin = volumes.create_volume(spec("lazy-origin", secrets))
    write(pool_io, image_of(origin.local_id), 0, b"lazy")
    snap = volumes.create_snapshot("lazy", origin.local_id, {}, secrets=secrets)
    write(pool_io, image_of(origin.local_id), 0, b"busy")  # the snapshot is not the volume as it is now
    snap_image = image_of(snap.local_id, "snap")
    assert user_snapshots(pool_io, snap_image) == []
    first = volumes.create_volume(spec("lazy-1", secrets, source=SourceRef("snapshot", snap.local_id)))
    assert user_snapshots(pool_io, snap_image) == ["cairn"]
    second = volumes.create_volume(spec("lazy-2", secrets, source=SourceRef("snapshot", snap.local_id)))
    assert user_snapshots(pool_io, snap_image) == ["cairn"]
    for volume in (first, second):
        assert read(pool_io, image_of(volume.local_id), 0, 4) == b"lazy"
        volumes.delete_volume(volume.local_id, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    volumes.delete_volume(origin.local_id, secrets=secrets)
    assert ceph.rbd("ls", POOL) == "" and ceph.rbd("trash", "ls", POOL) == ""


def test_images_of_earlier_versions_are_read_restored_and_deleted(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, ceph: CephCluster
) -> None:
    """Earlier versions marked an image complete with cairn.image (no cairn.made, on the
    oldest), wrote cairn.created on volumes, and took a snapshot's RBD snapshot when they
    made it. Such images still read as complete, clones of them do not inherit those keys,
    and deleting such a snapshot drops its RBD snapshot (into the trash while a restore
    still reads through it)."""
    origin = volumes.create_volume(spec("old-origin", secrets, mapOptions="a=1"))
    snap = volumes.create_snapshot("old-snap", origin.local_id, {}, secrets=secrets)
    for local_id, image_kind in ((origin.local_id, "vol"), (snap.local_id, "snap")):
        name = image_of(local_id, image_kind)
        with rbd.Image(pool_io, name) as image:
            image.metadata_set("cairn.image", name)
            image.metadata_set("cairn.created", "1700000000.5")
            image.metadata_remove("cairn.made")
            if image_kind == "snap":
                image.create_snap("cairn")
    assert volumes.get_volume(origin.local_id, secrets=secrets) == origin
    assert volumes.get_snapshot(snap.local_id, secrets=secrets).created_at == 1700000000.5
    clone = volumes.create_volume(spec("old-clone", secrets, source=SourceRef("volume", origin.local_id)))
    restored = volumes.create_volume(spec("old-restored", secrets, source=SourceRef("snapshot", snap.local_id)))
    for volume in (clone, restored):
        with rbd.Image(pool_io, image_of(volume.local_id), read_only=True) as image:
            metadata = dict(image.metadata_list())
        assert metadata["cairn.made"] == image_of(volume.local_id)
        assert not {"cairn.image", "cairn.created", "mapOptions"} & set(metadata), "nothing of the parent's stays"
        assert volume == volumes.get_volume(volume.local_id, secrets=secrets)
    volumes.delete_snapshot(snap.local_id, secrets=secrets)
    assert ceph.rbd("trash", "ls", POOL) != "", "the restored volume still reads through it"
    for volume in (restored, clone, origin):
        volumes.delete_volume(volume.local_id, secrets=secrets)
    assert ceph.rbd("ls", POOL) == "" and ceph.rbd("trash", "ls", POOL) == ""


def test_delete_drops_the_temporary_snapshots_a_killed_clone_left(
    volumes: RbdVolumes, secrets: dict[str, str], pool_io: Any, ceph: CephCluster
) -> None:
    volume = volumes.create_volume(spec("with-leftovers", secrets))
    with rbd.Image(pool_io, image_of(volume.local_id)) as image:
        image.create_snap(f"cairn-for-{image_name('volume', '00000000-0000-4000-8000-000000000000')}")
    volumes.delete_volume(volume.local_id, secrets=secrets)
    assert ceph.rbd("ls", POOL) == "" and ceph.rbd("trash", "ls", POOL) == ""


def test_a_restore_killed_after_taking_the_rbd_snapshot_is_finished_by_its_retry(
    ceph: CephCluster, secrets: dict[str, str], pool_io: Any
) -> None:
    backend = make_backend(ceph)
    origin = backend.create_volume(spec("kill-origin", secrets))
    write(pool_io, image_of(origin.local_id), 0, b"kept")
    snap = backend.create_snapshot("kill-snap", origin.local_id, {}, secrets=secrets)
    restore = spec("kill-restored", secrets, source=SourceRef("snapshot", snap.local_id))

    def restore_dying_before_its_clone() -> None:
        killed = make_backend(ceph)
        clones: list[object] = []

        class Dying:
            """librbd, but the process dies at its second clone: the first finds no RBD
            snapshot to clone from, the restore takes one, and clones again."""

            def __getattr__(self, name: str) -> Any:
                return getattr(rbd.RBD(), name)

            def clone(self, *args: Any, **kwargs: Any) -> None:
                clones.append(args)
                if len(clones) > 1:
                    die()
                rbd.RBD().clone(*args, **kwargs)

        killed.rbd = Dying()
        killed.create_volume(restore)

    killed_in_a_child(restore_dying_before_its_clone)
    assert user_snapshots(pool_io, image_of(snap.local_id, "snap")) == ["cairn"]
    restored = backend.create_volume(restore)
    assert read(pool_io, image_of(restored.local_id), 0, 4) == b"kept"
    images = {image_of(origin.local_id), image_of(snap.local_id, "snap"), image_of(restored.local_id)}
    assert set(ceph.rbd("ls", POOL).split()) == images, "exactly one restored image"
    assert user_snapshots(pool_io, image_of(snap.local_id, "snap")) == ["cairn"], "the retry took none of its own"
    backend.delete_volume(restored.local_id, secrets=secrets)
    backend.delete_snapshot(snap.local_id, secrets=secrets)
    backend.delete_volume(origin.local_id, secrets=secrets)
    backend.clusters.shutdown()


def test_metadata_read_without_an_open_equals_librbds_list(
    pool_io: Any, monkeypatch: pytest.MonkeyPatch, clean_pool: None
) -> None:
    rbd.RBD().create(pool_io, "cairn-metadata-probe", MiB, old_format=False)
    try:
        with rbd.Image(pool_io, "cairn-metadata-probe") as image:
            for i in range(10):
                image.metadata_set(f"key.{i:02d}", f"value {i} " + "x" * i)
            expected = dict(image.metadata_list())
        # Pages of three: the reader goes on after the last key of each page.
        monkeypatch.setattr(controller, "METADATA_READ", 3)
        assert controller._metadata_of(pool_io, "cairn-metadata-probe") == expected
        assert controller._metadata_of(pool_io, "cairn-no-such-image") is None
    finally:
        rbd.RBD().remove(pool_io, "cairn-metadata-probe")
