"""What the node plugin remembers about each staged volume.

NodeUnstage and NodeExpand carry only a volume ID and a path, and the node plugin may
have restarted since NodeStage; so NodeStage records the device it attached, the
filesystem it mounted and the targets published from it, one small JSON file per volume
under the node's state directory (a hostPath that outlives the plugin's container)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from csi.files import write_atomically
from csi.model import AccessMode, AccessType


@dataclass
class StagedVolume:
    volume_id: str
    staging_path: str
    device: str
    access_type: AccessType
    access_mode: AccessMode
    filesystem: str = ""
    mount_flags: tuple[str, ...] = ()
    shared_source: bool = False
    """The volume is a filesystem mounted as it is (``device`` then holds its source)."""
    targets: dict[str, bool] = field(default_factory=dict)
    """Published target path -> read-only."""

    def to_json(self) -> bytes:
        data = asdict(self)
        data["access_type"] = self.access_type.value
        data["access_mode"] = self.access_mode.value
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StagedVolume:
        data = json.loads(raw)
        data["access_type"] = AccessType(data["access_type"])
        data["access_mode"] = AccessMode(data["access_mode"])
        data["mount_flags"] = tuple(data.get("mount_flags", ()))  # records from before it was kept
        return cls(**data)


class NodeState:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def _path(self, volume_id: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(volume_id.encode()).hexdigest()[:40] + ".json")

    def load(self, volume_id: str) -> StagedVolume | None:
        try:
            with open(self._path(volume_id), "rb") as handle:
                return StagedVolume.from_json(handle.read())
        except FileNotFoundError:
            return None

    def save(self, staged: StagedVolume) -> None:
        write_atomically(self._path(staged.volume_id), staged.to_json())

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))
