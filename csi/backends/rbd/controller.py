"""Controller half of the rbd backend, through librbd (python3-rbd).

Volumes are images ``cairn-vol-<uuid>``; a snapshot is an image ``cairn-snap-<uuid>``
cloned from an RBD snapshot of its source volume, ``cairn-for-cairn-snap-<uuid>``, which
stays as long as the snapshot image reads through it: librbd tells what changed between
two snapshots of a volume from these (``changed``). A clone of a volume is made through
a short-lived RBD snapshot, removed at once (with clone v2 its data waits in the
snapshot trash while the clone needs it). Restores clone from an RBD snapshot named
``cairn`` of the snapshot image, taken at its first restore: the image is never written, so
a snapshot taken later holds the same data, and a snapshot never restored costs no RBD
snapshot (each one is a round of the monitors' consensus to take and another to drop).
Because a snapshot is an image of its own, it survives the deletion of its source volume;
because it is a clone, taking it copies no data. Clone chains are bounded: a new clone
deeper than ``maxCloneDepth`` is flattened at once (a full copy, so the call takes as
long as the data takes to copy).

An image's metadata says what it is: ``cairn.made`` (its own name: librbd finished making
it), ``cairn.source``, ``mapper`` and ``mapOptions`` (volumes), ``cairn.created``
(snapshots), and ``cairn.name``, written last, which marks it complete. A blank volume
gets them all in one atomic write right after librbd makes it, without being opened
(``_set_all_metadata``): it is made and complete at once. A volume restored from a
backup is made blank, with ``cairn.filling`` among those keys until its content is
written (``fill_volume``). Images made by earlier versions may also carry
``cairn.image`` (the same mark as ``cairn.made``) and ``cairn.created`` on volumes; both
are still read, and their snapshot images read through RBD snapshots in the trash.

Images that still have clones when deleted go to the RBD trash; they are purged as soon
as their last clone is gone (every delete tries). Which nodes use a volume is image
metadata (``cairn.published.<node>``), so it survives controller restarts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import rados
import rbd

from csi.backends.base import BlockReader, BlockWriter, check_publication
from csi.backends.rbd import blocks
from csi.backends.rbd.cluster import Clusters, ceph_call, classify
from csi.backends.rbd.common import MAPPERS, Credentials, Kind, RbdSettings, image_name, parse_features, split_id
from csi.backends.rbd.journal import OMAP_PAGE, Journal, Sweeper, forget_pool, remember_pool, remembered_pools
from csi.checks import BackgroundCheck
from csi.errors import AlreadyExists, CairnError, FailedPrecondition, InvalidArgument, NotFound
from csi.extents import Range, aligned, changed_blocks, check_start
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
    VolumeCondition,
    VolumeSpec,
)
from csi.sizes import choose_size

log = logging.getLogger(__name__)

SNAPSHOT = "cairn"
NAME_KEY, SOURCE_KEY, CREATED_KEY, PUBLISHED_PREFIX = "cairn.name", "cairn.source", "cairn.created", "cairn.published."
MADE_KEY = "cairn.made"  # the image's own name: librbd finished making it (see _made, _completed)
FILLING_KEY = "cairn.filling"  # a volume made from a backup whose content is not all written yet
FILL_NEW, FILL_BEGUN = "new", "begun"  # FILLING_KEY's values: nothing written yet; a fill began
IMAGE_KEY = "cairn.image"  # the image's own name, written by earlier versions: read as MADE_KEY
PARAM_POOL, PARAM_DATA_POOL, PARAM_FEATURES, PARAM_MAPPER = "pool", "dataPool", "imageFeatures", "mapper"
PARAM_MAP_OPTIONS = "mapOptions"
HEALTH_INTERVAL = 30.0  # seconds between two checks of the cluster
DF_FRESH = 1.0  # seconds a reading of the pools' free space answers placements


T = TypeVar("T")


class RbdVolumes:
    volume_parameters = frozenset({PARAM_POOL, PARAM_DATA_POOL, PARAM_FEATURES, PARAM_MAPPER, PARAM_MAP_OPTIONS})
    snapshot_parameters = frozenset({PARAM_FEATURES})
    topology: tuple[Segment, ...] = ()

    def __init__(self, settings: RbdSettings, clusters: Clusters) -> None:
        self.settings = settings
        self.clusters = clusters
        self.sweeper = Sweeper()
        self.rbd = rbd.RBD()
        self._health = BackgroundCheck(f"rbd pool {settings.pool}", self._check_cluster, HEALTH_INTERVAL)
        self._df_lock = threading.Lock()
        self._df_read: dict[Credentials | None, tuple[float, dict[str, int]]] = {}

    # -- plumbing -------------------------------------------------------------------

    @contextlib.contextmanager
    def _pool(self, pool: str, secrets: Secrets) -> Iterator[tuple[Any, Journal]]:
        with self.clusters.ioctx(pool, Credentials.from_secrets(secrets)) as io:
            journal = Journal(io)
            self.sweeper.ensure(pool, journal, lambda name: self._gone(io, name))
            yield io, journal

    def _exists(self, io: Any, name: str) -> bool:
        try:
            with rbd.Image(io, name, read_only=True):
                return True
        except rbd.ImageNotFound:
            return False

    @staticmethod
    def _image(io: Any, name: str, what: str) -> rbd.Image:
        return ceph_call(what, lambda: rbd.Image(io, name))

    def _clone_depth(self, image: rbd.Image, secrets: Secrets) -> int:
        """How many parents ``image`` reads through, opened with the calling request's
        credentials. A parent may be in the trash (its volume was deleted), where only
        its ID opens it."""
        depth = 0
        parent = _parent(image)
        credentials = Credentials.from_secrets(secrets)
        while parent is not None:
            depth += 1
            pool, parent_id = parent
            with (
                self.clusters.ioctx(pool, credentials) as io,
                rbd.Image(io, image_id=parent_id, read_only=True) as handle,
            ):
                parent = _parent(handle)
        return depth

    def _purge_trash(self, io: Any) -> None:
        """Remove trashed cairn images whose clones are all gone. A parent can only go
        after its last trashed child, so passes repeat while one removes something."""
        while True:
            removed = 0
            for entry in self.rbd.trash_list(io):
                if entry["name"].startswith("cairn-"):
                    try:
                        self.rbd.trash_remove(io, entry["id"])
                        removed += 1
                    except rbd.Error:
                        continue
            if not removed:
                return

    def _remove_image(self, io: Any, name: str, clone: bool = True) -> None:
        """Remove image ``name``, or move it to the trash while clones still read from it.
        librbd refuses to remove an image that has snapshots before it changes anything,
        so the snapshots Cairn took of it are looked for only then: most images have none.
        Removing a clone may free its trashed parent, so the trash is purged then; an image
        that is no clone (``clone`` False: made blank) frees nothing there."""
        try:
            if not self._removed(io, name) and not (_drop_own_snapshots(io, name) and self._removed(io, name)):
                # Clones (snapshots or restored volumes) still read from it: keep the data in
                # the trash until the last clone is gone.
                ceph_call(f"image {name}", lambda: self.rbd.trash_move(io, name, 0))
                return
        except rbd.ImageNotFound:
            return
        if clone:
            self._purge_trash(io)

    def _removed(self, io: Any, name: str) -> bool:
        """Remove image ``name``: False when it still has snapshots (raises ImageNotFound
        when there is no such image)."""
        try:
            self.rbd.remove(io, name)
        except rbd.ImageHasSnapshots:
            return False
        except rbd.ImageNotFound:
            raise
        except rbd.Error as exc:
            raise classify(exc, f"image {name}") from exc
        return True

    # -- capacity and capabilities -------------------------------------------------

    def settle(self) -> None:
        """Nothing to settle: every change is in Ceph when its call answers."""

    def health(self) -> str | None:
        return self._health.result()

    def _check_cluster(self) -> str | None:
        """One round trip to the monitors with the backend's own credentials
        (credentialsDir). Without them there is nothing to check with, and nothing is
        reported: the secrets StorageClasses name belong to their calls, not to the
        health check, and a call that cannot reach Ceph fails with its own reason."""
        if not self.clusters.has_default_credentials():
            return None
        connection = self.clusters.connection(None)
        command = json.dumps({"prefix": "df", "format": "json"})
        rc, out, err = connection.mon_command(command, b"")  # bounded by the connection's op timeout
        if rc == -errno.ETIMEDOUT:
            return f"the monitors {self.clusters.monitors} did not answer in time"
        if rc != 0:
            return f"the monitors {self.clusters.monitors} refused a status query: {err or os.strerror(-rc)}"
        if self.settings.pool not in {pool["name"] for pool in json.loads(out)["pools"]}:
            return f"pool {self.settings.pool!r} does not exist on {self.clusters.monitors}"
        return None

    def _df(self, secrets: Secrets) -> dict[str, int]:
        """Each pool's free space, read at most once every ``DF_FRESH`` seconds for one set
        of credentials: a placement needs a figure, not a round trip to the monitors per
        create (images are thin; a figure a moment old places as well)."""
        credentials = Credentials.from_secrets(secrets)
        now = time.monotonic()
        with self._df_lock:
            cached = self._df_read.get(credentials)
        if cached is not None and now - cached[0] < DF_FRESH:
            return cached[1]
        connection = self.clusters.connection(credentials)

        def df() -> dict[str, int]:
            rc, out, err = connection.mon_command(json.dumps({"prefix": "df", "format": "json"}), b"")
            if rc != 0:
                raise FailedPrecondition(f"Ceph refused 'df': {err}")
            return {p["name"]: int(p["stats"]["max_avail"]) for p in json.loads(out)["pools"]}

        free = ceph_call("the pool statistics", df)
        with self._df_lock:
            self._df_read[credentials] = (now, free)
        return free

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        """The pool's free space as Ceph computes it (after replication), the same from
        every segment (any node reaches the cluster). GetCapacity carries no secret:
        without credentialsDir it answers 0 rather than failing."""
        try:
            return self._df(secrets).get(self.settings.pool, 0)
        except FailedPrecondition:
            return 0

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return self.free_bytes(segment, secrets=secrets)

    # -- volumes --------------------------------------------------------------------

    def create_volume(self, spec: VolumeSpec) -> Volume:
        pool = spec.parameters.get(PARAM_POOL, self.settings.pool)
        features = parse_features(spec.parameters.get(PARAM_FEATURES, self.settings.image_features))
        data_pool = spec.parameters.get(PARAM_DATA_POOL, self.settings.data_pool) or None
        mapper = spec.parameters.get(PARAM_MAPPER, self.settings.mapper)
        if mapper not in MAPPERS:
            raise InvalidArgument(f"mapper {mapper!r} is not one of {', '.join(MAPPERS)}")
        source = _source_text(spec.source)
        # A backup names nothing of this backend: the volume is made blank, and filled later.
        blank = spec.source is None or spec.source.kind == "backup"
        # What the image's metadata will say besides its name (an empty value: no key).
        keys = {
            SOURCE_KEY: source,
            PARAM_MAPPER: mapper,
            PARAM_MAP_OPTIONS: spec.parameters.get(PARAM_MAP_OPTIONS, self.settings.map_options),
            FILLING_KEY: FILL_NEW if blank and spec.source is not None else "",
        }
        if pool != self.settings.pool:
            # Recorded before anything is made there, so listings find whatever follows.
            with self._pool(self.settings.pool, spec.secrets) as (io, _journal):
                remember_pool(io, pool)
        with self._pool(pool, spec.secrets) as (io, journal):
            reservation = journal.reserve("volume", spec.name)
            local_id, name = f"{pool}/{reservation.uuid}", image_name("volume", reservation.uuid)
            if not reservation.new:  # a retry: a call before it may have made it, or part of it
                existing = self._complete_volume(io, local_id)
                if existing is not None:
                    return self._matching(existing, spec, source)
            try:
                parent_size = self._source_size(spec.source, spec.secrets)
                size = choose_size(spec.required_bytes, spec.limit_bytes, parent_size)
                made = not reservation.new and self._made(io, name)
                if blank and reservation.new:
                    # A blank image nobody else has seen: made, then marked made and complete
                    # with all its keys at once, without opening it.
                    self._make(io, name, size, features, data_pool, None, spec.secrets)
                    _set_all_metadata(io, name, {MADE_KEY: name, **keys, NAME_KEY: spec.name})
                    return _volume(local_id, size, {**keys, NAME_KEY: spec.name})
                if not made:
                    if not reservation.new:
                        self._remove_image(io, name)  # what a killed call left half made, if anything
                    self._make(io, name, size, features, data_pool, spec.source, spec.secrets)
                with self._image(io, name, f"volume {spec.name!r}") as image:
                    # Read before the first write: each write makes librbd read the header again.
                    capacity, depth = int(image.size()), self._clone_depth(image, spec.secrets)
                    _forget_inherited(image, keys, also=(PARAM_MAP_OPTIONS,))
                    if not made:
                        image.metadata_set(MADE_KEY, name)
                    if capacity < size:
                        image.resize(size)
                        capacity = size
                    if depth > self.settings.max_clone_depth:
                        image.flatten()
                    for key, value in keys.items():
                        _set_metadata(image, key, value)
                    _set_metadata(image, NAME_KEY, spec.name)  # last: marks the volume complete
            except BaseException:
                # Nothing complete exists under this reservation: remove what this call,
                # or a crashed one before it, left, and the reservation with it. An image
                # that cannot go yet (a dead client still watches it) keeps its
                # reservation, so that the retry finds it and removes it then.
                with contextlib.suppress(Exception):
                    self._remove_image(io, name)
                    journal.release("volume", reservation.uuid)
                raise
        # What get_volume would read back, without reading it: the image is this call's.
        return _volume(local_id, capacity, {**keys, NAME_KEY: spec.name})

    def _made(self, io: Any, name: str) -> bool:
        """Whether ``name`` was made whole. librbd makes an image, and a clone above all,
        in several steps (a clone exists before it is attached to its parent; an image is
        listed before its header exists); a call killed between them leaves an image that
        must not be taken for the real one, or one that does not even open."""
        try:
            with rbd.Image(io, name, read_only=True) as image:
                return dict(image.metadata_list()).get(MADE_KEY) == name
        except rbd.ImageNotFound:
            return False

    def _gone(self, io: Any, name: str) -> bool:
        """Whether nothing of image ``name`` is left. One that does not open may still be
        listed (a call killed while librbd created it): it is removed here; when that
        fails, it is not gone."""
        if self._exists(io, name):
            return False
        try:
            self.rbd.remove(io, name)
        except rbd.ImageNotFound:
            return True
        except rbd.Error as exc:
            log.warning("cannot remove the remains of an image", extra={"image": name, "error": str(exc)})
            return False
        return True

    def _make(
        self,
        io: Any,
        name: str,
        size: int,
        features: int,
        data_pool: str | None,
        source: SourceRef | None,
        secrets: Secrets,
    ) -> None:
        """Make image ``name``, empty (no source, or a backup to fill it from later) or
        cloned from ``source``; the caller marks it made."""
        if source is None or source.kind == "backup":
            ceph_call(
                f"image {name}",
                lambda: self.rbd.create(io, name, size, old_format=False, features=features, data_pool=data_pool),
            )
            return
        kind: Kind = source.kind
        source_pool, source_uuid = split_id(source.local_id, kind)
        with self.clusters.ioctx(source_pool, Credentials.from_secrets(secrets)) as source_io:
            if kind == "snapshot":
                self._clone_snapshot(source_io, source.local_id, io, name, features, data_pool)
            else:
                self._clone_through_temporary_snapshot(
                    source_io, image_name("volume", source_uuid), io, name, features, data_pool
                )

    def _clone_snapshot(
        self, source_io: Any, snapshot_id: str, io: Any, name: str, features: int, data_pool: str | None
    ) -> None:
        """Clone snapshot ``snapshot_id`` through its image's RBD snapshot, which the first
        restore takes (the in-flight lock on the snapshot keeps restores and its deletion
        apart; a restore killed after taking it leaves it for the next one, and deleting
        the snapshot removes it)."""
        parent = image_name("snapshot", split_id(snapshot_id, "snapshot")[1])

        def clone() -> None:
            self.rbd.clone(source_io, parent, SNAPSHOT, io, name, features=features, data_pool=data_pool)

        try:
            clone()
            return
        except rbd.ImageNotFound:
            pass  # no RBD snapshot yet (or no image: opening it says so)
        except rbd.Error as exc:
            raise classify(exc, f"snapshot {snapshot_id}") from exc
        with self._image(source_io, parent, f"snapshot {snapshot_id}") as image:
            if SNAPSHOT not in {s["name"] for s in image.list_snaps()}:
                try:
                    image.create_snap(SNAPSHOT)
                except rbd.ImageExists:
                    pass
                except rbd.Error as exc:
                    raise classify(exc, f"snapshot {snapshot_id}") from exc
        ceph_call(f"snapshot {snapshot_id}", clone)

    def _clone_through_temporary_snapshot(
        self,
        source_io: Any,
        parent: str,
        io: Any,
        name: str,
        features: int,
        data_pool: str | None,
        check: Callable[[rbd.Image], None] | None = None,
        what: str = "",
        keep: bool = False,
    ) -> None:
        """Clone ``parent`` as it is now (``check``, if given, vets it first, open) through
        an RBD snapshot of it named for the clone. Unless the clone succeeds and ``keep``
        asks for it, the snapshot is removed at once; with clone v2 its data stays (in the
        snapshot trash) for as long as the clone needs it."""
        snap = _snapshot_for(name)
        with self._image(source_io, parent, what or f"source image {parent}") as source:
            if check is not None:
                check(source)
            if snap not in {s["name"] for s in source.list_snaps()}:
                ceph_call(f"source image {parent}", lambda: source.create_snap(snap))
            cloned = False
            try:
                ceph_call(
                    f"clone of {parent}",
                    lambda: self.rbd.clone(source_io, parent, snap, io, name, features=features, data_pool=data_pool),
                )
                cloned = True
            finally:
                if not (cloned and keep):
                    with contextlib.suppress(rbd.ImageNotFound):
                        source.remove_snap(snap)

    def _source_size(self, source: SourceRef | None, secrets: Secrets) -> int:
        """The size of the image a clone is made from; 0 for none (a backup's size is the
        request's). A volume still being filled from a backup is no source yet."""
        if source is None or source.kind == "backup":
            return 0
        kind: Kind = source.kind
        pool, source_uuid = split_id(source.local_id, kind)
        with self.clusters.ioctx(pool, Credentials.from_secrets(secrets)) as io:
            name = image_name(kind, source_uuid)
            try:
                with rbd.Image(io, name, read_only=True) as image:
                    metadata = dict(image.metadata_list())
                    if not _completed(io, kind, source_uuid, name, metadata):
                        raise NotFound(f"source {kind} {source.local_id!r} does not exist")
                    _not_filling(metadata, f"source {kind} {source.local_id!r}")
                    return int(image.size())
            except rbd.ImageNotFound:
                raise NotFound(f"source {kind} {source.local_id!r} does not exist") from None

    def _matching(self, volume: Volume, spec: VolumeSpec, source: str) -> Volume:
        if volume.name != spec.name or _source_text(volume.source) != source:
            raise AlreadyExists(f"volume {spec.name!r} exists with another content source")
        if volume.capacity_bytes < spec.required_bytes or (
            spec.limit_bytes and volume.capacity_bytes > spec.limit_bytes
        ):
            raise AlreadyExists(
                f"volume {spec.name!r} exists with {volume.capacity_bytes} bytes, outside the requested range"
            )
        return volume

    def _complete_volume(self, io: Any, local_id: str) -> Volume | None:
        _, image_uuid = split_id(local_id, "volume")
        try:
            name = image_name("volume", image_uuid)
            with rbd.Image(io, name, read_only=True) as image:
                metadata = dict(image.metadata_list())
                if not _completed(io, "volume", image_uuid, name, metadata):
                    return None
                return _volume(local_id, int(image.size()), metadata, _condition(io, image_uuid, metadata))
        except rbd.ImageNotFound:
            return None

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        pool, image_uuid = split_id(local_id, "volume")
        with self._pool(pool, secrets) as (io, journal):
            name = image_name("volume", image_uuid)
            metadata = _metadata_of(io, name)
            nodes = _published(metadata) if metadata is not None else {}
            if nodes:
                raise FailedPrecondition(f"volume {local_id} is still published to node(s) {', '.join(sorted(nodes))}")
            # A volume made blank (no source, or a backup's) clones nothing; one whose
            # metadata is unreadable may.
            source = _source_ref(metadata.get(SOURCE_KEY, "")) if metadata is not None else None
            blank = metadata is not None and (source is None or source.kind == "backup")
            self._remove_image(io, name, clone=not blank)
            journal.release("volume", image_uuid, name=metadata.get(NAME_KEY, "") if metadata is not None else "")

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        pool, _ = split_id(local_id, "volume")
        with self._pool(pool, secrets) as (io, _journal):
            volume = self._complete_volume(io, local_id)
        if volume is None:
            raise NotFound(f"volume {local_id!r} does not exist")
        return volume

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        with self._pool(self.settings.pool, secrets) as (io, journal):
            image_uuid = journal.lookup("volume", name)
            return self._complete_volume(io, f"{self.settings.pool}/{image_uuid}") if image_uuid else None

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        return self._list("volume", self._complete_volume, after, limit, secrets)

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        pool, image_uuid = split_id(local_id, "volume")
        with self._pool(pool, secrets) as (io, _journal):
            if self._complete_volume(io, local_id) is None:
                raise NotFound(f"volume {local_id!r} does not exist")
            with self._image(io, image_name("volume", image_uuid), f"volume {local_id}") as image:
                current = int(image.size())
                if required_bytes <= current:
                    return current
                size = choose_size(required_bytes, limit_bytes)
                ceph_call(f"volume {local_id}", lambda: image.resize(size))
                return size

    # -- snapshots ------------------------------------------------------------------

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        pool, source_uuid = split_id(source_local_id, "volume")
        source_name = image_name("volume", source_uuid)
        with self._pool(pool, secrets) as (io, journal):
            reservation = journal.reserve("snapshot", name, source=source_local_id)
            if reservation.record.get("source") != source_local_id:
                raise AlreadyExists(f"snapshot {name!r} exists for another source volume")
            local_id, image = f"{pool}/{reservation.uuid}", image_name("snapshot", reservation.uuid)
            if not reservation.new:  # a retry: a call before it may have made it, or part of it
                done = self._complete_snapshot(io, local_id)
                if done is not None:
                    return done

            def complete_source(source: rbd.Image) -> None:
                metadata = dict(source.metadata_list())
                if not _completed(io, "volume", source_uuid, source_name, metadata):
                    raise NotFound(f"source volume {source_local_id!r} does not exist")
                _not_filling(metadata, f"source volume {source_local_id!r}")

            keys = {SOURCE_KEY: source_local_id, CREATED_KEY: str(time.time())}
            try:
                made = not reservation.new and self._made(io, image)
                if made:
                    if self._complete_volume(io, source_local_id) is None:
                        raise NotFound(f"source volume {source_local_id!r} does not exist")
                else:
                    if not reservation.new:
                        self._remove_image(io, image)  # what a killed call left half made, if anything
                    features = parse_features(parameters.get(PARAM_FEATURES, self.settings.image_features))
                    what = f"source volume {source_local_id!r}"
                    # The RBD snapshot stays for as long as the snapshot image: librbd can tell
                    # what changed between two snapshots of an image only by their names, and
                    # it names no snapshot in its trash (see ``changed``).
                    self._clone_through_temporary_snapshot(
                        io, source_name, io, image, features, None, check=complete_source, what=what, keep=True
                    )
                with self._image(io, image, f"snapshot {name!r}") as snap_image:
                    size, depth = int(snap_image.size()), self._clone_depth(snap_image, secrets)
                    _forget_inherited(snap_image, keys)
                    if not made:
                        snap_image.metadata_set(MADE_KEY, image)
                    if depth > self.settings.max_clone_depth:
                        snap_image.flatten()
                        # A full copy now: the volume need not keep that data for it (when
                        # this fails, deleting the snapshot tries again).
                        try:
                            _drop_snapshot(io, source_name, _snapshot_for(image))
                        except CairnError as exc:
                            log.warning("cannot drop an RBD snapshot", extra={"image": source_name, "error": str(exc)})
                    for key, value in keys.items():
                        _set_metadata(snap_image, key, value)
                    _set_metadata(snap_image, NAME_KEY, name)  # last: marks the snapshot complete
            except BaseException:
                with contextlib.suppress(Exception):
                    self._remove_image(io, image)
                    _drop_snapshot(io, source_name, _snapshot_for(image))
                    journal.release("snapshot", reservation.uuid)
                raise
        # What get_snapshot would read back, without reading it: the image is this call's.
        return Snapshot(
            local_id=local_id,
            name=name,
            source_volume_local_id=source_local_id,
            size_bytes=size,
            created_at=float(keys[CREATED_KEY]),
        )

    def _complete_snapshot(self, io: Any, local_id: str) -> Snapshot | None:
        _, image_uuid = split_id(local_id, "snapshot")
        try:
            name = image_name("snapshot", image_uuid)
            with rbd.Image(io, name, read_only=True) as image:
                metadata = dict(image.metadata_list())
                if not _completed(io, "snapshot", image_uuid, name, metadata):
                    return None
                return Snapshot(
                    local_id=local_id,
                    name=metadata[NAME_KEY],
                    source_volume_local_id=metadata[SOURCE_KEY],
                    size_bytes=int(image.size()),
                    created_at=float(metadata.get(CREATED_KEY, "0")),
                )
        except rbd.ImageNotFound:
            return None

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        """Drop the volume's RBD snapshot kept for the snapshot image, then the image. In
        this order a retry after a crash still finds the volume through the image; the RBD
        snapshot, which the image may still read, waits in the snapshot trash, and librbd
        removes it with its last clone."""
        pool, image_uuid = split_id(local_id, "snapshot")
        with self._pool(pool, secrets) as (io, journal):
            name = image_name("snapshot", image_uuid)
            kept = self._kept_for(io, name)
            if kept is not None:
                volume_pool, volume_name, volume_id = kept
                with self.clusters.ioctx(volume_pool, Credentials.from_secrets(secrets)) as volume_io:
                    _drop_snapshot(volume_io, volume_name, _snapshot_for(name), image_id=volume_id)
            self._remove_image(io, name)
            journal.release("snapshot", image_uuid)

    def _kept_for(self, io: Any, name: str) -> tuple[str, str | None, str] | None:
        """The pool, and the image name or ID, of the volume that may keep an RBD snapshot
        for snapshot image ``name``: the parent it reads through (by ID: it may be in the
        trash), or the volume its metadata names when it reads through none (flattened);
        None when there is no such image, or it reads through a snapshot in the trash
        (made by an earlier version: nothing is kept for it)."""
        try:
            with rbd.Image(io, name, read_only=True) as image:
                parent = _kept_parent_of(image, name)
                if parent is not None:
                    return parent[0], None, parent[1]
                if _parent(image) is not None:
                    return None
                source = dict(image.metadata_list()).get(SOURCE_KEY, "")
        except rbd.ImageNotFound:
            return None
        except rbd.Error as exc:
            raise classify(exc, f"snapshot image {name}") from exc
        try:
            volume_pool, volume_uuid = split_id(source, "volume")
        except NotFound:
            return None  # not a volume's ID: what a clone inherited, before it got its own
        return volume_pool, image_name("volume", volume_uuid), ""

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        pool, _ = split_id(local_id, "snapshot")
        with self._pool(pool, secrets) as (io, _journal):
            snapshot = self._complete_snapshot(io, local_id)
        if snapshot is None:
            raise NotFound(f"snapshot {local_id!r} does not exist")
        return snapshot

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        return self._list("snapshot", self._complete_snapshot, after, limit, secrets)

    def _list(
        self, kind: Kind, complete: Callable[[Any, str], T | None], after: str, limit: int, secrets: Secrets
    ) -> list[T]:
        """The complete objects of ``kind`` after local ID ``after``, at most ``limit``
        (0: all), in local-ID order, from the backend's pool and every pool a StorageClass
        put volumes in (local IDs are ``<pool>/<uuid>``, so pools are read in that order).
        Each pool's journal is read in UUID order from the cursor, and only the images of
        the page are opened. A recorded pool that was deleted since holds nothing."""
        with self._pool(self.settings.pool, secrets) as (io, _journal):
            pools = sorted({self.settings.pool, *remembered_pools(io)}, key=lambda pool: pool + "/")
        found: list[T] = []
        for pool in pools:
            start = f"{pool}/"
            if after >= start and not after.startswith(start):
                continue  # every ID of this pool sorts before the cursor
            cursor = after.removeprefix(start) if after.startswith(start) else ""
            try:
                with self._pool(pool, secrets) as (io, journal):
                    # A few more keys than the page needs: reservations of unfinished work are skipped.
                    for image_uuid in journal.reserved(kind, cursor, min(limit + 16, OMAP_PAGE) if limit else 0):
                        item = complete(io, f"{pool}/{image_uuid}")
                        if item is not None:
                            found.append(item)
                            if limit and len(found) == limit:
                                return found
            except NotFound:
                log.warning("pool %s, recorded as holding volumes, no longer exists; forgetting it", pool)
                with self._pool(self.settings.pool, secrets) as (io, _journal):
                    forget_pool(io, pool)
        return found

    # -- snapshot blocks (backups, changed-block tracking) --------------------------

    def _open_snapshot(self, io: Any, local_id: str) -> tuple[rbd.Image, dict[str, str]]:
        """Snapshot ``local_id``'s image, open read-only (the caller closes it), and its
        metadata; NotFound when there is none or it is not complete, as for get_snapshot."""
        _, image_uuid = split_id(local_id, "snapshot")
        name, what = image_name("snapshot", image_uuid), f"snapshot {local_id!r}"
        image = ceph_call(what, lambda: rbd.Image(io, name, read_only=True))
        try:
            metadata = dict(ceph_call(what, image.metadata_list))
            if not _completed(io, "snapshot", image_uuid, name, metadata):
                raise NotFound(f"{what} does not exist")
        except BaseException:
            image.close()
            raise
        return image, metadata

    def allocated(self, local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS) -> Iterator[Extent]:
        """The ranges of the snapshot image that may hold data, its parents' included, from
        ``start`` on: librbd's diff of the image since its creation. Found by the call."""
        check_start(start)
        pool, _ = split_id(local_id, "snapshot")
        with self._pool(pool, secrets) as (io, _journal):
            image, _metadata = self._open_snapshot(io, local_id)
            with image:
                found = blocks.diff(image, start, int(image.size()), None, zeros=False, what=f"snapshot {local_id!r}")
        return iter(found)

    def changed(
        self, base_local_id: str, target_local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS
    ) -> Iterator[Extent]:
        """The ranges, from ``start`` on, where snapshot ``target_local_id`` may differ
        from ``base_local_id`` of the same volume.

        The cheap route is librbd's own diff between the volume's two RBD snapshots the
        snapshot images are clones of (``cairn-for-<image>``, kept for this): it reads no
        data, the object maps (fast-diff) name the objects that changed, and a listing of
        each one's snapshots the exact ranges. It serves when both images are unflattened
        clones of snapshots of one volume image that still carry their names. A snapshot
        image reads exactly its parent snapshot (it is never written), so their diff is
        theirs. librbd names no snapshot in its trash (python-rbd of Ceph 16 takes the
        base of a diff by name, in the user namespace only), which is why the snapshots
        are kept rather than left to the trash; and the clones' own data says nothing,
        as they hold none until flattened.

        Otherwise (an image flattened past ``maxCloneDepth``, snapshots made by earlier
        versions, whose RBD snapshots are in the trash, or of a volume since deleted,
        whose snapshots went to the trash with it) both images are read where either may
        hold data, and compared in aligned blocks: a hole and zeros are equal, and past
        the base's end (the volume grew) whatever the target holds is changed. The
        checks are made by the call; the comparison runs as the caller iterates."""
        check_start(start)
        pools = {split_id(base_local_id, "snapshot")[0], split_id(target_local_id, "snapshot")[0]}
        with contextlib.ExitStack() as stack:
            ios = {pool: stack.enter_context(self._pool(pool, secrets))[0] for pool in sorted(pools)}
            opened = []
            for local_id in (base_local_id, target_local_id):
                image, metadata = self._open_snapshot(ios[split_id(local_id, "snapshot")[0]], local_id)
                stack.enter_context(image)
                opened.append((image, metadata.get(SOURCE_KEY, "")))
            (base, base_source), (target, target_source) = opened
            if base_source != target_source:
                raise InvalidArgument(
                    f"snapshots {base_local_id} (of volume {base_source}) and {target_local_id} "
                    f"(of volume {target_source}) are not snapshots of one volume"
                )
            if base_local_id == target_local_id:
                return iter(())
            base_size, target_size = int(base.size()), int(target.size())
            found = self._changed_in_volume(base, target, start, target_size, secrets)
            if found is not None:
                return iter(found)
            common = min(base_size, target_size)
            in_base = blocks.diff(base, start, common, None, zeros=False, what=f"snapshot {base_local_id!r}")
            in_target = blocks.diff(target, start, target_size, None, zeros=False, what=f"snapshot {target_local_id!r}")
        held = sorted((e.offset, e.end) for e in [*in_base, *in_target] if e.offset < common)
        ranges = list(aligned(held, start, common))
        grown = [(max(e.offset, common), e.end) for e in in_target if e.end > common]
        return self._compared(base_local_id, target_local_id, ranges, grown, start, secrets)

    def _changed_in_volume(
        self, base: rbd.Image, target: rbd.Image, start: int, target_size: int, secrets: Secrets
    ) -> list[Extent] | None:
        """What changed between two snapshot images, from the RBD snapshots of their
        volume they are clones of (see ``changed``); None when they are not both such."""
        base_name, target_name = base.get_name(), target.get_name()
        parent = _kept_parent_of(base, base_name)
        if parent is None or parent != _kept_parent_of(target, target_name):
            return None
        pool, image_id = parent
        snaps = (_snapshot_for(base_name), _snapshot_for(target_name))
        what = f"the RBD snapshots {', '.join(snaps)}"
        with self.clusters.ioctx(pool, Credentials.from_secrets(secrets)) as io:
            try:
                volume = rbd.Image(io, image_id=image_id, read_only=True)
            except rbd.ImageNotFound:
                return None
            except rbd.Error as exc:
                raise classify(exc, what) from exc
            with volume:
                ids = {
                    s["name"]: int(s["id"])
                    for s in ceph_call(what, lambda: list(volume.list_snaps()))
                    if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER
                }
                if not set(snaps) <= set(ids):
                    return None
                # librbd diffs from an earlier snapshot; which bytes differ does not depend
                # on the order, and only those within the target's size are asked for.
                earlier, later = sorted(snaps, key=ids.__getitem__)
                ceph_call(what, lambda: volume.set_snap(later))
                return blocks.diff(volume, start, target_size, earlier, zeros=True, what=what)

    def _compared(
        self,
        base_local_id: str,
        target_local_id: str,
        ranges: list[Range],
        grown: list[Range],
        start: int,
        secrets: Secrets,
    ) -> Iterator[Extent]:
        """The blocks of ``ranges`` where the two snapshots' bytes differ, cut at ``start``
        and the target's end, then ``grown`` (what the target holds past the base's end),
        merged where they touch."""
        pools = {split_id(base_local_id, "snapshot")[0], split_id(target_local_id, "snapshot")[0]}
        with contextlib.ExitStack() as stack:
            ios = {pool: stack.enter_context(self._pool(pool, secrets))[0] for pool in sorted(pools)}
            readers = []
            for local_id in (base_local_id, target_local_id):
                image, _metadata = self._open_snapshot(ios[split_id(local_id, "snapshot")[0]], local_id)
                stack.enter_context(image)
                readers.append(blocks.ImageReader(image, int(image.size()), f"snapshot {local_id!r}"))
            base, target = readers
            yield from changed_blocks(ranges, base.read, target.read, grown, start, target.size)

    @contextlib.contextmanager
    def read_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[BlockReader]:
        """The snapshot image open read-only, once for the whole block."""
        pool, _ = split_id(local_id, "snapshot")
        with self._pool(pool, secrets) as (io, _journal):
            image, _metadata = self._open_snapshot(io, local_id)
            with image:
                yield blocks.ImageReader(image, int(image.size()), f"snapshot {local_id!r}")

    @contextlib.contextmanager
    def fill_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[BlockWriter]:
        """A volume made from a backup and not filled yet, open for writing its content.
        The first fill finds it blank; a later one zeroes what a failed one wrote, so that
        what it does not write reads as zeros. A clean exit flushes the image, then clears
        ``cairn.filling``; an error leaves it, for a retry."""
        pool, image_uuid = split_id(local_id, "volume")
        name, what = image_name("volume", image_uuid), f"volume {local_id!r}"
        with self._pool(pool, secrets) as (io, _journal), self._image(io, name, what) as image:
            metadata = dict(ceph_call(what, image.metadata_list))
            if not _completed(io, "volume", image_uuid, name, metadata):
                raise NotFound(f"{what} does not exist")
            state = metadata.get(FILLING_KEY, "")
            if not state:
                raise FailedPrecondition(
                    f"volume {local_id} is not waiting for content from a backup: it is filled already, "
                    "or was not made from one"
                )
            size = int(image.size())
            if state == FILL_NEW:
                ceph_call(what, lambda: image.metadata_set(FILLING_KEY, FILL_BEGUN))
            else:
                ceph_call(what, lambda: image.write_zeroes(0, size))
            yield blocks.ImageWriter(image, size, what)
            ceph_call(what, image.flush)
            ceph_call(what, lambda: image.metadata_remove(FILLING_KEY))

    # -- publication ----------------------------------------------------------------

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        pool, image_uuid = split_id(local_id, "volume")
        credentials = Credentials.from_secrets(secrets)
        with self._pool(pool, secrets) as (io, _journal):
            volume = self._complete_volume(io, local_id)
            if volume is None:
                raise NotFound(f"volume {local_id!r} does not exist")
            name = image_name("volume", image_uuid)
            with self._image(io, name, f"volume {local_id}") as image:
                metadata = dict(image.metadata_list())
                published = _published(metadata)
                mode = "ro" if readonly else "rw"
                check_publication(local_id, {n: m == "ro" for n, m in published.items()}, node_id, capability, readonly)
                if node_id not in published:
                    _set_metadata(image, PUBLISHED_PREFIX + node_id, mode)
        context = {
            "monitors": ",".join(self.settings.monitors),
            "pool": pool,
            "image": name,
            "mapper": metadata.get(PARAM_MAPPER, self.settings.mapper),
        }
        map_options = metadata.get(PARAM_MAP_OPTIONS, self.settings.map_options)
        if map_options:
            context["mapOptions"] = map_options
        if credentials is not None:
            context["user"] = credentials.user
        return context

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        pool, image_uuid = split_id(local_id, "volume")
        with (
            self._pool(pool, secrets) as (io, _journal),
            contextlib.suppress(rbd.ImageNotFound, KeyError),
            rbd.Image(io, image_name("volume", image_uuid)) as image,
        ):
            image.metadata_remove(PUBLISHED_PREFIX + node_id)


def _completed(io: Any, kind: Kind, image_uuid: str, name: str, metadata: Mapping[str, str]) -> bool:
    """Whether the image's metadata marks it complete: the name key is written last. A
    clone starts with a copy of its parent's metadata, so the mark that it was made names
    the image itself (``cairn.made``, or ``cairn.image`` on images of earlier versions);
    an image made before either key existed is complete when its name key is the one its
    reservation holds."""
    if NAME_KEY not in metadata:
        return False
    own = metadata.get(MADE_KEY, metadata.get(IMAGE_KEY))
    if own is not None:
        return own == name
    record = Journal(io).record(kind, image_uuid)
    return record is not None and record.get("name") == metadata[NAME_KEY]


def _forget_inherited(image: rbd.Image, keys: Mapping[str, str], also: Collection[str] = ()) -> None:
    """Remove the cairn keys, and those in ``also``, that the incomplete ``image`` holds and
    ``keys`` will not give values of their own: a clone starts with a copy of its parent's
    metadata (its name, its publications, the marks that name the parent), and an image a
    killed call made may hold what that call asked for. Before the image is marked made,
    so that nothing of its parent's passes for its own; then the metadata says exactly
    what the call answers."""
    for key, _value in list(image.metadata_list()):
        if (key.startswith("cairn.") or key in also) and key != MADE_KEY and not keys.get(key):
            image.metadata_remove(key)


def _drop_own_snapshots(io: Any, name: str) -> bool:
    """Remove the RBD snapshots Cairn took of image ``name``, and whether there were any: a
    snapshot image's ``cairn`` (restored volumes keep reading through the snapshot trash),
    a volume's snapshots kept for its snapshot images, and the temporary ones a crashed
    clone of it left (with clone v2 a clone keeps their data by itself: they wait in the
    snapshot trash). An image with snapshots can be neither removed nor purged from the
    trash."""
    try:
        image = rbd.Image(io, name)
    except rbd.ImageNotFound:
        return False
    except rbd.Error as exc:
        raise classify(exc, f"image {name}") from exc
    dropped = False
    with image:
        for snap in list(image.list_snaps()):
            if snap["name"] == SNAPSHOT and name.startswith(image_name("snapshot", "")):
                ceph_call(f"snapshot image {name}", lambda: image.remove_snap(SNAPSHOT))
                dropped = True
            elif snap["name"].startswith("cairn-for-"):
                with contextlib.suppress(rbd.Error):
                    image.remove_snap(snap["name"])
                    dropped = True
    return dropped


def _snapshot_for(name: str) -> str:
    """The RBD snapshot of a source image that clone ``name`` is made through."""
    return f"cairn-for-{name}"


def _kept_parent_of(image: rbd.Image, name: str) -> tuple[str, str] | None:
    """The pool and image ID of the image whose RBD snapshot ``_snapshot_for(name)``,
    kept, the open snapshot image ``name`` is a clone of; None when it reads through no
    such snapshot (flattened, or its snapshot in the trash, whose name librbd replaces)."""
    parent = _parent(image)
    if parent is None or image.get_parent_image_spec()["snap_name"] != _snapshot_for(name):
        return None
    return parent


def _drop_snapshot(io: Any, name: str | None, snap: str, *, image_id: str = "") -> None:
    """Remove RBD snapshot ``snap`` of image ``name`` (or of the image ``image_id``, which
    may be in the trash) when it is there; with clones still reading it, librbd moves it
    to the snapshot trash and removes it with the last one."""
    try:
        with rbd.Image(io, name, image_id=image_id or None) as image:
            image.remove_snap(snap)
    except rbd.ImageNotFound:
        return
    except rbd.Error as exc:
        raise classify(exc, f"RBD snapshot {snap}") from exc


def _set_all_metadata(io: Any, name: str, values: Mapping[str, str]) -> None:
    """Set several metadata keys of image ``name`` in one atomic write: the OSD class
    method librbd's ``Image.metadata_set`` calls with one key (``metadata_set`` of class
    ``rbd`` on the image's header object, taking an encoded map of keys to values), here
    with them all. Only for an image no client has open (one just made): librbd would
    otherwise tell its watchers to read the header again. Empty values are left out, as
    ``_set_metadata`` does."""

    def encoded(text: str) -> bytes:
        data = text.encode()
        return struct.pack("<I", len(data)) + data

    def write() -> None:
        raw = io.read(f"rbd_id.{name}")  # the image's ID, encoded as a string
        (length,) = struct.unpack_from("<I", raw)
        image_id = raw[4 : 4 + length].decode()
        kept = {key: value for key, value in values.items() if value}
        data = struct.pack("<I", len(kept)) + b"".join(encoded(k) + encoded(v) for k, v in kept.items())
        io.execute(f"rbd_header.{image_id}", "rbd", "metadata_set", data)

    ceph_call(f"image {name}", write)


METADATA_READ = 1024
"""Metadata keys read in one call (the class method pages through the header itself)."""
METADATA_BYTES = 1 << 20
"""Room for the answer: far more than Cairn's few keys (a publication is one short key)."""


def _metadata_of(io: Any, name: str) -> dict[str, str] | None:
    """Image ``name``'s metadata, without opening the image (an open reads the header,
    the object map and more, and registers a watch): the image's ID, then the class
    method librbd's ``Image.metadata_list`` calls (``metadata_list`` of class ``rbd`` on
    the header; in: the key to start after and how many to return; out: an encoded map
    of names to values). None when there is no such image."""

    def text(raw: bytes, at: int) -> tuple[bytes, int]:
        (length,) = struct.unpack_from("<I", raw, at)
        return raw[at + 4 : at + 4 + length], at + 4 + length

    def read() -> dict[str, str] | None:
        try:
            raw = io.read(f"rbd_id.{name}")
        except rados.ObjectNotFound:
            return None
        image_id = text(raw, 0)[0].decode()
        found: dict[str, str] = {}
        after = b""
        while True:
            request = struct.pack("<I", len(after)) + after + struct.pack("<Q", METADATA_READ)
            try:
                _, answer = io.execute(f"rbd_header.{image_id}", "rbd", "metadata_list", request, METADATA_BYTES)
            except rados.ObjectNotFound:
                return None  # removed meanwhile
            except rados.Error as exc:
                if getattr(exc, "errno", None) != errno.ERANGE:
                    raise
                # Values too long for the room given (a request name of megabytes): librbd
                # reads them whole.
                try:
                    with rbd.Image(io, name, read_only=True) as image:
                        return dict(image.metadata_list())
                except rbd.ImageNotFound:
                    return None
            (count,) = struct.unpack_from("<I", answer, 0)
            at = 4
            for _ in range(count):
                key, at = text(answer, at)
                value, at = text(answer, at)
                found[key.decode()] = value.decode()
                after = key
            if count < METADATA_READ:
                return found

    return ceph_call(f"image {name}", read)


def _set_metadata(image: rbd.Image, key: str, value: str) -> None:
    """Image metadata is written only with a value: python-rbd's metadata_list drops empty
    values and pairs the remaining ones with the wrong keys. An absent key reads as empty."""
    if value:
        image.metadata_set(key, value)


def _parent(image: rbd.Image) -> tuple[str, str] | None:
    """The pool and image ID of the image's parent, or None."""
    try:
        return str(image.get_parent_image_spec()["pool_name"]), str(image.parent_id())
    except rbd.ImageNotFound:
        return None


def _published(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k.removeprefix(PUBLISHED_PREFIX): v for k, v in metadata.items() if k.startswith(PUBLISHED_PREFIX)}


def _source_text(source: SourceRef | None) -> str:
    return f"{source.kind}:{source.local_id}" if source else ""


def _condition(io: Any, image_uuid: str, metadata: Mapping[str, str]) -> VolumeCondition:
    """What is wrong with a complete volume as the controller sees it: its name's
    reservation in the journal is missing or names another image (a retried CreateVolume
    of that name would not find it, and would make a second volume)."""
    reserved = Journal(io).lookup("volume", metadata[NAME_KEY])
    if reserved != image_uuid:
        holder = f"names image {reserved}" if reserved else "is missing"
        return VolumeCondition(True, f"the journal's reservation of name {metadata[NAME_KEY]!r} {holder}")
    return HEALTHY


def _source_ref(text: str) -> SourceRef | None:
    """The content source ``_source_text`` wrote (a backup's ID may hold colons)."""
    kind, _, local_id = text.partition(":")
    if kind == "snapshot":
        return SourceRef("snapshot", local_id)
    if kind == "volume":
        return SourceRef("volume", local_id)
    if kind == "backup":
        return SourceRef("backup", local_id)
    return None


def _not_filling(metadata: Mapping[str, str], what: str) -> None:
    """Refuse to copy a volume whose content a restore from a backup has not all written:
    a snapshot or clone of it would keep a part of the backup, and never the rest."""
    if metadata.get(FILLING_KEY):
        raise FailedPrecondition(f"{what} is still being restored from a backup")


def _volume(local_id: str, size: int, metadata: Mapping[str, str], condition: VolumeCondition = HEALTHY) -> Volume:
    return Volume(
        local_id=local_id,
        name=metadata[NAME_KEY],
        capacity_bytes=size,
        source=_source_ref(metadata.get(SOURCE_KEY, "")),
        context={PARAM_MAPPER: metadata.get(PARAM_MAPPER, "")} if metadata.get(PARAM_MAPPER) else {},
        published_nodes=tuple(sorted(_published(metadata))),
        condition=condition,
        filling=bool(metadata.get(FILLING_KEY)),
    )
