"""A throw-away volume group for the tests: physical volumes on loop devices over sparse
files, seen only through a private LVM configuration that the tests give every command.

That configuration keeps LVM off the host's own disks (a filter accepting the test's
loop devices alone, no devices file) and leaves nothing of the test on the host: no
metadata backups or archives under /etc/lvm, no device hints under /run/lvm, no udev or
D-Bus traffic, no lvmpolld or dmeventd. Without device-mapper in the kernel, activation
is turned off too, and LVM then changes metadata only; where the kernel has it (the vm
tier), volumes are activated as in production.

``loop_volume_group`` removes the volume group, wipes the physical volumes' labels and
detaches the loop devices however the test ends, then checks that the host kept no trace
of it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from csi import loopdev
from csi.backends.lvm.lvm import Lvm
from csi.model import MiB

EXTENT = 4 * MiB
# Where LVM would leave traces on the host, were the private configuration not to hold:
# metadata backups and archives, device hints and the record of PVs seen online, device
# nodes (libdevmapper makes /dev/mapper/control even where no driver answers). Nothing
# may appear there during a test, nor /dev/<volume group>. Command locks come and go under LOCKS with any LVM
# command on the host; only one naming the test's volume group counts there.
HOST_PATHS = ("/etc/lvm/backup", "/etc/lvm/archive", "/run/lvm", "/dev/mapper")
LOCKS = "/run/lock/lvm"


def has_device_mapper() -> bool:
    """Whether the kernel has device-mapper (loaded); /dev/mapper/control alone does not
    say, as libdevmapper makes that node whether or not a driver answers behind it."""
    subprocess.run(["modprobe", "-q", "dm_mod"], check=False, capture_output=True)
    try:
        with open("/proc/misc", encoding="ascii") as listing:
            return any(line.split()[-1:] == ["device-mapper"] for line in listing)
    except OSError:
        return False


def config_for(devices: list[str], activation: bool) -> str:
    """The private LVM configuration for a volume group on ``devices``."""
    accept = ",".join(f'"a|^{device}$|"' for device in devices)
    devices_filter = f'[{accept},"r|.*|"]'
    return " ".join(
        [
            f"devices {{ filter={devices_filter} global_filter={devices_filter} use_devicesfile=0",
            'scan=["/dev"] hints="none" obtain_device_list_from_udev=0 external_device_info_source="none" }',
            f"global {{ activation={int(activation)} notify_dbus=0 use_lvmpolld=0 use_lvmlockd=0 }}",
            "activation { udev_sync=0 udev_rules=0 monitoring=0 }",
            "backup { backup=0 archive=0 }",
        ]
    )


@dataclass
class LoopVolumeGroup:
    name: str
    devices: list[str]
    config: str

    def lvm(self) -> Lvm:
        """A fresh instance of the code under test, as a restarted driver would make."""
        return Lvm(self.config)

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """An LVM command with the private configuration, run directly: the tests check
        the code under test against LVM itself, not against itself."""
        return subprocess.run(
            ["lvm", command, "--config", self.config, *args], capture_output=True, text=True, timeout=60, check=False
        )

    def report(self, command: str, fields: str, *args: str) -> list[dict[str, str]]:
        """Rows of ``vgs`` or ``lvs`` on this volume group, sizes in bytes."""
        kind = "vg" if command == "vgs" else "lv"
        result = self.run(
            command, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *args, self.name
        )
        assert result.returncode == 0, result.stderr
        return [row for report in json.loads(result.stdout)["report"] for row in report[kind]]

    def seqno(self) -> int:
        """The volume group's metadata sequence number: one more for each metadata update."""
        return int(self.report("vgs", "vg_seqno")[0]["vg_seqno"])


def host_files(folders: tuple[str, ...] = (*HOST_PATHS, LOCKS)) -> set[str]:
    """The files in the host's LVM directories (and their subdirectories, as /run/lvm has)."""
    found: set[str] = set()
    for folder in folders:
        for parent, _, names in os.walk(folder):
            found |= {f"{parent}/{name}" for name in names}
    return found


