"""Controller half of the nfs backend: volumes are folders (``layout: directory``, shared
by many nodes) or sparse image files (``layout: image``, Cinder's NFS driver) on one
export, reached through ``fs.Tree`` (the user-space client, or the exported directory
itself with ``exportRoot``).

On the export, relative to its root (``<b>`` is the backend's name)::

    <subDir>                               a directory volume's data (from the template)
    .cairn/<b>/volumes/vol-<uuid>.json     a volume's record: name, layout, path, source,
                                           size, publications, what to do on delete
    .cairn/<b>/volumes/vol-<uuid>.img      an image volume's data
    .cairn/<b>/snapshots/snap-<uuid>.json  a snapshot's record
    .cairn/<b>/snapshots/snap-<uuid>.data  its copy (a folder or an image)
    .cairn/<b>/tmp/                        objects being made (renamed into place)
    .cairn/<b>/trash/                      folders being removed (renamed out of sight first)

Crash safety is the local backend's: the ID is derived from the request name; data is
made under ``tmp/``, then the record is written, then the data is renamed into place.
An object exists when its record and its data exist, so a crash leaves a temporary
object or a record without data, which a retry remakes and the start-up sweep removes.
A delete renames the data out of sight before it removes the record, so it is never
half visible.

A backend of images also offers ``SnapshotBlocks`` (``blocks.py``): the ranges of a
snapshot image that may hold data, those where two snapshots of one volume differ,
reading a snapshot, and filling a volume restored from a backup. Such a volume is made
blank, with its source and ``"filling": true`` in its record, and the record loses the
mark once its content is written and flushed; until then it is no source of a snapshot
or a clone. A backend of folders has no blocks to read, and says so.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from csi import quota
from csi.backends.base import BlockReader, BlockWriter, check_publication, matching
from csi.backends.nfs import blocks, paths, tree_ops
from csi.backends.nfs.common import ON_DELETE, NfsSettings
from csi.backends.nfs.fs import File, Stat, Tree, opened
from csi.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from csi.extents import Range, Read, check_start, to_extents, union
from csi.model import (
    HEALTHY,
    NO_SECRETS,
    Capability,
    Extent,
    Secrets,
    Segment,
    Snapshot,
    SourceRef,
    Volume,
    VolumeSpec,
)
from csi.sizes import choose_size

log = logging.getLogger(__name__)

PARAM_SUB_DIR = "subDir"
PARAM_ON_DELETE = "onDelete"
PARAM_MOUNT_OPTIONS = "mountOptions"
PARAM_MOUNT_PERMISSIONS = "mountPermissions"
_NAMESPACE = {kind: uuid.uuid5(uuid.NAMESPACE_URL, f"https://cairn.csi.io/nfs/{kind}") for kind in ("vol", "snap")}
_FOLDER = {"volume": "volumes", "snapshot": "snapshots"}
_CONTROL_FOLDERS = ("volumes", "snapshots", "tmp", "trash", "archived")
_CONTROL_MODE = 0o711
"""Searchable by anyone, listable by the driver only: where the export squashes root, the
owners of what a volume holds must reach it there to remove it (see ``_remove_tree``)."""
_OWNER_CLIENTS = 16
"""How many clients acting as other users (root squash) stay connected."""
_PREFIX = {"volume": "vol", "snapshot": "snap"}


def parse_permissions(value: str, where: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise InvalidArgument(f"{where} {value!r} is not an octal mode such as 0775") from None
    if not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"{where} {value!r} is not a file mode (0000 to 7777)")
    return mode


def parse_mount_options(value: str) -> tuple[str, ...]:
    options = tuple(o.strip() for o in value.split(",") if o.strip())
    for option in options:
        if any(c in option for c in " \t\n\0"):
            raise InvalidArgument(f"mount option {option!r} contains whitespace or NUL")
    return options


def check_local_id(kind: str, local_id: str) -> None:
    """Refuse anything that is not an ID this backend issues (so no path is ever built
    from a string a client made up)."""
    prefix = _PREFIX[kind] + "-"
    try:
        valid = local_id.startswith(prefix) and str(uuid.UUID(local_id[len(prefix) :])) == local_id[len(prefix) :]
    except ValueError:
        valid = False
    if not valid:
        raise NotFound(f"{kind} {local_id!r} does not exist")


class NfsVolumes:
    volume_parameters = frozenset({PARAM_SUB_DIR, PARAM_ON_DELETE, PARAM_MOUNT_OPTIONS, PARAM_MOUNT_PERMISSIONS})
    snapshot_parameters: frozenset[str] = frozenset()
    topology: tuple[Segment, ...] = ()  # an export is reachable from every node

    def __init__(
        self,
        settings: NfsSettings,
        tree: Tree,
        owner_tree: Callable[[int, int], Tree] | None = None,
        quota_root: str = "",
    ) -> None:
        """``owner_tree(uid, gid)`` gives a tree that acts as that user, where the export
        squashes root: removing a folder's entries as their owner is how deletion
        works there."""
        self.settings = settings
        self.tree = tree
        self.owner_tree = owner_tree
        self.quota_root = quota_root
        """Where ``tree`` lies on this host when its filesystem enforces project quotas
        (``exportRoot``): directory volumes' sizes are then limits, not advice."""
        self._owners: dict[tuple[int, int], Tree] = {}
        self._owners_lock = threading.Lock()
        self.control = settings.control
        self._ready = False

    # -- set-up -----------------------------------------------------------------------

    def _ensure(self) -> None:
        """Make the backend's folders on first use and sweep what crashed calls left; a
        server that is down at start-up does not stop the driver from starting."""
        if self._ready:
            return
        try:
            tree_ops.make_dirs(self.tree, paths_of(self.control))
            for folder in _CONTROL_FOLDERS:
                path = tree_ops.join(self.control, folder)
                tree_ops.make_dirs(self.tree, paths_of(path), _CONTROL_MODE)
                if stat.S_IMODE(self.tree.lstat(path).mode) != _CONTROL_MODE:
                    self.tree.chmod(path, _CONTROL_MODE)
        except OSError as exc:
            raise Unavailable(f"export {self.tree.describe()} is not usable: {exc.strerror or exc}") from exc
        self._ready = True

    def recover(self) -> None:
        """Remove what crashed calls left (temporary objects, records without data, folders
        half removed). Only safe when nothing is in flight: at the controller's start."""
        try:
            self._ensure()
            for name in self.tree.listdir(tree_ops.join(self.control, "trash")):
                self._remove_tree(tree_ops.join(self.control, "trash", name))
            for name in self.tree.listdir(tree_ops.join(self.control, "tmp")):
                log.warning("removing what an interrupted creation left", extra={"path": name})
                self._remove_tree(tree_ops.join(self.control, "tmp", name))
            for kind, folder in _FOLDER.items():
                directory = tree_ops.join(self.control, folder)
                for name in self.tree.listdir(directory):
                    if ".json.tmp-" in name:
                        tree_ops.remove_file(self.tree, tree_ops.join(directory, name))
                    elif name.endswith(".json"):
                        local_id = name.removesuffix(".json")
                        record = tree_ops.read_json(self.tree, tree_ops.join(directory, name))
                        if record is not None and not self._has_data(kind, local_id, record):
                            log.warning("removing a record whose data never landed", extra={"path": name})
                            tree_ops.remove_file(self.tree, tree_ops.join(directory, name))
        except (OSError, Unavailable) as exc:
            log.warning("could not sweep the export at start-up: %s", exc)
            self._ready = False

    # -- records ----------------------------------------------------------------------

    def _record_path(self, kind: str, local_id: str) -> str:
        check_local_id(kind, local_id)
        return tree_ops.join(self.control, _FOLDER[kind], f"{local_id}.json")

    def _data_path(self, kind: str, local_id: str, record: Mapping[str, Any]) -> str:
        if kind == "snapshot":
            return tree_ops.join(self.control, "snapshots", f"{local_id}.data")
        return str(record["path"])

    def _has_data(self, kind: str, local_id: str, record: Mapping[str, Any]) -> bool:
        return tree_ops.exists(self.tree, self._data_path(kind, local_id, record))

    def _read(self, kind: str, local_id: str) -> dict[str, Any] | None:
        """The record of a complete object, or None. A statically provisioned folder has
        no record: it is described from its ID."""
        self._ensure()
        if kind == "volume" and is_static(local_id):
            return self._static(local_id)
        record: dict[str, Any] | None = self._call(
            lambda: tree_ops.read_json(self.tree, self._record_path(kind, local_id))
        )
        if record is None or not self._call(lambda: self._has_data(kind, local_id, record)):
            return None
        return record

    def _static(self, local_id: str) -> dict[str, Any] | None:
        """A folder an operator made and named in a PersistentVolume (static provisioning):
        the driver publishes it and may copy it, and never writes, resizes or removes it."""
        if self.settings.layout != "directory":
            raise NotFound(
                f"volume {local_id!r}: backend {self.settings.backend!r} makes images; static volumes are folders"
            )
        path = static_path(local_id)
        st = self._call(lambda: _lstat_or_none(self.tree, path))
        if st is None or not st.is_dir:
            return None
        return {
            "name": local_id,
            "layout": "directory",
            "path": path,
            "size": 0,
            "source": None,
            "published": {},
            "mountOptions": list(self.settings.mount_options),
            "static": True,
        }

    def _require(self, kind: str, local_id: str) -> dict[str, Any]:
        record = self._read(kind, local_id)
        if record is None:
            raise NotFound(f"{kind} {local_id!r} does not exist")
        return record

    def _write(self, kind: str, local_id: str, record: dict[str, Any]) -> None:
        self._call(lambda: tree_ops.write_json(self.tree, self._record_path(kind, local_id), record))

    def _call(self, step: Callable[[], Any]) -> Any:
        """Run a step against the export, turning the server's answers into domain errors."""
        try:
            return step()
        except OSError as exc:
            raise _domain_error(exc, self.tree.describe()) from exc

    # -- capacity and health ------------------------------------------------------------

    def settle(self) -> None:
        """Nothing to settle: every change is on the server when its call answers."""

    def health(self) -> str | None:
        try:
            self.tree.fsstat("")
        except OSError as exc:
            return f"export {self.tree.describe()} is not reachable: {exc.strerror or exc}"
        return None

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        try:
            return self.tree.fsstat("").available_bytes
        except OSError as exc:
            log.warning("no free space figure for %s: %s", self.tree.describe(), exc)
            return 0

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        if self.settings.layout == "directory":
            # An advisory size takes no room until written; the export's size bounds it.
            try:
                return self.tree.fsstat("").total_bytes
            except OSError:
                return 0
        return self.free_bytes(segment)

    # -- volumes ------------------------------------------------------------------------

    def _options(self, parameters: Mapping[str, str]) -> dict[str, Any]:
        on_delete = parameters.get(PARAM_ON_DELETE, self.settings.on_delete)
        if on_delete not in ON_DELETE:
            raise InvalidArgument(
                f"parameter {PARAM_ON_DELETE!r} must be one of {', '.join(ON_DELETE)}, got {on_delete!r}"
            )
        permissions = self.settings.mount_permissions
        if PARAM_MOUNT_PERMISSIONS in parameters:
            permissions = parse_permissions(
                parameters[PARAM_MOUNT_PERMISSIONS], f"parameter {PARAM_MOUNT_PERMISSIONS!r}"
            )
        options = self.settings.mount_options
        if PARAM_MOUNT_OPTIONS in parameters:
            options = parse_mount_options(parameters[PARAM_MOUNT_OPTIONS])
        template = parameters.get(PARAM_SUB_DIR, self.settings.sub_dir)
        if PARAM_SUB_DIR in parameters and self.settings.layout != "directory":
            raise InvalidArgument(
                f"parameter {PARAM_SUB_DIR!r} applies to directory volumes; backend {self.settings.backend!r} makes images"
            )
        return {"onDelete": on_delete, "permissions": permissions, "mountOptions": list(options), "template": template}

    def create_volume(self, spec: VolumeSpec) -> Volume:
        self._ensure()
        options = self._options(spec.parameters)
        local_id = f"vol-{uuid.uuid5(_NAMESPACE['vol'], spec.name)}"
        existing = self._read("volume", local_id)
        if existing is not None:
            return matching(self._volume(local_id, existing), spec)
        source_path, source_size = self._source(spec.source)
        size = choose_size(spec.required_bytes, spec.limit_bytes, source_size)
        if self.settings.layout == "directory":
            path = paths.expand(options["template"], spec.metadata, spec.name)
        else:
            path = self.settings.image_path(local_id)
        parts = (
            paths.check_relative(path, f"volume {spec.name!r} path")
            if self.settings.layout == "directory"
            else path.split("/")
        )
        temp = tree_ops.join(self.control, "tmp", local_id)
        record = {
            "name": spec.name,
            "layout": self.settings.layout,
            "path": path,
            "size": size,
            "source": {"kind": spec.source.kind, "local_id": spec.source.local_id} if spec.source else None,
            "onDelete": options["onDelete"],
            "mountOptions": options["mountOptions"],
            "created": time.time(),
            "published": {},
        }
        if spec.source is not None and spec.source.kind == "backup":
            record["filling"] = True  # blank until fill_volume writes the backup's content

        def make() -> None:
            tree_ops.check_no_links(self.tree, parts)
            if tree_ops.exists(self.tree, path):
                raise AlreadyExists(
                    f"{path!r} already exists on export {self.tree.describe()} and is not volume {spec.name!r}"
                )
            tree_ops.make_dirs(self.tree, parts[:-1])
            self._remove_tree(temp)
            if self.settings.layout == "directory":
                if source_path:
                    tree_ops.copy_tree(self.tree, source_path, temp)
                else:
                    self.tree.mkdir(temp, options["permissions"])
                self.tree.chmod(temp, options["permissions"])
                if self.quota_root:
                    full = os.path.join(self.quota_root, temp)
                    record["project"] = quota.project_for(full)
                    quota.limit(full, record["project"], size)
            else:
                if source_path:
                    tree_ops.copy_file(self.tree, source_path, temp)
                with opened(self.tree, temp, os.O_WRONLY | os.O_CREAT, 0o600) as handle:
                    handle.truncate(size)
                    handle.fsync()
            tree_ops.write_json(self.tree, self._record_path("volume", local_id), record)
            self.tree.rename(temp, path)

        try:
            self._call(make)
        except BaseException:
            self._forget_creation(local_id, temp)
            raise
        return self.get_volume(local_id)

    def _forget_creation(self, local_id: str, temp: str) -> None:
        try:
            self._remove_tree(temp)
            record_path = self._record_path("volume", local_id)
            record = tree_ops.read_json(self.tree, record_path)
            if record is not None and not self._has_data("volume", local_id, record):
                tree_ops.remove_file(self.tree, record_path)
        except OSError as exc:
            log.warning("could not clean up a failed creation of %s (the start-up sweep will): %s", local_id, exc)

    def _source(self, source: SourceRef | None) -> tuple[str, int]:
        """The data to copy for a content source and its size; none for a backup (an ID
        of the driver's backups, not of this backend's objects: ``fill_volume`` writes
        its content later)."""
        if source is None:
            return "", 0
        if source.kind == "backup":
            self._check_images()
            return "", 0
        record = self._read(source.kind, source.local_id)
        if record is None:
            raise NotFound(f"source {source.kind} {source.local_id!r} does not exist")
        _not_filling(record, f"source {source.kind} {source.local_id!r}")
        return self._data_path(source.kind, source.local_id, record), int(record["size"])

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        self._ensure()
        if is_static(local_id):
            log.info("volume %s is a folder the driver did not make: it stays on the export", local_id)
            return
        record_path = self._record_path("volume", local_id)
        record = self._call(lambda: tree_ops.read_json(self.tree, record_path))
        if record is None:
            return
        if record["published"]:
            nodes = ", ".join(sorted(record["published"]))
            raise FailedPrecondition(f"volume {local_id} is still published to node(s) {nodes}")
        path = str(record["path"])

        def remove() -> None:
            if tree_ops.exists(self.tree, path):
                if record["onDelete"] == "archive":
                    self._archive(local_id, record)
                elif record["onDelete"] == "delete":
                    trash = tree_ops.join(self.control, "trash", f"{local_id}-{uuid.uuid4().hex[:8]}")
                    self._move(path, trash)
            # The record goes last: a delete cut short is finished by the retry.
            self._empty_trash(local_id)
            if record.get("project") and self.quota_root and record["onDelete"] == "delete":
                quota.release(self.quota_root, int(record["project"]))
            tree_ops.remove_file(self.tree, record_path)

        self._call(remove)

    def _empty_trash(self, local_id: str) -> None:
        trash = tree_ops.join(self.control, "trash")
        for name in self.tree.listdir(trash):
            if name.startswith(f"{local_id}-"):
                self._remove_tree(tree_ops.join(trash, name))

    def _move(self, path: str, target: str) -> None:
        """Rename ``path``; a folder a pod made its own (moving a folder rewrites its
        '..', which needs write permission on it) is moved by its owner where root is
        squashed, after the owner gives itself that permission."""
        try:
            self.tree.rename(path, target)
        except PermissionError:
            if self.owner_tree is None:
                raise
            st = self.tree.lstat(path)
            owner = self._as_owner(st)
            owner.chmod(path, stat.S_IMODE(st.mode) | stat.S_IRWXU)
            self.tree.rename(path, target)

    def _archive(self, local_id: str, record: Mapping[str, Any]) -> None:
        """Keep the data under a name that cannot collide (time, volume ID and a random
        part): a folder beside where it was, as ``archived-<name>-...``; an image in the
        backend's ``archived`` folder, beside a copy of its record naming the claim."""
        path = str(record["path"])
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        unique = f"{stamp}-{local_id}-{uuid.uuid4().hex[:8]}"
        if record["layout"] == "image":
            target = tree_ops.join(self.control, "archived", unique)
            tree_ops.write_json(self.tree, f"{target}.json", dict(record))
            self._move(path, f"{target}.img")
            return
        parent, _, base = path.rpartition("/")
        self._move(path, tree_ops.join(parent, f"archived-{base}-{unique}"))

    def _remove_tree(self, path: str) -> None:
        try:
            tree_ops.remove_tree(self.tree, path)
        except PermissionError:
            if self.owner_tree is None:
                raise
            # A squashing server: remove each folder's entries as the folder's owner.
            tree_ops.remove_tree(self.tree, path, as_owner=self._as_owner)

    def _as_owner(self, st: Stat) -> Tree:
        assert self.owner_tree is not None
        key = (st.uid, st.gid)
        with self._owners_lock:
            tree = self._owners.pop(key, None) or self.owner_tree(*key)
            self._owners[key] = tree  # the most recently used last
            while len(self._owners) > _OWNER_CLIENTS:
                oldest = next(iter(self._owners))
                self._owners.pop(oldest).close()
            return tree

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        return self._volume(local_id, self._require("volume", local_id))

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        local_id = f"vol-{uuid.uuid5(_NAMESPACE['vol'], name)}"
        record = self._read("volume", local_id)
        return self._volume(local_id, record) if record else None

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        return [self._volume(i, r) for i, r in self._records("volume", after, limit)]

    def _records(self, kind: str, after: str = "", limit: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """The records of ``kind`` after local ID ``after``, at most ``limit`` (0: all):
        one listing of the control folder's names, then only the page's records read."""
        self._ensure()
        folder = tree_ops.join(self.control, _FOLDER[kind])
        names = self._call(lambda: self.tree.listdir(folder))
        found = []
        for local_id in sorted(n.removesuffix(".json") for n in names if n.endswith(".json")):
            if local_id <= after:
                continue
            try:
                record = self._read(kind, local_id)
            except NotFound:
                continue
            if record is not None:
                found.append((local_id, record))
                if limit and len(found) == limit:
                    break
        return found

    def _volume(self, local_id: str, record: Mapping[str, Any]) -> Volume:
        source = record.get("source")
        return Volume(
            local_id=local_id,
            name=record["name"],
            capacity_bytes=self._size("volume", local_id, record),
            source=SourceRef(source["kind"], source["local_id"]) if source else None,
            context={"subDir": str(record["path"])} if record["layout"] == "directory" else {},
            published_nodes=tuple(sorted(record["published"])),
            condition=HEALTHY,
            filling=bool(record.get("filling")),
        )

    def _size(self, kind: str, local_id: str, record: Mapping[str, Any]) -> int:
        if record.get("layout", "directory") == "image" and kind == "volume":
            try:
                return int(self._call(lambda: self.tree.lstat(self._data_path(kind, local_id, record)).size))
            except NotFound:
                raise NotFound(f"{kind} {local_id!r} does not exist") from None
        return int(record["size"])

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        record = self._require("volume", local_id)
        if record.get("static"):
            raise FailedPrecondition(f"volume {local_id} is a folder the driver did not make: it has no size to grow")
        current = self._size("volume", local_id, record)
        if required_bytes <= current:
            return current
        size = choose_size(required_bytes, limit_bytes)
        if record["layout"] == "image":
            self._call(lambda: self.tree.truncate(str(record["path"]), size))
        elif record.get("project") and self.quota_root:
            quota.grow(os.path.join(self.quota_root, str(record["path"])), int(record["project"]), size)
        record["size"] = size
        self._write("volume", local_id, record)
        return size

    # -- snapshots ----------------------------------------------------------------------

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        self._ensure()
        local_id = f"snap-{uuid.uuid5(_NAMESPACE['snap'], name)}"
        existing = self._read("snapshot", local_id)
        if existing is not None:
            if existing["source"] != source_local_id:
                raise AlreadyExists(f"snapshot {name!r} exists for another source volume")
            return self._snapshot(local_id, existing)
        valid = _valid("volume", source_local_id) or is_static(source_local_id)
        source = self._read("volume", source_local_id) if valid else None
        if source is None:
            raise NotFound(f"source volume {source_local_id!r} does not exist")
        _not_filling(source, f"source volume {source_local_id!r}")
        temp = tree_ops.join(self.control, "tmp", local_id)
        data = self._data_path("snapshot", local_id, {})
        record = {
            "name": name,
            "source": source_local_id,
            "layout": source["layout"],
            "size": self._size("volume", source_local_id, source),
            "created": time.time(),
        }

        def make() -> None:
            self._remove_tree(temp)
            if source["layout"] == "directory":
                tree_ops.copy_tree(self.tree, str(source["path"]), temp)
            else:
                tree_ops.copy_file(self.tree, str(source["path"]), temp)
            tree_ops.write_json(self.tree, self._record_path("snapshot", local_id), record)
            self.tree.rename(temp, data)

        try:
            self._call(make)
        except BaseException:
            try:
                self._remove_tree(temp)
                if not tree_ops.exists(self.tree, data):
                    tree_ops.remove_file(self.tree, self._record_path("snapshot", local_id))
            except OSError as exc:
                log.warning("could not clean up a failed snapshot %s (the start-up sweep will): %s", local_id, exc)
            raise
        return self.get_snapshot(local_id)

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        self._ensure()
        record_path = self._record_path("snapshot", local_id)
        data = self._data_path("snapshot", local_id, {})

        def remove() -> None:
            if tree_ops.exists(self.tree, data):
                self._move(data, tree_ops.join(self.control, "trash", f"{local_id}-{uuid.uuid4().hex[:8]}"))
            self._empty_trash(local_id)
            tree_ops.remove_file(self.tree, record_path)

        self._call(remove)

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        return self._snapshot(local_id, self._require("snapshot", local_id))

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        return [self._snapshot(i, r) for i, r in self._records("snapshot", after, limit)]

    @staticmethod
    def _snapshot(local_id: str, record: Mapping[str, Any]) -> Snapshot:
        return Snapshot(
            local_id=local_id,
            name=record["name"],
            source_volume_local_id=record["source"],
            size_bytes=int(record["size"]),
            created_at=float(record["created"]),
        )

    # -- snapshot blocks (backups, changed-block tracking; images only) ------------------

    def _check_images(self) -> None:
        """Refuse block access on a backend of folders, naming it."""
        if self.settings.layout != "image":
            raise FailedPrecondition(
                f"backend {self.settings.backend!r} makes directory volumes (layout: {self.settings.layout}): "
                "they have no blocks to read, so no backups, restores from backups or changed-block tracking on it"
            )

    def _image_snapshot(self, local_id: str) -> tuple[str, dict[str, Any]]:
        """Where snapshot ``local_id``'s image is, and its record; NotFound when there is
        none."""
        self._check_images()
        record = self._require("snapshot", local_id)
        if record.get("layout") != "image":
            raise FailedPrecondition(f"snapshot {local_id} is a copy of a folder: it has no blocks to read")
        return self._data_path("snapshot", local_id, record), record

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """The export's errors as domain errors; a file gone is ``what`` gone."""
        try:
            yield
        except FileNotFoundError as exc:
            raise NotFound(f"{what} does not exist (it was deleted during the call)") from exc
        except OSError as exc:
            raise _domain_error(exc, self.tree.describe()) from exc

    def _size_of(self, path: str, what: str) -> int:
        with self._io(what):
            return self.tree.lstat(path).size

    def _data_ranges(self, path: str, start: int, end: int, what: str) -> Iterator[Range]:
        with self._io(what):
            yield from self.tree.data_ranges(path, start, end)

    def _reader(self, path: str, what: str) -> Read:
        """Reads of a file, each opening it and closing it again (see ``blocks``): one
        that finds the client connected anew meanwhile (ESTALE) is made again."""

        def read(offset: int, length: int) -> bytes:
            with self._io(what):
                for attempt in range(tree_ops.STALE_ATTEMPTS):
                    try:
                        return _read_file(self.tree, path, offset, length)
                    except OSError as exc:
                        if exc.errno != errno.ESTALE or attempt == tree_ops.STALE_ATTEMPTS - 1:
                            raise
            raise AssertionError("unreachable")

        return read

    def _writer(self, handle: File, what: str) -> blocks.Write:
        def write(offset: int, data: bytes) -> None:
            with self._io(what):
                handle.pwrite(data, offset)

        return write

    def allocated(self, local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS) -> Iterator[Extent]:
        """The ranges of the snapshot's image that may hold data, from ``start`` on: its
        data between its holes where the tree can tell them (``exportRoot``), the whole
        image through the user-space client. Checked now; read as the caller iterates."""
        check_start(start)
        path, _ = self._image_snapshot(local_id)
        return self._allocated(path, start, f"snapshot {local_id!r}")

    def _allocated(self, path: str, start: int, what: str) -> Iterator[Extent]:
        size = self._size_of(path, what)
        yield from to_extents(self._data_ranges(path, start, size, what))

    def changed(
        self, base_local_id: str, target_local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS
    ) -> Iterator[Extent]:
        """The blocks, from ``start`` on, where snapshot ``target_local_id`` may differ
        from ``base_local_id`` of the same volume: both images are read where either may
        hold data and compared in aligned blocks (a hole and zeros are equal), and past
        the base's end whatever the target may hold is changed. Checked now; read as the
        caller iterates."""
        check_start(start)
        base_path, base = self._image_snapshot(base_local_id)
        target_path, target = self._image_snapshot(target_local_id)
        if base["source"] != target["source"]:
            raise InvalidArgument(
                f"snapshots {base_local_id} (of volume {base['source']}) and {target_local_id} "
                f"(of volume {target['source']}) are not snapshots of one volume"
            )
        if base_local_id == target_local_id:
            return iter(())
        return self._changed(
            (base_path, f"snapshot {base_local_id!r}"), (target_path, f"snapshot {target_local_id!r}"), start
        )

    def _changed(self, base: tuple[str, str], target: tuple[str, str], start: int) -> Iterator[Extent]:
        (base_path, base_what), (target_path, target_what) = base, target
        base_size, target_size = self._size_of(base_path, base_what), self._size_of(target_path, target_what)
        common = min(base_size, target_size)
        # What neither image may hold is zeros in both: only the rest is read.
        candidates = union(
            self._data_ranges(base_path, start, common, base_what),
            self._data_ranges(target_path, start, common, target_what),
        )
        grown = self._data_ranges(target_path, max(start, base_size), target_size, target_what)
        yield from blocks.changed(
            self._reader(base_path, base_what),
            self._reader(target_path, target_what),
            candidates,
            grown,
            start,
            common,
            target_size,
        )

    @contextlib.contextmanager
    def read_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[BlockReader]:
        """The snapshot's image for reading; NotFound when there is none. It is opened by
        each read, not held open: the ranges of the same snapshot may be asked for while
        it is read (which the user-space client could not open again meanwhile)."""
        path, _ = self._image_snapshot(local_id)
        what = f"snapshot {local_id!r}"
        yield blocks.ImageReader(self._reader(path, what), self._size_of(path, what), what)

    @contextlib.contextmanager
    def fill_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[BlockWriter]:
        """A volume made from a backup and not filled yet, open for writing its content.
        What an earlier, failed fill wrote is discarded first (the image is cut to nothing
        and grown back: all holes), so what this one does not write reads as zeros. A
        clean exit flushes the image, then records the volume as filled; an error leaves
        it filling, for a retry."""
        self._check_images()
        record = self._require("volume", local_id)
        if not record.get("filling"):
            raise FailedPrecondition(
                f"volume {local_id} is not waiting for content from a backup: it is filled already, "
                "or was not made from one"
            )
        what = f"volume {local_id!r}"
        with self._io(what):
            handle = self.tree.open(str(record["path"]), os.O_WRONLY)
        try:
            with self._io(what):
                size = handle.fstat().size
                handle.truncate(0)
                handle.truncate(size)
            yield blocks.ImageWriter(self._writer(handle, what), size, what)
            with self._io(what):
                handle.fsync()
        finally:
            try:
                handle.close()
            except OSError as exc:  # what matters was flushed, or the fill failed anyway
                log.warning("could not close %s after filling it: %s", what, exc)
        # Read again: a publication may have rewritten the record while the content was written.
        current = self._read("volume", local_id)
        if current is None:
            raise NotFound(f"{what} was deleted while it was filled")
        current.pop("filling", None)
        self._write("volume", local_id, current)

    # -- publication --------------------------------------------------------------------

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        record = self._require("volume", local_id)
        published: dict[str, bool] = record["published"]
        check_publication(local_id, published, node_id, capability, readonly)
        if node_id not in published and not record.get("static"):
            published[node_id] = readonly
            self._write("volume", local_id, record)
        context = {
            "server": self.settings.server,
            "share": self.settings.share,
            "port": str(self.settings.port),
            "path": str(record["path"]),
            "mountOptions": ",".join(record["mountOptions"]),
        }
        if record.get("static"):
            # The PersistentVolume's attributes (server, share, subDir) say what to mount.
            for key in ("server", "share", "path"):
                del context[key]
        return context

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        if not _valid("volume", local_id):
            return  # a static volume's publications are not recorded
        record = self._read("volume", local_id)
        if record is None or node_id not in record["published"]:
            return
        del record["published"][node_id]
        self._write("volume", local_id, record)


STATIC_PREFIX = "static:"


def is_static(local_id: str) -> bool:
    return local_id.startswith(STATIC_PREFIX)


def static_path(local_id: str) -> str:
    """The folder a static volume's ID names (``static:<subDir>``), checked like a
    template's result."""
    path = local_id[len(STATIC_PREFIX) :]
    try:
        paths.check_relative(path, f"static volume {local_id!r}")
    except InvalidArgument as exc:
        raise NotFound(str(exc)) from None
    return path


def _lstat_or_none(tree: Tree, path: str) -> Stat | None:
    try:
        tree_ops.check_no_links(tree, [*paths_of(path), ""])
        return tree.lstat(path)
    except (FileNotFoundError, InvalidArgument):
        return None


def paths_of(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _read_file(tree: Tree, path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a file from ``offset``; fewer only where it ends."""
    parts: list[bytes] = []
    with opened(tree, path, os.O_RDONLY) as handle:
        while length > 0:
            part = handle.pread(length, offset)
            if not part:
                break
            parts.append(part)
            offset, length = offset + len(part), length - len(part)
    return b"".join(parts)


def _not_filling(record: Mapping[str, Any], what: str) -> None:
    """Refuse to copy a volume whose content a restore from a backup has not all written:
    a snapshot or clone of it would keep a part of the backup, and never the rest."""
    if record.get("filling"):
        raise FailedPrecondition(f"{what} is still being restored from a backup")


def _valid(kind: str, local_id: str) -> bool:
    try:
        check_local_id(kind, local_id)
    except NotFound:
        return False
    return True


def _domain_error(exc: OSError, where: str) -> Exception:
    """What an error from the export means to a caller."""
    name = exc.filename or ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"export {where} is full: {exc.strerror} ({name})")
    if exc.errno in (errno.EFBIG,):
        return OutOfRange(f"export {where} cannot hold a file that large ({name})")
    if exc.errno == errno.ENOENT:
        return NotFound(f"{name or 'a path'} vanished from export {where} during the call")
    if exc.errno == errno.ESTALE:
        return Aborted(f"the connection to export {where} was made anew during the call ({name}); retry")
    if exc.errno in (
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.EIO,
        errno.ENOTCONN,
    ):
        return Unavailable(f"export {where} is not reachable: {exc.strerror or exc}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailedPrecondition(f"export {where} refused {name or 'the change'}: {exc.strerror}")
    return exc
