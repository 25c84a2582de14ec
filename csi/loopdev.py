"""Loop devices: expose a file as a block device. Used by the local backend, and by any
connector that reaches an image as a file (rbd-fuse). The device is found again from its
backing file, so no state needs recording and a restarted driver finds what it attached."""

from __future__ import annotations

import contextlib
import json
import os
import time

from csi import mount, proc
from csi.errors import CommandFailed, FailedPrecondition

DETACH_WAIT = 5.0
"""How long ``detach`` waits for the kernel to let go of a device that was still open."""


def attached() -> dict[str, str]:
    """Map of loop device -> backing file for every attached loop device."""
    result = proc.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    if not result.stdout.strip():
        return {}
    devices = json.loads(result.stdout).get("loopdevices", [])
    return {d["name"]: (d.get("back-file") or "").removesuffix(" (deleted)") for d in devices}


def find(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``, in device order. A device is matched
    by the file's inode and filesystem, not only by the path losetup shows: that path is
    the one the attaching process saw, and when it attached through a mount that is gone
    (a node plugin container replaced by an upgrade or a restart) the path shown is
    relative to that mount, so a match by path alone would leave the device attached for
    ever. A file that no longer exists is matched by its path."""
    path = os.path.realpath(path)
    try:
        info = os.stat(path)
        identity: tuple[int, str] | None = (info.st_ino, f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}")
    except OSError:
        identity = None
    result = proc.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN"])
    if not result.stdout.strip():
        return []
    found = []
    for device in json.loads(result.stdout).get("loopdevices", []):
        back = (device.get("back-file") or "").removesuffix(" (deleted)")
        same = identity is not None and (
            str(device.get("back-ino") or "").strip() == str(identity[0])
            and str(device.get("back-maj:min") or "").strip() == identity[1]
        )
        if back == path or same:
            found.append(str(device["name"]))
    return sorted(found)


def attach(path: str, read_only: bool = False) -> str:
    """The loop device backed by ``path``, attaching one (read-only if asked) when there
    is none."""
    existing = find(path)
    if existing:
        return existing[0]
    ro = ["--read-only"] if read_only else []
    return proc.run(["losetup", "--find", "--show", *ro, os.path.realpath(path)]).stdout.strip()


def detach(path: str, wait: float = DETACH_WAIT) -> None:
    """Detach every loop device backed by ``path``; none attached is fine.

    The kernel detaches a device only once nothing holds it open: ``losetup --detach`` of
    a device still in use succeeds, yet only marks the device to detach itself at its last
    close. What holds it may let go in a moment (a probe of the device), or not for long
    (a copy of its mount in another mount namespace, a container started while it was
    mounted). So this returns only once each device has let go of ``path``, waiting up to
    ``wait`` seconds, and otherwise raises FailedPrecondition naming what holds it where
    that can be seen: the device is not detached yet, and a retry finishes the job once it
    is released (the device stays marked, and detaches itself then)."""
    path = os.path.realpath(path)
    devices = find(path)
    for device in devices:
        try:
            proc.run(["losetup", "--detach", device])
        except CommandFailed:
            if device in find(path):
                raise  # otherwise it detached meanwhile: at its last close, or by another call
    deadline = time.monotonic() + wait
    while held := sorted(set(devices) & set(find(path))):
        if time.monotonic() >= deadline:
            raise FailedPrecondition(
                f"loop device {', '.join(held)} of {path} is still in use {wait:g}s after it was detached: "
                f"{_holders(held)}; it detaches once that lets go of it, and a retry then succeeds"
            )
        time.sleep(0.05)


def _holders(devices: list[str]) -> str:
    """What keeps ``devices`` open, as far as this host shows it."""
    found = [f"mounted at {m}" for device in devices for m in mount.mounts_elsewhere(device)]
    for device in devices:
        stacked = f"/sys/block/{os.path.basename(device)}/holders"
        with contextlib.suppress(OSError):
            found += [f"device {holder} is stacked on {device}" for holder in sorted(os.listdir(stacked))]
    if not found:
        return "held open by a process, or by a filesystem that was unmounted while frozen"
    return "; ".join(found)


def refresh_size(device: str) -> None:
    """Make the loop device see its backing file's current size."""
    proc.run(["losetup", "--set-capacity", device])
