"""Backups and restores through the engine, on real local backends and a real directory
repository: full then incremental backups that read only what changed, restores onto
another backend byte for byte, deletion that frees only what no other backup uses,
cancellation, and damaged chunks that fail a restore by name."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi import ids
from csi.backends import local
from csi.backends.base import Backend
from csi.backends.local.controller import LocalVolumes
from csi.backup import engine
from csi.backup.directory import DirectoryStore
from csi.backup.engine import SNAPSHOT_PREFIX, Backups, backup_id, chunk_indexes, in_parallel
from csi.backup.repository import Repository
from csi.backup.store import Store, Stored
from csi.config import BackendConfig
from csi.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from csi.model import NO_SECRETS, AccessMode, AccessType, Capability, Extent, MiB, Secrets, SourceRef, VolumeSpec
from csi.registry import Registry

pytestmark = pytest.mark.unit

CHUNK = 64 * 1024
SIZE = 4 * MiB
RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


class CountingStore:
    """The directory store, counting what is written, and able to hold a put."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.puts: list[str] = []
        self.hold: threading.Event | None = None
        self.holding = threading.Event()

    @property
    def where(self) -> str:
        return self.inner.where

    def put(self, key: str, data: bytes) -> None:
        if self.hold is not None and key.startswith("chunks/"):
            self.holding.set()
            self.hold.wait(30)
        self.puts.append(key)
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[Stored]:
        return self.inner.list(prefix)

    def sweep(self, before: float) -> int:
        return self.inner.sweep(before)


