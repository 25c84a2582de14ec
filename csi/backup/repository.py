"""The format of a backup repository, on top of a ``Store``.

A volume is backed up as fixed-size chunks, each kept once under its content address
(deduplication across all backups of the repository), and a manifest that lists the
chunks of one backup in order. Objects in the store:

* ``config``: written at first use; the format version, the chunk size, whether the
  repository is encrypted and a check value of its key, so a repository opened with the
  wrong key or another chunk size is refused before anything is written.
* ``chunks/<2 hex>/<digest>``: one chunk, compressed (zstd) and, with a key, encrypted.
* ``backups/<backup_id>``: a backup's manifest (JSON, sealed the same way). Written last:
  a backup exists once its manifest does, never before.
* ``pending/<backup_id>``: a backup in progress (``Repository.writing``).
* ``collecting/<random>``: a collection in progress (``Repository.collect``).

Every stored object is an envelope: one byte saying its format, then a zstd frame
(``PLAIN``) or a 12-byte random nonce and the zstd frame encrypted with AES-256-GCM
(``SEALED``). A reader refuses a format byte it does not know.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from csi.backup.store import Store, Stored
from csi.errors import Aborted, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from csi.model import GiB, MiB

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 * MiB
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 * MiB
KEY_BYTES = 32
"""The least length of a repository key, in bytes (256 bits: the AES-256 key size)."""

FORMAT = 1
"""The repository format this module writes and reads (config and manifests)."""
PLAIN = 0x01
"""Envelope format byte: a zstd frame."""
SEALED = 0x02
"""Envelope format byte: a 12-byte nonce, then the zstd frame under AES-256-GCM."""
NONCE_BYTES = 12
ZSTD_LEVEL = 3
MANIFEST_LIMIT = 1 * GiB
"""The largest manifest a reader decompresses (a 16 TiB volume in 4 MiB chunks needs ~280 MB)."""

PENDING_STALE = 6 * 3600.0
"""A pending marker not rewritten for this long belongs to a backup that died."""
PENDING_REFRESH = 600.0
"""How often a backup in progress rewrites its marker (on its next chunk call)."""
COLLECTING_STALE = 300.0
"""A collecting marker not rewritten for this long belongs to a collection that died."""
COLLECTING_REFRESH = 60.0
WRITERS_CHECK = 1.0
"""How often a collection looks for a backup that began meanwhile (and stops for it)."""
GRACE = 3600.0
"""How old an unreferenced chunk must be before a collection removes it."""
COLLECT_WAIT = 60.0
"""How long a backup waits for a running collection to stop before it gives up."""

CONFIG_KEY = "config"
CHUNKS = "chunks/"
BACKUPS = "backups/"
PENDING = "pending/"
COLLECTING = "collecting/"

_BACKUP_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")
_DIGEST = re.compile(r"[0-9a-f]{64}")

_ID_INFO = b"cairn backup repository: chunk addresses"
_DATA_INFO = b"cairn backup repository: object encryption"
_CHECK_INFO = b"cairn backup repository: key check"


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a volume of ``size`` bytes has."""
    return math.ceil(size / chunk_size)


def valid_backup_id(backup_id: str) -> bool:
    return bool(_BACKUP_ID.fullmatch(backup_id)) and backup_id not in (".", "..")


def _check_backup_id(backup_id: str) -> None:
    if not valid_backup_id(backup_id):
        raise InvalidArgument(f"invalid backup ID {backup_id!r}: 1 to 200 of [A-Za-z0-9._-]")


def _check_digest(digest: str) -> None:
    if not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"invalid chunk digest {digest!r}: 64 lowercase hex digits")


def _chunk_key(digest: str) -> str:
    return f"{CHUNKS}{digest[:2]}/{digest}"


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


class _Damaged(Exception):
    """An object failed a check; the caller says which object, in which repository."""


