"""The repository format on a real directory store: chunks round trip (plain and
encrypted), deduplicate and fail loudly when damaged; manifests make backups visible;
collection removes exactly the chunks nothing references, and never while a backup runs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from csi.backup import repository
from csi.backup.directory import DirectoryStore
from csi.backup.repository import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    Repository,
    chunk_count,
)
from csi.backup.store import Stored
from csi.errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument, NotFound

pytestmark = pytest.mark.unit

CHUNK = 64 * 1024
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


class CountingStore:
    """A directory store that counts the gets of each key (and, when told, puts a
    pending marker on its first chunk delete: a backup beginning mid-collection)."""

    def __init__(self, root: str) -> None:
        self.inner = DirectoryStore(root)
        self.gets: list[str] = []
        self.begin_backup_on_delete = False

    @property
    def where(self) -> str:
        return self.inner.where

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        if self.begin_backup_on_delete and key.startswith("chunks/"):
            self.begin_backup_on_delete = False
            self.inner.put("pending/late", b"{}")

    def list(self, prefix: str = "") -> Iterator[Stored]:
        return self.inner.list(prefix)

    def sweep(self, before: float) -> int:
        return self.inner.sweep(before)


def make(root: Path, key: bytes | None = None, chunk_size: int = CHUNK) -> Repository:
    return Repository("tank", DirectoryStore(str(root)), key=key, chunk_size=chunk_size)


@pytest.fixture(params=[None, KEY], ids=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    key: bytes | None = request.param
    return make(tmp_path / "repo", key)


def chunk_file(root: Path, digest: str) -> Path:
    return root / "chunks" / digest[:2] / digest


def root_of(repo: Repository) -> Path:
    return Path(repo.store.where)


def data(seed: int, size: int = CHUNK) -> bytes:
    """Incompressible bytes, different for each seed."""
    return hashlib.shake_256(str(seed).encode()).digest(size)


def backup(repo: Repository, backup_id: str, chunks: list[bytes | None], **fields: str) -> Manifest:
    """Store the chunks (None: a zero chunk) and save a manifest for them."""
    digests = tuple(None if chunk is None else repo.put_chunk(chunk)[0] for chunk in chunks)
    manifest = Manifest(
        backup_id=backup_id,
        name=fields.get("name", f"request-{backup_id}"),
        volume_id=fields.get("volume_id", "1:local:vol"),
        base_snapshot=fields.get("base_snapshot", ""),
        parent=fields.get("parent", ""),
        size=len(chunks) * repo.chunk_size,
        chunk_size=repo.chunk_size,
        chunks=digests,
        created_at=1700000000.25,
        read_bytes=len(chunks) * repo.chunk_size,
        new_bytes=123,
    )
    repo.save(manifest)
    return manifest


def age(path: Path, seconds: float) -> None:
    """Make every file under ``path`` (or ``path`` itself) look written ``seconds`` ago."""
    then = time.time() - seconds
    targets = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for target in targets:
        os.utime(target, (then, then))


def chunk_digests(root: Path) -> set[str]:
    return {path.name for path in (root / "chunks").rglob("*") if path.is_file()}


# -- chunks


def test_chunks_round_trip(repo: Repository) -> None:
    for seed, chunk in enumerate([data(1), data(2, 100), b"\0" * CHUNK, b"", b"abc" * 1000]):
        digest, stored = repo.put_chunk(chunk)
        assert digest == repo.digest(chunk)
        assert stored == chunk_file(root_of(repo), digest).stat().st_size > 0, seed
        assert repo.has_chunk(digest)
        assert repo.get_chunk(digest) == chunk
        assert repo.get_chunk(digest, backup="b1") == chunk
    assert not repo.has_chunk("0" * 64)


def test_addresses_and_content_leak_nothing_with_a_key(tmp_path: Path) -> None:
    chunk = data(7)
    plain, encrypted = make(tmp_path / "plain"), make(tmp_path / "encrypted", KEY)
    assert plain.digest(chunk) == hashlib.sha256(chunk).hexdigest()
    assert encrypted.digest(chunk) != hashlib.sha256(chunk).hexdigest()
    assert encrypted.digest(chunk) != make(tmp_path / "other", OTHER_KEY).digest(chunk)
    plain_digest, _ = plain.put_chunk(chunk)
    sealed_digest, _ = encrypted.put_chunk(chunk)
    # zstd keeps incompressible data as it is: visible unless encrypted.
    assert chunk[:64] in chunk_file(tmp_path / "plain", plain_digest).read_bytes()
    assert chunk[:64] not in chunk_file(tmp_path / "encrypted", sealed_digest).read_bytes()
    assert chunk_file(tmp_path / "plain", plain_digest).read_bytes()[0] == repository.PLAIN
    assert chunk_file(tmp_path / "encrypted", sealed_digest).read_bytes()[0] == repository.SEALED


def test_compression(repo: Repository) -> None:
    _, stored = repo.put_chunk(b"the same line again\n" * 3000)
    assert stored < 1000


def test_same_data_is_stored_once(repo: Repository) -> None:
    first = repo.put_chunk(data(1))
    second = repo.put_chunk(data(1))
    assert first[0] == second[0]
    assert first[1] > 0
    assert second[1] == 0
    assert chunk_digests(root_of(repo)) == {first[0]}


def test_chunks_larger_than_the_chunk_size_are_refused(repo: Repository) -> None:
    with pytest.raises(InvalidArgument, match="larger than"):
        repo.put_chunk(b"x" * (CHUNK + 1))


@pytest.mark.parametrize("digest", ["", "abc", "G" * 64, "A" * 64, "../" + "0" * 61])
def test_invalid_digests_are_refused(repo: Repository, digest: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid chunk digest"):
        repo.get_chunk(digest)
    with pytest.raises(InvalidArgument, match="invalid chunk digest"):
        repo.has_chunk(digest)


@pytest.mark.parametrize("where", ["header", "start", "middle", "end"])
def test_a_damaged_chunk_is_data_loss_naming_it(repo: Repository, where: str) -> None:
    digest, _ = repo.put_chunk(data(3))
    path = chunk_file(root_of(repo), digest)
    blob = bytearray(path.read_bytes())
    position = {"header": 0, "start": 1, "middle": len(blob) // 2, "end": len(blob) - 1}[where]
    blob[position] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(DataLoss, match=rf"chunk {digest} of backup 'b7' in backup repository 'tank' \(.*\) is damaged"):
        repo.get_chunk(digest, backup="b7")
    with pytest.raises(DataLoss, match=rf"chunk {digest} in backup repository 'tank'"):
        repo.get_chunk(digest)


def test_an_unknown_format_is_refused(repo: Repository) -> None:
    digest, _ = repo.put_chunk(data(3))
    path = chunk_file(root_of(repo), digest)
    path.write_bytes(b"\x09" + path.read_bytes()[1:])
    with pytest.raises(DataLoss, match="unknown format byte 0x09"):
        repo.get_chunk(digest)


def test_truncated_and_empty_chunks_are_damaged(repo: Repository) -> None:
    digest, _ = repo.put_chunk(data(3))
    path = chunk_file(root_of(repo), digest)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataLoss, match="is damaged"):
        repo.get_chunk(digest)
    path.write_bytes(b"")
    with pytest.raises(DataLoss, match="is damaged: it is empty"):
        repo.get_chunk(digest)


def test_a_frame_claiming_more_than_a_chunk_is_damaged(tmp_path: Path) -> None:
    repo = make(tmp_path)
    digest, _ = repo.put_chunk(b"small")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (CHUNK + 1))
    chunk_file(tmp_path, digest).write_bytes(bytes([repository.PLAIN]) + bomb)
    with pytest.raises(DataLoss, match=f"claims {CHUNK + 1} bytes, more than the {CHUNK}"):
        repo.get_chunk(digest)


def test_a_chunk_stored_under_another_address_is_damaged(repo: Repository) -> None:
    one, _ = repo.put_chunk(data(1))
    two, _ = repo.put_chunk(data(2))
    chunk_file(root_of(repo), two).write_bytes(chunk_file(root_of(repo), one).read_bytes())
    with pytest.raises(DataLoss, match=rf"chunk {two} .* is damaged"):
        repo.get_chunk(two)


def test_a_missing_chunk_is_data_loss(repo: Repository) -> None:
    digest, _ = repo.put_chunk(data(4))
    chunk_file(root_of(repo), digest).unlink()
    with pytest.raises(DataLoss, match=rf"chunk {digest} of backup 'b1' in backup repository 'tank' .* is missing"):
        repo.get_chunk(digest, backup="b1")


# -- keys, chunk sizes and the config


def test_a_short_key_or_odd_chunk_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="the key has 31 bytes; it needs at least 32"):
        make(tmp_path, b"k" * 31)
    make(tmp_path, b"k" * 64)  # longer is fine
    for size in [0, 1000, 4097, 128 * 1024 * 1024]:
        with pytest.raises(InvalidArgument, match="chunk size"):
            make(tmp_path, chunk_size=size)
    assert not (tmp_path / "config").exists()  # nothing written before first use


def test_the_config_is_written_at_first_use(tmp_path: Path) -> None:
    repo = make(tmp_path, KEY)
    repo.put_chunk(b"x")
    config = json.loads((tmp_path / "config").read_bytes())
    assert config["format"] == repository.FORMAT
    assert config["chunk_size"] == CHUNK
    assert config["encrypted"] is True
    assert len(config["key_check"]) == 64
    assert KEY.hex() not in (tmp_path / "config").read_text()


@pytest.mark.parametrize(
    ("written_with", "opened_with", "error", "message"),
    [
        (KEY, OTHER_KEY, InvalidArgument, "the key given is not the key of backup repository 'tank'"),
        (KEY, None, InvalidArgument, "backup repository 'tank' .* is encrypted: give its key"),
        (None, KEY, InvalidArgument, "backup repository 'tank' .* is not encrypted, but a key was given"),
    ],
)
def test_the_wrong_key_is_refused_before_anything_is_written(
    tmp_path: Path, written_with: bytes | None, opened_with: bytes | None, error: type[Exception], message: str
) -> None:
    first = make(tmp_path, written_with)
    backup(first, "b1", [data(1)])
    before = sorted(s.key for s in first.store.list())
    wrong = make(tmp_path, opened_with)
    with pytest.raises(error, match=message):
        wrong.check()
    for attempt in (lambda: wrong.put_chunk(data(2)), lambda: wrong.manifest("b1"), wrong.verify):
        with pytest.raises(error, match=message):
            attempt()
    with pytest.raises(error, match=message), wrong.writing("b2"):
        pass
    assert sorted(s.key for s in first.store.list()) == before


def test_another_chunk_size_is_refused(tmp_path: Path) -> None:
    make(tmp_path).put_chunk(b"x")
    other = make(tmp_path, chunk_size=2 * CHUNK)
    with pytest.raises(FailedPrecondition, match=f"backup repository 'tank' .* has chunks of {CHUNK} bytes, not"):
        other.put_chunk(b"x")
    assert make(tmp_path).get_chunk(make(tmp_path).digest(b"x")) == b"x"


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config").write_text(
        json.dumps({"format": 2, "chunk_size": CHUNK, "encrypted": False, "key_check": ""})
    )
    with pytest.raises(FailedPrecondition, match="has format 2; this driver reads format 1"):
        make(tmp_path).check()


def test_a_damaged_config_is_data_loss(tmp_path: Path) -> None:
    (tmp_path / "config").write_text("{")
    with pytest.raises(DataLoss, match="the config of backup repository 'tank'"):
        make(tmp_path).check()


def test_a_new_repository_with_the_default_chunk_size(tmp_path: Path) -> None:
    repo = Repository("big", DirectoryStore(str(tmp_path)))
    assert repo.chunk_size == DEFAULT_CHUNK_SIZE == 4 * 1024 * 1024
    chunk = data(5, DEFAULT_CHUNK_SIZE)
    assert repo.get_chunk(repo.put_chunk(chunk)[0]) == chunk


# -- manifests


def test_manifests_round_trip(repo: Repository) -> None:
    assert not repo.exists("b1")
    saved = backup(repo, "b1", [data(1), None, data(2)], name="req", base_snapshot="1:local:snap", parent="b0")
    assert repo.exists("b1")
    assert repo.manifest("b1") == saved
    assert saved.chunks[1] is None
    assert len(saved.chunks) == chunk_count(saved.size, saved.chunk_size) == 3
    # A fresh instance reads the same.
    assert make(root_of(repo), KEY if repo.encrypted else None).manifest("b1") == saved


def test_a_manifest_is_encrypted_with_a_key(tmp_path: Path) -> None:
    repo = make(tmp_path, KEY)
    backup(repo, "b1", [data(1)], name="secret-name", volume_id="1:local:secret-volume")
    stored = (tmp_path / "backups" / "b1").read_bytes()
    assert stored[0] == repository.SEALED
    assert b"secret" not in stored


def test_a_missing_backup_is_not_found(repo: Repository) -> None:
    with pytest.raises(NotFound, match=r"no backup 'b9' in backup repository 'tank' \("):
        repo.manifest("b9")


@pytest.mark.parametrize("backup_id", ["", ".", "..", "a/b", "a b", "x" * 201])
def test_invalid_backup_ids_are_refused(repo: Repository, backup_id: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid backup ID"):
        repo.manifest(backup_id)
    with pytest.raises(InvalidArgument, match="invalid backup ID"):
        repo.exists(backup_id)
    with pytest.raises(InvalidArgument, match="invalid backup ID"), repo.writing(backup_id):
        pass


def test_inconsistent_manifests_are_refused(repo: Repository) -> None:
    good = backup(repo, "b1", [data(1), data(2)])
    bad = [
        (good.__class__(**{**good.__dict__, "chunks": good.chunks[:1]}), "1 chunks for"),
        (good.__class__(**{**good.__dict__, "chunk_size": CHUNK * 2, "size": CHUNK * 4}), "chunks of"),
        (good.__class__(**{**good.__dict__, "chunks": ("xyz", None)}), "invalid chunk digest"),
        (good.__class__(**{**good.__dict__, "backup_id": "a/b"}), "backup ID"),
        (good.__class__(**{**good.__dict__, "parent": "../b"}), "invalid parent"),
        (good.__class__(**{**good.__dict__, "size": -1, "chunks": ()}), "negative"),
    ]
    for manifest, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            repo.save(manifest)


def test_a_manifest_under_another_name_is_damaged(repo: Repository) -> None:
    backup(repo, "b1", [data(1)])
    root = root_of(repo)
    (root / "backups" / "b2").write_bytes((root / "backups" / "b1").read_bytes())
    with pytest.raises(DataLoss, match=r"the manifest of backup 'b2' in backup repository 'tank' .* is damaged"):
        repo.manifest("b2")


def test_manifests_pages_read_only_the_page(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path))
    writer = Repository("tank", store, key=KEY, chunk_size=CHUNK)
    ids = ["a1", "b-2", "b.3", "b3", "c", "d_4"]
    for number, backup_id in enumerate(ids):
        backup(writer, backup_id, [data(number)])
    reader = Repository("tank", store, key=KEY, chunk_size=CHUNK)
    store.gets.clear()
    page = reader.manifests(after="b-2", limit=2)
    assert [m.backup_id for m in page] == ["b.3", "b3"]
    assert [key for key in store.gets if key != "config"] == ["backups/b.3", "backups/b3"]
    store.gets.clear()
    assert [m.backup_id for m in reader.manifests(after="b3", limit=2)] == ["c", "d_4"]
    assert store.gets == ["backups/c", "backups/d_4"]
    assert reader.manifests(after="d_4", limit=2) == []
    assert [m.backup_id for m in reader.manifests()] == sorted(ids)
    assert [m.backup_id for m in reader.manifests(limit=1)] == ["a1"]
    with pytest.raises(InvalidArgument):
        reader.manifests(limit=-1)


# -- crashes, collection and deletes


def test_a_crashed_backup_is_invisible_and_collected(repo: Repository) -> None:
    kept = backup(repo, "b1", [data(1), data(2)])
    with pytest.raises(RuntimeError), repo.writing("b2"):
        crashed = {repo.put_chunk(data(3))[0], repo.put_chunk(data(4))[0], repo.put_chunk(data(1))[0]}
        raise RuntimeError("killed")
    assert not repo.exists("b2")
    assert [m.backup_id for m in repo.manifests()] == ["b1"]
    root = root_of(repo)
    assert chunk_digests(root) == set(kept.chunks) | crashed
    # Fresh chunks are left for the grace period.
    assert repo.collect().removed == 0
    assert chunk_digests(root) == set(kept.chunks) | crashed
    collected = repo.collect(grace=0)
    assert (collected.removed, collected.kept, collected.skipped) == (2, 2, "")
    assert collected.removed_bytes > 2 * CHUNK
    assert chunk_digests(root) == set(kept.chunks)
    assert repo.verify().ok
    assert not (root / "collecting").exists() or not list((root / "collecting").iterdir())


def test_collect_removes_nothing_while_a_backup_is_in_progress(repo: Repository) -> None:
    repo.put_chunk(data(1))
    root = root_of(repo)
    with repo.writing("b2"):
        assert (root / "pending" / "b2").is_file()
        collected = repo.collect(grace=0)
        assert collected.removed == 0
        assert collected.skipped == "backups in progress: b2"
    assert not (root / "pending" / "b2").exists()
    # Another process's backup: only its marker is visible here.
    repo.store.put("pending/elsewhere", b"{}")
    assert repo.collect(grace=0).skipped == "backups in progress: elsewhere"
    assert len(chunk_digests(root)) == 1


def test_collect_removes_a_stale_marker_and_goes_on(repo: Repository) -> None:
    repo.put_chunk(data(1))
    root = root_of(repo)
    repo.store.put("pending/died", b"{}")
    age(root / "pending" / "died", repository.PENDING_STALE + 60)
    collected = repo.collect(grace=0)
    assert (collected.removed, collected.stale_markers, collected.skipped) == (1, ("died",), "")
    assert not (root / "pending" / "died").exists()
    assert chunk_digests(root) == set()


def test_a_backup_beginning_mid_collection_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "WRITERS_CHECK", 0.0)
    store = CountingStore(str(tmp_path))
    repo = Repository("tank", store, chunk_size=CHUNK)
    for seed in range(5):
        repo.put_chunk(data(seed))
    store.begin_backup_on_delete = True
    collected = repo.collect(grace=0)
    assert (collected.removed, collected.skipped) == (1, "a backup began")
    assert len(chunk_digests(tmp_path)) == 4


def test_a_backup_waits_for_a_running_collection(repo: Repository) -> None:
    root = root_of(repo)
    repo.store.put("collecting/other", b"{}")
    with pytest.raises(Aborted, match="a collection of unused chunks is still running"), repo.writing("b1", wait=0.3):
        pass
    assert not (root / "pending" / "b1").exists()
    # It goes on once the collection is done...
    done = threading.Timer(0.3, repo.store.delete, ["collecting/other"])
    done.start()
    with repo.writing("b1", wait=10):
        assert not repo.store.exists("collecting/other")
    done.join()
    # ...or when the collection died long ago.
    repo.store.put("collecting/dead", b"{}")
    age(root / "collecting" / "dead", repository.COLLECTING_STALE + 60)
    with repo.writing("b1", wait=0):
        pass


def test_a_backup_is_written_once_at_a_time(repo: Repository) -> None:
    with repo.writing("b1"), pytest.raises(Aborted, match="already being written"), repo.writing("b1"):
        pass


def test_a_backup_whose_marker_went_stale_may_not_save(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    with repo.writing("b1"):
        digest, _ = repo.put_chunk(data(1))
        repo.store.delete("pending/b1")  # as a collection does with a stale marker
        with pytest.raises(Aborted, match="start the backup again"):
            backup(repo, "b1", [data(1)])
    assert not repo.exists("b1")
    monkeypatch.setattr(repository, "PENDING_REFRESH", 0.0)
    with repo.writing("b2"):
        repo.store.delete("pending/b2")
        assert repo.has_chunk(digest)  # the refresh finds the marker gone
        repo.store.put("pending/b2", b"{}")
        with pytest.raises(Aborted, match="start the backup again"):
            backup(repo, "b2", [data(1)])


def test_markers_of_backups_in_progress_are_refreshed(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    root = root_of(repo)
    with repo.writing("b1"):
        age(root / "pending" / "b1", 3600)
        repo.put_chunk(data(1))
        assert time.time() - (root / "pending" / "b1").stat().st_mtime > 3000  # not due yet
        monkeypatch.setattr(repository, "PENDING_REFRESH", 0.0)
        repo.put_chunk(data(2))
        assert time.time() - (root / "pending" / "b1").stat().st_mtime < 60
        backup(repo, "b1", [data(1), data(2)])
    assert repo.exists("b1")


def test_deleting_one_backup_keeps_the_chunks_another_shares(repo: Repository) -> None:
    one = backup(repo, "b1", [data(1), data(2), None])
    two = backup(repo, "b2", [data(2), data(3), None], parent="b1")
    root = root_of(repo)
    age(root / "chunks", 7200)
    repo.delete("b1")
    assert not repo.exists("b1")
    assert chunk_digests(root) == {d for d in two.chunks if d is not None}
    assert one.chunks[1] == two.chunks[0]
    assert [repo.get_chunk(d) for d in two.chunks if d] == [data(2), data(3)]
    repo.delete("b1")  # missing is fine
    repo.delete("b2")
    assert chunk_digests(root) == set()
    assert repo.manifests() == []


def test_a_delete_frees_its_own_chunks_at_once_and_orphans_after_the_grace(repo: Repository) -> None:
    kept = backup(repo, "b1", [data(1), data(2)])
    backup(repo, "b2", [data(2), data(3)])
    orphan, _ = repo.put_chunk(data(4))  # a backup that died before its manifest
    repo.delete("b2")
    assert chunk_digests(root_of(repo)) == {*kept.chunks, orphan}
    age(chunk_file(root_of(repo), orphan), repository.GRACE + 60)
    repo.delete("b9")
    assert chunk_digests(root_of(repo)) == set(kept.chunks)


def test_a_delete_during_a_backup_leaves_collection_for_later(repo: Repository) -> None:
    backup(repo, "b1", [data(1)])
    age(root_of(repo) / "chunks", 7200)
    with repo.writing("b2"):
        repo.delete("b1")
    assert not repo.exists("b1")
    assert len(chunk_digests(root_of(repo))) == 1
    assert repo.collect().removed == 1


def test_an_unreadable_manifest_stops_collection(repo: Repository) -> None:
    backup(repo, "b1", [data(1)])
    repo.put_chunk(data(2))
    (root_of(repo) / "backups" / "b1").write_bytes(b"\x01garbage")
    collected = repo.collect(grace=0)
    assert collected.removed == 0
    assert collected.skipped == "manifests cannot be read"
    assert len(collected.problems) == 1 and "backup 'b1'" in collected.problems[0]
    assert len(chunk_digests(root_of(repo))) == 2


# -- verify


def test_verify_finds_damaged_and_missing_chunks(repo: Repository) -> None:
    one = backup(repo, "b1", [data(1), data(2), None])
    two = backup(repo, "b2", [data(2), data(3)])
    verified = repo.verify()
    assert (verified.backups, verified.chunks, verified.problems, verified.ok) == (2, 3, (), True)
    assert verified.bytes == sum(p.stat().st_size for p in (root_of(repo) / "chunks").rglob("*") if p.is_file())
    damaged, shared, missing = one.chunks[0], one.chunks[1], two.chunks[1]
    assert damaged and shared and missing
    path = chunk_file(root_of(repo), damaged)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    chunk_file(root_of(repo), missing).unlink()
    chunk_file(root_of(repo), shared).write_bytes(b"")
    verified = repo.verify()
    assert not verified.ok
    assert verified.chunks == 0
    problems = sorted(verified.problems)
    assert len(problems) == 3
    assert any(f"chunk {damaged} of backup 'b1'" in p and "is damaged" in p for p in problems)
    assert any(f"chunk {missing} of backup 'b2'" in p and "is missing" in p for p in problems)
    assert any(f"chunk {shared} of backup 'b1'" in p and "(and 1 other backups)" in p for p in problems)
    assert all("backup repository 'tank'" in p for p in problems)


def test_verify_reports_an_unreadable_manifest(repo: Repository) -> None:
    backup(repo, "b1", [data(1)])
    backup(repo, "b2", [data(2)])
    (root_of(repo) / "backups" / "b2").write_bytes(b"")
    verified = repo.verify()
    assert (verified.backups, verified.chunks) == (1, 1)
    assert verified.problems == (
        f"the manifest of backup 'b2' in backup repository 'tank' ({root_of(repo)}) is damaged: it is empty",
    )


# -- the chunk codec, for any content


@pytest.fixture(scope="module")
def codec_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Repository]:
    root = tmp_path_factory.mktemp("codec")
    return {"plain": make(root / "plain", chunk_size=4096), "encrypted": make(root / "encrypted", KEY, 4096)}


@settings(max_examples=150, deadline=None, database=None)
@given(
    chunk=st.binary(max_size=4096)
    | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 512)),
    kind=st.sampled_from(["plain", "encrypted"]),
    flip=st.integers(min_value=0),
)
def test_any_chunk_round_trips_and_any_flipped_byte_is_caught(
    codec_repos: dict[str, Repository], chunk: bytes, kind: str, flip: int
) -> None:
    repo = codec_repos[kind]
    chunk = chunk[:4096]
    digest, _ = repo.put_chunk(chunk)
    assert repo.get_chunk(digest) == chunk
    path = chunk_file(root_of(repo), digest)
    original = path.read_bytes()
    blob = bytearray(original)
    blob[flip % len(blob)] ^= 1 << (flip % 8)
    path.write_bytes(bytes(blob))
    try:
        if kind == "encrypted":
            with pytest.raises(DataLoss, match=digest):
                repo.get_chunk(digest)
        else:
            # Unauthenticated: a flip may leave the content intact (a frame's checksum
            # flag, say); whatever it changes is caught.
            try:
                assert repo.get_chunk(digest) == chunk
            except DataLoss as exc:
                assert digest in str(exc)
    finally:
        path.write_bytes(original)


def test_an_abandoned_backup_no_longer_holds_collections_off(tmp_path: Path) -> None:
    repository = make(tmp_path)
    with repository.writing("b-1"):
        repository.put_chunk(b"orphan")
        with pytest.raises(Aborted):
            repository.abandon("b-1")
    # As a process that died would leave it: the marker, and the chunk.
    repository.store.put("pending/b-2", b"{}")
    repository.put_chunk(b"another orphan")
    assert repository.collect(grace=0).skipped
    repository.abandon("b-2")
    collected = repository.collect(grace=0)
    assert not collected.skipped and collected.removed == 2