@dataclass
class World:
    registry: Registry
    store: CountingStore
    repository: Repository
    backups: Backups
    root: Path

    def backend(self, name: str) -> Backend:
        backend = self.registry.find(name)
        assert backend is not None
        return backend

    def local(self, name: str) -> LocalVolumes:
        volumes = self.backend(name).volumes
        assert isinstance(volumes, LocalVolumes)
        return volumes

    def volume(self, name: str, backend: str = "a", size: int = SIZE) -> str:
        made = self.backend(backend).volumes.create_volume(VolumeSpec(name, size, 0, (RWO,)))
        return ids.encode(backend, made.local_id)

    def image(self, volume_id: str) -> str:
        ref = ids.decode(volume_id)
        return self.local(ref.backend).layout.image("volume", ref.local_id)

    def write(self, volume_id: str, offset: int, data: bytes) -> None:
        fd = os.open(self.image(volume_id), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def digest(self, volume_id: str) -> str:
        with open(self.image(volume_id), "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()

    def back_up(self, name: str, volume_id: str) -> str:
        """A finished backup's driver-wide snapshot ID."""
        first = self.backups.backup("vault", name, volume_id)
        self.backups.wait()
        done = self.backups.backup("vault", name, volume_id)
        assert not first.ready or first == done
        assert done.ready, f"backup {name} did not finish"
        return ids.encode("vault", done.local_id)

    def restore(self, backup: str, name: str, backend: str = "b") -> str:
        manifest = self.backups.manifest(backup)
        target = self.backend(backend)
        spec = VolumeSpec(name, manifest.size, 0, (RWO,), source=SourceRef("backup", backup))
        volume = target.volumes.create_volume(spec)
        assert volume.filling
        self.backups.restore(backup, target, volume, secrets={})
        assert not target.volumes.get_volume(volume.local_id).filling
        return ids.encode(backend, volume.local_id)


@pytest.fixture
def world(tmp_path: Path) -> World:
    backends = [
        local.build(BackendConfig(name, "local", None, {"path": str(tmp_path / name)}), "node-a", True, False)
        for name in ("a", "b")
    ]
    registry = Registry(backends)
    store = CountingStore(DirectoryStore(str(tmp_path / "repository")))
    repository = Repository("vault", store, chunk_size=CHUNK)
    return World(registry, store, repository, Backups(registry, {"vault": repository}), tmp_path)


def chunk_keys(world: World) -> set[str]:
    return {s.key for s in world.store.list("chunks/")}


def test_chunk_indexes_cover_each_touched_chunk_once() -> None:
    extents = [Extent(0, 1), Extent(10, 5), Extent(CHUNK - 1, 2), Extent(5 * CHUNK, 3 * CHUNK)]
    assert list(chunk_indexes(extents, CHUNK, 7)) == [0, 1, 5, 6]
    # Overlapping extents (a diff plus the chunk that grew) touch each chunk once.
    assert list(chunk_indexes([Extent(0, 3 * CHUNK), Extent(CHUNK, 10), Extent(2 * CHUNK, CHUNK)], CHUNK, 7)) == [
        0,
        1,
        2,
    ]


def test_a_full_backup_restores_byte_for_byte_onto_another_backend(world: World) -> None:
    volume = world.volume("data")
    payload = random.Random(1).randbytes(3 * CHUNK + 100)
    world.write(volume, CHUNK // 2, payload)
    world.write(volume, SIZE - 10, b"tail-bytes")
    backup = world.back_up("full", volume)

    manifest = world.backups.manifest(backup)
    assert manifest.size == SIZE and manifest.parent == ""
    # Only the chunks that hold data were read and stored; the holes cost nothing.
    assert sum(d is not None for d in manifest.chunks) == 5
    assert manifest.read_bytes <= 6 * CHUNK
    restored = world.restore(backup, "copy")
    assert world.digest(restored) == world.digest(volume)


def test_an_incremental_backup_reads_only_the_changed_chunks(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, random.Random(2).randbytes(SIZE))
    first = world.back_up("one", volume)
    assert world.backups.manifest(first).read_bytes == SIZE

    world.write(volume, 7 * CHUNK + 5, b"changed")
    stored_before = chunk_keys(world)
    second = world.back_up("two", volume)
    manifest = world.backups.manifest(second)
    assert manifest.parent == backup_id("one")
    assert manifest.read_bytes <= 2 * CHUNK, "an incremental backup read more than the changed chunk"
    assert len(chunk_keys(world) - stored_before) == 1
    assert world.digest(world.restore(second, "two-copy")) == world.digest(volume)
    # Only the newest backup's snapshot is kept, as the base of the next one.
    snapshots = world.backend("a").volumes.list_snapshots()
    assert [s.name for s in snapshots] == [SNAPSHOT_PREFIX + backup_id("two")]


def test_a_base_that_goes_while_a_backup_starts_makes_it_read_the_volume_whole(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup of the same volume beside this one finished and dropped the base between
    this backup finding it and diffing against it: this backup still succeeds."""
    volume = world.volume("data")
    world.write(volume, 0, random.Random(3).randbytes(SIZE // 2))
    first = world.back_up("one", volume)
    volumes = world.local("a")
    diff = volumes.changed

    def base_gone_first(base: str, target: str, start: int = 0, **kwargs: object) -> object:
        volumes.delete_snapshot(base)
        return diff(base, target, start, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(volumes, "changed", base_gone_first)
    world.write(volume, 3 * CHUNK, b"changed")
    second = world.back_up("two", volume)
    manifest = world.backups.manifest(second)
    assert manifest.parent == "" and manifest.read_bytes == SIZE // 2, "read whole: what the snapshot holds"
    assert world.digest(world.restore(second, "two-copy")) == world.digest(volume)
    assert world.backups.manifest(first).size == SIZE


def test_a_chain_of_five_backups_restores_each_point_in_time(world: World) -> None:
    volume = world.volume("data")
    rng = random.Random(3)
    expected = {}
    for step in range(5):
        for _ in range(rng.randint(1, 6)):
            offset = rng.randrange(SIZE - 4096)
            world.write(volume, offset, rng.randbytes(rng.randint(1, 20000)))
        expected[f"point-{step}"] = world.digest(volume)
        world.back_up(f"point-{step}", volume)
    for name, digest in expected.items():
        restored = world.restore(ids.encode("vault", backup_id(name)), f"restored-{name}")
        assert world.digest(restored) == digest, f"{name} did not restore to its own point in time"


def test_a_backup_of_a_grown_volume_covers_the_growth(world: World) -> None:
    volume = world.volume("data", size=SIZE + 1000)
    world.write(volume, SIZE, b"x" * 1000)
    world.back_up("before", volume)
    world.local("a").expand_volume(ids.decode(volume).local_id, 2 * SIZE, 0)
    world.write(volume, SIZE + 500, b"y" * 5000)
    after = world.back_up("after", volume)
    assert world.backups.manifest(after).size == 2 * SIZE
    assert world.digest(world.restore(after, "grown")) == world.digest(volume)


def test_deleting_a_backup_frees_only_what_no_other_backup_uses(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, random.Random(4).randbytes(4 * CHUNK))
    first = world.back_up("one", volume)
    shared = chunk_keys(world)
    world.write(volume, 10 * CHUNK, random.Random(5).randbytes(CHUNK))
    second = world.back_up("two", volume)
    assert chunk_keys(world) > shared

    world.backups.delete("vault", ids.decode(second, "snapshot").local_id)
    with pytest.raises(NotFound):
        world.backups.get("vault", ids.decode(second, "snapshot").local_id)
    # What the first backup uses stays; what only the second used is gone (no grace for
    # it: nothing else was running), and so is its snapshot.
    assert chunk_keys(world) == shared
    assert world.backend("a").volumes.list_snapshots() == []
    assert world.digest(world.restore(first, "one-copy")) != world.digest(volume)


def test_the_same_name_for_another_volume_is_already_exists(world: World) -> None:
    one, two = world.volume("one"), world.volume("two")
    world.back_up("nightly", one)
    with pytest.raises(AlreadyExists, match="nightly"):
        world.backups.backup("vault", "nightly", two)


def test_a_backup_deleted_while_it_runs_is_cancelled_and_leaves_no_snapshot(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, random.Random(6).randbytes(SIZE))
    world.store.hold = threading.Event()
    started = world.backups.backup("vault", "slow", volume)
    assert not started.ready
    assert world.store.holding.wait(30)
    assert not world.backups.get("vault", started.local_id).ready
    releaser = threading.Timer(0.2, world.store.hold.set)
    releaser.start()
    world.backups.delete("vault", started.local_id)
    releaser.join()
    with pytest.raises(NotFound):
        world.backups.get("vault", started.local_id)
    assert world.backend("a").volumes.list_snapshots() == []
    assert not world.repository.exists(started.local_id)


def test_a_failed_backup_reports_its_error_once_then_starts_again(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, b"data")
    original = world.repository.put_chunk
    failures = iter([OSError(28, "No space left on device")])

    def failing(data: bytes) -> tuple[str, int]:
        error = next(failures, None)
        if error is not None:
            raise error
        return original(data)

    world.repository.put_chunk = failing  # type: ignore[method-assign]
    world.backups.backup("vault", "flaky", volume)
    world.backups.wait()
    with pytest.raises(OSError, match="No space"):
        world.backups.backup("vault", "flaky", volume)
    assert world.back_up("flaky", volume)


def test_a_damaged_chunk_fails_the_restore_by_name_and_leaves_the_volume_filling(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, random.Random(7).randbytes(2 * CHUNK))
    backup = world.back_up("fragile", volume)
    digest = next(d for d in world.backups.manifest(backup).chunks if d is not None)
    key = next(s.key for s in world.store.list("chunks/") if s.key.endswith(digest))
    path = world.root / "repository" / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    target = world.backend("b")
    made = target.volumes.create_volume(VolumeSpec("victim", SIZE, 0, (RWO,), source=SourceRef("backup", backup)))
    with pytest.raises(DataLoss, match=digest[:12]):
        world.backups.restore(backup, target, made, secrets={})
    assert target.volumes.get_volume(made.local_id).filling


def test_a_restore_onto_a_volume_too_small_is_refused(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, b"data")
    backup = world.back_up("big", volume)
    target = world.backend("b")
    made = target.volumes.create_volume(VolumeSpec("small", MiB, 0, (RWO,), source=SourceRef("backup", backup)))
    with pytest.raises(FailedPrecondition, match="less than backup"):
        world.backups.restore(backup, target, made, secrets={})


def samples(world: World) -> dict[tuple[str, tuple[str, ...]], float]:
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in world.backups.collect()
        for sample in family.samples
    }


def test_metrics_show_running_backups_their_progress_and_what_they_moved(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, random.Random(8).randbytes(2 * CHUNK))
    world.store.hold = threading.Event()
    world.backups.backup("vault", "watched", volume)
    assert world.store.holding.wait(30)
    during = samples(world)
    assert during[("cairn_backups_running", ("vault",))] == 1
    assert during[("cairn_backup_progress_ratio", ("vault", "watched"))] < 1
    world.store.hold.set()
    world.backups.wait()
    after = samples(world)
    assert after[("cairn_backups_running", ("vault",))] == 0
    assert ("cairn_backup_progress_ratio", ("vault", "watched")) not in after
    assert after[("cairn_backup_read_bytes_total", ("vault",))] == 2 * CHUNK
    assert after[("cairn_backup_stored_bytes_total", ("vault",))] > 0
    assert after[("cairn_backups_ended_total", ("vault", "saved"))] == 1
    assert after[("cairn_backups_ended_total", ("vault", "failed"))] == 0


def test_in_parallel_does_every_chunk_and_stops_starting_chunks_after_an_error() -> None:
    done: list[int] = []
    lock = threading.Lock()

    def record(index: int) -> None:
        with lock:
            done.append(index)

    in_parallel(range(100), record)
    assert sorted(done) == list(range(100))

    started: list[int] = []

    def failing(index: int) -> None:
        with lock:
            started.append(index)
        if index == 3:
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        in_parallel(range(10_000), failing, workers=2)
    # What was queued when it failed may still run; nothing is queued after it.
    assert len(started) < 20


def test_a_volume_of_a_backend_without_block_access_is_refused_by_name(tmp_path: Path) -> None:
    from tests.fakes import FAKE_CAPABILITIES, FakeVolumes

    fake = Backend("plain", "fake", None, FAKE_CAPABILITIES, FakeVolumes(), None)
    volume = fake.volumes.create_volume(VolumeSpec("data", MiB, 0, (RWO,)))
    repository = Repository("vault", DirectoryStore(str(tmp_path / "repository")), chunk_size=CHUNK)
    backups = Backups(Registry([fake]), {"vault": repository})
    with pytest.raises(InvalidArgument, match=r"backend 'plain' .* does not read"):
        backups.backup("vault", "nightly", ids.encode("plain", volume.local_id))
    with pytest.raises(InvalidArgument, match="'attic' is not configured"):
        backups.backup("attic", "nightly", ids.encode("plain", volume.local_id))


def test_backups_of_one_volume_side_by_side_leave_one_base_snapshot(world: World) -> None:
    volume = world.volume("data")
    world.write(volume, 0, random.Random(9).randbytes(4 * CHUNK))
    world.back_up("first", volume)
    world.write(volume, 8 * CHUNK, b"new data both backups store")
    world.store.hold = threading.Event()
    world.backups.backup("vault", "left", volume)
    world.backups.backup("vault", "right", volume)
    assert world.store.holding.wait(30)
    world.store.hold.set()
    world.backups.wait()
    for name in ("left", "right"):
        assert world.backups.backup("vault", name, volume).ready
    names = [s.name for s in world.backend("a").volumes.list_snapshots()]
    newest = max(world.repository.manifests(), key=lambda m: m.created_at)
    assert names == [SNAPSHOT_PREFIX + newest.backup_id]


def crashed_before_its_older_base_went(world: World, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, Backups]:
    """A volume with two saved backups, the second saved by a process that died before
    it removed the first's snapshot (so its in-progress marker is left too), and the
    engine of the process started after it: the volume's ID, the second's ID, the engine."""
    volume = world.volume("data")
    world.write(volume, 0, random.Random(11).randbytes(4 * CHUNK))
    world.back_up("first", volume)
    world.write(volume, 0, b"changed since the first")
    with monkeypatch.context() as patch:
        patch.setattr(world.backups, "_drop_older_bases", lambda *args, **kwargs: True)
        second = ids.decode(world.back_up("second", volume)).local_id
    world.store.put("pending/" + second, json.dumps({"since": time.time()}).encode())
    assert len(world.backend("a").volumes.list_snapshots()) == 2
    return volume, second, Backups(world.registry, {"vault": world.repository})


def busy_snapshots(world: World, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make deleting a snapshot of backend a fail as an image a dead client still
    watches does, until the returned event is set."""
    volumes = world.local("a")
    delete = volumes.delete_snapshot
    released = threading.Event()

    def busy(local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        if not released.is_set():
            raise FailedPrecondition(f"snapshot {local_id} is in use")
        delete(local_id, secrets=secrets)

    monkeypatch.setattr(volumes, "delete_snapshot", busy)
    return released


def test_a_saved_backup_is_ready_only_once_the_older_base_a_crash_left_is_gone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume, second, restarted = crashed_before_its_older_base_went(world, monkeypatch)
    released = busy_snapshots(world, monkeypatch)
    for _ in range(2):
        assert not restarted.backup("vault", "second", volume).ready
        assert world.repository.pending(second), "the marker stays until the older base is gone"
    released.set()
    assert restarted.backup("vault", "second", volume).ready
    assert not world.repository.pending(second)
    assert [s.name for s in world.backend("a").volumes.list_snapshots()] == [SNAPSHOT_PREFIX + second]


def test_an_older_base_that_stays_busy_is_left_to_the_next_backup(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume, second, restarted = crashed_before_its_older_base_went(world, monkeypatch)
    released = busy_snapshots(world, monkeypatch)
    monkeypatch.setattr(engine, "BASE_PATIENCE", 0.0)
    assert restarted.backup("vault", "second", volume).ready, "no wait past the patience"
    assert not world.repository.pending(second)
    assert len(world.backend("a").volumes.list_snapshots()) == 2
    released.set()
    world.backups = restarted
    third = ids.decode(world.back_up("third", volume)).local_id
    assert [s.name for s in world.backend("a").volumes.list_snapshots()] == [SNAPSHOT_PREFIX + third]
