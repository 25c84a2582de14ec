"""The directory store: atomic puts that leave no temporary file in sight, listings in
key order across folders, and keys that cannot leave the root."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi.backup.directory import DirectoryStore
from csi.backup.store import Store
from csi.errors import InvalidArgument, NotFound

pytestmark = pytest.mark.unit


def files_under(root: Path) -> list[str]:
    """Every file under ``root``, as a path relative to it."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_put_get_exists_delete(tmp_path: Path) -> None:
    store: Store = DirectoryStore(str(tmp_path / "repo"))
    assert store.where == str(tmp_path / "repo")
    assert not store.exists("chunks/ab/abc")
    store.put("chunks/ab/abc", b"one")
    assert store.exists("chunks/ab/abc")
    assert store.get("chunks/ab/abc") == b"one"
    assert (tmp_path / "repo" / "chunks" / "ab" / "abc").read_bytes() == b"one"
    store.put("chunks/ab/abc", b"two, longer")
    assert store.get("chunks/ab/abc") == b"two, longer"
    store.delete("chunks/ab/abc")
    assert not store.exists("chunks/ab/abc")
    store.delete("chunks/ab/abc")  # missing is fine
    store.delete("never/was")


def test_get_of_a_missing_key_names_key_and_store(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    with pytest.raises(NotFound, match=rf"'backups/b1'.*{tmp_path}"):
        store.get("backups/b1")
    store.put("backups/b1", b"")
    assert store.get("backups/b1") == b""
    with pytest.raises(NotFound):
        store.get("backups")  # a folder is no object
    with pytest.raises(NotFound):
        store.get("backups/b1/below")


def test_a_missing_root_is_an_empty_store(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path / "not" / "yet"))
    assert list(store.list()) == []
    assert not store.exists("config")
    store.put("config", b"x")
    assert files_under(tmp_path) == ["not/yet/config"]


def test_list_is_in_key_order_across_folders(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    # "-" and "." sort before "/": a folder's keys come after names that extend its name.
    keys = ["a/b", "a-c", "a.d", "a/a/z", "b", "A", "0", "a/b.c", "a/b-c", "a/bx"]
    for key in keys:
        store.put(key, key.encode())
    listed = list(store.list())
    assert [stored.key for stored in listed] == sorted(keys)
    assert all(stored.size == len(stored.key) for stored in listed)
    assert all(abs(stored.modified - os.stat(tmp_path / stored.key).st_mtime) < 1e-6 for stored in listed)


def test_list_by_prefix(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    for key in ["backups/b1", "backups/b2", "backups/c1", "chunks/00/00aa", "chunks/ff/ffbb", "config", "pending/b3"]:
        store.put(key, b"")
    assert [s.key for s in store.list("backups/")] == ["backups/b1", "backups/b2", "backups/c1"]
    assert [s.key for s in store.list("backups/b")] == ["backups/b1", "backups/b2"]
    assert [s.key for s in store.list("chunks/")] == ["chunks/00/00aa", "chunks/ff/ffbb"]
    assert [s.key for s in store.list("chunks/f")] == ["chunks/ff/ffbb"]
    assert [s.key for s in store.list("c")] == ["chunks/00/00aa", "chunks/ff/ffbb", "config"]
    assert [s.key for s in store.list("config")] == ["config"]
    assert list(store.list("nothing/")) == []
    assert list(store.list("config/")) == []  # a file is no folder


def test_puts_leave_no_temporary_file_and_listings_ignore_them(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    for number in range(20):
        store.put(f"chunks/{number % 3:02d}/c{number}", b"x" * number)
    assert files_under(tmp_path) == sorted(f"chunks/{n % 3:02d}/c{n}" for n in range(20))
    # A put killed before its rename leaves a temporary file beside the target: the
    # object keeps its old content and no listing shows the leftover.
    store.put("backups/b1", b"old")
    leftover = tmp_path / "backups" / ".b1~0123456789ab"
    leftover.write_bytes(b"half of the new")
    assert store.get("backups/b1") == b"old"
    assert [s.key for s in store.list("backups/")] == ["backups/b1"]
    assert [s.key for s in store.list()] == sorted(["backups/b1", *(f"chunks/{n % 3:02d}/c{n}" for n in range(20))])


def test_a_failed_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    store.put("a/b", b"x")
    with pytest.raises(InvalidArgument, match="'a' names a folder"):
        store.put("a", b"y")
    with pytest.raises(InvalidArgument, match="'a/b/c' lies under another key"):
        store.put("a/b/c", b"y")
    assert files_under(tmp_path) == ["a/b"]
    assert [name for name in os.listdir(tmp_path / "a")] == ["b"]


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", ".", "..", "a//b", "a/", "/a", "a b", "a\\b", "a~b", "ä", "a\0b"],
)
def test_keys_are_validated(tmp_path: Path, key: str) -> None:
    store = DirectoryStore(str(tmp_path / "root"))
    with pytest.raises(InvalidArgument, match="invalid store key"):
        store.put(key, b"x")
    with pytest.raises(InvalidArgument, match="invalid store key"):
        store.get(key)
    with pytest.raises(InvalidArgument, match="invalid store key"):
        store.exists(key)
    with pytest.raises(InvalidArgument, match="invalid store key"):
        store.delete(key)
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("prefix", ["../", "a/../", "a b", "~"])
def test_prefixes_are_validated(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid store key prefix"):
        list(DirectoryStore(str(tmp_path)).list(prefix))


def test_keys_with_dots_inside_are_keys(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    for key in ["b.1", "..b", "b..", ".hidden", "x/.y"]:
        store.put(key, key.encode())
        assert store.get(key) == key.encode()
    assert [s.key for s in store.list()] == sorted(["b.1", "..b", "b..", ".hidden", "x/.y"])


def test_sweep_removes_only_old_leftovers_of_interrupted_puts(tmp_path: Path) -> None:
    store = DirectoryStore(str(tmp_path))
    store.put("chunks/ab/abcd", b"kept")
    folder = tmp_path / "chunks" / "ab"
    old = folder / ".abce~0123456789ab"
    old.write_bytes(b"half")
    os.utime(old, (1000, 1000))
    fresh = folder / ".abcf~0123456789ab"
    fresh.write_bytes(b"being written")
    assert store.sweep(before=2000) == 1
    assert not old.exists() and fresh.exists()
    assert store.get("chunks/ab/abcd") == b"kept"


def test_puts_racing_to_make_one_folder_all_succeed(tmp_path: Path) -> None:
    """Many puts into a folder none has made yet: each makes it or finds it made."""
    for attempt in range(20):
        store = DirectoryStore(str(tmp_path / f"store-{attempt}"))
        barrier = threading.Barrier(8)

        def put(i: int, store: DirectoryStore = store, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            store.put(f"chunks/ab/{i:04d}", b"x")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(8)))
        assert [s.key for s in store.list("chunks/")] == [f"chunks/ab/{i:04d}" for i in range(8)]
