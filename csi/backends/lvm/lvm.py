"""The one place the lvm backend runs LVM: each method of ``Lvm`` is one LVM command, run
through ``proc.run`` (argv only, a timeout on each), with the operator's LVM configuration
given to every command with ``--config`` (the runner passes no environment, and a
configuration on the command line leaves the host's lvm.conf alone).

Reports are read as JSON (``--reportformat json``) in bytes (``--units b --nosuffix``)
with the fields named explicitly, so neither the host's lvm.conf nor a newer LVM changes
what is parsed. Failures become domain errors in ``failures``.

Sizes: LVM allocates whole extents, so it rounds a size up to a multiple of the volume
group's extent size (a striped volume's to a multiple of extent size x stripes; a thin
volume's virtual size and a snapshot's copy-on-write space likewise), and reports the
rounded size. Its command line takes bytes only in whole 512-byte sectors, so sizes are
rounded up to a sector here first; ``round_up`` gives what LVM will make of a size.

Names and tags are checked before any command runs: a name LVM would read as an option,
or a tag it would refuse, is the caller's InvalidArgument, never a half-run command. The
backend encodes its own names and metadata into what ``valid_name`` and ``valid_tag``
accept."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from csi import proc
from csi.backends.lvm import failures
from csi.errors import CommandFailed, InvalidArgument, NotFound
from csi.sizes import round_up as _round_up

TIMEOUT = 60.0
"""Seconds an LVM command may take. Metadata changes take well under a second; what takes
longer is waiting for another LVM command's lock on the volume group, and a command still
waiting after this long is stuck (on a suspended device, say) rather than queued."""

SECTOR = 512
TAG_MAX = 1024
NAME_MAX = 127
_TAG = re.compile(r"[A-Za-z0-9_+.\-/=!:&#]+")
_NAME = re.compile(r"[A-Za-z0-9_+.\-]+")

_VG_FIELDS = (
    "vg_name",
    "vg_uuid",
    "vg_size",
    "vg_free",
    "vg_extent_size",
    "vg_extent_count",
    "vg_free_count",
    "pv_count",
    "lv_count",
    "vg_tags",
)
# segtype is a segment field: LVM reports a row per segment for it, one LV on several rows
# once it has grown onto a second stretch of extents. Rows are merged by lv_uuid.
_LV_FIELDS = (
    "vg_name",
    "lv_name",
    "lv_uuid",
    "lv_size",
    "lv_tags",
    "pool_lv",
    "origin",
    "segtype",
    "lv_active",
    "data_percent",
    "metadata_percent",
)
_REPORT = ("--reportformat", "json", "--units", "b", "--nosuffix")


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    size: int
    """Bytes in extents on all its physical volumes (LVM's own metadata excluded)."""
    free: int
    """Bytes in extents no logical volume uses."""
    extent_size: int
    extent_count: int
    free_count: int
    pv_count: int
    lv_count: int
    tags: frozenset[str]


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    uuid: str
    size: int
    """Bytes: a thin volume's virtual size, a snapshot's origin-sized view."""
    tags: frozenset[str]
    pool: str
    """The thin pool of a thin volume; "" for any other."""
    origin: str
    """The volume a snapshot was taken of; "" for any other (and for a thin snapshot whose
    origin was removed since)."""
    segtype: str
    """LVM's segment type of the volume's first segment: linear, striped, raid1, thin,
    thin-pool, snapshot, ..."""
    active: bool
    """Whether the volume is active on this host. False where LVM cannot tell: with
    activation disabled in its configuration, or without device-mapper."""
    data_percent: float | None
    """How full a thin pool, thin volume or snapshot is; None for other volumes, and for
    these while inactive."""
    metadata_percent: float | None
    """How full a thin pool's metadata is; None for other volumes, and while inactive."""

    @property
    def path(self) -> str:
        """The device node LVM makes for the volume while it is active."""
        return f"/dev/{self.vg}/{self.name}"

    @property
    def thin(self) -> bool:
        """Whether the volume is a thin volume (a thin snapshot included)."""
        return bool(self.pool)


def mapper_path(vg: str, lv: str) -> str:
    """The device-mapper node LVM makes for an active LV (hyphens in names doubled)."""
    return f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def valid_tag(text: str) -> bool:
    """Whether LVM accepts ``text`` as a tag: 1 to 1024 of A-Z a-z 0-9 _ + . - / = ! : & #,
    not starting with a hyphen (lvm(8); LVM would read one as an option)."""
    return 0 < len(text) <= TAG_MAX and _TAG.fullmatch(text) is not None and not text.startswith("-")


def valid_name(text: str) -> bool:
    """Whether LVM accepts ``text`` as a volume group or logical volume name: up to 127 of
    A-Z a-z 0-9 _ + . -, not starting with a hyphen, and neither "." nor "..". LVM refuses
    a few more (names starting "snapshot" or "pvmove", or containing "_tdata" and its kin,
    are reserved for its own volumes) and limits a volume group and volume's names
    together; those refusals remain LVM's."""
    return (
        0 < len(text) <= NAME_MAX
        and _NAME.fullmatch(text) is not None
        and not text.startswith("-")
        and text not in (".", "..")
    )


def round_up(size: int, extent_size: int, stripes: int = 1) -> int:
    """The size LVM makes of ``size`` bytes in a volume group of ``extent_size``: whole
    extents, a multiple of ``stripes`` of them for a striped volume."""
    return _round_up(_round_up(size, SECTOR), extent_size * max(stripes, 1))


class Lvm:
    """LVM commands with one configuration. ``config`` is given to every command with
    ``--config`` (LVM's own syntax, as in lvm.conf: a device filter, for instance), so an
    operator can keep LVM off disks it must not touch; empty means the host's lvm.conf
    alone. Holds no state: a fresh instance, in a restarted driver, sees what any other
    made."""

    def __init__(self, config: str = "", timeout: float = TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout

    # Reports.

    def volume_group(self, vg: str) -> VolumeGroup:
        """The volume group ``vg``; NotFound when there is none."""
        _check_names(vg)
        rows = self._report("vgs", "vg", _VG_FIELDS, [vg])
        if len(rows) != 1:
            raise CommandFailed(["lvm", "vgs", vg], 0, f"it reported {len(rows)} volume groups called {vg!r}")
        row = rows[0]
        return VolumeGroup(
            name=row["vg_name"],
            uuid=row["vg_uuid"],
            size=int(row["vg_size"]),
            free=int(row["vg_free"]),
            extent_size=int(row["vg_extent_size"]),
            extent_count=int(row["vg_extent_count"]),
            free_count=int(row["vg_free_count"]),
            pv_count=int(row["pv_count"]),
            lv_count=int(row["lv_count"]),
            tags=_tags(row["vg_tags"]),
        )

    def volumes(self, vg: str, tag: str | None = None) -> list[LogicalVolume]:
        """The visible logical volumes of ``vg`` (thin pools and snapshots included, LVM's
        internal ones not), only those carrying ``tag`` when given; NotFound when the
        volume group does not exist."""
        _check_names(vg)
        selection: list[str] = []
        if tag is not None:
            _check_tags([tag])
            # Tags hold no quote, so quoting keeps LVM's selection operators (& ! =) literal;
            # {"t"} selects volumes whose tags include t.
            selection = ["--select", f'lv_tags={{"{tag}"}}']
        return _volumes(self._report("lvs", "lv", _LV_FIELDS, [*selection, vg]))

    def volume(self, vg: str, name: str) -> LogicalVolume | None:
        """The logical volume ``name`` of ``vg``; None when there is none, NotFound when the
        volume group does not exist."""
        _check_names(vg, name)
        try:
            found = _volumes(self._report("lvs", "lv", _LV_FIELDS, [f"{vg}/{name}"]))
        except failures.VolumeNotFound:
            return None
        return found[0] if found else None

    def thin_id(self, vg: str, name: str) -> int:
        """The thin device ID of thin volume ``name`` in its pool's metadata (what the
        thin-provisioning tools name it by); NotFound when there is no such thin volume."""
        _check_names(vg, name)
        rows = self._report("lvs", "lv", ("thin_id",), [f"{vg}/{name}"])
        text = rows[0].get("thin_id", "") if rows else ""
        if not text.isdigit():
            raise NotFound(f"logical volume {vg}/{name} is not a thin volume")
        return int(text)

    # Changes.

    def create(
        self,
        vg: str,
        name: str,
        size: int,
        tags: Iterable[str] = (),
        thin_pool: str = "",
        stripes: int = 0,
        mirrors: int = 0,
        activate: bool = True,
    ) -> None:
        """Create the logical volume ``name`` of ``size`` bytes (rounded up, see the module)
        in ``vg``, or in its thin pool ``thin_pool``: striped over ``stripes`` physical
        volumes, with ``mirrors`` extra copies (raid1; raid10 with stripes too); 0 for
        LVM's default of one stripe and no copy. A thin volume takes its layout from its
        pool.

        The tags are set by the same command, in the same metadata update as the volume:
        a create cut short (a crash, a timeout) leaves either nothing or a volume with all
        its tags, which a retry finds by tag.

        Activated (``activate``), the volume's first 4 KiB are zeroed and any filesystem or
        RAID signature on it wiped without asking: a new volume must not show an old
        volume's filesystem. An inactive volume cannot be wiped; its extents are left as
        they are. A thin volume reads as zeros wherever it was never written (if its pool
        zeroes new blocks, LVM's default).

        AlreadyExists when the name is taken (whatever that volume is), ResourceExhausted
        when there is no room, NotFound when the volume group or thin pool does not
        exist."""
        _check_names(vg, name, *([thin_pool] if thin_pool else []))
        tags = _check_tags(tags)
        if size <= 0:
            raise InvalidArgument(f"a logical volume needs a size above 0 bytes, not {size}")
        if stripes < 0 or mirrors < 0:
            raise InvalidArgument(f"stripes and mirrors cannot be negative ({stripes}, {mirrors})")
        argv = ["lvcreate", "--name", name, *_addtags(tags)]
        if thin_pool:
            if stripes > 1 or mirrors:
                raise InvalidArgument(f"a thin volume takes its layout from its pool {thin_pool!r}")
            # LVM refuses --zero here: a thin volume's blocks are zeroed, if at all, by the pool.
            argv += ["--virtualsize", _bytes(size), "--thinpool", thin_pool]
            argv += ["--activate", "y" if activate else "n"]
        else:
            argv += ["--size", _bytes(size)]
            if mirrors:
                argv += ["--type", "raid10" if stripes > 1 else "raid1", "--mirrors", str(mirrors)]
            if stripes > 1:
                argv += ["--stripes", str(stripes)]
            if activate:
                argv += ["--activate", "y", "--zero", "y", "--wipesignatures", "y", "--yes"]
            else:
                argv += ["--activate", "n", "--zero", "n"]
        self._run([*argv, vg])

    def snapshot(
        self,
        vg: str,
        origin: str,
        name: str,
        tags: Iterable[str] = (),
        size: int = 0,
        activate: bool | None = None,
    ) -> None:
        """Snapshot the logical volume ``origin`` of ``vg`` as ``name``, its tags set in the
        same command (see ``create``). ``size`` 0 takes a thin snapshot, which needs a thin
        origin and shares its pool; a size takes a copy-on-write snapshot with that much
        space for changed blocks.

        ``activate`` None leaves activation to LVM: a thin snapshot is made inactive and
        flagged to be skipped by activation (so it is not activated at boot); a
        copy-on-write snapshot follows its origin (LVM makes one of an active origin only
        active). True or False asks for that state; a thin snapshot's skip flag is then
        overridden for this activation only.

        AlreadyExists, ResourceExhausted and NotFound (of the origin) as for ``create``."""
        _check_names(vg, origin, name)
        tags = _check_tags(tags)
        if size < 0:
            raise InvalidArgument(f"a snapshot's size cannot be negative ({size})")
        argv = ["lvcreate", "--snapshot", "--name", name, *_addtags(tags)]
        if size:
            argv += ["--size", _bytes(size)]
        if activate is True:
            argv += ["--activate", "y", "--ignoreactivationskip"]
        elif activate is False:
            argv += ["--activate", "n"]
        self._run([*argv, f"{vg}/{origin}"])

    def extend(self, vg: str, name: str, size: int) -> None:
        """Grow the logical volume to at least ``size`` bytes (rounded up as LVM does). A
        volume already that large is left as it is: a retried or repeated expansion
        succeeds. The filesystem on it is not touched.

        NotFound when there is no such volume, ResourceExhausted when the volume group (for
        a thick volume) has no room."""
        _check_names(vg, name)
        if size <= 0:
            raise InvalidArgument(f"a logical volume needs a size above 0 bytes, not {size}")
        try:
            self._run(["lvextend", "--size", _bytes(size), f"{vg}/{name}"])
        except failures.SizeUnchanged:
            return

    def remove(self, vg: str, name: str) -> None:
        """Remove the logical volume; one that does not exist is not an error, a volume
        group that does not exist is (NotFound).

        LVM's questions are answered yes (no one is there to answer them): it removes an
        active volume (refusing one that is open: FailedPrecondition), with a thin pool
        its thin volumes, and with a copy-on-write origin its snapshots; a caller that must
        keep those checks first. A thin snapshot does not depend on its origin, and stays."""
        _check_names(vg, name)
        try:
            self._run(["lvremove", "--yes", f"{vg}/{name}"])
        except failures.VolumeNotFound:
            return

    def add_tags(self, vg: str, name: str, tags: Iterable[str]) -> None:
        """Add tags to the logical volume, in one metadata update; adding a tag it has is
        not an error."""
        self._change_tags(vg, name, "--addtag", tags)

    def delete_tags(self, vg: str, name: str, tags: Iterable[str]) -> None:
        """Remove tags from the logical volume, in one metadata update; removing a tag it
        lacks is not an error."""
        self._change_tags(vg, name, "--deltag", tags)

    def activate(self, vg: str, name: str) -> None:
        """Activate the logical volume on this host, so its device node exists; activating
        an active volume is not an error. The activation-skip flag (set on thin snapshots)
        is ignored: asking for a volume is reason enough."""
        _check_names(vg, name)
        self._run(["lvchange", "--activate", "y", "--ignoreactivationskip", f"{vg}/{name}"])

    def deactivate(self, vg: str, name: str) -> None:
        """Deactivate the logical volume; an inactive one is not an error, an open one is
        (FailedPrecondition)."""
        _check_names(vg, name)
        self._run(["lvchange", "--activate", "n", f"{vg}/{name}"])

    # Running.

    def _change_tags(self, vg: str, name: str, option: str, tags: Iterable[str]) -> None:
        _check_names(vg, name)
        tags = _check_tags(tags)
        if not tags:
            return
        self._run(["lvchange", *(f"{option}={tag}" for tag in tags), f"{vg}/{name}"])

    def _report(self, command: str, kind: str, fields: Sequence[str], args: Sequence[str]) -> list[dict[str, str]]:
        """The rows of an LVM report (``kind`` is "vg" or "lv")."""
        output = self._run([command, *_REPORT, "--options", ",".join(fields), *args])
        try:
            document: Any = json.loads(output)
            return [dict(row) for report in document["report"] for row in report.get(kind, [])]
        except (ValueError, KeyError, TypeError) as exc:
            raise CommandFailed(["lvm", command, *args], 0, f"its output is not an LVM JSON report: {exc}") from exc

    def _run(self, argv: Sequence[str]) -> str:
        """Run the LVM command ``argv`` (``lvcreate ...``) with this instance's configuration
        and return what it printed; its failure as ``failures`` classifies it."""
        config = ["--config", self.config] if self.config else []
        command = ["lvm", argv[0], *config, *argv[1:]]
        try:
            return proc.run(command, timeout=self.timeout).stdout
        except CommandFailed as exc:
            classified = failures.classify(exc)
            if classified is exc:
                raise
            raise classified from exc


def _volumes(rows: Iterable[dict[str, str]]) -> list[LogicalVolume]:
    """Logical volumes from report rows, one per volume (the first segment's row)."""
    found: dict[str, LogicalVolume] = {}
    for row in rows:
        if row["lv_uuid"] in found:
            continue
        found[row["lv_uuid"]] = LogicalVolume(
            vg=row["vg_name"],
            name=row["lv_name"],
            uuid=row["lv_uuid"],
            size=int(row["lv_size"]),
            tags=_tags(row["lv_tags"]),
            pool=row["pool_lv"],
            origin=row["origin"],
            segtype=row["segtype"],
            active=row["lv_active"] == "active",
            data_percent=_percent(row["data_percent"]),
            metadata_percent=_percent(row["metadata_percent"]),
        )
    return list(found.values())


def _tags(text: str) -> frozenset[str]:
    """Tags as LVM reports them: joined by commas, which no tag can hold."""
    return frozenset(tag for tag in text.split(",") if tag)


def _percent(text: str) -> float | None:
    return float(text) if text.strip() else None


def _bytes(size: int) -> str:
    """A size for LVM's command line: bytes, in whole sectors (LVM takes no other)."""
    return f"{_round_up(size, SECTOR)}b"


def _addtags(tags: Sequence[str]) -> list[str]:
    # "--addtag=t" keeps a tag LVM's parser could mistake for an option one argument.
    return [f"--addtag={tag}" for tag in tags]


def _check_names(*names: str) -> None:
    for name in names:
        if not valid_name(name):
            raise InvalidArgument(
                f"{name!r} is not an LVM name: up to {NAME_MAX} of A-Z a-z 0-9 _ + . -, not starting with a hyphen"
            )


def _check_tags(tags: Iterable[str]) -> list[str]:
    """The tags, in order and without repeats; InvalidArgument naming the first LVM would
    refuse."""
    if isinstance(tags, str):
        raise TypeError(f"tags must be a collection of tags, not the string {tags!r}")
    checked = list(dict.fromkeys(tags))
    for tag in checked:
        if not valid_tag(tag):
            raise InvalidArgument(
                f"{tag[:64]!r} is not an LVM tag: 1 to {TAG_MAX} of A-Z a-z 0-9 _ + . - / = ! : & #, "
                "not starting with a hyphen"
            )
    return checked
