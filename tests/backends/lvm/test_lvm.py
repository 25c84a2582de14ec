"""The LVM command layer against real LVM, on a volume group of loop devices that only the
test's private configuration sees (tests/lvm.py); and what LVM's failures are taken to
mean. Without device-mapper in the kernel (this host), LVM changes metadata only and
nothing is activated; with it (the vm tier), the volumes created active are."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import proc
from csi.backends.lvm import failures
from csi.backends.lvm.lvm import Lvm, round_up, valid_name, valid_tag
from csi.errors import (
    AlreadyExists,
    CommandBusy,
    CommandFailed,
    CommandNotFound,
    CommandRefused,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi.model import MiB
from tests.lvm import EXTENT, LoopVolumeGroup, loop_volume_group
from tests.support import require_root, require_tools

ROOT = Path(__file__).resolve().parents[3]
integration = pytest.mark.integration
unit = pytest.mark.unit

# The tags a backend records: its own names, with LVM's selection operators (& ! =) in them.
TAGS = frozenset({"cairn.volume=pvc-1", "cairn.owner=a&b!c:d#e/f+g"})


@pytest.fixture
def vg(tmp_path: Path) -> Iterator[LoopVolumeGroup]:
    require_root()
    require_tools("lvm", "losetup")
    with loop_volume_group(tmp_path) as group:
        yield group


@pytest.fixture
def striped_vg(tmp_path: Path) -> Iterator[LoopVolumeGroup]:
    require_root()
    require_tools("lvm", "losetup")
    with loop_volume_group(tmp_path, devices=2) as group:
        yield group


# What LVM's failures mean.

# Messages as lvm2 2.03 prints them, and the class each is taken for.
MESSAGES = [
    ('  Volume group "vg0" has insufficient free space (9 extents): 256 required.', failures.NoSpace),
    ("  Insufficient free space: 252 extents needed, but only 8 available", failures.NoSpace),
    ("  Insufficient suitable allocatable extents for logical volume pvc-1: 12 more required", failures.NoSpace),
    ("  Insufficient suitable contiguous allocatable extents for logical volume lv: 3 more required", failures.NoSpace),
    ("  Number of stripes (2) must not exceed number of physical volumes (1)", failures.NoSpace),
    ("  Cannot create new thin volume, free space in thin pool vg0/pool reached threshold.", failures.NoSpace),
    ("  Free space in pool vg0/pool is above threshold, new volumes are not allowed.", failures.NoSpace),
    ('  Logical Volume "pvc-1" already exists in volume group "vg0"', failures.VolumeExists),
    ('  Volume group "vg0" not found\n  Cannot process volume group vg0', failures.VolumeGroupNotFound),
    ('  Failed to find logical volume "vg0/pvc-1"', failures.VolumeNotFound),
    ("  Snapshot origin LV pvc-1 not found in Volume group vg0.", failures.VolumeNotFound),
    ("  Thin pool volume pool not found in Volume group vg0.", failures.VolumeNotFound),
    ("  Logical volume vg0/pvc-1 contains a filesystem in use.", failures.VolumeBusy),
    ("  Logical volume vg0/pvc-1 in use.", failures.VolumeBusy),
    ("  Logical volume vg0/pvc-1 is used by another device.", failures.VolumeBusy),
    ("  Snapshot origin volumes can be resized only while inactive: try lvchange -an.", failures.VolumeBusy),
    ("  New size (3 extents) matches existing size (3 extents).", failures.SizeUnchanged),
    ("  New size given (2 extents) not larger than existing size (3 extents)", failures.SizeUnchanged),
    (
        "  /dev/mapper/control: open failed: No such device\n"
        "  Failure to communicate with kernel device-mapper driver.",
        failures.NoDeviceMapper,
    ),
    ("  Can't create thin-pool without using device-mapper kernel driver.", failures.NoDeviceMapper),
]
DOMAIN = {
    failures.NoSpace: ResourceExhausted,
    failures.VolumeExists: AlreadyExists,
    failures.VolumeGroupNotFound: NotFound,
    failures.VolumeNotFound: NotFound,
    failures.VolumeBusy: FailedPrecondition,
    failures.SizeUnchanged: CommandFailed,
    failures.NoDeviceMapper: FailedPrecondition,
}


@unit
@pytest.mark.parametrize(("stderr", "cls"), MESSAGES)
def test_what_lvm_printed_decides_the_error(stderr: str, cls: type[CommandFailed]) -> None:
    argv = ["lvm", "lvcreate", "--name", "pvc-1", "vg0"]
    classified = failures.classify(CommandFailed(argv, 5, stderr))
    assert type(classified) is cls
    assert isinstance(classified, DOMAIN[cls])
    assert (classified.argv, classified.returncode, classified.stderr) == (tuple(argv), 5, stderr.strip())


@unit
def test_a_failure_lvm_explains_otherwise_keeps_its_class() -> None:
    for error in (
        CommandFailed(["lvm", "lvcreate"], 3, "Option --zero is unsupported with snapshots."),
        CommandBusy(["lvm", "lvremove"], 5, "device-mapper: remove ioctl on x failed: Device or resource busy"),
    ):
        assert failures.classify(error) is error


@unit
def test_the_first_phrase_that_matches_wins() -> None:
    """lvcreate of a taken name on a host without device-mapper prints both: the taken
    name is what the caller must hear."""
    stderr = (
        "  /dev/mapper/control: open failed: No such device\n"
        '  Logical Volume "pvc-1" already exists in volume group "vg0"'
    )
    assert type(failures.classify(CommandFailed(["lvm"], 5, stderr))) is failures.VolumeExists
    assert issubclass(failures.NoDeviceMapper, CommandRefused)
    assert issubclass(failures.VolumeGroupNotFound, CommandNotFound)


@unit
def test_valid_tags_and_names() -> None:
    for tag in ("a", "cairn.volume=pvc-1", "A-Z_a+z.0/9=!:&#", "x" * 1024):
        assert valid_tag(tag), tag
    for tag in ("", "x" * 1025, "a b", "a,b", "é", "-a", "@a", 'a"b', "a{b}", "a\nb"):
        assert not valid_tag(tag), tag
    for name in ("vg0", "pvc-1", "a+b_c.d", "x" * 127):
        assert valid_name(name), name
    for name in ("", ".", "..", "-a", "a/b", "a b", "x" * 128, "@a"):
        assert not valid_name(name), name


@unit
def test_sizes_round_as_lvm_rounds_them() -> None:
    assert round_up(1, EXTENT) == EXTENT
    assert round_up(EXTENT, EXTENT) == EXTENT
    assert round_up(EXTENT + 1, EXTENT) == 2 * EXTENT
    assert round_up(5 * MiB, EXTENT, stripes=2) == 8 * MiB
    assert round_up(9 * MiB, EXTENT, stripes=2) == 16 * MiB


@unit
@pytest.mark.parametrize("bad", ["a b", "", "-x", "é", "x" * 1025])
def test_an_invalid_tag_is_refused_before_any_command_runs(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a command ran: {args}")

    monkeypatch.setattr(proc, "run", run)
    lvm = Lvm()
    with pytest.raises(InvalidArgument):
        lvm.create("vg0", "pvc-1", MiB, tags=["good", bad])
    with pytest.raises(InvalidArgument):
        lvm.snapshot("vg0", "pvc-1", "snap-1", tags=[bad])
    with pytest.raises(InvalidArgument):
        lvm.add_tags("vg0", "pvc-1", [bad])
    with pytest.raises(InvalidArgument):
        lvm.delete_tags("vg0", "pvc-1", [bad])
    with pytest.raises(InvalidArgument):
        lvm.volumes("vg0", tag=bad)
    with pytest.raises(InvalidArgument):
        lvm.create("-vg0", "pvc-1", MiB)
    with pytest.raises(InvalidArgument):
        lvm.remove("vg0", "..")


# Real LVM.


@integration
def test_the_private_configuration_sees_only_the_test_devices(vg: LoopVolumeGroup) -> None:
    result = vg.run("pvs", "--noheadings", "-o", "pv_name,vg_name")
    assert result.returncode == 0, result.stderr
    assert sorted(line.split()[0] for line in result.stdout.splitlines() if line.strip()) == sorted(vg.devices)


@integration
def test_a_volume_is_created_with_its_tags_and_found_by_tag_and_by_name(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    seqno = vg.seqno()
    lvm.create(vg.name, "pvc-1", 8 * MiB, tags=sorted(TAGS), activate=False)
    assert vg.seqno() == seqno + 1, "the volume and its tags must be one metadata update"
    lvm.create(vg.name, "pvc-2", 4 * MiB, tags=["cairn.volume=pvc-2"])  # activated where the kernel can

    volume = lvm.volume(vg.name, "pvc-1")
    assert volume is not None
    assert (volume.vg, volume.name, volume.size, volume.tags) == (vg.name, "pvc-1", 8 * MiB, TAGS)
    assert (volume.pool, volume.origin, volume.segtype, volume.thin) == ("", "", "linear", False)
    assert volume.path == f"/dev/{vg.name}/pvc-1"
    assert (volume.data_percent, volume.metadata_percent) == (None, None)
    assert volume.uuid == vg.report("lvs", "lv_uuid", "-S", "lv_name=pvc-1")[0]["lv_uuid"]

    for tag in TAGS:
        assert [v.name for v in lvm.volumes(vg.name, tag=tag)] == ["pvc-1"], tag
    assert lvm.volumes(vg.name, tag="cairn.volume=pvc") == [], "a tag is matched whole, not as a prefix"
    assert lvm.volumes(vg.name, tag="cairn.volume") == []
    assert sorted(v.name for v in lvm.volumes(vg.name)) == ["pvc-1", "pvc-2"]
    assert lvm.volume(vg.name, "pvc-3") is None


@integration
def test_a_create_cut_short_leaves_a_volume_a_fresh_instance_finds_by_tag(vg: LoopVolumeGroup) -> None:
    """A driver killed right after lvcreate (before it recorded anything, or answered)
    restarts with nothing but LVM: the retry must find the volume by its request's tag."""
    code = (
        "import os, signal\n"
        "from csi.backends.lvm.lvm import Lvm\n"
        f"Lvm({vg.config!r}).create({vg.name!r}, 'pvc-crashed', {8 * MiB}, tags=['cairn.request=r-1'], activate=False)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert child.returncode == -9, child.stderr
    found = Lvm(vg.config).volumes(vg.name, tag="cairn.request=r-1")
    assert [(v.name, v.size, v.tags) for v in found] == [("pvc-crashed", 8 * MiB, frozenset({"cairn.request=r-1"}))]


@integration
def test_a_taken_name_is_already_exists_and_leaves_the_volume_alone(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    lvm.create(vg.name, "pvc-1", 8 * MiB, tags=["cairn.volume=first"], activate=False)
    with pytest.raises(AlreadyExists) as caught:
        lvm.create(vg.name, "pvc-1", 4 * MiB, tags=["cairn.volume=second"], activate=False)
    assert isinstance(caught.value, failures.VolumeExists)
    assert "already exists" in caught.value.stderr
    volume = lvm.volume(vg.name, "pvc-1")
    assert volume is not None
    assert (volume.size, volume.tags) == (8 * MiB, frozenset({"cairn.volume=first"}))


@integration
def test_more_than_the_free_space_is_resource_exhausted(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    free = lvm.volume_group(vg.name).free
    seqno = vg.seqno()
    with pytest.raises(ResourceExhausted) as caught:
        lvm.create(vg.name, "pvc-big", free + 1, activate=False)
    assert isinstance(caught.value, CommandFailed)
    assert lvm.volume(vg.name, "pvc-big") is None
    assert vg.seqno() == seqno

    lvm.create(vg.name, "pvc-all", free, activate=False)
    assert lvm.volume_group(vg.name).free == 0
    with pytest.raises(ResourceExhausted):
        lvm.extend(vg.name, "pvc-all", free + EXTENT)


@integration
def test_extend_grows_to_whole_extents_and_a_repeat_is_done(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    lvm.create(vg.name, "pvc-1", 8 * MiB, activate=False)
    lvm.create(vg.name, "pvc-2", 4 * MiB, activate=False)  # so pvc-1 grows onto a second segment
    lvm.extend(vg.name, "pvc-1", 10 * MiB + 1)
    grown = lvm.volume(vg.name, "pvc-1")
    assert grown is not None
    assert grown.size == round_up(10 * MiB + 1, EXTENT) == 12 * MiB
    assert vg.report("lvs", "lv_size", "-S", "lv_name=pvc-1")[0]["lv_size"] == str(12 * MiB)
    assert [v.name for v in lvm.volumes(vg.name)].count("pvc-1") == 1, "one volume per LV, whatever its segments"

    lvm.extend(vg.name, "pvc-1", 12 * MiB)  # the size it has
    lvm.extend(vg.name, "pvc-1", 4 * MiB)  # smaller: an expansion already done
    after = lvm.volume(vg.name, "pvc-1")
    assert after is not None and after.size == 12 * MiB

    with pytest.raises(NotFound):
        lvm.extend(vg.name, "pvc-missing", 8 * MiB)


@integration
def test_remove_twice_is_fine(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    lvm.create(vg.name, "pvc-1", 8 * MiB, tags=["cairn.volume=pvc-1"], activate=False)
    lvm.remove(vg.name, "pvc-1")
    assert lvm.volume(vg.name, "pvc-1") is None
    assert vg.report("lvs", "lv_name") == []
    lvm.remove(vg.name, "pvc-1")
    assert lvm.volume_group(vg.name).free == lvm.volume_group(vg.name).size


@integration
def test_a_missing_volume_group_is_not_found(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    missing = f"{vg.name}-missing"
    with pytest.raises(NotFound) as caught:
        lvm.volume(missing, "pvc-1")
    assert isinstance(caught.value, failures.VolumeGroupNotFound)
    for call in (
        lambda: lvm.volume_group(missing),
        lambda: lvm.volumes(missing),
        lambda: lvm.volumes(missing, tag="cairn.volume=pvc-1"),
        lambda: lvm.create(missing, "pvc-1", 8 * MiB, activate=False),
        lambda: lvm.remove(missing, "pvc-1"),
    ):
        with pytest.raises(failures.VolumeGroupNotFound):
            call()


@integration
def test_tags_are_added_and_removed(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    lvm.create(vg.name, "pvc-1", 4 * MiB, tags=["cairn.volume=pvc-1"], activate=False)
    seqno = vg.seqno()
    lvm.add_tags(vg.name, "pvc-1", ["cairn.snapshot=s-1", "cairn.owner=x&y"])
    assert vg.seqno() == seqno + 1, "all the tags in one metadata update"
    lvm.add_tags(vg.name, "pvc-1", ["cairn.snapshot=s-1"])  # again: not an error
    volume = lvm.volume(vg.name, "pvc-1")
    assert volume is not None
    assert volume.tags == {"cairn.volume=pvc-1", "cairn.snapshot=s-1", "cairn.owner=x&y"}
    assert [v.name for v in lvm.volumes(vg.name, tag="cairn.owner=x&y")] == ["pvc-1"]

    lvm.delete_tags(vg.name, "pvc-1", ["cairn.owner=x&y", "cairn.never-set"])
    volume = lvm.volume(vg.name, "pvc-1")
    assert volume is not None and volume.tags == {"cairn.volume=pvc-1", "cairn.snapshot=s-1"}
    assert lvm.volumes(vg.name, tag="cairn.owner=x&y") == []

    seqno = vg.seqno()
    lvm.add_tags(vg.name, "pvc-1", [])
    assert vg.seqno() == seqno, "no tags, no command"
    with pytest.raises(NotFound):
        lvm.add_tags(vg.name, "pvc-missing", ["cairn.volume=x"])


@integration
@pytest.mark.parametrize("bad", ["a b", "-a", "é", "x" * 1025])
def test_invalid_tags_change_nothing(vg: LoopVolumeGroup, bad: str) -> None:
    lvm = vg.lvm()
    lvm.create(vg.name, "pvc-1", 4 * MiB, tags=["cairn.volume=pvc-1"], activate=False)
    seqno = vg.seqno()
    with pytest.raises(InvalidArgument):
        lvm.create(vg.name, "pvc-2", 4 * MiB, tags=["cairn.volume=pvc-2", bad], activate=False)
    with pytest.raises(InvalidArgument):
        lvm.add_tags(vg.name, "pvc-1", ["cairn.ok", bad])
    assert lvm.volume(vg.name, "pvc-2") is None
    volume = lvm.volume(vg.name, "pvc-1")
    assert volume is not None and volume.tags == {"cairn.volume=pvc-1"}
    assert vg.seqno() == seqno


@integration
def test_volume_group_figures_match_vgs(vg: LoopVolumeGroup) -> None:
    lvm = vg.lvm()
    fields = "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,pv_count,lv_count"

    def expected() -> dict[str, str]:
        return vg.report("vgs", fields)[0]

    def reported() -> dict[str, str]:
        group = lvm.volume_group(vg.name)
        values = [group.name, group.uuid, group.size, group.free, group.extent_size, group.extent_count]
        values += [group.free_count, group.pv_count, group.lv_count]
        return dict(zip(fields.split(","), map(str, values), strict=True))

    assert reported() == expected()
    group = lvm.volume_group(vg.name)
    assert group.extent_size == EXTENT and group.size == group.extent_count * EXTENT and group.free == group.size
    assert group.tags == frozenset()

    lvm.create(vg.name, "pvc-1", 5 * MiB, activate=False)
    assert reported() == expected()
    assert lvm.volume_group(vg.name).free == group.free - 8 * MiB


@integration
def test_a_striped_volume_spans_the_physical_volumes(striped_vg: LoopVolumeGroup) -> None:
    vg = striped_vg
    lvm = vg.lvm()
    lvm.create(vg.name, "pvc-1", 5 * MiB, stripes=2, activate=False)
    volume = lvm.volume(vg.name, "pvc-1")
    assert volume is not None
    assert (volume.segtype, volume.size) == ("striped", round_up(5 * MiB, EXTENT, stripes=2))
    assert vg.report("lvs", "stripes", "-S", "lv_name=pvc-1")[0]["stripes"] == "2"
    with pytest.raises(ResourceExhausted):
        lvm.create(vg.name, "pvc-2", 4 * MiB, stripes=3, activate=False)
