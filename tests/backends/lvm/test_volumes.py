"""The lvm backend's controller half on a volume group of loop devices (LVM metadata
only where the kernel has no device-mapper): what the contract suite cannot say because
it is about LVM itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.backends.lvm.lvm import Lvm
from csi.backends.lvm.volumes import LvmVolumes
from csi.errors import InvalidArgument, Unavailable
from csi.model import AccessMode, AccessType, Capability, MiB, VolumeSpec
from tests.lvm import loop_volume_group
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration
RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def test_a_volume_group_that_is_away_is_unavailable_and_deletes_nothing(tmp_path: Path) -> None:
    """Disks that vanished (unplugged, or hidden by a filter) may come back: a delete then
    must not answer OK, or their LV would never be removed."""
    require_root()
    require_tools("lvm")
    with loop_volume_group(tmp_path) as group:
        volumes = LvmVolumes("lvm", group.lvm(), group.name, "", "node-a")
        volume = volumes.create_volume(VolumeSpec("kept", 8 * MiB, 0, (RWO,)))
        hidden = group.config.replace('"a|^', '"r|^')  # the same filter, rejecting the disks
        away = LvmVolumes("lvm", Lvm(hidden), group.name, "", "node-a")
        with pytest.raises(Unavailable, match=f"volume group {group.name} is not found"):
            away.delete_volume(volume.local_id)
        with pytest.raises(Unavailable):
            away.list_volumes()
        assert away.free_bytes() == 0
        assert away.health() is not None and group.name in away.health()  # type: ignore[operator]
        assert [v.name for v in volumes.list_volumes()] == ["kept"], "the volume is still there"
        volumes.delete_volume(volume.local_id)
        assert volumes.list_volumes() == []


def test_stripes_and_mirrors_where_the_volume_group_allows_them(tmp_path: Path) -> None:
    require_root()
    require_tools("lvm")
    with loop_volume_group(tmp_path, size=256 * MiB, devices=2) as group:
        volumes = LvmVolumes("lvm", group.lvm(), group.name, "", "node-a")

        def spec(name: str, **parameters: str) -> VolumeSpec:
            return VolumeSpec(name, 16 * MiB, 0, (RWO,), parameters)

        striped = volumes.create_volume(spec("striped", stripes="2"))
        rows = group.report("lvs", "lv_name,stripes,segtype")
        assert {r["lv_name"]: (r["segtype"], r["stripes"]) for r in rows}[
            f"cairn-{striped.local_id.split('@')[1]}"
        ] == (
            "striped",
            "2",
        )
        for parameters, problem in (
            ({"stripes": "3"}, "need 3 physical volumes; volume group .* has 2"),
            ({"stripes": "2", "mirrors": "1"}, "need 4 physical volumes"),
            ({"stripes": "two"}, "'stripes' must be a whole number from 1 to 128"),
            ({"mirrors": "-1"}, "'mirrors' must be a whole number from 0 to 4"),
        ):
            with pytest.raises(InvalidArgument, match=problem):
                volumes.create_volume(spec("refused", **parameters))
        thin = LvmVolumes("lvm", group.lvm(), group.name, "pool", "node-a")
        with pytest.raises(InvalidArgument, match="take"):
            thin.create_volume(spec("thin-striped", stripes="2"))
        assert [v.name for v in volumes.list_volumes()] == ["striped"], "refusals made nothing"
        volumes.delete_volume(striped.local_id)
