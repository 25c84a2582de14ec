"""Loop devices: expose a file as a block device. Used by the local backend, and by any
connector that reaches an image as a file (rbd-fuse). The device is found again from its
backing file, so no state needs recording and a restarted driver finds what it attached."""

from __future__ import annotations

import json
import os

from csi import proc


def attached() -> dict[str, str]:
    """Map of loop device -> backing file for every attached loop device."""
    result = proc.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    if not result.stdout.strip():
        return {}
    devices = json.loads(result.stdout).get("loopdevices", [])
    return {d["name"]: (d.get("back-file") or "").removesuffix(" (deleted)") for d in devices}


def find(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``, in device order."""
    path = os.path.realpath(path)
    return sorted(dev for dev, back in attached().items() if back == path)


def attach(path: str, read_only: bool = False) -> str:
    """The loop device backed by ``path``, attaching one (read-only if asked) when there
    is none."""
    existing = find(path)
    if existing:
        return existing[0]
    ro = ["--read-only"] if read_only else []
    return proc.run(["losetup", "--find", "--show", *ro, os.path.realpath(path)]).stdout.strip()


def detach(path: str) -> None:
    """Detach every loop device backed by ``path``; none attached is fine."""
    for device in find(path):
        proc.run(["losetup", "--detach", device])


def refresh_size(device: str) -> None:
    """Make the loop device see its backing file's current size."""
    proc.run(["losetup", "--set-capacity", device])
