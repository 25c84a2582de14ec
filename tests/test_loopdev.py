"""Loop devices are found again from their backing file, whoever attached them and
through whichever mount."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from csi import loopdev
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration


def test_a_device_attached_through_a_mount_that_is_gone_is_found_and_detached(tmp_path: Path) -> None:
    """A node plugin container attaches an image through its own mount of the backend's
    directory; once that container is replaced (an upgrade), losetup shows the backing
    file relative to the vanished mount. The new plugin must still find the device, or
    unstaging leaves it attached, holding a deleted image's space."""
    require_root()
    require_tools("losetup", "unshare", "mount")
    data, view = tmp_path / "data", tmp_path / "view"
    data.mkdir()
    view.mkdir()
    image = data / "vol.img"
    image.write_bytes(b"")
    with image.open("r+b") as handle:
        handle.truncate(16 << 20)
    attached = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {data} {view} && losetup --find --show {view}/vol.img"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        shown = loopdev.attached()[attached]
        assert shown != str(image), f"losetup shows {shown}: the namespace's mount should be gone"
        assert loopdev.find(str(image)) == [attached]
        loopdev.detach(str(image))
        assert attached not in loopdev.attached()
    finally:
        subprocess.run(["losetup", "--detach", attached], capture_output=True, check=False)