def host_traces(name: str, before: set[str]) -> list[str]:
    """What the host's LVM directories gained since ``before``, or hold that names the
    volume group ``name``."""
    found = (host_files(HOST_PATHS) - before) | {path for path in host_files() if name in path}
    if os.path.lexists(f"/dev/{name}"):
        found.add(f"/dev/{name}")
    return sorted(found)


@contextlib.contextmanager
def loop_volume_group(root: Path, size: int = 64 * MiB, devices: int = 1) -> Iterator[LoopVolumeGroup]:
    """A volume group of ``devices`` physical volumes of ``size`` bytes each (sparse files
    under ``root``), with 4 MiB extents and a name of its own; gone afterwards, and the
    test failed if anything of it stays on the host (noted on the test's own failure, if
    it failed)."""
    name = f"cairn-test-{secrets.token_hex(4)}"
    before = host_files(HOST_PATHS)
    images = [root / f"pv{index}.img" for index in range(devices)]
    attached: list[str] = []
    try:
        for image in images:
            with open(image, "wb") as handle:
                handle.truncate(size)
            attached.append(loopdev.attach(str(image)))
        group = LoopVolumeGroup(name, attached, config_for(attached, has_device_mapper()))
        for device in attached:
            _must(group.run("pvcreate", "--yes", device))
        _must(group.run("vgcreate", "--physicalextentsize", f"{EXTENT}b", name, *attached))
        yield group
    except BaseException as failure:
        problems = _clean_up(name, images, attached, before)
        if problems:
            failure.add_note(f"and the volume group {name} was not cleaned up: {problems}")
        raise
    problems = _clean_up(name, images, attached, before)
    assert not problems, f"the volume group {name} was not cleaned up: {problems}"


def _clean_up(name: str, images: list[Path], attached: list[str], before: set[str]) -> list[str]:
    """Remove the volume group, wipe its physical volumes, detach and delete their files
    (each step tried whatever the others did); what could not be, and what the host kept."""
    problems: list[str] = []
    if attached:
        group = LoopVolumeGroup(name, attached, config_for(attached, has_device_mapper()))
        removed = group.run("vgremove", "--force", "--yes", name)
        if removed.returncode != 0 and "not found" not in removed.stderr:
            problems.append(f"vgremove: {removed.stderr.strip()}")
        for device in attached:
            wiped = group.run("pvremove", "--force", "--force", "--yes", device)
            if wiped.returncode != 0 and "No PV" not in wiped.stderr:
                problems.append(f"pvremove {device}: {wiped.stderr.strip()}")
    for image in images:
        try:
            loopdev.detach(str(image))
        except Exception as exc:
            problems.append(f"detaching {image}: {exc}")
        image.unlink(missing_ok=True)
    backing = {os.path.realpath(image) for image in images}
    problems += [f"loop {device}" for device, back in loopdev.attached().items() if back in backing]
    return problems + [f"{path} left on the host" for path in host_traces(name, before)]


def _must(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args[:2])} failed: {result.stderr.strip()}"


THIN_POOL = "pool"
THIN_CHUNK = 64 * 1024


@contextlib.contextmanager
def thin_pool_group(root: Path) -> Iterator[LoopVolumeGroup]:
    """A 256 MiB volume group holding a 128 MiB thin pool ``THIN_POOL`` of 64 KiB chunks
    (device-mapper needed); gone afterwards, as ``loop_volume_group``."""
    with loop_volume_group(root, size=256 * MiB) as made:
        pool = made.run("lvcreate", "--type", "thin-pool", "--chunksize", "64k", "--size", "128m", "--name",
                        THIN_POOL, made.name)  # fmt: skip
        assert pool.returncode == 0, pool.stderr
        yield made
