"""The local backend's journal on real files: what a call acknowledged survives the loss
of everything it did not flush, a blank create and a delete cost one flush each (shared
by calls in flight), torn entries are skipped, and checkpoints keep the journal short
without removing a file before the changes it holds are flushed."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.backends.local import journal
from csi.backends.local.controller import LocalVolumes
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def spec(name: str, size: int = 8 * MiB, source: SourceRef | None = None) -> VolumeSpec:
    return VolumeSpec(name=name, required_bytes=size, limit_bytes=0, capabilities=(RWO,), parameters={}, source=source)


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "local")


class Flushes:
    """Counts the flushes made, by what they flushed: the journal, a folder, or another
    file (a record, an image)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: Counter[str] = Counter()
        for name in ("fsync", "fdatasync"):
            monkeypatch.setattr(os, name, self._counting(getattr(os, name)))

    def _counting(self, real: object) -> object:
        def flush(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            what = "journal" if path.endswith(journal.SUFFIX) else "folder" if os.path.isdir(path) else "file"
            self.seen[what] += 1
            real(fd)  # type: ignore[operator]

        return flush


def journal_files(root: str) -> list[str]:
    return journal.files_in(os.path.join(root, "journal"))


def test_a_blank_create_and_a_delete_cost_one_journal_flush_each(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = LocalVolumes(root, "node-a")
    volumes.create_volume(spec("pvc-0"))  # the journal's file is made (and its folder flushed) once
    flushes = Flushes(monkeypatch)
    volume = volumes.create_volume(spec("pvc-1"))
    assert flushes.seen == {"journal": 1}, "the image and the record are not flushed one by one"
    volumes.delete_volume(volume.local_id)
    assert flushes.seen == {"journal": 2}


def test_concurrent_creates_share_journal_flushes(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = LocalVolumes(root, "node-a")
    volumes.create_volume(spec("pvc-0"))  # the journal's file is made (and its folder flushed) once
    real = os.fdatasync

    def slow(fd: int) -> None:  # a disk slow enough for callers to pile up behind a flush
        threading.Event().wait(0.005)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    flushes = Flushes(monkeypatch)
    threads = [
        threading.Thread(target=lambda n=n: [volumes.create_volume(spec(f"pvc-{n}-{i}")) for i in range(10)])
        for n in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(volumes.list_volumes()) == 161
    assert flushes.seen["journal"] < 160 / 2, "calls in flight share the journal's flushes"
    assert set(flushes.seen) == {"journal"}


@pytest.mark.parametrize("lost", [("record",), ("image",), ("record", "image"), ("size",)])
def test_an_acknowledged_blank_volume_survives_losing_what_was_not_flushed(root: str, lost: tuple[str, ...]) -> None:
    volumes = LocalVolumes(root, "node-a")
    made = volumes.create_volume(spec("pvc-1", 8 * MiB))
    record, image = volumes.layout.record_path("volume", made.local_id), volumes.layout.image("volume", made.local_id)
    # A power loss: neither the record, nor the image's name or size was flushed.
    if "record" in lost:
        os.unlink(record)
    if "image" in lost:
        os.unlink(image)
    if "size" in lost:
        os.truncate(image, 0)
    again = LocalVolumes(root, "node-a")
    assert again.get_volume(made.local_id) == made
    assert os.stat(image).st_size == 8 * MiB
    assert journal_files(root) == [], "replayed, flushed and dropped"


def test_an_acknowledged_delete_survives_losing_the_removals(root: str) -> None:
    volumes = LocalVolumes(root, "node-a")
    made = volumes.create_volume(spec("pvc-1"))
    record, image = volumes.layout.record_path("volume", made.local_id), volumes.layout.image("volume", made.local_id)
    saved = Path(record).read_bytes()
    volumes.delete_volume(made.local_id)
    Path(record).write_bytes(saved)  # the removals never reached the disk
    Path(image).write_bytes(b"")
    again = LocalVolumes(root, "node-a")
    assert again.lookup_volume("pvc-1") is None
    assert not os.path.exists(record) and not os.path.exists(image)


def test_an_acknowledged_publication_and_growth_survive_losing_the_record(root: str) -> None:
    volumes = LocalVolumes(root, "node-a")
    made = volumes.create_volume(spec("pvc-1", 8 * MiB))
    record = volumes.layout.record_path("volume", made.local_id)
    before = Path(record).read_bytes()
    volumes.publish_volume(made.local_id, "node-a", RWO, readonly=False)
    assert volumes.expand_volume(made.local_id, 16 * MiB, 0) == 16 * MiB
    Path(record).write_bytes(before)  # the record as it was before both
    again = LocalVolumes(root, "node-a").get_volume(made.local_id)
    assert again.published_nodes == ("node-a",)
    assert again.capacity_bytes == 16 * MiB


def test_a_snapshot_copy_is_flushed_before_the_journal_names_it(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = LocalVolumes(root, "node-a")
    made = volumes.create_volume(spec("pvc-1"))
    flushes = Flushes(monkeypatch)
    volumes.create_snapshot("snap-1", made.local_id, {})
    assert flushes.seen == {"file": 1, "folder": 1, "journal": 1}, "the copy, its name, then its record"


def test_a_retry_that_finds_its_volume_journals_it_again(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The call that made the volume may have died before its journal entry: the retry's
    answer must not rest on files nobody flushed."""
    volumes = LocalVolumes(root, "node-a")
    made = volumes.create_volume(spec("pvc-1"))
    for path in journal_files(root):
        os.truncate(path, 0)  # as if the first call died before its entry
    assert volumes.create_volume(spec("pvc-1")) == made
    os.unlink(volumes.layout.record_path("volume", made.local_id))
    assert LocalVolumes(root, "node-a").get_volume(made.local_id) == made


def test_a_clean_close_settles_and_removes_the_journal(root: str) -> None:
    volumes = LocalVolumes(root, "node-a")
    made = volumes.create_volume(spec("pvc-1"))
    gone = volumes.create_volume(spec("pvc-2"))
    volumes.delete_volume(gone.local_id)
    assert len(journal_files(root)) == 1
    volumes.settle()
    assert journal_files(root) == [], "a clean stop leaves nothing to replay"
    assert LocalVolumes(root, "node-a").list_volumes() == [made]


def test_torn_entries_are_skipped_and_later_ones_count() -> None:
    first = journal.encode("volume", "vol-1", {"name": "a"})
    torn = journal.encode("volume", "vol-2", {"name": "b"})[:-9]
    last = journal.encode("volume", "vol-3", None)
    garbage = b"\x00" * 64
    entries = list(journal.decode(first + torn + last + garbage))
    assert entries == [(("volume", "vol-1"), {"name": "a"}), (("volume", "vol-3"), None)]


def test_what_a_crash_left_half_written_in_the_journal_is_not_applied(root: str) -> None:
    volumes = LocalVolumes(root, "node-a")
    kept = volumes.create_volume(spec("pvc-1"))
    [path] = journal_files(root)
    with open(path, "ab") as handle:  # an entry for another volume, cut short by the crash
        handle.write(journal.encode("volume", volumes.layout.local_id("volume", "pvc-2"), {"name": "pvc-2"})[:40])
    again = LocalVolumes(root, "node-a")
    assert [v.local_id for v in again.list_volumes()] == [kept.local_id]


@pytest.fixture
def small_journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(journal, "LIMIT", 4096)  # a checkpoint every dozen changes or so
    yield


def test_checkpoints_keep_the_journal_short_and_flush_before_they_remove(
    root: str, small_journal: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    volumes = LocalVolumes(root, "node-a")
    settled: list[set[journal.Key]] = []
    real = volumes.layout.settle
    gate = threading.Event()

    def slow_settle(keys: set[journal.Key]) -> None:
        gate.wait(5)  # appends go on meanwhile, into the newer file
        settled.append(set(keys))
        real(keys)

    volumes.layout.journal.settle = slow_settle
    made = [volumes.create_volume(spec(f"pvc-{i}")) for i in range(60)]
    assert len(journal_files(root)) == 2, "one checkpoint at a time: the full file waits, the newer one grows"
    gate.set()
    volumes.layout.journal.wait()
    assert volumes.layout.journal.checkpoints == 1
    assert len(journal_files(root)) == 1
    assert settled and all(key[0] == "volume" for key in settled[0])
    more = [volumes.create_volume(spec(f"more-{i}")) for i in range(20)]
    volumes.layout.journal.wait()
    assert volumes.layout.journal.checkpoints >= 2
    # Everything, checkpointed or still journaled, comes back after a restart.
    again = LocalVolumes(root, "node-a")
    assert sorted(v.local_id for v in again.list_volumes()) == sorted(v.local_id for v in made + more)


def test_a_failed_checkpoint_keeps_its_file_and_stops_later_ones(root: str, small_journal: None) -> None:
    volumes = LocalVolumes(root, "node-a")

    def broken(keys: set[journal.Key]) -> None:
        raise OSError(5, "Input/output error")

    volumes.layout.journal.settle = broken
    made = [volumes.create_volume(spec(f"pvc-{i}")) for i in range(60)]
    volumes.layout.journal.wait()
    assert volumes.layout.journal.checkpoints == 0
    assert len(journal_files(root)) == 2, "the older file stays, and no newer one is removed before it"
    for volume in made:
        os.unlink(volumes.layout.record_path("volume", volume.local_id))
    again = LocalVolumes(root, "node-a")
    assert len(again.list_volumes()) == 60


def test_a_new_file_that_cannot_be_made_leaves_the_full_one_in_use(
    root: str, small_journal: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    volumes = LocalVolumes(root, "node-a")
    volumes.create_volume(spec("pvc-0"))

    def full_disk(folder: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as broken:
        broken.setattr(journal, "fsync_dir", full_disk)
        made = [volumes.create_volume(spec(f"pvc-{i}")) for i in range(1, 40)]
        assert len(journal_files(root)) == 1, "every append went on in the one file"
    volumes.create_volume(spec("pvc-40"))
    volumes.layout.journal.wait()
    volumes.settle()
    assert journal_files(root) == []
    assert len(LocalVolumes(root, "node-a").list_volumes()) == 41 == len(made) + 2
