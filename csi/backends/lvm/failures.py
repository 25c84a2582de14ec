"""What a failed LVM command means, read from what it printed.

LVM's exit codes do not say why a command failed: 5 (ECMD_FAILED) covers a full volume
group, a missing volume and a name already taken alike, and 3 (EINVALID_CMD_LINE) a
command line LVM refused, which is this layer's bug rather than the caller's. So the
message decides, as in ``errors.command_failed``; the phrases below are lvm2's own
(2.03), matched without regard to case. A failure none of them matches keeps the class
``proc.run`` gave it. Every class here is still a CommandFailed, carrying the command,
its exit code and what it printed."""

from __future__ import annotations

import re

from csi.errors import AlreadyExists, CommandBusy, CommandFailed, CommandNoSpace, CommandNotFound, CommandRefused


class NoSpace(CommandNoSpace):
    """The volume group has too few free extents, or too few physical volumes for the
    layout asked for, or the thin pool is past its threshold: RESOURCE_EXHAUSTED, so the
    scheduler tries the next backend."""


class VolumeGroupNotFound(CommandNotFound):
    """The volume group does not exist on this host (or LVM's filter hides its disks)."""


class VolumeNotFound(CommandNotFound):
    """The logical volume (or the origin or thin pool a command names) does not exist."""


class VolumeExists(AlreadyExists, CommandFailed):
    """A logical volume of that name is already in the volume group."""


class VolumeBusy(CommandBusy):
    """The logical volume is open (mounted, mapped by another device) or in a state that
    forbids the operation now."""


class SizeUnchanged(CommandFailed):
    """lvextend was asked for a size the volume already has or exceeds; ``Lvm.extend``
    takes that as done."""


class NoDeviceMapper(CommandRefused):
    """The command needs the kernel's device-mapper, which this host lacks or which the
    LVM configuration turned off (``global/activation=0``)."""


# LVM's messages -> the class that says what they mean. Checked in order; the first match wins.
_CLASSES: tuple[tuple[type[CommandFailed], tuple[str, ...]], ...] = (
    (VolumeExists, (r"already exists in volume group",)),
    (
        NoSpace,
        (
            r"insufficient free space",  # "Volume group ... has insufficient free space", "Insufficient free space: ..."
            r"insufficient suitable \w*\s*allocatable extents",
            r"no free extents",
            r"not enough space for thin pool",
            r"not enough pvs with free space",
            r"insufficient number of devices",
            r"number of stripes \(\d+\) must not exceed number of physical volumes",
            r"free space in thin pool \S+ reached threshold",
            r"is above threshold, new volumes are not allowed",
            r"threshold configured for free \w+ space in thin pool",
            r"is out of (data|metadata) space",
        ),
    ),
    (VolumeGroupNotFound, (r'volume group "[^"]*" not found',)),
    (
        VolumeNotFound,
        (
            r"failed to find logical volume",
            r"logical volume \S+ not found",
            r"not found in volume group",  # the origin of a snapshot, a thin pool
        ),
    ),
    (
        VolumeBusy,
        (
            r"contains a filesystem in use",
            r"logical volume \S+ in use",
            r"is used by another device",
            r"is already in use",
            r"open logical volume",
            r"unable to deactivate open",
            r"can be resized only while inactive",
        ),
    ),
    (SizeUnchanged, (r"matches existing size", r"not larger than existing size")),
    (
        NoDeviceMapper,
        (r"failure to communicate with kernel device-mapper", r"without using device-mapper kernel driver"),
    ),
)
_COMPILED = tuple((cls, tuple(re.compile(p, re.IGNORECASE) for p in patterns)) for cls, patterns in _CLASSES)


def classify(error: CommandFailed) -> CommandFailed:
    """The error that says what an LVM command's failure means: an instance of a class
    above, or ``error`` itself when LVM's message is none of theirs."""
    for cls, patterns in _COMPILED:
        if any(pattern.search(error.stderr) for pattern in patterns):
            return cls(error.argv, error.returncode, error.stderr)
    return error
