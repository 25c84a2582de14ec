"""Group commit of a directory's entries: every caller is covered by an fsync that began
after its change, and concurrent callers share fsyncs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from csi import files
from csi.files import DirectorySync

pytestmark = pytest.mark.unit


class Recorder:
    """Stands in for the directory fsync: notes how many changes had been made when each
    fsync began, and is slow enough for callers to pile up behind it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes = 0
        self.began: list[int] = []
        self.finished: list[int] = []

    def change(self) -> int:
        with self.lock:
            self.changes += 1
            return self.changes

    def fsync_dir(self, _directory: str) -> None:
        with self.lock:
            seen = self.changes
            self.began.append(seen)
        time.sleep(0.005)
        with self.lock:
            self.finished.append(seen)


def test_each_caller_returns_after_an_fsync_that_began_after_its_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(files, "fsync_dir", recorder.fsync_dir)
    sync = DirectorySync(str(tmp_path))
    problems: list[str] = []

    def caller() -> None:
        for _ in range(20):
            mine = recorder.change()
            sync.sync()
            with recorder.lock:
                if not any(seen >= mine for seen in recorder.finished):
                    problems.append(f"change {mine} returned before an fsync covering it ended")

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems
    assert sync.syncs == len(recorder.finished) < 16 * 20 / 2, "concurrent callers share fsyncs"


def test_a_failed_fsync_covers_nobody(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_directory: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "fsync_dir", broken)
    sync = DirectorySync(str(tmp_path))
    with pytest.raises(OSError):
        sync.sync()
    monkeypatch.undo()
    sync.sync()
    assert sync.syncs == 1


def test_a_lone_caller_syncs_the_real_directory(tmp_path: Path) -> None:
    sync = DirectorySync(str(tmp_path))
    sync.sync()
    sync.sync()
    assert sync.syncs == 2, "one fsync per call when nobody else is waiting"
