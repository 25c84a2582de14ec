"""Controller half of the lvm backend: volumes and snapshots are logical volumes of one
volume group on one node, and LVM's own metadata is the only record.

Every object is one LV whose name derives from the request name (``cairn-vol-<uuid>``,
``cairn-snap-<uuid>``, the UUID a digest of the name), carrying in its tags everything a
later call needs: the backend that made it, the request name, the content source, when
it was made, and the nodes it is published to. ``lvcreate`` sets the tags in the same
metadata update that makes the LV, so a create cut short by a crash leaves either
nothing or a complete object, and the retry, computing the same LV name, finds it.

Thick volumes (no ``thinPool``) take extents from the volume group; LVM zeroes only the
head of a new LV, and the controller never activates one, so a new thick volume is tagged
``unwiped`` and the node wipes old filesystem signatures off it at its first attach (the
rest of its extents may still hold a previous volume's data: raw block readers of a thick
volume can see it, as with plain LVM). Thin volumes read as zeros where never written.
Snapshots, restores and clones are thin snapshots, so they need a thin pool; a thick
backend declares neither.

With a thin pool, where the controller runs beside the volume group, the backend also
offers block access (``SnapshotBlocks``, for backups and changed-block tracking): the
pool's metadata says what a snapshot maps and what two snapshots do not share
(``blocks``), and a snapshot is read, or a volume restored from a backup written,
through its device, active for that time only. A volume made from a backup is a blank
thin volume tagged ``filling`` until its content is all written.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence

from csi import ids
from csi.backends.base import check_publication, matching, page_of
from csi.backends.lvm import blocks, failures
from csi.backends.lvm.lvm import LogicalVolume, Lvm, mapper_path, round_up
from csi.errors import (
    AlreadyExists,
    CairnError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from csi.extents import Range, check_start, to_extents
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

TAG = "cairn.csi.io/"
BACKEND_TAG = TAG + "backend="
NAME_TAG = TAG + "name="
SOURCE_TAG = TAG + "source="
CREATED_TAG = TAG + "created="
PUBLISHED_TAG = TAG + "published="
SIZE_TAG = TAG + "size="
UNWIPED_TAG = TAG + "unwiped"
FILLING_TAG = TAG + "filling"
"""On a volume made from a backup until its content is all written."""
FILL_STARTED_TAG = TAG + "fill-started"
"""On a filling volume once a fill began: the next fill starts from a blank volume."""

PARAM_STRIPES = "stripes"
"""StorageClass parameter: physical volumes a thick volume is striped over (default 1)."""
PARAM_MIRRORS = "mirrors"
"""StorageClass parameter: extra copies of a thick volume (raid1; raid10 with stripes)."""
_LIMITS = {PARAM_STRIPES: (1, 128), PARAM_MIRRORS: (0, 4)}

_PREFIX = {"volume": "vol", "snapshot": "snap"}
_NAMESPACE = {kind: uuid.uuid5(uuid.NAMESPACE_URL, f"https://cairn.csi.io/lvm/{kind}") for kind in _PREFIX}
_REST = {
    kind: re.compile(rf"^{prefix}-[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$")
    for kind, prefix in _PREFIX.items()
}


def encode(text: str) -> str:
    """``text`` in LVM's tag alphabet (URL-safe base64)."""
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def rest_of(backend: str, kind: str, name: str) -> str:
    """The node-free part of the local ID of request ``name`` (``vol-<uuid>``): the same
    on every node. The backend is part of the digest, so two backends on one volume
    group never compute the same LV for one request name."""
    return f"{_PREFIX[kind]}-{uuid.uuid5(_NAMESPACE[kind], f'{backend}/{name}')}"


def lv_name(rest: str) -> str:
    """The LV of a local ID's node-free part (``vol-<uuid>``)."""
    return f"cairn-{rest}"


def tag_value(tags: frozenset[str], prefix: str) -> str | None:
    found = [t[len(prefix) :] for t in tags if t.startswith(prefix)]
    return found[0] if found else None


