"""Controller half of the local backend: volumes are sparse image files on one node.

Snapshots and clones are full copies made with ``cp --reflink=auto --sparse=always``: a
reflink (shared extents, instant) where the filesystem offers it (XFS, btrfs), a sparse
copy elsewhere. A snapshot is therefore independent of its source volume, and deleting
either never affects the other.

It also offers ``SnapshotBlocks`` (``blocks.py``): the ranges of a snapshot that hold
data, those where two snapshots of one volume differ (successive reflink copies share
what did not change, which is known without a read), reading a snapshot, and filling a
volume restored from a backup. Such a volume is made blank, with its source and
``"filling": true`` in its record, and the record loses the mark once its content is
written and flushed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from csi import loopdev, mount, proc
from csi.backends.base import BlockReader, BlockWriter, check_publication, matching
from csi.backends.local import blocks
from csi.backends.local.layout import Kind, Layout
from csi.errors import (
    Aborted,
    AlreadyExists,
    CommandFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from csi.extents import check_start
from csi.files import TEMP_SUFFIX, fsync_file
from csi.model import (
    HEALTHY,
    NO_SECRETS,
    TOPOLOGY_NODE_KEY,
    Capability,
    Extent,
    Secrets,
    Segment,
    Snapshot,
    SourceRef,
    Volume,
    VolumeCondition,
    VolumeSpec,
    reaches,
)
from csi.sizes import choose_size

COPY_TIMEOUT = 3600.0
T = TypeVar("T")
PARAM_PREALLOCATE = "preallocate"


class LocalVolumes:
    volume_parameters = frozenset({PARAM_PREALLOCATE})
    snapshot_parameters: frozenset[str] = frozenset()

    def __init__(self, root: str, node_id: str, recover: bool = True) -> None:
        """``recover`` removes what crashed creations left and thaws what crashed copies
        left frozen; only the process that serves the controller (the one that copies)
        may do it (a node plugin on the same host must not)."""
        self.layout = Layout(root)
        self.layout.ensure()
        if recover:
            self.layout.recover()
            mount.thaw_recorded(self.layout.freeze_journal)
        self.node_id = node_id
        self.topology: tuple[Segment, ...] = ({TOPOLOGY_NODE_KEY: node_id},)
        self.read_compared: blocks.Pread = os.pread
        """How ``changed`` reads the bytes it compares (the tests count them)."""

    def settle(self) -> None:
        """Checkpoint the journal and remove its file (a later change opens another): at
        a clean stop, or for a folder about to be unmounted."""
        self.layout.journal.close()

    # -- capacity and capabilities -------------------------------------------------

    def health(self) -> str | None:
        if not os.access(self.layout.root, os.W_OK | os.X_OK):
            return f"directory {self.layout.root} is not writable"
        return None

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        if not reaches(self.topology, segment):
            return 0  # another node: this directory is of no use there
        st = os.statvfs(self.layout.root)
        return st.f_bavail * st.f_frsize

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return self.free_bytes(segment, secrets=secrets)

    # -- volumes --------------------------------------------------------------------

    def create_volume(self, spec: VolumeSpec) -> Volume:
        preallocate = _parse_bool(spec.parameters.get(PARAM_PREALLOCATE, "false"), PARAM_PREALLOCATE)
        local_id = self.layout.local_id("volume", spec.name)
        existing = self.layout.read_record("volume", local_id)
        if existing is not None:
            # A retry: answered from what was made, even if the source is gone since.
            answer = matching(self._volume(local_id, existing), spec)
            self.layout.confirm("volume", local_id, existing)
            return answer
        source_image, source_size = self._source(spec.source)
        size = choose_size(spec.required_bytes, spec.limit_bytes, source_size)
        image = self.layout.image("volume", local_id)
        temp = image + TEMP_SUFFIX
        try:
            if source_image:
                self._copy_source(spec.source, source_image, temp)
            else:
                open(temp, "wb").close()
            truncate(temp, size, spec.name)
            if preallocate:
                _preallocate(temp, size)
            holds_data = bool(source_image) or preallocate
            if holds_data:
                fsync_file(temp)
            record = {
                "name": spec.name,
                "source": _source_record(spec.source),
                "parameters": dict(spec.parameters),
                "created": time.time(),
                "published": {},
                "size": size,
            }
            if spec.source is not None and spec.source.kind == "backup":
                record["filling"] = True
            self.layout.commit("volume", local_id, record, temp, holds_data)
        except FileNotFoundError as exc:
            self.layout.remove("volume", local_id)
            if self._own_file(exc, "volume", local_id):
                raise Aborted(self._deleted_meanwhile("volume", local_id, spec.name)) from exc
            raise
        except BaseException:
            self.layout.remove("volume", local_id)
            raise
        return self._volume(local_id, record)

    def _own_file(self, exc: FileNotFoundError, kind: Kind, local_id: str) -> bool:
        """Whether the file that vanished is one of the creation's own: then a delete of
        the same (deterministic) ID ran meanwhile and removed what it had begun."""
        own = self.layout.image(kind, local_id), self.layout.record_path(kind, local_id)
        return isinstance(exc.filename, str) and exc.filename.startswith(own)

    @staticmethod
    def _deleted_meanwhile(kind: Kind, local_id: str, name: str) -> str:
        return f"{kind} {name!r} ({local_id}) was deleted while it was being created; retry the creation"

    def _source(self, source: SourceRef | None) -> tuple[str | None, int]:
        """The image to copy for a content source and its size; none for a backup (an ID
        of the driver's backups, not of this backend's objects: ``fill_volume`` writes
        its content later)."""
        if source is None or source.kind == "backup":
            return None, 0
        if not self.layout.exists(source.kind, source.local_id):
            raise NotFound(f"source {source.kind} {source.local_id!r} does not exist")
        return self.layout.image(source.kind, source.local_id), self._size(source.kind, source.local_id)

    def _copy_source(self, source: SourceRef | None, source_image: str, target: str) -> None:
        """Copy a content source; one deleted meanwhile (by another controller, or by
        hand) is NotFound, not a failed copy."""
        try:
            copy_image(source_image, target)
        except (CommandFailed, FileNotFoundError) as exc:
            if source is not None and not os.path.exists(source_image):
                raise NotFound(f"source {source.kind} {source.local_id!r} was deleted while it was copied") from exc
            raise

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        record = self.layout.read_record("volume", local_id)
        if record and record["published"]:
            nodes = ", ".join(sorted(record["published"]))
            raise FailedPrecondition(f"volume {local_id} is still published to node(s) {nodes}")
        self.layout.remove("volume", local_id)

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        record = self.layout.require_record("volume", local_id)
        return self._volume(local_id, record)

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        local_id = self.layout.local_id("volume", name)
        record = self.layout.read_record("volume", local_id)
        return self._volume(local_id, record) if record else None

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        return _present(self.get_volume, self.layout.ids("volume", after), limit)

    def _volume(self, local_id: str, record: dict[str, Any]) -> Volume:
        source = record.get("source")
        return Volume(
            local_id=local_id,
            name=record["name"],
            capacity_bytes=self._size("volume", local_id),
            source=SourceRef(source["kind"], source["local_id"]) if source else None,
            topology=self.topology,
            published_nodes=tuple(sorted(record["published"])),
            condition=self._condition(local_id, record),
            filling=bool(record.get("filling")),
        )

    def _condition(self, local_id: str, record: dict[str, Any]) -> VolumeCondition:
        """What is wrong with the volume as the controller sees it: an image the driver
        cannot read and write, or publications to a node that cannot reach it."""
        problems = []
        if not os.access(self.layout.image("volume", local_id), os.R_OK | os.W_OK):
            problems.append(f"its image {self.layout.image('volume', local_id)} is not readable and writable")
        strangers = sorted(set(record["published"]) - {self.node_id})
        if strangers:
            problems.append(f"it is recorded as published to {', '.join(strangers)}, which cannot reach it")
        return VolumeCondition(True, "; ".join(problems)) if problems else HEALTHY

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        record = self.layout.require_record("volume", local_id)
        image = self.layout.image("volume", local_id)
        current = os.stat(image).st_size
        if required_bytes <= current:
            return current
        size = choose_size(required_bytes, limit_bytes)
        truncate(image, size, local_id)
        if _parse_bool(record["parameters"].get(PARAM_PREALLOCATE, "false"), PARAM_PREALLOCATE):
            _preallocate(image, size)
        fsync_file(image)
        # Read again: a publication may have rewritten the record meanwhile.
        latest = self.layout.require_record("volume", local_id)
        latest["size"] = size
        self.layout.write_record("volume", local_id, latest)
        return size

    # -- snapshots ------------------------------------------------------------------

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        local_id = self.layout.local_id("snapshot", name)
        existing = self.layout.read_record("snapshot", local_id)
        if existing is not None:
            if existing["name"] != name or existing["source"] != source_local_id:
                raise AlreadyExists(f"snapshot {name!r} exists for another source volume")
            answer = self._snapshot(local_id, existing)
            self.layout.confirm("snapshot", local_id, existing)
            return answer
        source = SourceRef("volume", source_local_id)
        source_image, _ = self._source(source)
        assert source_image is not None
        image = self.layout.image("snapshot", local_id)
        temp = image + TEMP_SUFFIX
        try:
            self._copy_source(source, source_image, temp)
            fsync_file(temp)
            record = {"name": name, "source": source_local_id, "created": time.time()}
            self.layout.commit("snapshot", local_id, record, temp, holds_data=True)
        except FileNotFoundError as exc:
            self.layout.remove("snapshot", local_id)
            if self._own_file(exc, "snapshot", local_id):
                raise Aborted(self._deleted_meanwhile("snapshot", local_id, name)) from exc
            raise
        except BaseException:
            self.layout.remove("snapshot", local_id)
            raise
        return self._snapshot(local_id, record)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        self.layout.remove("snapshot", local_id)

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        record = self.layout.require_record("snapshot", local_id)
        return self._snapshot(local_id, record)

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        return _present(self.get_snapshot, self.layout.ids("snapshot", after), limit)

    def _snapshot(self, local_id: str, record: dict[str, Any]) -> Snapshot:
        return Snapshot(
            local_id=local_id,
            name=record["name"],
            source_volume_local_id=record["source"],
            size_bytes=self._size("snapshot", local_id),
            created_at=record["created"],
        )

    def _size(self, kind: Kind, local_id: str) -> int:
        try:
            return os.stat(self.layout.image(kind, local_id)).st_size
        except FileNotFoundError:
            raise NotFound(f"{kind} {local_id!r} does not exist") from None

    # -- snapshot blocks (backups, changed-block tracking) --------------------------

    def allocated(self, local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS) -> Iterator[Extent]:
        """The ranges of the snapshot's image that may hold data (its holes read as
        zeros), from ``start`` on. Checked now; read as the caller iterates."""
        check_start(start)
        self.layout.require_record("snapshot", local_id)
        return blocks.allocated(self.layout.image("snapshot", local_id), f"snapshot {local_id!r}", start)

    def changed(
        self, base_local_id: str, target_local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS
    ) -> Iterator[Extent]:
        """The blocks, from ``start`` on, where snapshot ``target_local_id`` may differ
        from ``base_local_id`` of the same volume: what they share on disk is not read,
        the rest is compared (see ``blocks.changed``). Checked now; read as the caller
        iterates."""
        check_start(start)
        base = self.layout.require_record("snapshot", base_local_id)
        target = self.layout.require_record("snapshot", target_local_id)
        if base["source"] != target["source"]:
            raise InvalidArgument(
                f"snapshots {base_local_id} (of volume {base['source']}) and {target_local_id} "
                f"(of volume {target['source']}) are not snapshots of one volume"
            )
        if base_local_id == target_local_id:
            return iter(())
        return blocks.changed(
            self.layout.image("snapshot", base_local_id),
            self.layout.image("snapshot", target_local_id),
            start,
            (f"snapshot {base_local_id!r}", f"snapshot {target_local_id!r}"),
            read=self.read_compared,
        )

    @contextlib.contextmanager
    def read_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[BlockReader]:
        """The snapshot's image open for reading; NotFound when there is none."""
        self.layout.require_record("snapshot", local_id)
        fd = blocks.open_image(self.layout.image("snapshot", local_id), f"snapshot {local_id!r}")
        try:
            yield blocks.ImageReader(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def fill_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[BlockWriter]:
        """A volume made from a backup and not filled yet, open for writing its content.
        What an earlier, failed fill wrote is discarded first, so what this one does not
        write reads as zeros. A clean exit flushes the image, then records the volume as
        filled; an error leaves it filling, for a retry."""
        record = self.layout.require_record("volume", local_id)
        if not record.get("filling"):
            raise FailedPrecondition(
                f"volume {local_id} is not waiting for content from a backup: it is filled already, "
                "or was not made from one"
            )
        image = self.layout.image("volume", local_id)
        what = f"volume {local_id!r}"
        fd = blocks.open_image(image, what, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            if _parse_bool(record["parameters"].get(PARAM_PREALLOCATE, "false"), PARAM_PREALLOCATE):
                _preallocate(image, size)
            yield blocks.ImageWriter(fd, size, what)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.layout.durable["volume"].sync()  # the image is there before the record says it is filled
        # Read again: a publication may have rewritten the record while the content was written.
        current = self.layout.read_record("volume", local_id)
        if current is None:
            raise NotFound(f"volume {local_id!r} was deleted while it was filled")
        current.pop("filling", None)
        self.layout.write_record("volume", local_id, current)

    # -- publication ----------------------------------------------------------------

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        record = self.layout.require_record("volume", local_id)
        if node_id != self.node_id:
            raise NotFound(f"node {node_id!r} cannot reach volume {local_id}: it is local to node {self.node_id!r}")
        published: dict[str, bool] = record["published"]
        check_publication(local_id, published, node_id, capability, readonly)
        if node_id not in published:
            published[node_id] = readonly
            self.layout.write_record("volume", local_id, record)
        # What a node writes to the image must not depend on the journal's replay, which
        # makes a lost blank image again: its name is flushed before any node has it.
        self.layout.durable["volume"].sync()
        return {"image": self.layout.image("volume", local_id)}

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        record = self.layout.read_record("volume", local_id)
        if record is None or node_id not in record["published"]:
            return
        del record["published"][node_id]
        self.layout.write_record("volume", local_id, record)


def copy_image(source: str, target: str) -> None:
    """A point-in-time copy of an image, sharing extents where the filesystem can and
    keeping holes. When the image is staged on this host (the local backend's controller
    and node run on the same host), its filesystem is frozen during the copy so the copy
    holds everything written before it began and nothing torn. The freeze is recorded in
    the backend's freeze journal, so a crash during the copy cannot leave it frozen (see
    ``mount.frozen``); it never outlasts COPY_TIMEOUT."""
    journal = Layout.containing(target).freeze_journal
    with mount.frozen(loopdev.find(source), journal, limit=COPY_TIMEOUT):
        proc.run(["cp", "--reflink=auto", "--sparse=always", source, target], timeout=COPY_TIMEOUT)


def _present(get: Callable[[str], T], local_ids: Iterable[str], limit: int = 0) -> list[T]:
    """The first ``limit`` (0: all) objects that exist when they are read: one still
    being made, or deleted between the index and its read, is left out, not an error."""
    found = []
    for local_id in local_ids:
        try:
            found.append(get(local_id))
        except NotFound:
            continue
        if limit and len(found) == limit:
            break
    return found


def truncate(path: str, size: int, what: str) -> None:
    """Set an image's size; a size the filesystem cannot hold is OutOfRange."""
    try:
        os.truncate(path, size)
    except (OverflowError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.EFBIG, errno.EINVAL):
            raise
        raise OutOfRange(f"volume {what!r}: {size} bytes is more than this backend's filesystem can hold") from exc


def _source_record(source: SourceRef | None) -> dict[str, str] | None:
    return {"kind": source.kind, "local_id": source.local_id} if source else None


def _parse_bool(value: str, key: str) -> bool:
    if value.lower() in ("true", "yes", "1"):
        return True
    if value.lower() in ("false", "no", "0"):
        return False
    raise InvalidArgument(f"parameter {key!r} must be true or false, got {value!r}")


def _preallocate(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no room to preallocate {size} bytes for {path}: {exc.strerror}") from exc
        raise
    finally:
        os.close(fd)