@dataclass(frozen=True)
class Manifest:
    """One backup: the chunks of a volume at one point, in order."""

    backup_id: str
    """Repository-local ID ([A-Za-z0-9._-]+)."""
    name: str
    """The request name the backup was made for."""
    volume_id: str
    """Driver-wide ID of the volume backed up."""
    base_snapshot: str
    """Driver-wide ID of a backend snapshot kept as the base of the next incremental
    backup ("" for none)."""
    parent: str
    """The backup_id this one is incremental to ("" for a full backup)."""
    size: int
    """Bytes of the volume."""
    chunk_size: int
    chunks: tuple[str | None, ...]
    """One digest per chunk (``chunk_count(size, chunk_size)``); None: the chunk is all zeros."""
    created_at: float
    read_bytes: int
    """Bytes the backup read from the backend."""
    new_bytes: int
    """Bytes of new chunks it stored (as stored: compressed, encrypted)."""


@dataclass(frozen=True)
class Collected:
    """What ``collect`` did."""

    removed: int = 0
    """Chunks removed."""
    removed_bytes: int = 0
    """Their stored bytes."""
    kept: int = 0
    """Chunks kept: referenced by a manifest, or younger than the grace period."""
    stale_markers: tuple[str, ...] = ()
    """Backup IDs whose pending markers were stale (their backup died) and were removed."""
    skipped: str = ""
    """Why the collection stopped before removing what it could ("" when it finished)."""
    problems: tuple[str, ...] = ()
    """Manifests that could not be read (nothing is removed then), each naming its backup."""


@dataclass(frozen=True)
class Verified:
    """What ``verify`` found."""

    backups: int
    """Manifests read."""
    chunks: int
    """Distinct chunks read and checked."""
    bytes: int
    """Stored bytes of those chunks."""
    problems: tuple[str, ...]
    """One line for each damaged or missing chunk or manifest, naming backup and chunk."""

    @property
    def ok(self) -> bool:
        return not self.problems


