"""Facts about the filesystems Cairn formats, shared by the controller (sizes, parameter
checks) and the node (mkfs and mount)."""

from __future__ import annotations

from csi.errors import InvalidArgument
from csi.model import Filesystem

# The smallest device each filesystem's mkfs accepts (mkfs.xfs: "must be larger than 300MB").
MINIMUM_BYTES = {Filesystem.EXT4: 0, Filesystem.XFS: 300 << 20}


def parse_filesystem(name: str) -> Filesystem:
    try:
        return Filesystem(name)
    except ValueError:
        supported = ", ".join(f.value for f in Filesystem)
        raise InvalidArgument(f"filesystem {name!r} is not supported (supported: {supported})") from None
