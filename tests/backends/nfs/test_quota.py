"""Directory volume sizes enforced with project quotas, where the controller reaches the
exported filesystem itself (``exportRoot``): XFS and ext4, each on a loop device mounted
with project quotas. This host's kernel has no quota support; the vm tier runs these
tests in a guest with a stock kernel."""

from __future__ import annotations

import errno
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import quota
from csi.backends.nfs import controller_for
from csi.backends.nfs.common import NfsSettings
from csi.model import AccessMode, AccessType, Capability, MiB, VolumeSpec
from tests.support import require_root, require_tools

pytestmark = pytest.mark.integration
RWX = Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER)
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f"], "ext4": ["mkfs.ext4", "-q", "-F", "-O", "quota,project"]}


@pytest.fixture(params=["xfs", "ext4"])
def exported(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A filesystem with project quotas, mounted where an NFS server would export it."""
    require_root()
    require_tools("losetup", "xfs_quota", "chattr", "setquota", "quotaon", "setpriv")
    fstype = str(request.param)
    image = tmp_path / f"{fstype}.img"
    # Where a pod's user (uid 1000) can reach it: pytest's own folders are private.
    target = Path(tempfile.mkdtemp(prefix="cairn-quota-"))
    target.chmod(0o755)
    with open(image, "wb") as handle:
        handle.truncate(512 * MiB)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True)
    loop = device.stdout.strip()
    try:
        subprocess.run([*MKFS[fstype], loop], capture_output=True, check=True)
        mounted = subprocess.run(["mount", "-o", "prjquota", loop, str(target)], capture_output=True, text=True)
        if mounted.returncode != 0:
            # A kernel feature, not a package `make test` could install: the vm tier runs it.
            pytest.skip(f"this kernel cannot mount {fstype} with project quotas: {mounted.stderr.strip()}")
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        target.rmdir()


def fill(folder: Path, size: int) -> None:
    """Write ``size`` bytes into the folder as a pod's user would (uid 1000): ext4 lets
    root, with CAP_SYS_RESOURCE, exceed a quota."""
    result = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--inh-caps=-all",
         "dd", "if=/dev/urandom", f"of={folder / 'data'}", "bs=1M", f"count={size // MiB}", "conv=fsync"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if "Disk quota exceeded" in result.stderr:
        raise OSError(errno.EDQUOT, result.stderr.strip())
    if "No space left" in result.stderr:
        raise OSError(errno.ENOSPC, result.stderr.strip())
    assert result.returncode == 0, f"writing as uid 1000 failed otherwise: {result.stderr.strip()}"


def test_a_directory_volume_is_limited_to_its_size_and_grows(exported: Path) -> None:
    assert quota.enforced_at(str(exported)) is None
    settings = NfsSettings(backend="quota", server="127.0.0.1", share="/export", export_root=str(exported))
    volumes = controller_for(settings)
    assert volumes.quota_root == str(exported), "the controller must enforce sizes here"
    volume = volumes.create_volume(VolumeSpec("pv-limited", 16 * MiB, 0, (RWX,)))
    folder = exported / volume.context["subDir"]
    with pytest.raises(OSError) as refused:
        fill(folder, 24 * MiB)
    assert refused.value.errno in (errno.EDQUOT, errno.ENOSPC)
    (folder / "data").unlink()
    assert volumes.expand_volume(volume.local_id, 40 * MiB, 0) == 40 * MiB
    fill(folder, 24 * MiB)  # fits now
    volumes.delete_volume(volume.local_id)
    assert not folder.exists()
    assert volumes.list_volumes() == []


def test_a_filesystem_without_project_quotas_leaves_sizes_advisory() -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="cairn-advisory-"))
    tmp_path.chmod(0o755)
    try:
        settings = NfsSettings(backend="advisory", server="127.0.0.1", share="/export", export_root=str(tmp_path))
        if quota.enforced_at(str(tmp_path)) is None:
            pytest.skip(f"{tmp_path} has project quotas: nothing advisory to show")
        volumes = controller_for(settings)
        assert volumes.quota_root == ""
        volume = volumes.create_volume(VolumeSpec("pv-advisory", 8 * MiB, 0, (RWX,)))
        fill(tmp_path / volume.context["subDir"], 16 * MiB)  # more than its size: nothing enforces it
        volumes.delete_volume(volume.local_id)
    finally:
        shutil.rmtree(tmp_path)
