"""The local backend's listing index on real files: a page reads its own records, the
index follows this process's changes without rescanning and anyone else's by rescanning,
and a listing walked while volumes come and go neither skips nor repeats."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.backends.local import controller as local_controller
from csi.backends.local import layout
from csi.backends.local.controller import LocalVolumes
from csi.backends.local.layout import Layout
from csi.model import AccessMode, AccessType, Capability, MiB, VolumeSpec

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def spec(name: str) -> VolumeSpec:
    return VolumeSpec(name=name, required_bytes=MiB, limit_bytes=0, capabilities=(RWO,), parameters={})


@pytest.fixture
def volumes(tmp_path: Path) -> LocalVolumes:
    return LocalVolumes(str(tmp_path / "local"), "node-a")


class Reads:
    """Counts the records a backend reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = Layout.read_record

        def counted(layout: Layout, kind: layout.Kind, local_id: str) -> dict[str, object] | None:
            self.count += 1
            return real(layout, kind, local_id)

        monkeypatch.setattr(Layout, "read_record", counted)


def walk(volumes: LocalVolumes, size: int) -> Iterator[list[str]]:
    after = ""
    while page := [v.local_id for v in volumes.list_volumes(after=after, limit=size)]:
        yield page
        after = page[-1]


def test_a_page_of_ten_thousand_volumes_reads_only_its_own_records(
    volumes: LocalVolumes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "SETTLED_NS", 3600 * 10**9)  # no recheck falls due during the test
    with monkeypatch.context() as quick:
        # Durability is not what this test is about: made without flushing, 10,000 take seconds.
        quick.setattr("csi.files.fsync_dir", lambda _path: None)
        quick.setattr(local_controller, "fsync_file", lambda _path: None)
        quick.setattr(os, "fsync", lambda _fd: None)
        made = sorted(volumes.create_volume(spec(f"pvc-{i}")).local_id for i in range(10_000))
    reads = Reads(monkeypatch)
    seen: list[str] = []
    for page in walk(volumes, 100):
        assert reads.count <= 100, f"a page of 100 read {reads.count} records"
        reads.count = 0
        seen += page
    assert seen == made
    index = volumes.layout.index["volume"]
    assert index.scans == 1, "the folder was read whole once, at the first page"
    volumes.delete_volume(made[5000])
    assert [v.local_id for v in volumes.list_volumes(after=made[4998], limit=2)] == [made[4999], made[5001]]
    assert index.scans == 1, "the index followed the deletion"


def test_the_index_follows_this_process_and_rescans_for_changes_made_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout, "SETTLED_NS", 3600 * 10**9)  # only the folder's time decides here
    root = str(tmp_path / "local")
    mine, other = LocalVolumes(root, "node-a"), LocalVolumes(root, "node-a", recover=False)
    first = mine.create_volume(spec("pvc-1"))
    assert [v.local_id for v in mine.list_volumes()] == [first.local_id]
    index = mine.layout.index["volume"]
    scans = index.scans
    second = mine.create_volume(spec("pvc-2"))
    mine.delete_volume(first.local_id)
    assert [v.local_id for v in mine.list_volumes()] == [second.local_id]
    assert index.scans == scans, "this process's own changes need no scan"

    elsewhere = other.create_volume(spec("pvc-3"))  # another process, or a restore by hand
    assert {v.local_id for v in mine.list_volumes()} == {second.local_id, elsewhere.local_id}
    assert index.scans == scans + 1
    os.unlink(mine.layout.record_path("volume", second.local_id))
    os.unlink(mine.layout.image("volume", second.local_id))
    assert [v.local_id for v in mine.list_volumes()] == [elsewhere.local_id]


def test_a_change_elsewhere_that_leaves_the_folders_time_as_it_was_shows_after_the_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timestamps are coarse: a change made elsewhere in the same tick as one the index
    knows leaves the folder's times as they were (here, a filesystem whose folder times
    never move). The index reads the folder again once the delay after the last change
    it knows has passed."""
    clock = [1_000 * 10**9]
    monkeypatch.setattr(layout, "_now", lambda: clock[0])
    monkeypatch.setattr(layout.Index, "_stat", lambda index: (os.stat(index.folder).st_ino, clock[0], clock[0]))
    root = str(tmp_path / "local")
    mine, other = LocalVolumes(root, "node-a"), LocalVolumes(root, "node-a", recover=False)
    known = mine.create_volume(spec("pvc-1"))
    assert [v.local_id for v in mine.list_volumes()] == [known.local_id]
    hidden = other.create_volume(spec("pvc-2"))
    assert [v.local_id for v in mine.list_volumes()] == [known.local_id], "not seen yet: the times are the same"
    clock[0] += layout.SETTLED_NS
    assert [v.local_id for v in mine.list_volumes()] == sorted([known.local_id, hidden.local_id])
    scans = mine.layout.index["volume"].scans
    list(mine.list_volumes())
    assert mine.layout.index["volume"].scans == scans, "read again only once the delay has passed"


def test_a_listing_walked_while_volumes_come_and_go_neither_skips_nor_repeats(volumes: LocalVolumes) -> None:
    steady = {volumes.create_volume(spec(f"steady-{i}")).local_id for i in range(60)}
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn() -> None:
        rng = random.Random(7)
        try:
            while not stop.is_set():
                made = volumes.create_volume(spec(f"passing-{rng.randrange(40)}"))
                if rng.random() < 0.6:
                    volumes.delete_volume(made.local_id)
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(20):
            seen = [local_id for page in walk(volumes, 7) for local_id in page]
            assert seen == sorted(set(seen)), "in order, each once"
            assert steady <= set(seen), "a volume that existed throughout is listed"
    finally:
        stop.set()
        worker.join()
    assert not failures
