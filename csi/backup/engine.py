"""Backups of the volumes of any backend that reads its snapshots' blocks, into the
configured repositories, and restores of them onto any backend that fills volumes.

A backup (CreateSnapshot through a VolumeSnapshotClass of type backup) runs in the
background: the backend takes a snapshot, the engine copies its chunks into the
repository and writes the manifest last, and until then the snapshot is reported not
ready to use. The CO asks again until it is (the external-snapshotter does); a controller
that crashed meanwhile starts the copy again at the next ask, and the chunks already
stored are not stored twice.

The first backup of a volume reads what the snapshot holds (its allocated ranges); each
later one reads only the ranges that changed since the snapshot of the previous backup,
which is kept for that purpose (one backend snapshot per volume, the newest backup's) and
removed once a newer backup has its own. Without that snapshot (deleted, or a backend
that lost it), a backup reads everything allocated again and still stores only the chunks
the repository lacks."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from csi import ids
from csi.backends.base import Backend, SnapshotBlocks
from csi.backup.repository import Manifest, Repository
from csi.errors import Aborted, AlreadyExists, CairnError, FailedPrecondition, InvalidArgument, NotFound
from csi.model import NO_SECRETS, BackupOrder, Extent, Secrets, Snapshot, Volume
from csi.registry import Registry

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "cairn-backup-"
"""Names of the backend snapshots backups take (visible in the backend's listings)."""
PROGRESS_STEP = 0.1
"""Log a running backup's progress at every tenth of the volume."""
NODE_POLL = 1.0
"""Seconds between two looks at a copy a node runs (a routed backend's)."""
WORKERS = 4
"""Chunks read, hashed, compressed and stored (or fetched, checked and written) at once."""
BASE_PATIENCE = 60.0
"""How long the asks of a backup saved by a process that died before it removed the
snapshots of the volume's older backups keep it not ready while removing them fails: the
dead process may have had one open, and Ceph calls an image busy until the dead client's
watch expires (30 s by default). Past that it is reported ready, and the volume's next
backup removes what is left."""


def backup_id(name: str) -> str:
    """The repository-local ID of the backup made for request ``name``: fixed length,
    so any name fits an ID, and the same for every retry."""
    return "b-" + hashlib.sha256(name.encode()).hexdigest()[:40]


def chunk_indexes(extents: Iterable[Extent], chunk_size: int, count: int) -> Iterator[int]:
    """The indexes of the chunks that ``extents`` (sorted by offset; they may overlap)
    touch, each once, in order."""
    last = -1
    for extent in extents:
        if extent.length <= 0:
            continue
        first = max(extent.offset // chunk_size, last + 1)
        end = min((extent.end - 1) // chunk_size, count - 1)
        yield from range(first, end + 1)
        last = max(last, end)


def in_parallel(indexes: Iterable[int], work: Callable[[int], None], workers: int = WORKERS) -> None:
    """``work(i)`` for each index, ``workers`` at a time (hashing, compression, encryption
    and the I/O release the interpreter's lock), with at most twice that many chunks
    queued, so memory stays bounded. The first error is raised once the chunks in flight
    are done, and no chunk is started after it."""
    failed = threading.Event()

    def guarded(index: int) -> None:
        if failed.is_set():
            return
        try:
            work(index)
        except BaseException:
            failed.set()
            raise

    with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunks") as pool:
        pending: set[futures.Future[None]] = set()
        try:
            for index in indexes:
                if failed.is_set():
                    break
                if len(pending) >= 2 * workers:
                    done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                    for future in done:
                        future.result()
                pending.add(pool.submit(guarded, index))
        finally:
            done, _ = futures.wait(pending)
        for future in done:
            future.result()


def is_zero(data: bytes) -> bool:
    return not data.strip(b"\0")


Tally = Callable[[int, int, int], None]
"""Told of each chunk copied: bytes read, bytes newly stored, and where the chunk ends."""


def write_backup(
    repository: Repository,
    blocks: SnapshotBlocks,
    snapshot_local_id: str,
    order: BackupOrder,
    *,
    cancelled: threading.Event,
    tally: Tally | None = None,
    secrets: Secrets = NO_SECRETS,
) -> Manifest:
    """Copy what the repository lacks of the snapshot into it and save the manifest, on
    whichever host reads the snapshot's blocks (the caller marks the backup in progress,
    ``Repository.writing``). With a base (the previous backup's snapshot) only the ranges
    changed since it are read, the other chunks taken from the previous manifest;
    otherwise every allocated range. Aborted at the next chunk once ``cancelled`` is set."""
    chunk_size = repository.chunk_size
    previous: Manifest | None = None
    if order.base and order.parent:
        try:
            previous = repository.manifest(order.parent)
        except NotFound:
            previous = None  # deleted since the order: read the snapshot whole
    with blocks.read_snapshot(snapshot_local_id, secrets=secrets) as reader:
        size = reader.size
        count = -(-size // chunk_size)
        changed: list[Extent] | None = None
        if previous is not None and previous.chunk_size == chunk_size and previous.size <= size:
            try:
                changed = list(blocks.changed(order.base, snapshot_local_id, secrets=secrets))
            except NotFound:
                # The base went since it was found: a backup of the volume that ran
                # beside this one finished and dropped it. Read what the snapshot holds.
                log.info("the base of a backup went meanwhile; reading it whole", extra={"backup": order.name})
        chunks: list[str | None]
        if previous is not None and changed is not None:
            chunks = list(previous.chunks[:count]) + [None] * max(0, count - len(previous.chunks))
            ranges = changed
            if size > previous.size:
                # The chunk that was the last, and partial, is read again whole.
                start = previous.size - previous.size % chunk_size
                ranges = sorted([*ranges, Extent(start, min(size, start + chunk_size) - start)])
            parent = previous.backup_id
        else:
            chunks = [None] * count
            ranges = list(blocks.allocated(snapshot_local_id, secrets=secrets))
            parent = ""
        lock = threading.Lock()
        totals = {"read": 0, "new": 0, "done": 0, "reported": 0.0}

        def copy_chunk(index: int) -> None:
            if cancelled.is_set():
                raise Aborted(f"backup {order.name!r} was cancelled: its snapshot is being deleted")
            offset = index * chunk_size
            data = reader.read(offset, min(chunk_size, size - offset))
            digest, stored = (None, 0) if is_zero(data) else repository.put_chunk(data)
            chunks[index] = digest
            with lock:
                totals["read"] += len(data)
                totals["new"] += stored
                totals["done"] = max(totals["done"], offset + len(data))
                due = size and totals["done"] / size >= totals["reported"] + PROGRESS_STEP
                if due:
                    totals["reported"] = totals["done"] / size
            if tally is not None:
                tally(len(data), stored, offset + len(data))
            if due:
                log.info(
                    "backup progress",
                    extra={
                        "backup": order.name,
                        "percent": int(100 * totals["reported"]),
                        "read_bytes": totals["read"],
                    },
                )

        in_parallel(chunk_indexes(ranges, chunk_size, count), copy_chunk)
    manifest = Manifest(
        backup_id=order.backup_id,
        name=order.name,
        volume_id=order.volume_id,
        base_snapshot=order.snapshot_id,
        parent=parent,
        size=size,
        chunk_size=chunk_size,
        chunks=tuple(chunks),
        created_at=order.started,
        read_bytes=int(totals["read"]),
        new_bytes=int(totals["new"]),
    )
    repository.save(manifest)
    return manifest


def check_room(volume: Volume, manifest: Manifest) -> None:
    if volume.capacity_bytes < manifest.size:
        raise FailedPrecondition(
            f"volume {volume.local_id} has {volume.capacity_bytes} bytes, less than backup {manifest.name!r} "
            f"({manifest.size})"
        )


def fill_from(
    repository: Repository,
    manifest: Manifest,
    blocks: SnapshotBlocks,
    volume_local_id: str,
    *,
    cancelled: threading.Event | None = None,
    tally: Callable[[int], None] | None = None,
    secrets: Secrets = NO_SECRETS,
) -> Restored:
    """Write the backup's non-zero chunks into a volume made from it (still filling),
    each checked against its address first (DataLoss naming it otherwise); the fill's end
    makes the writes durable and clears the mark. Zero chunks are not written: the new
    volume reads zeros there. ``tally`` hears the bytes written so far."""
    totals = {"chunks": 0, "bytes": 0}
    lock = threading.Lock()
    with blocks.fill_volume(volume_local_id, secrets=secrets) as writer:

        def write_chunk(index: int) -> None:
            if cancelled is not None and cancelled.is_set():
                raise Aborted(f"the restore of backup {manifest.name!r} into {volume_local_id} was cancelled")
            digest = manifest.chunks[index]
            assert digest is not None
            data = repository.get_chunk(digest, backup=manifest.name)
            writer.write(index * manifest.chunk_size, data)
            with lock:
                totals["chunks"] += 1
                totals["bytes"] += len(data)
                written = totals["bytes"]
            if tally is not None:
                tally(written)

        in_parallel((i for i, d in enumerate(manifest.chunks) if d is not None), write_chunk)
    chunks, written = totals["chunks"], totals["bytes"]
    log.info(
        "backup restored",
        extra={"backup": manifest.name, "volume": volume_local_id, "chunks": chunks, "bytes": written},
    )
    return Restored(chunks, written)


@dataclass
class Progress:
    """A backup running in this process."""

    name: str
    volume_id: str
    size: int
    started: float
    thread: threading.Thread | None = None
    done_bytes: int = 0
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


@dataclass(frozen=True)
class Restored:
    """What a restore wrote."""

    chunks: int
    bytes_written: int


class Backups:
    """The repositories this controller serves and the backups running in it."""

    def __init__(self, registry: Registry, repositories: Mapping[str, Repository]) -> None:
        self.registry = registry
        self.repositories = dict(repositories)
        self._jobs: dict[tuple[str, str], Progress] = {}
        self._lock = threading.Lock()
        # For the metrics: what this process's backups read and stored, and how they ended.
        self._read: Counter[str] = Counter()
        self._stored: Counter[str] = Counter()
        self._ended: Counter[tuple[str, str]] = Counter()
        # Saved backups whose older bases could not be removed yet: since when (monotonic).
        self._finishing: dict[tuple[str, str], float] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.repositories

    def repository(self, name: str) -> Repository:
        repository = self.repositories.get(name)
        if repository is None:
            configured = ", ".join(sorted(self.repositories)) or "none"
            raise InvalidArgument(f"backup repository {name!r} is not configured (configured: {configured})")
        return repository

    # -- backups --------------------------------------------------------------------

    def backup(self, repository_name: str, name: str, volume_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        """The backup named ``name`` of volume ``volume_id`` (a driver-wide ID): ready
        when its manifest is saved; otherwise started (or still running) in the
        background and reported not ready. A backup that failed reports its error once,
        and the next ask starts it again."""
        repository = self.repository(repository_name)
        local_id = backup_id(name)
        key = (repository.name, local_id)
        done = self._saved(repository, local_id)
        if done is not None:
            if done.volume_id != volume_id:
                raise AlreadyExists(f"snapshot {name!r} is a backup of another volume ({done.volume_id})")
            with self._lock:
                job = self._jobs.get(key)
            if job is not None and job.running:
                # Saved, and the snapshots of the volume's older backups are going: ready
                # once they are gone (a node that copied it saved it a moment before).
                return Snapshot(local_id, name, volume_id, job.size, job.started, ready=False)
            if not self._finish_saved(repository, done, secrets):
                return dataclasses.replace(_snapshot(done), ready=False)
            return _snapshot(done)
        backend, volume_local_id = self._route_volume(volume_id)
        if not backend.capabilities.backups:
            raise InvalidArgument(
                f"volume {volume_id} cannot be backed up: backend {backend.name!r} ({backend.kind}) "
                "does not read its snapshots' blocks"
            )
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.volume_id != volume_id:
                raise AlreadyExists(f"snapshot {name!r} is a backup of another volume ({job.volume_id})")
            if job is not None and not job.running:
                del self._jobs[key]
                if job.error is not None:
                    # Reported once; the CO's next ask starts the backup again.
                    raise job.error
                done = self._saved(repository, local_id)
                if done is not None:
                    return _snapshot(done)
                job = None
            if job is None:
                volume = backend.volumes.get_volume(volume_local_id, secrets=secrets)
                job = Progress(name, volume_id, volume.capacity_bytes, time.time())
                job.thread = threading.Thread(
                    target=self._run,
                    args=(job, repository, local_id, backend, volume_local_id, dict(secrets)),
                    name=f"backup {name}",
                    daemon=True,
                )
                self._jobs[key] = job
                job.thread.start()
        return Snapshot(local_id, name, volume_id, job.size, job.started, ready=False)

    def _finish_saved(self, repository: Repository, done: Manifest, secrets: Secrets) -> bool:
        """Finish what a process that died after saving ``done`` left undone: the
        snapshots of the volume's older backups, and the in-progress marker, which would
        hold every collection off until it went stale. Nothing when no marker is left
        (the usual case: one existence check) or a job of this process still runs. A
        node that copied a backup removed its marker when it saved the manifest, before
        this process could remove the older snapshots: for such backends, their listing
        (one read) says whether any is left.

        False (not ready yet; the next ask tries again) while an older snapshot cannot
        be removed, for at most BASE_PATIENCE: the marker stays meanwhile."""
        key = (repository.name, done.backup_id)
        with self._lock:
            job = self._jobs.get(key)
        if job is not None and job.running:
            return True
        if repository.pending(done.backup_id):
            if not self._drop_older_bases(repository, done.volume_id, secrets):
                with self._lock:
                    since = self._finishing.setdefault(key, time.monotonic())
                if time.monotonic() - since < BASE_PATIENCE:
                    return False
                log.warning(
                    "a saved backup's older base snapshots are still there; left for the volume's next backup",
                    extra={"backup": done.name, "repository": repository.name, "waited": BASE_PATIENCE},
                )
            repository.abandon(done.backup_id)
            with self._lock:
                self._finishing.pop(key, None)
        elif self._older_bases_on_nodes(done, secrets):
            self._drop_older_bases(repository, done.volume_id, secrets)
        return True

    def _older_bases_on_nodes(self, done: Manifest, secrets: Secrets) -> bool:
        """Whether the volume of ``done``, on a backend whose nodes copy its backups,
        holds another backup's snapshot besides the one of ``done``."""
        try:
            backend, volume_local_id = self._route_volume(done.volume_id)
        except CairnError:
            return False  # the volume's backend is gone from the config: nothing to drop there
        if not backend.capabilities.node_blocks:
            return False
        own = SNAPSHOT_PREFIX + done.backup_id
        return any(
            s.source_volume_local_id == volume_local_id and s.name.startswith(SNAPSHOT_PREFIX) and s.name != own
            for s in _listed_snapshots(backend, secrets)
        )

    def _saved(self, repository: Repository, local_id: str) -> Manifest | None:
        try:
            return repository.manifest(local_id)
        except NotFound:
            return None

    def _route_volume(self, volume_id: str) -> tuple[Backend, str]:
        ref = ids.decode(volume_id, "volume")
        return self.registry.route(ref.backend, "volume", volume_id), ref.local_id

    def _run(
        self,
        job: Progress,
        repository: Repository,
        local_id: str,
        backend: Backend,
        volume_local_id: str,
        secrets: Secrets,
    ) -> None:
        # The process that stores the chunks marks the backup in progress: this one, or
        # the node that copies it for a routed backend.
        writing = repository.writing(local_id) if backend.capabilities.blocks else contextlib.nullcontext()
        try:
            with writing:
                manifest = self._copy(job, repository, local_id, backend, volume_local_id, secrets)
            log.info(
                "backup saved",
                extra={
                    "backup": job.name,
                    "repository": repository.name,
                    "volume": job.volume_id,
                    "read_bytes": manifest.read_bytes,
                    "new_bytes": manifest.new_bytes,
                    "seconds": round(time.time() - job.started, 3),
                },
            )
            with self._lock:
                self._ended[(repository.name, "saved")] += 1
        except BaseException as exc:
            job.error = exc
            with self._lock:
                self._ended[(repository.name, "cancelled" if job.cancelled.is_set() else "failed")] += 1
            level = logging.INFO if isinstance(exc, Aborted) else logging.ERROR
            log.log(level, "backup failed: %s", exc, extra={"backup": job.name, "repository": repository.name})

    def _copy(
        self,
        job: Progress,
        repository: Repository,
        local_id: str,
        backend: Backend,
        volume_local_id: str,
        secrets: Secrets,
    ) -> Manifest:
        earlier = self._of_volume(repository, job.volume_id)
        previous = max(earlier, key=lambda m: m.created_at, default=None)
        # The snapshots of backups older than the newest are no base of anything.
        for old in earlier:
            if old is not previous:
                self._drop_base(old.base_snapshot, secrets)
        snapshot = self._take_snapshot(job, backend, local_id, volume_local_id, secrets)
        base = self._usable_base(previous, backend, repository.chunk_size, snapshot.size_bytes, secrets)
        order = BackupOrder(
            repository=repository.name,
            backup_id=local_id,
            name=job.name,
            volume_id=job.volume_id,
            snapshot_id=ids.encode(backend.name, snapshot.local_id),
            base=base or "",
            parent=previous.backup_id if base and previous is not None else "",
            started=job.started,
        )
        if backend.capabilities.blocks:

            def tally(read: int, stored: int, end: int) -> None:
                with self._lock:
                    self._read[repository.name] += read
                    self._stored[repository.name] += stored
                    job.done_bytes = max(job.done_bytes, end)

            manifest = write_backup(
                repository,
                backend.blocks,
                snapshot.local_id,
                order,
                cancelled=job.cancelled,
                tally=tally,
                secrets=secrets,
            )
        else:
            manifest = self._copy_on_node(job, repository, backend, snapshot.local_id, order)
        self._drop_older_bases(repository, job.volume_id, secrets)
        return manifest

    def _take_snapshot(
        self, job: Progress, backend: Backend, local_id: str, volume_local_id: str, secrets: Secrets
    ) -> Snapshot:
        """The backup's backend snapshot, taken (or found, for a retry). A routed backend's
        node may take longer than one call waits (Aborted): asked again until it answers
        or the backup is cancelled."""
        while True:
            try:
                return backend.volumes.create_snapshot(SNAPSHOT_PREFIX + local_id, volume_local_id, {}, secrets=secrets)
            except Aborted:
                if backend.capabilities.blocks or job.cancelled.wait(NODE_POLL):
                    raise

    def _copy_on_node(
        self, job: Progress, repository: Repository, backend: Backend, snapshot_local_id: str, order: BackupOrder
    ) -> Manifest:
        """Have the node that holds the snapshot copy it (a routed backend: this process
        holds no node's storage) and wait until it saved the manifest."""
        remote = backend.node_blocks
        remote.order_backup(snapshot_local_id, order)
        while True:
            if job.cancelled.is_set():
                raise Aborted(f"backup {job.name!r} was cancelled: its snapshot is being deleted")
            done = remote.backup_progress(snapshot_local_id, order.backup_id)
            if done is None:
                break
            job.done_bytes = max(job.done_bytes, done)
            job.cancelled.wait(NODE_POLL)
        manifest = repository.manifest(order.backup_id)
        with self._lock:
            self._read[repository.name] += manifest.read_bytes
            self._stored[repository.name] += manifest.new_bytes
            job.done_bytes = manifest.size
        return manifest

    def _drop_older_bases(self, repository: Repository, volume_id: str, secrets: Secrets) -> bool:
        """Remove the backend snapshots of every saved backup of the volume but the
        newest: one base per volume, also when backups of it ran side by side. Whether
        every one went."""
        saved = self._of_volume(repository, volume_id)
        newest = max(saved, key=lambda m: m.created_at, default=None)
        dropped = [self._drop_base(old.base_snapshot, secrets) for old in saved if old is not newest]
        return all(dropped)

    def _of_volume(self, repository: Repository, volume_id: str) -> list[Manifest]:
        """The saved backups of a volume. Reads every manifest: a backup happens far less
        often than the listings that must not cost that much."""
        return [m for m in repository.manifests() if m.volume_id == volume_id]

    def _usable_base(
        self, previous: Manifest | None, backend: Backend, chunk_size: int, job_size: int, secrets: Secrets
    ) -> str | None:
        """The local ID of the previous backup's snapshot, when a diff against it can
        stand for reading the whole volume: it still exists on this backend and the
        chunking is the same."""
        if previous is None or not previous.base_snapshot or previous.chunk_size != chunk_size:
            return None
        if previous.size > job_size:
            return None  # volumes do not shrink; a snapshot that did is no base
        try:
            ref = ids.decode(previous.base_snapshot, "snapshot")
        except NotFound:
            return None
        if ref.backend != backend.name:
            return None
        try:
            backend.volumes.get_snapshot(ref.local_id, secrets=secrets)
        except NotFound:
            return None
        return ref.local_id

    def _drop_base(self, snapshot_id: str, secrets: Secrets) -> bool:
        """Remove a backup's backend snapshot; whether it is gone. One that cannot go is
        left for the volume's next backup (or the next ask of a saved one), which tries again."""
        if not snapshot_id:
            return True
        try:
            ref = ids.decode(snapshot_id, "snapshot")
            backend = self.registry.route(ref.backend, "snapshot", snapshot_id)
            backend.volumes.delete_snapshot(ref.local_id, secrets=secrets)
        except NotFound:
            pass
        except CairnError as exc:
            log.warning("could not remove a backup's base snapshot: %s", exc, extra={"snapshot": snapshot_id})
            return False
        return True

    def delete(self, repository_name: str, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        """Delete a backup: a running one is cancelled first (its snapshot goes with it),
        a saved one's manifest and the chunks no other backup uses. Missing is fine."""
        repository = self.repository(repository_name)
        with self._lock:
            job = self._jobs.get((repository.name, local_id))
            self._finishing.pop((repository.name, local_id), None)
        if job is not None:
            job.cancelled.set()
            if job.thread is not None:
                job.thread.join()
            with self._lock:
                self._jobs.pop((repository.name, local_id), None)
        manifest = self._saved(repository, local_id)
        if manifest is not None:
            # When it was the volume's newest backup, its snapshot was the base of the
            # next one: that one reads everything allocated again (and stores only what
            # the repository lacks).
            repository.delete(local_id)
            self._drop_base(manifest.base_snapshot, secrets)
            return
        self._drop_unfinished(job.volume_id if job is not None else "", local_id, secrets)
        if job is None:
            # Started by a process that is gone: its marker would hold collections off
            # until it went stale. (A job of this process removed its own.)
            repository.abandon(local_id)

    def _drop_unfinished(self, volume_id: str, local_id: str, secrets: Secrets) -> None:
        """Remove the snapshot of a backup that never finished (a crash, or a cancel):
        its backend is the volume's when known, else any backend that serves blocks."""
        name = SNAPSHOT_PREFIX + local_id
        if volume_id:
            candidates = [self._route_volume(volume_id)[0]]
        else:
            candidates = [b for b in self.registry if b.capabilities.backups and b.controller is not None]
        for backend in candidates:
            for snapshot in _listed_snapshots(backend, secrets):
                if snapshot.name == name:
                    backend.volumes.delete_snapshot(snapshot.local_id, secrets=secrets)
                    return

    def get(self, repository_name: str, local_id: str) -> Snapshot:
        """The backup as a snapshot; one running in this process is not ready yet."""
        repository = self.repository(repository_name)
        done = self._saved(repository, local_id)
        if done is not None:
            return _snapshot(done)
        with self._lock:
            job = self._jobs.get((repository.name, local_id))
        if job is not None and job.running:
            return Snapshot(local_id, job.name, job.volume_id, job.size, job.started, ready=False)
        raise NotFound(f"backup {local_id!r} does not exist in repository {repository.name!r}")

    def list(self, repository_name: str, after: str = "", limit: int = 0) -> list[Snapshot]:
        """Saved backups in ID order, a page at a time."""
        repository = self.repository(repository_name)
        return [_snapshot(m) for m in repository.manifests(after=after, limit=limit)]

    # -- restores -------------------------------------------------------------------

    def manifest(self, backup_snapshot_id: str) -> Manifest:
        """The saved backup a driver-wide snapshot ID names; NotFound otherwise (a
        backup still running is no content source yet)."""
        ref = ids.decode(backup_snapshot_id, "snapshot")
        repository = self.repository(ref.backend)
        try:
            return repository.manifest(ref.local_id)
        except NotFound:
            raise NotFound(f"snapshot {backup_snapshot_id!r} does not exist (no saved backup)") from None

    def restore(self, backup_snapshot_id: str, backend: Backend, volume: Volume, *, secrets: Secrets) -> Restored:
        """Write the backup's content into ``volume`` (made from it, still filling) on
        ``backend``; every chunk is checked against its address (DataLoss otherwise).
        Zero chunks are not written: the new volume reads zeros there."""
        manifest = self.manifest(backup_snapshot_id)
        repository = self.repository(ids.decode(backup_snapshot_id, "snapshot").backend)
        check_room(volume, manifest)
        return fill_from(repository, manifest, backend.blocks, volume.local_id, secrets=secrets)

    # -- metrics (a prometheus_client collector) -----------------------------------

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily, CounterMetricFamily
    ]:
        return (
            GaugeMetricFamily("cairn_backups_running", "Backups running in this controller.", labels=("repository",)),
            GaugeMetricFamily(
                "cairn_backup_progress_ratio",
                "How far each running backup is through its volume (0 to 1).",
                labels=("repository", "backup"),
            ),
            CounterMetricFamily(
                "cairn_backup_read_bytes", "Bytes backups read from their backends.", labels=("repository",)
            ),
            CounterMetricFamily(
                "cairn_backup_stored_bytes",
                "Bytes backups stored in their repository (new chunks, compressed).",
                labels=("repository",),
            ),
            CounterMetricFamily(
                "cairn_backups_ended",
                "Backups ended, by outcome (saved, failed, cancelled).",
                labels=("repository", "outcome"),
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        running, progress, read, stored, ended = self._families()
        with self._lock:
            jobs = [(repo, j) for (repo, _), j in self._jobs.items() if j.running]
            for name in sorted(self.repositories):
                running.add_metric((name,), float(sum(1 for repo, _ in jobs if repo == name)))
                read.add_metric((name,), float(self._read[name]))
                stored.add_metric((name,), float(self._stored[name]))
                for outcome in ("saved", "failed", "cancelled"):
                    ended.add_metric((name, outcome), float(self._ended[(name, outcome)]))
            for repo, job in jobs:
                progress.add_metric((repo, job.name), job.done_bytes / job.size if job.size else 0.0)
        return [running, progress, read, stored, ended]

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the backups running now (tests, and a stop that lets them finish)."""
        with self._lock:
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
        for thread in threads:
            thread.join(timeout)


def _listed_snapshots(backend: Backend, secrets: Secrets) -> Iterator[Snapshot]:
    """Every snapshot the backend lists, read a page at a time."""
    after = ""
    while page := backend.volumes.list_snapshots(after=after, limit=500, secrets=secrets):
        yield from page
        after = page[-1].local_id


def _snapshot(manifest: Manifest) -> Snapshot:
    return Snapshot(
        local_id=manifest.backup_id,
        name=manifest.name,
        source_volume_local_id=manifest.volume_id,
        size_bytes=manifest.size,
        created_at=manifest.created_at,
    )


class NodeBackups:
    """The backup work of a routed backend's node (``backends.routed``): the controller
    holds no node's storage, so the node that holds a volume copies its backups' snapshots
    into the repositories and fills the volumes restored onto it, with the same functions
    the controller uses for the backends it reaches itself. Needs the repositories
    configured (and their credentials mounted) on the node too."""

    def __init__(self, repositories: Mapping[str, Repository], blocks: SnapshotBlocks) -> None:
        self.repositories = dict(repositories)
        self.blocks = blocks

    def _repository(self, name: str) -> Repository:
        repository = self.repositories.get(name)
        if repository is None:
            raise FailedPrecondition(
                f"backup repository {name!r} is not configured on this node (the node plugin needs the same "
                "backupRepositories as the controller)"
            )
        return repository

    def copy(
        self, snapshot_local_id: str, order: BackupOrder, cancelled: threading.Event, progress: Callable[[int], None]
    ) -> Manifest:
        """Copy the snapshot as ``order`` says and save the manifest (in progress in the
        repository meanwhile). A copy cut short and ordered again stores no chunk twice."""
        repository = self._repository(order.repository)
        with contextlib.suppress(NotFound):
            return repository.manifest(order.backup_id)  # saved before this node plugin restarted
        with repository.writing(order.backup_id):
            return write_backup(
                repository,
                self.blocks,
                snapshot_local_id,
                order,
                cancelled=cancelled,
                tally=lambda read, stored, end: progress(end),
            )

    def fill(
        self,
        volume: Volume,
        backup_snapshot_id: str,
        cancelled: threading.Event,
        progress: Callable[[int], None],
    ) -> Restored:
        """Write a backup (a driver-wide backup snapshot ID) into ``volume``, made from it
        on this node and still filling."""
        ref = ids.decode(backup_snapshot_id, "snapshot")
        repository = self._repository(ref.backend)
        manifest = repository.manifest(ref.local_id)
        check_room(volume, manifest)
        return fill_from(repository, manifest, self.blocks, volume.local_id, cancelled=cancelled, tally=progress)