class Repository:
    """Chunks and manifests of backups in ``store``, named ``name`` in messages.

    ``key``, when given, encrypts the repository: raw bytes, at least ``KEY_BYTES`` (32)
    long, of which nothing is stored (only a check value derived from it). Three keys are
    derived from it with HKDF-SHA256 under distinct info strings: one addresses chunks
    (HMAC-SHA256, so an address reveals nothing of the content), one encrypts objects
    (AES-256-GCM), one makes the check value in ``config``.

    Safe to share between threads. The config is checked (and written, by the first
    write to a new repository) on first use: ``check`` does it at once."""

    def __init__(
        self, name: str, store: Store, *, key: bytes | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        self.name = name
        self.store = store
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size % MIN_CHUNK_SIZE:
            raise InvalidArgument(
                f"backup repository {name!r}: chunk size {chunk_size} is not a multiple of "
                f"{MIN_CHUNK_SIZE} between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
            )
        self.chunk_size = chunk_size
        self._id_key: bytes | None = None
        self._aead: AESGCM | None = None
        self._key_check = ""
        if key is not None:
            if len(key) < KEY_BYTES:
                raise InvalidArgument(
                    f"backup repository {name!r}: the key has {len(key)} bytes; it needs at least {KEY_BYTES}"
                )
            self._id_key = _derive(key, _ID_INFO)
            self._aead = AESGCM(_derive(key, _DATA_INFO))
            self._key_check = _derive(key, _CHECK_INFO).hex()
        self._lock = threading.Lock()
        self._checked = False
        self._writing: dict[str, float] = {}
        """Backups in progress here -> when their marker was last written."""
        self._lost: set[str] = set()
        """Backups in progress here whose marker someone removed as stale."""

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def __str__(self) -> str:
        return f"backup repository {self.name!r} ({self.store.where})"

    # -- config

    def _config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "chunk_size": self.chunk_size,
            "encrypted": self.encrypted,
            "key_check": self._key_check,
        }

    def check(self, *, create: bool = True) -> None:
        """Refuse a repository this one cannot use: another format (FailedPrecondition),
        another chunk size (FailedPrecondition), another key or none where it needs one
        (InvalidArgument). A repository without a config gets one when ``create``."""
        if self._checked:
            return
        with self._lock:
            if self._checked:
                return
            try:
                raw = self.store.get(CONFIG_KEY)
            except NotFound:
                if not create:
                    return
                self.store.put(CONFIG_KEY, json.dumps(self._config(), sort_keys=True).encode())
                raw = self.store.get(CONFIG_KEY)  # another writer may have won the race
            self._compare_config(raw)
            self._checked = True

    def _compare_config(self, raw: bytes) -> None:
        try:
            config = json.loads(raw)
            version = config["format"]
            chunk_size = config["chunk_size"]
            encrypted = config["encrypted"]
            key_check = config["key_check"]
            if not (
                isinstance(version, int)
                and isinstance(chunk_size, int)
                and isinstance(encrypted, bool)
                and isinstance(key_check, str)
            ):
                raise TypeError("a field has the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataLoss(f"the config of {self} is damaged: {exc}") from exc
        if version != FORMAT:
            raise FailedPrecondition(f"{self} has format {version}; this driver reads format {FORMAT}")
        if encrypted and not self.encrypted:
            raise InvalidArgument(f"{self} is encrypted: give its key")
        if not encrypted and self.encrypted:
            raise InvalidArgument(f"{self} is not encrypted, but a key was given for it")
        if self.encrypted and not hmac.compare_digest(key_check.encode(), self._key_check.encode()):
            raise InvalidArgument(f"the key given is not the key of {self}")
        if chunk_size != self.chunk_size:
            raise FailedPrecondition(f"{self} has chunks of {chunk_size} bytes, not {self.chunk_size}")

    # -- envelopes

    def _seal(self, plain: bytes, context: bytes) -> bytes:
        frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(plain)
        if self._aead is None:
            return bytes([PLAIN]) + frame
        header = bytes([SEALED])
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._aead.encrypt(nonce, frame, header + context)

    def _unseal(self, blob: bytes, context: bytes, limit: int) -> bytes:
        """The plaintext of an envelope; _Damaged saying why not. ``context`` (which
        object this is) is authenticated with the data, so a sealed object copied to
        another key fails."""
        if not blob:
            raise _Damaged("it is empty")
        kind = blob[0]
        if kind == PLAIN:
            if self._aead is not None:
                raise _Damaged("it is not encrypted, though the repository is")
            frame = blob[1:]
        elif kind == SEALED:
            if self._aead is None:
                raise _Damaged("it is encrypted, though the repository is not")
            nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
            try:
                frame = self._aead.decrypt(nonce, sealed, blob[:1] + context)
            except (InvalidTag, ValueError) as exc:
                raise _Damaged("it fails authentication (altered, or not written with this key)") from exc
        else:
            raise _Damaged(f"unknown format byte {kind:#04x} (written by a newer driver?)")
        try:
            size = zstandard.frame_content_size(frame)
            if size > limit:  # -1: not recorded, and max_output_size bounds it
                raise _Damaged(f"it claims {size} bytes, more than the {limit} it may hold")
            return zstandard.ZstdDecompressor().decompress(frame, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise _Damaged(f"it does not decompress: {exc}") from exc

    # -- chunks

    def digest(self, data: bytes) -> str:
        """The content address of a plaintext chunk: SHA-256, or with a key HMAC-SHA256
        under the address key (64 lowercase hex digits)."""
        if self._id_key is None:
            return hashlib.sha256(data).hexdigest()
        return hmac.new(self._id_key, data, hashlib.sha256).hexdigest()

    def has_chunk(self, digest: str) -> bool:
        _check_digest(digest)
        self.check()
        self._refresh_markers()
        return self.store.exists(_chunk_key(digest))

    def put_chunk(self, data: bytes) -> tuple[str, int]:
        """Store a chunk of plaintext (at most ``chunk_size`` bytes): its digest, and the
        bytes stored (0 when the chunk was there already)."""
        if len(data) > self.chunk_size:
            raise InvalidArgument(f"a chunk of {len(data)} bytes is larger than the {self.chunk_size} of {self}")
        self.check()
        self._refresh_markers()
        digest = self.digest(data)
        key = _chunk_key(digest)
        if self.store.exists(key):
            return digest, 0
        blob = self._seal(data, b"chunk:" + digest.encode())
        self.store.put(key, blob)
        return digest, len(blob)

    def get_chunk(self, digest: str, *, backup: str = "") -> bytes:
        """The plaintext of a chunk, checked against its address; DataLoss naming the
        chunk, the backup (when given) and the repository when it is missing or damaged."""
        return self._read_chunk(digest, backup)[0]

    def _read_chunk(self, digest: str, backup: str) -> tuple[bytes, int]:
        _check_digest(digest)
        self.check(create=False)
        what = f"chunk {digest} of backup {backup!r} in {self}" if backup else f"chunk {digest} in {self}"
        try:
            blob = self.store.get(_chunk_key(digest))
        except NotFound:
            raise DataLoss(f"{what} is missing") from None
        try:
            plain = self._unseal(blob, b"chunk:" + digest.encode(), self.chunk_size)
        except _Damaged as exc:
            raise DataLoss(f"{what} is damaged: {exc}") from exc
        if not hmac.compare_digest(self.digest(plain), digest):
            raise DataLoss(f"{what} is damaged: its content does not match its address")
        return plain, len(blob)

    # -- manifests

    def _check_manifest(self, manifest: Manifest) -> None:
        """InvalidArgument unless the manifest is one this repository can keep."""
        problem = _manifest_problem(manifest, self.chunk_size)
        if problem:
            raise InvalidArgument(f"manifest of backup {manifest.backup_id!r} for {self}: {problem}")

    def save(self, manifest: Manifest) -> None:
        """Write the manifest: the last write of a backup, after all its chunks, and what
        makes it visible. A backup in progress here (``writing``) whose marker was
        removed as stale is refused (Aborted): a collection may have removed chunks it
        found, so it must start again."""
        self._check_manifest(manifest)
        self.check()
        backup_id = manifest.backup_id
        with self._lock:
            ours = backup_id in self._writing
            lost = backup_id in self._lost
        if ours and (lost or not self.store.exists(PENDING + backup_id)):
            raise Aborted(
                f"backup {backup_id!r} in {self}: its in-progress marker was removed as stale, so chunks it "
                "relies on may have been collected; start the backup again"
            )
        blob = self._seal(_encode_manifest(manifest), b"backup:" + backup_id.encode())
        self.store.put(BACKUPS + backup_id, blob)

    def manifest(self, backup_id: str) -> Manifest:
        """The manifest of a backup: NotFound when there is none, DataLoss when it is damaged."""
        _check_backup_id(backup_id)
        self.check(create=False)
        try:
            blob = self.store.get(BACKUPS + backup_id)
        except NotFound:
            raise NotFound(f"no backup {backup_id!r} in {self}") from None
        return self._decode(backup_id, blob)

    def _decode(self, backup_id: str, blob: bytes) -> Manifest:
        try:
            plain = self._unseal(blob, b"backup:" + backup_id.encode(), MANIFEST_LIMIT)
            return _decode_manifest(plain, backup_id, self.chunk_size)
        except _Damaged as exc:
            raise DataLoss(f"the manifest of backup {backup_id!r} in {self} is damaged: {exc}") from exc

    def exists(self, backup_id: str) -> bool:
        _check_backup_id(backup_id)
        return self.store.exists(BACKUPS + backup_id)

    def _backup_ids(self, after: str = "") -> Iterator[str]:
        for stored in self.store.list(BACKUPS):
            backup_id = stored.key[len(BACKUPS) :]
            if valid_backup_id(backup_id) and backup_id > after:
                yield backup_id

    def manifests(self, after: str = "", limit: int = 0) -> list[Manifest]:
        """Manifests in backup_id order, of IDs after ``after``, at most ``limit`` (0: all).
        Only the page's manifests are read; one deleted since the listing is left out."""
        if limit < 0:
            raise InvalidArgument(f"a negative limit ({limit}) for the backups of {self}")
        self.check(create=False)
        page: list[Manifest] = []
        for backup_id in self._backup_ids(after):
            try:
                blob = self.store.get(BACKUPS + backup_id)
            except NotFound:
                continue
            page.append(self._decode(backup_id, blob))
            if len(page) == limit:
                break
        return page

    def delete(self, backup_id: str) -> None:
        """Remove the backup's manifest (none is fine), then collect the chunks no other
        backup uses, unless a backup is in progress here (a later collection will). The
        deleted backup's own chunks go whatever their age (a backup that could rely on
        one would have a marker); the grace period still keeps every other unreferenced
        chunk (see ``collect``)."""
        _check_backup_id(backup_id)
        self.check(create=False)
        try:
            freed = {digest for digest in self.manifest(backup_id).chunks if digest is not None}
        except (NotFound, DataLoss):
            freed = set()  # gone already, or damaged: removed all the same
        self.store.delete(BACKUPS + backup_id)
        with self._lock:
            busy = bool(self._writing)
        if not busy:
            collected = self._collect_now(GRACE, freed)
            (log.warning if collected.problems else log.info)("%s: backup %s deleted; %s", self, backup_id, collected)

    # -- backups in progress and collection

    def pending(self, backup_id: str) -> bool:
        """Whether the backup's in-progress marker is there (its writer may be gone)."""
        _check_backup_id(backup_id)
        return self.store.exists(PENDING + backup_id)

    def abandon(self, backup_id: str) -> None:
        """Forget a backup that will not finish (deleted after the process writing it
        died): its in-progress marker goes, so collections need not wait for it to go
        stale. Refused (Aborted) while this process writes it."""
        _check_backup_id(backup_id)
        with self._lock:
            if backup_id in self._writing:
                raise Aborted(f"backup {backup_id!r} in {self} is being written by this process")
        self.store.delete(PENDING + backup_id)

    def writing(self, backup_id: str, *, wait: float = COLLECT_WAIT) -> AbstractContextManager[None]:
        """Mark a backup in progress for the block: ``pending/<backup_id>`` is written on
        entry, rewritten every ``PENDING_REFRESH`` while chunks are put or looked up, and
        removed on exit. No collection removes chunks while the marker is fresh, so a chunk
        found with ``has_chunk`` stays. A collection running on entry is waited for (it
        stops within about a second once it sees the marker); Aborted after ``wait``
        seconds. Aborted too for a backup already in progress in this process."""
        return self._writing_block(backup_id, wait)

    @contextmanager
    def _writing_block(self, backup_id: str, wait: float) -> Iterator[None]:
        _check_backup_id(backup_id)
        self.check()
        with self._lock:
            if backup_id in self._writing:
                raise Aborted(f"backup {backup_id!r} in {self} is already being written")
            self._writing[backup_id] = time.time()
            self._lost.discard(backup_id)
        try:
            self._put_marker(PENDING + backup_id)
            self._wait_for_collections(backup_id, wait)
            yield
        finally:
            with self._lock:
                del self._writing[backup_id]
                self._lost.discard(backup_id)
            self.store.delete(PENDING + backup_id)

    def _put_marker(self, key: str) -> None:
        self.store.put(key, json.dumps({"since": time.time()}).encode())

    def _wait_for_collections(self, backup_id: str, wait: float) -> None:
        deadline = time.monotonic() + wait
        while self._fresh(COLLECTING, COLLECTING_STALE):
            if time.monotonic() >= deadline:
                raise Aborted(
                    f"backup {backup_id!r} in {self}: a collection of unused chunks is still running "
                    f"after {wait:g}s; try again later"
                )
            time.sleep(0.2)

    def _fresh(self, prefix: str, stale: float) -> list[Stored]:
        now = time.time()
        return [marker for marker in self.store.list(prefix) if now - marker.modified < stale]

    def _refresh_markers(self) -> None:
        """Rewrite the markers of this process's backups in progress that are due; one
        that is gone was removed as stale by a collection, and its backup may not save."""
        now = time.time()
        with self._lock:
            due = [backup_id for backup_id, last in self._writing.items() if now - last >= PENDING_REFRESH]
            for backup_id in due:
                self._writing[backup_id] = now
        for backup_id in due:
            if self.store.exists(PENDING + backup_id):
                self._put_marker(PENDING + backup_id)
            else:
                log.warning("%s: the marker of backup %s in progress was removed as stale", self, backup_id)
                with self._lock:
                    self._lost.add(backup_id)

    def collect(self, grace: float = GRACE) -> Collected:
        """Remove the chunks no manifest references and last written more than ``grace``
        seconds ago: those of backups deleted, or killed before their manifest.

        Nothing is removed while a backup is in progress (a fresh pending marker), since
        it may rely on a chunk no manifest references yet; stale markers are removed. The
        collection marks itself in ``collecting/`` first and looks for markers after, and a
        backup does the reverse, so one of the two always sees the other; a backup that
        begins during the collection stops it (checked every ``WRITERS_CHECK`` seconds)
        and waits for its marker to go. Nothing is removed either when a manifest cannot
        be read: what it references is unknown.

        The grace period is a belt on top of the markers: a chunk written in the last
        ``grace`` seconds stays even when no marker says why (a writer whose marker a
        lagging listing hides, say)."""
        return self._collect_now(grace, set())

    def _collect_now(self, grace: float, freed: set[str]) -> Collected:
        """``collect``, removing the unreferenced chunks in ``freed`` whatever their age."""
        if grace < 0:
            raise InvalidArgument(f"a negative grace period ({grace:g}s) to collect {self}")
        self.check(create=False)
        started = time.time()
        marker = COLLECTING + secrets.token_hex(8)
        self._put_marker(marker)
        try:
            return self._collect(started - grace, freed, marker)
        finally:
            self.store.delete(marker)

    def _collect(self, cutoff: float, freed: set[str], marker: str) -> Collected:
        stale: list[str] = []
        now = time.time()
        in_progress: list[str] = []
        for stored in self.store.list(PENDING):
            backup_id = stored.key[len(PENDING) :]
            if now - stored.modified < PENDING_STALE:
                in_progress.append(backup_id)
            else:
                self.store.delete(stored.key)
                stale.append(backup_id)
        if stale:
            log.warning("%s: removed the stale markers of backups %s (they died in progress)", self, stale)
        if in_progress:
            return Collected(stale_markers=tuple(stale), skipped=f"backups in progress: {', '.join(in_progress)}")

        watch = _Watch(self, marker)
        referenced: set[str] = set()
        problems: list[str] = []
        for backup_id in self._backup_ids():
            if watch.writer_arrived():
                return Collected(stale_markers=tuple(stale), skipped="a backup began")
            try:
                manifest = self.manifest(backup_id)
            except NotFound:
                continue
            except DataLoss as exc:
                problems.append(str(exc))
                continue
            referenced.update(digest for digest in manifest.chunks if digest is not None)
        if problems:
            return Collected(stale_markers=tuple(stale), skipped="manifests cannot be read", problems=tuple(problems))

        # What puts of a crashed backup left half written (no backup may be writing now).
        self.store.sweep(cutoff)
        removed = removed_bytes = kept = 0
        for stored in self.store.list(CHUNKS):
            digest = stored.key.rpartition("/")[2]
            if stored.key != _chunk_key(digest) or not _DIGEST.fullmatch(digest):
                continue  # not a chunk: leave it alone
            if digest in referenced or (stored.modified > cutoff and digest not in freed):
                kept += 1
                continue
            if watch.writer_arrived():
                return Collected(removed, removed_bytes, kept, tuple(stale), skipped="a backup began")
            self.store.delete(stored.key)
            removed += 1
            removed_bytes += stored.size
        return Collected(removed, removed_bytes, kept, tuple(stale))

    def verify(self) -> Verified:
        """Read every chunk every manifest references (each once) and check it; one
        problem for each missing or damaged chunk or unreadable manifest."""
        self.check(create=False)
        users: dict[str, tuple[str, int]] = {}  # digest -> (first backup using it, how many)
        problems: list[str] = []
        backups = 0
        for backup_id in self._backup_ids():
            try:
                manifest = self.manifest(backup_id)
            except NotFound:
                continue
            except DataLoss as exc:
                problems.append(str(exc))
                continue
            backups += 1
            for digest in dict.fromkeys(manifest.chunks):
                if digest is not None:
                    first, count = users.get(digest, (backup_id, 0))
                    users[digest] = (first, count + 1)
        chunks = stored_bytes = 0
        for digest, (first, count) in users.items():
            try:
                _, size = self._read_chunk(digest, first)
            except DataLoss as exc:
                others = f" (and {count - 1} other backups)" if count > 1 else ""
                problems.append(f"{exc}{others}")
                continue
            chunks += 1
            stored_bytes += size
        return Verified(backups=backups, chunks=chunks, bytes=stored_bytes, problems=tuple(problems))


class _Watch:
    """A collection's look-out: whether a backup began since it started (throttled to a
    store listing every ``WRITERS_CHECK`` seconds), and keeping its own marker fresh."""

    def __init__(self, repository: Repository, marker: str) -> None:
        self.repository = repository
        self.marker = marker
        self.checked = time.monotonic()
        self.refreshed = time.monotonic()

    def writer_arrived(self) -> bool:
        now = time.monotonic()
        if now - self.refreshed >= COLLECTING_REFRESH:
            self.repository._put_marker(self.marker)
            self.refreshed = now
        if now - self.checked < WRITERS_CHECK:
            return False
        self.checked = now
        return bool(self.repository._fresh(PENDING, PENDING_STALE))


def _manifest_problem(manifest: Manifest, chunk_size: int) -> str:
    """What is wrong with a manifest for a repository of ``chunk_size`` ("" nothing)."""
    if not valid_backup_id(manifest.backup_id):
        return "the backup ID is not 1 to 200 of [A-Za-z0-9._-]"
    if manifest.parent and not valid_backup_id(manifest.parent):
        return f"invalid parent {manifest.parent!r}"
    if manifest.chunk_size != chunk_size:
        return f"chunks of {manifest.chunk_size} bytes in a repository of {chunk_size}"
    if manifest.size < 0 or manifest.read_bytes < 0 or manifest.new_bytes < 0:
        return "a negative size or byte count"
    expected = chunk_count(manifest.size, chunk_size)
    if len(manifest.chunks) != expected:
        return f"{len(manifest.chunks)} chunks for {manifest.size} bytes, which take {expected}"
    for digest in manifest.chunks:
        if digest is not None and not _DIGEST.fullmatch(digest):
            return f"invalid chunk digest {digest!r}"
    return ""


def _encode_manifest(manifest: Manifest) -> bytes:
    document = {
        "format": FORMAT,
        "backup_id": manifest.backup_id,
        "name": manifest.name,
        "volume_id": manifest.volume_id,
        "base_snapshot": manifest.base_snapshot,
        "parent": manifest.parent,
        "size": manifest.size,
        "chunk_size": manifest.chunk_size,
        "chunks": list(manifest.chunks),
        "created_at": manifest.created_at,
        "read_bytes": manifest.read_bytes,
        "new_bytes": manifest.new_bytes,
    }
    return json.dumps(document, separators=(",", ":")).encode()


_TEXT_FIELDS = ("backup_id", "name", "volume_id", "base_snapshot", "parent")
_INT_FIELDS = ("size", "chunk_size", "read_bytes", "new_bytes")


def _decode_manifest(plain: bytes, backup_id: str, chunk_size: int) -> Manifest:
    """The manifest in ``plain``, checked; _Damaged when it is not one."""
    try:
        document = json.loads(plain)
    except ValueError as exc:
        raise _Damaged(f"it is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _Damaged("it is not a JSON object")
    version = document.get("format")
    if version != FORMAT:
        raise _Damaged(f"manifest format {version!r}; this driver reads format {FORMAT}")
    for field in _TEXT_FIELDS:
        if not isinstance(document.get(field), str):
            raise _Damaged(f"{field} is not a string")
    for field in _INT_FIELDS:
        value = document.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Damaged(f"{field} is not an integer")
    created_at = document.get("created_at")
    if not isinstance(created_at, int | float) or isinstance(created_at, bool):
        raise _Damaged("created_at is not a number")
    chunks = document.get("chunks")
    if not isinstance(chunks, list) or not all(digest is None or isinstance(digest, str) for digest in chunks):
        raise _Damaged("chunks is not a list of digests")
    if document["backup_id"] != backup_id:
        raise _Damaged(f"it is the manifest of backup {document['backup_id']!r}")
    manifest = Manifest(
        backup_id=document["backup_id"],
        name=document["name"],
        volume_id=document["volume_id"],
        base_snapshot=document["base_snapshot"],
        parent=document["parent"],
        size=document["size"],
        chunk_size=document["chunk_size"],
        chunks=tuple(chunks),
        created_at=float(created_at),
        read_bytes=document["read_bytes"],
        new_bytes=document["new_bytes"],
    )
    problem = _manifest_problem(manifest, chunk_size)
    if problem:
        raise _Damaged(problem)
    return manifest