class LvmVolumes:
    volume_parameters: frozenset[str] = frozenset({PARAM_STRIPES, PARAM_MIRRORS})
    snapshot_parameters: frozenset[str] = frozenset()

    def __init__(self, backend: str, lvm: Lvm, volume_group: str, thin_pool: str, node_id: str) -> None:
        self.backend = backend
        self.lvm = lvm
        self.vg = volume_group
        self.thin_pool = thin_pool
        self.node_id = node_id
        self._extent_size = 0
        self.topology: tuple[Segment, ...] = ({TOPOLOGY_NODE_KEY: node_id},)
        self._activation = threading.Lock()
        self._readers: dict[str, int] = {}  # LV -> users of its activation by this process

    # -- IDs ------------------------------------------------------------------------

    def local_id(self, kind: str, name: str) -> str:
        return ids.with_node(self.backend, self.node_id, rest_of(self.backend, kind, name))

    def _lv(self, kind: str, local_id: str) -> str:
        """The LV name of a local ID of this backend; NotFound for any other string."""
        _, rest = ids.split_node(local_id)
        if not _REST[kind].match(rest) or ids.with_node(self.backend, self.node_id, rest) != local_id:
            raise NotFound(f"{kind} {local_id!r} does not exist in volume group {self.vg} on node {self.node_id!r}")
        return lv_name(rest)

    def _find(self, kind: str, local_id: str) -> LogicalVolume | None:
        """The LV of ``local_id`` when it is one of this backend's; None when there is none."""
        name = self._lv(kind, local_id)
        with self._group_present():
            found = self.lvm.volume(self.vg, name)
        if found is None or BACKEND_TAG + encode(self.backend) not in found.tags:
            return None
        return found

    @contextlib.contextmanager
    def _group_present(self) -> Iterator[None]:
        """A volume group LVM cannot find is UNAVAILABLE, not "no such volume": the disks
        that hold it may be back later, and a delete answered OK now would leave their LV
        behind for good."""
        try:
            yield
        except failures.VolumeGroupNotFound as exc:
            raise Unavailable(f"volume group {self.vg} is not found on node {self.node_id!r}: {exc}") from exc

    def _extent(self) -> int:
        """The volume group's extent size, read once: LVM changes it only on request
        (``vgchange -s``), and every create and expand needs it."""
        if not self._extent_size:
            with self._group_present():
                self._extent_size = self.lvm.volume_group(self.vg).extent_size
        return self._extent_size

    def _maybe(self, kind: str, local_id: str) -> LogicalVolume | None:
        """The LV of ``local_id``; None also for an ID this backend never made (deletes
        of those succeed, as the spec asks)."""
        try:
            return self._find(kind, local_id)
        except NotFound:
            return None

    def _require(self, kind: str, local_id: str) -> LogicalVolume:
        found = self._find(kind, local_id)
        if found is None:
            raise NotFound(f"{kind} {local_id!r} does not exist in volume group {self.vg}")
        return found

    # -- capacity -------------------------------------------------------------------

    def settle(self) -> None:
        """Nothing to settle: LVM's metadata is written when its call answers."""

    def health(self) -> str | None:
        try:
            self.lvm.volume_group(self.vg)
            if self.thin_pool and self.lvm.volume(self.vg, self.thin_pool) is None:
                return f"thin pool {self.vg}/{self.thin_pool} does not exist"
        except Exception as exc:  # any failure to read LVM is the answer
            return f"volume group {self.vg}: {exc}"
        return None

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        if not reaches(self.topology, segment):
            return 0
        try:
            group = self.lvm.volume_group(self.vg)
        except failures.VolumeGroupNotFound:
            return 0  # no room where there is no volume group; health() says why
        if not self.thin_pool:
            return group.free
        # A thin pool is offered once: what its volumes (snapshots aside, which share
        # their origin's blocks) have been promised is no longer free.
        pool = self.lvm.volume(self.vg, self.thin_pool)
        if pool is None:
            return 0
        promised = sum(
            lv.size
            for lv in self.lvm.volumes(self.vg)
            if lv.pool == self.thin_pool and not lv.name.startswith("cairn-snap-")
        )
        return max(0, pool.size - promised)

    def max_volume_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        return self.free_bytes(segment, secrets=secrets)

    # -- volumes --------------------------------------------------------------------

    def create_volume(self, spec: VolumeSpec) -> Volume:
        local_id = self.local_id("volume", spec.name)
        name = self._lv("volume", local_id)
        extent = self._extent()
        with self._group_present():
            return self._create(spec, local_id, name, extent)

    def _create(self, spec: VolumeSpec, local_id: str, name: str, extent: int) -> Volume:
        existing = self.lvm.volume(self.vg, name)
        if existing is None:
            stripes, mirrors = self._layout(spec)
            restore = spec.source is not None and spec.source.kind == "backup"
            if restore and not self.thin_pool:
                raise InvalidArgument(f"backend {self.backend!r} has no thin pool: it cannot restore a backup")
            source = None if restore else self._source(spec.source)
            size = round_up(choose_size(spec.required_bytes, spec.limit_bytes, source.size if source else 0), extent)
            if spec.limit_bytes and size > spec.limit_bytes:
                raise OutOfRange(
                    f"volume {spec.name!r}: LVM allocates whole extents of {extent} bytes, and none fits the "
                    f"range {spec.required_bytes}..{spec.limit_bytes}"
                )
            tags = [
                BACKEND_TAG + encode(self.backend),
                NAME_TAG + encode(spec.name),
                CREATED_TAG + str(int(time.time())),
            ]
            if source is not None and spec.source is not None:
                # A thin snapshot has its source's size; the size asked for is noted, so
                # the growth that follows is finished by a retry if a crash cuts it short.
                tags += [SOURCE_TAG + f"{spec.source.kind}:{encode(spec.source.local_id)}", SIZE_TAG + str(size)]
                self.lvm.snapshot(self.vg, source.name, name, tags, activate=False)
            else:
                if restore and spec.source is not None:
                    # Blank, and marked filling in the command that makes it.
                    tags += [SOURCE_TAG + f"backup:{encode(spec.source.local_id)}", FILLING_TAG]
                if not self.thin_pool:
                    tags.append(UNWIPED_TAG)
                self.lvm.create(
                    self.vg, name, size, tags, thin_pool=self.thin_pool, stripes=stripes, mirrors=mirrors,
                    activate=False,
                )  # fmt: skip
            existing = self.lvm.volume(self.vg, name)
            if existing is None:
                raise NotFound(f"volume {spec.name!r}: LV {self.vg}/{name} vanished right after it was made")
        volume = self._volume(local_id, existing)
        if volume.name != spec.name or BACKEND_TAG + encode(self.backend) not in existing.tags:
            raise AlreadyExists(f"LV {self.vg}/{name} exists and does not belong to volume {spec.name!r}")
        target = tag_value(existing.tags, SIZE_TAG) or ""
        if volume.source == spec.source and target.isdigit() and volume.capacity_bytes < int(target):
            # The growth a crash cut short, finished by the retry of the same request (a
            # request for another source is refused below, its volume left as it is).
            self.lvm.extend(self.vg, name, int(target))
            volume = self.get_volume(local_id)
        return matching(volume, spec)

    def _layout(self, spec: VolumeSpec) -> tuple[int, int]:
        """Stripes and mirrors the StorageClass asks for; INVALID_ARGUMENT where this
        backend cannot lay a volume out that way."""
        found = {}
        for key, (low, high) in _LIMITS.items():
            text = spec.parameters.get(key, str(low))
            if not text.isdigit() or not low <= int(text) <= high:
                raise InvalidArgument(f"parameter {key!r} must be a whole number from {low} to {high}, not {text!r}")
            found[key] = int(text)
        stripes, mirrors = found[PARAM_STRIPES], found[PARAM_MIRRORS]
        if (stripes > 1 or mirrors) and self.thin_pool:
            raise InvalidArgument(
                f"backend {self.backend!r} keeps volumes in thin pool {self.vg}/{self.thin_pool}, whose layout its "
                f"volumes take: {PARAM_STRIPES!r} and {PARAM_MIRRORS!r} apply to thick backends"
            )
        if stripes * (mirrors + 1) == 1:
            return stripes, mirrors  # a plain volume fits any volume group: no need to ask LVM
        devices = self.lvm.volume_group(self.vg).pv_count
        if stripes * (mirrors + 1) > devices:
            raise InvalidArgument(
                f"{stripes} stripe(s) with {mirrors} mirror(s) need {stripes * (mirrors + 1)} physical volumes; "
                f"volume group {self.vg} has {devices}"
            )
        return stripes, mirrors

    def _source(self, source: SourceRef | None) -> LogicalVolume | None:
        if source is None:
            return None
        if not self.thin_pool:
            raise InvalidArgument(f"backend {self.backend!r} has no thin pool: it cannot copy a {source.kind}")
        found = self._find(source.kind, source.local_id)
        if found is None:
            raise NotFound(f"source {source.kind} {source.local_id!r} does not exist")
        _not_filling(found, f"source {source.kind} {source.local_id!r}")
        return found

    def delete_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        found = self._maybe("volume", local_id)
        if found is None:
            return
        published = self._published(found)
        if published:
            raise FailedPrecondition(f"volume {local_id} is still published to node(s) {', '.join(sorted(published))}")
        self.lvm.remove(self.vg, found.name)

    def get_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Volume:
        return self._volume(local_id, self._require("volume", local_id))

    def lookup_volume(self, name: str, *, secrets: Secrets = NO_SECRETS) -> Volume | None:
        local_id = self.local_id("volume", name)
        found = self._find("volume", local_id)
        return self._volume(local_id, found) if found else None

    def list_volumes(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Volume]:
        # One report of the volume group answers for every volume: LVM has no cursor.
        return page_of((self._volume(local_id, lv) for local_id, lv in self._listed("volume")), after, limit)

    def _listed(self, kind: str) -> list[tuple[str, LogicalVolume]]:
        prefix = f"cairn-{_PREFIX[kind]}-"
        found = []
        with self._group_present():
            listed = self.lvm.volumes(self.vg, tag=BACKEND_TAG + encode(self.backend))
        for lv in listed:
            if lv.name.startswith(prefix) and _REST[kind].match(lv.name.removeprefix("cairn-")):
                found.append((ids.with_node(self.backend, self.node_id, lv.name.removeprefix("cairn-")), lv))
        return found

    def _volume(self, local_id: str, lv: LogicalVolume) -> Volume:
        source = None
        raw = tag_value(lv.tags, SOURCE_TAG)
        if raw:
            kind, _, encoded = raw.partition(":")
            source_id = decode(encoded)
            if kind in ("snapshot", "volume", "backup") and source_id:
                source = SourceRef(kind, source_id)  # type: ignore[arg-type]
        published = self._published(lv)
        strangers = sorted(set(published) - {self.node_id})
        condition = HEALTHY
        if strangers:
            condition = VolumeCondition(
                True, f"it is recorded as published to {', '.join(strangers)}, which cannot reach it"
            )
        return Volume(
            local_id=local_id,
            name=decode(tag_value(lv.tags, NAME_TAG) or "") or "",
            capacity_bytes=lv.size,
            source=source,
            topology=self.topology,
            published_nodes=tuple(sorted(published)),
            condition=condition,
            filling=FILLING_TAG in lv.tags,
        )

    def expand_volume(
        self, local_id: str, required_bytes: int, limit_bytes: int, *, secrets: Secrets = NO_SECRETS
    ) -> int:
        found = self._require("volume", local_id)
        if required_bytes <= found.size:
            return found.size
        extent = self._extent()
        size = round_up(choose_size(required_bytes, limit_bytes), extent)
        if limit_bytes and size > limit_bytes:
            raise OutOfRange(f"volume {local_id}: no whole number of {extent}-byte extents fits {limit_bytes} bytes")
        self.lvm.extend(self.vg, found.name, size)
        return self._require("volume", local_id).size

    # -- snapshots ------------------------------------------------------------------

    def create_snapshot(
        self, name: str, source_local_id: str, parameters: Mapping[str, str], *, secrets: Secrets = NO_SECRETS
    ) -> Snapshot:
        local_id = self.local_id("snapshot", name)
        lv = self._lv("snapshot", local_id)
        existing = self._find("snapshot", local_id)
        if existing is None:
            source = self._source(SourceRef("volume", source_local_id))
            assert source is not None
            tags = [
                BACKEND_TAG + encode(self.backend),
                NAME_TAG + encode(name),
                CREATED_TAG + str(int(time.time())),
                SOURCE_TAG + f"volume:{encode(source_local_id)}",
            ]
            self.lvm.snapshot(self.vg, source.name, lv, tags, activate=False)
            existing = self._require("snapshot", local_id)
        snapshot = self._snapshot(local_id, existing)
        if snapshot.name != name or snapshot.source_volume_local_id != source_local_id:
            raise AlreadyExists(f"snapshot {name!r} exists for another source volume")
        return snapshot

    def delete_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        found = self._maybe("snapshot", local_id)
        if found is not None:
            self.lvm.remove(self.vg, found.name)

    def get_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Snapshot:
        return self._snapshot(local_id, self._require("snapshot", local_id))

    def list_snapshots(self, *, after: str = "", limit: int = 0, secrets: Secrets = NO_SECRETS) -> Sequence[Snapshot]:
        return page_of((self._snapshot(local_id, lv) for local_id, lv in self._listed("snapshot")), after, limit)

    def _snapshot(self, local_id: str, lv: LogicalVolume) -> Snapshot:
        source = decode((tag_value(lv.tags, SOURCE_TAG) or "").removeprefix("volume:")) or ""
        created = tag_value(lv.tags, CREATED_TAG) or "0"
        return Snapshot(
            local_id=local_id,
            name=decode(tag_value(lv.tags, NAME_TAG) or "") or "",
            source_volume_local_id=source,
            size_bytes=lv.size,
            created_at=float(created) if created.isdigit() else 0.0,
        )

    # -- publication ----------------------------------------------------------------

    @staticmethod
    def _published(lv: LogicalVolume) -> dict[str, bool]:
        """Node -> read-only, from the LV's publication tags."""
        found = {}
        for tag in lv.tags:
            if tag.startswith(PUBLISHED_TAG):
                node, _, mode = tag[len(PUBLISHED_TAG) :].rpartition(":")
                decoded = decode(node)
                if decoded is not None:
                    found[decoded] = mode == "ro"
        return found

    def publish_volume(
        self, local_id: str, node_id: str, capability: Capability, readonly: bool, *, secrets: Secrets = NO_SECRETS
    ) -> dict[str, str]:
        found = self._require("volume", local_id)
        if node_id != self.node_id:
            raise NotFound(f"node {node_id!r} cannot reach volume {local_id}: it is local to node {self.node_id!r}")
        published = self._published(found)
        check_publication(local_id, published, node_id, capability, readonly)
        if node_id not in published:
            tag = PUBLISHED_TAG + f"{encode(node_id)}:{'ro' if readonly else 'rw'}"
            self.lvm.add_tags(self.vg, found.name, [tag])
        return {"lv": f"{self.vg}/{found.name}"}

    def unpublish_volume(self, local_id: str, node_id: str, *, secrets: Secrets = NO_SECRETS) -> None:
        found = self._maybe("volume", local_id)
        if found is None:
            return
        tags = [t for t in found.tags if t.startswith(PUBLISHED_TAG + encode(node_id) + ":")]
        self.lvm.delete_tags(self.vg, found.name, tags)

    # -- blocks (SnapshotBlocks; declared with a thin pool) -------------------------

    def allocated(self, local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS) -> Iterator[Extent]:
        check_start(start)
        found = self._thin("snapshot", local_id)
        what = f"snapshot {local_id}"
        with self._active(found), blocks.metadata_snapshot(self.vg, self.thin_pool, what) as tmeta:
            ranges = blocks.mapped(blocks.dump(tmeta, self.lvm.thin_id(self.vg, found.name)), what)
        return to_extents(_cut(ranges, start, found.size))

    def changed(
        self, base_local_id: str, target_local_id: str, start: int = 0, *, secrets: Secrets = NO_SECRETS
    ) -> Iterator[Extent]:
        check_start(start)
        base, target = self._thin("snapshot", base_local_id), self._thin("snapshot", target_local_id)
        if tag_value(base.tags, SOURCE_TAG) != tag_value(target.tags, SOURCE_TAG):
            raise InvalidArgument(
                f"snapshots {base_local_id} and {target_local_id} are not snapshots of one volume: no changes "
                "between them can be told"
            )
        what = f"snapshots {base_local_id} and {target_local_id}"
        with self._active(target), blocks.metadata_snapshot(self.vg, self.thin_pool, what) as tmeta:
            first, second = self.lvm.thin_id(self.vg, base.name), self.lvm.thin_id(self.vg, target.name)
            ranges = blocks.unshared(blocks.delta(tmeta, first, second), what)
        # Past the base's end the target is compared with zeros: what it maps there is
        # among what the two do not share.
        return to_extents(_cut(ranges, start, target.size))

    @contextlib.contextmanager
    def read_snapshot(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[blocks.DeviceReader]:
        found = self._thin("snapshot", local_id)
        with self._active(found) as device, open(device, "rb", buffering=0) as opened:
            yield blocks.DeviceReader(opened, found.size, f"snapshot {local_id}")

    @contextlib.contextmanager
    def fill_volume(self, local_id: str, *, secrets: Secrets = NO_SECRETS) -> Iterator[blocks.DeviceWriter]:
        found = self._thin("volume", local_id)
        if FILLING_TAG not in found.tags:
            raise FailedPrecondition(f"volume {local_id} is not being restored from a backup: its content is its own")
        if FILL_STARTED_TAG in found.tags:
            found = self._blank_again(found)
        self.lvm.add_tags(self.vg, found.name, [FILL_STARTED_TAG])
        with self._active(found) as device, open(device, "r+b", buffering=0) as opened:
            yield blocks.DeviceWriter(opened, found.size, f"volume {local_id}")
            os.fsync(opened.fileno())
        self.lvm.delete_tags(self.vg, found.name, [FILLING_TAG, FILL_STARTED_TAG])

    def _blank_again(self, found: LogicalVolume) -> LogicalVolume:
        """A filling volume that an earlier fill wrote to, made again blank with its tags
        (a crash in between leaves no volume, which the CO's retry of the create makes)."""
        tags = sorted(found.tags - {FILL_STARTED_TAG})
        self.lvm.remove(self.vg, found.name)
        self.lvm.create(self.vg, found.name, found.size, tags, thin_pool=self.thin_pool, activate=False)
        made = self.lvm.volume(self.vg, found.name)
        if made is None:
            raise Unavailable(f"LV {self.vg}/{found.name} vanished right after it was made again")
        return made

    def _thin(self, kind: str, local_id: str) -> LogicalVolume:
        if not self.thin_pool:
            raise FailedPrecondition(f"backend {self.backend!r} has no thin pool: no block access on it")
        with self._group_present():
            return self._require(kind, local_id)

    @contextlib.contextmanager
    def _active(self, lv: LogicalVolume) -> Iterator[str]:
        """``lv`` active for the time of the block (its device node yielded), and inactive
        again once no caller in this process needs it: the controller leaves every LV
        inactive, the node activates volumes when it stages them."""
        with self._activation:
            if not self._readers.get(lv.name):
                self.lvm.activate(self.vg, lv.name)
            self._readers[lv.name] = self._readers.get(lv.name, 0) + 1
        try:
            yield mapper_path(self.vg, lv.name)
        finally:
            with self._activation:
                self._readers[lv.name] -= 1
                if not self._readers[lv.name]:
                    del self._readers[lv.name]
                    with contextlib.suppress(CairnError):  # left active: harmless, and the next user deactivates it
                        self.lvm.deactivate(self.vg, lv.name)


def _cut(ranges: list[Range], start: int, end: int) -> list[Range]:
    """Sorted ``ranges`` cut to [start, end)."""
    return [(max(low, start), min(high, end)) for low, high in ranges if high > start and low < end]


def _not_filling(lv: LogicalVolume, what: str) -> None:
    """Refuse to copy a volume whose content a restore from a backup has not all written:
    a snapshot or clone of it would keep a part of the backup, and never the rest."""
    if FILLING_TAG in lv.tags:
        raise FailedPrecondition(f"{what} is still being restored from a backup")
