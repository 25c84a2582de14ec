"""``mount.frozen`` on a real ext4 filesystem: a freeze is held by a guard process and
recorded in a journal, so it ends however its holder ends, and only what Cairn froze is
ever thawed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import mount
from csi.errors import Aborted, DeadlineExceeded, FailedPrecondition
from tests.support import descendants, require_root, require_tools

pytestmark = pytest.mark.integration


class Filesystem:
    def __init__(self, root: Path) -> None:
        self.image = root / "fs.img"
        self.target = str(root / "mnt")
        self.journal = str(root / "frozen")
        with open(self.image, "wb") as handle:
            handle.truncate(32 << 20)
        self.device = subprocess.run(
            ["losetup", "--find", "--show", str(self.image)], capture_output=True, text=True, check=True
        ).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", self.device], check=True)
        os.makedirs(self.target)
        subprocess.run(["mount", self.device, self.target], check=True)

    def frozen(self) -> bool:
        """Freezing a frozen filesystem fails with EBUSY; a probe that froze it thaws it."""
        probe = subprocess.run(["fsfreeze", "--freeze", self.target], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            subprocess.run(["fsfreeze", "--unfreeze", self.target], check=True)
            return False
        assert "busy" in probe.stderr.lower(), probe.stderr
        return True

    def records(self) -> list[dict[str, object]]:
        if not os.path.isdir(self.journal):
            return []
        return [json.loads((Path(self.journal) / name).read_text()) for name in sorted(os.listdir(self.journal))]

    def record(self, **fields: object) -> None:
        """A record as a dead process's freeze leaves it."""
        os.makedirs(self.journal, exist_ok=True)
        done = subprocess.Popen(["true"])
        done.wait()
        entry = {"target": self.target, "device": self.device, "guard": done.pid, "guard_started": "1", **fields}
        entry.setdefault("boot", Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        (Path(self.journal) / "stale.json").write_text(json.dumps(entry))

    def close(self) -> None:
        subprocess.run(["fsfreeze", "--unfreeze", self.target], capture_output=True, check=False)
        subprocess.run(["umount", self.target], check=False)
        subprocess.run(["losetup", "--detach", self.device], check=False)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Filesystem]:
    require_root()
    require_tools("losetup", "mkfs.ext4", "fsfreeze", "timeout")
    filesystem = Filesystem(tmp_path)
    try:
        yield filesystem
    finally:
        filesystem.close()


def test_a_freeze_holds_for_the_block_and_is_recorded_until_thawed(fs: Filesystem) -> None:
    with mount.frozen([fs.device], fs.journal, limit=60):
        assert fs.frozen()
        assert [(r["target"], r["device"]) for r in fs.records()] == [(fs.target, fs.device)]
    assert not fs.frozen()
    assert fs.records() == []


def test_a_filesystem_someone_else_froze_is_refused_and_left_frozen(fs: Filesystem) -> None:
    subprocess.run(["fsfreeze", "--freeze", fs.target], check=True)
    with pytest.raises(FailedPrecondition, match="frozen, and not by Cairn"), mount.frozen([fs.device], fs.journal, 60):
        pass
    mount.thaw_recorded(fs.journal)
    assert fs.frozen(), "an admin's freeze was thawed"
    assert fs.records() == []


def test_a_second_copy_of_a_frozen_filesystem_is_aborted(fs: Filesystem) -> None:
    with mount.frozen([fs.device], fs.journal, limit=60):
        with pytest.raises(Aborted), mount.frozen([fs.device], fs.journal, limit=60):
            pass
        assert fs.frozen(), "the refused copy thawed the first one's freeze"
    assert not fs.frozen()


def test_a_record_from_before_a_reboot_thaws_nothing(fs: Filesystem) -> None:
    subprocess.run(["fsfreeze", "--freeze", fs.target], check=True)  # someone's, after the reboot
    fs.record(boot="another-boot")
    mount.thaw_recorded(fs.journal)
    assert fs.frozen()
    assert fs.records() == []


def guards() -> list[int]:
    """This process's freeze guards (its children running the guard script; a fork of
    one about to run a command of its own is not another)."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"cairn-freeze" in argv and parent == os.getpid():
            found.append(pid)
    return found


def test_a_guard_killed_during_the_copy_is_made_good_at_release(fs: Filesystem) -> None:
    with mount.frozen([fs.device], fs.journal, limit=60):
        (guard,) = guards()
        os.kill(guard, signal.SIGKILL)
        time.sleep(0.1)
        assert fs.frozen(), "the freeze must outlive its guard until the copy ends"
    assert not fs.frozen()
    assert fs.records() == []


def test_the_guard_thaws_by_itself_after_the_hold_limit(fs: Filesystem) -> None:
    with pytest.raises(DeadlineExceeded, match="may be torn"), mount.frozen([fs.device], fs.journal, limit=0.5):
        deadline = time.monotonic() + 10
        while fs.frozen() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not fs.frozen()
    assert fs.records() == []


HOLDER = """
import sys, time
from csi import mount
with mount.frozen([sys.argv[1]], sys.argv[2], limit=600):
    print("frozen", flush=True)
    time.sleep(600)
"""


def hold(fs: Filesystem, children: bool) -> list[int]:
    """Freeze ``fs`` in another process, then SIGKILL that process (with its guard when
    ``children``); returns the pids of what it leaves running."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, fs.device, fs.journal], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline() == "frozen\n"
    orphans = descendants(holder.pid)
    victims = [holder.pid, *(orphans if children else [])]
    for how in (signal.SIGSTOP, signal.SIGKILL):  # all at once, as a container's end: none sees another go
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, how)
    holder.wait()
    return [] if children else orphans


def test_what_a_killed_process_and_guard_left_frozen_is_thawed_at_start_or_by_the_next_freeze(
    fs: Filesystem,
) -> None:
    hold(fs, children=True)
    assert fs.frozen() and len(fs.records()) == 1
    mount.thaw_recorded(fs.journal)
    assert not fs.frozen()
    assert fs.records() == []

    hold(fs, children=True)
    with mount.frozen([fs.device], fs.journal, limit=60):
        assert fs.frozen()
    assert not fs.frozen()
    assert fs.records() == []


def test_a_holder_killed_alone_thaws_at_once_and_its_record_is_settled_later(fs: Filesystem) -> None:
    orphans = hold(fs, children=False)
    deadline = time.monotonic() + 5
    while fs.frozen() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fs.frozen(), "still frozen 5 s after its holder died"
    while any(Path(f"/proc/{pid}").exists() for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(fs.records()) == 1, "the record stays until a start or the next freeze settles it"
    mount.thaw_recorded(fs.journal)
    assert fs.records() == []
