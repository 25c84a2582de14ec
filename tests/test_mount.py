"""Bind mounts and local unmounts through the system calls: read-only and option
remounts keep what the bind had, failures are classified as the tools' would be, and a
busy mount names what holds it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import mount
from csi.errors import CommandBusy, CommandNotFound
from tests.support import require_root

pytestmark = pytest.mark.integration


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted nosuid,nodev (as /run is), so a bind of it starts with flags."""
    require_root()
    source = tmp_path / "source"
    source.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev,size=4m", "tmpfs", str(source)], check=True)
    try:
        yield source
    finally:
        subprocess.run(["umount", "--recursive", str(source)], check=False)


def options(target: Path) -> set[str]:
    entry = mount.find_mount(str(target))
    assert entry is not None, f"{target} is not mounted"
    return set(entry.options)


def test_a_read_only_bind_is_read_only_and_keeps_its_sources_flags(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "data").write_text("kept")
    target = tmp_path / "target"
    target.mkdir()
    mount.bind(str(tmpfs), str(target), readonly=True, options=["noexec"])
    try:
        assert {"ro", "nosuid", "nodev", "noexec"} <= options(target)
        assert (target / "data").read_text() == "kept"
        with pytest.raises(OSError, match="Read-only file system"):
            (target / "new").write_text("refused")
        assert "rw" in options(tmpfs), "the source stays writable"
    finally:
        mount.unmount(str(target))
    assert not mount.is_mounted(str(target))


def test_a_writable_bind_of_a_device_node(tmp_path: Path) -> None:
    require_root()
    target = tmp_path / "device"
    target.touch()
    mount.bind("/dev/null", str(target))
    try:
        entry = mount.find_mount(str(target))
        assert entry is not None and mount.source_of(entry) == "/dev/null" and "rw" in entry.options
    finally:
        mount.unmount(str(target))
    mount.unmount(str(target))  # not mounted: nothing to do


def test_an_option_the_table_does_not_know_goes_through_the_tool(tmpfs: Path, tmp_path: Path) -> None:
    """mount(8) takes options the table does not (here a user-space "x-" option, which
    it keeps for itself): the bind is made, with the read-only remount."""
    target = tmp_path / "target"
    target.mkdir()
    mount.bind(str(tmpfs), str(target), readonly=True, options=["x-cairn-test"])
    try:
        assert {"ro", "nosuid", "nodev"} <= options(target)
    finally:
        mount.unmount(str(target))


def test_a_remount_that_cannot_even_start_leaves_no_bind(tmpfs: Path, tmp_path: Path) -> None:
    """An option list mount(8) cannot be started with (longer than the kernel takes for
    one argument: E2BIG, not a failed command) still takes the bind away."""
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(OSError, match="Argument list too long"):
        mount.bind(str(tmpfs), str(target), readonly=True, options=["x" * (1 << 20)])
    assert mount.find_mount(str(target)) is None, "a writable bind was left behind"


def test_failures_are_classified_and_a_busy_unmount_names_its_holder(tmpfs: Path, tmp_path: Path) -> None:
    with pytest.raises(CommandNotFound, match="No such file or directory"):
        mount.bind(str(tmp_path / "missing"), str(tmpfs))
    target = tmp_path / "target"
    target.mkdir()
    mount.bind(str(tmpfs), str(target))
    holder, previous = os.open(target, os.O_RDONLY | os.O_DIRECTORY), os.getcwd()
    os.chdir(target)
    try:
        with pytest.raises(CommandBusy, match="a process has files open or works in it"):
            mount.unmount(str(target))
    finally:
        os.chdir(previous)
        os.close(holder)
    mount.unmount(str(target))
    assert not mount.is_mounted(str(target))
