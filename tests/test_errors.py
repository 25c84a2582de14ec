"""Host-tool failures are classified where they happen: what a tool printed decides the
gRPC code a client sees, and every classified error is still a CommandFailed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from csi import mount, proc, status
from csi.errors import CommandFailed, command_failed
from tests.support import require_root

CASES = [
    ("cp: error writing 'x': No space left on device", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("umount: /mnt: target is busy.", grpc.StatusCode.FAILED_PRECONDITION),
    ("losetup: /dev/loop9: failed to set up loop device: Device or resource busy", grpc.StatusCode.FAILED_PRECONDITION),
    ("mount: /mnt: permission denied.", grpc.StatusCode.FAILED_PRECONDITION),
    ("resize2fs: Operation not permitted While trying to add group #2", grpc.StatusCode.FAILED_PRECONDITION),
    ("cp: cannot stat 'a.img': No such file or directory", grpc.StatusCode.NOT_FOUND),
    ("mkfs.ext4: invalid block size - 3", grpc.StatusCode.INTERNAL),
]


@pytest.mark.unit
@pytest.mark.parametrize(("stderr", "code"), CASES)
def test_what_a_tool_printed_decides_the_code(stderr: str, code: grpc.StatusCode) -> None:
    error = command_failed(["tool", "arg"], 1, stderr)
    assert isinstance(error, CommandFailed)
    assert status.to_status(error)[0] is code
    assert stderr in str(error)


@pytest.mark.unit
def test_the_runner_classifies(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed) as caught:
        proc.run(["cp", str(tmp_path / "missing"), str(tmp_path / "copy")])
    assert status.to_status(caught.value)[0] is grpc.StatusCode.NOT_FOUND


@pytest.mark.integration
def test_a_busy_mount_names_what_holds_it(tmp_path: Path) -> None:
    require_root()
    outer, inner = tmp_path / "outer", tmp_path / "outer" / "inner"
    outer.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(outer)], check=True)
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
    try:
        with pytest.raises(CommandFailed) as caught:
            mount.unmount(str(outer))
        code, message = status.to_status(caught.value)
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert f"mounts inside it: {inner}" in message
    finally:
        subprocess.run(["umount", str(inner)], check=True)
        subprocess.run(["umount", str(outer)], check=True)
