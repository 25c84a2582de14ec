"""Where the local backend keeps things, and the crash-safe file operations it uses.

    <path>/volumes/vol-<uuid>.img     the volume: a sparse image file
    <path>/volumes/vol-<uuid>.json    its record: request name, source, publications
    <path>/snapshots/snap-<uuid>.img  a point-in-time copy of a volume's image
    <path>/snapshots/snap-<uuid>.json its record: name, source volume, creation time
    <path>/frozen/<hash>.json         a filesystem frozen for a copy in progress (see
                                      ``mount.frozen``); thawed and removed at start-up
                                      if the copy never ended

The UUID is derived from the request name (UUIDv5), so the ID of a volume is known
before anything is written; that is what makes CreateVolume idempotent without a
journal. An object exists when its record *and* its image exist. Creation writes the
image under a temporary name, then the record, then renames the image into place; so a
crash leaves either a temporary file or a record without an image, and ``recover`` (run
at start-up, when nothing is in flight) removes both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from csi.errors import NotFound
from csi.files import TEMP_SUFFIX, fsync_dir, write_atomically

log = logging.getLogger(__name__)

Kind = Literal["volume", "snapshot"]
_PREFIX = {"volume": "vol", "snapshot": "snap"}
_FOLDER = {"volume": "volumes", "snapshot": "snapshots"}
_FREEZE_JOURNAL = "frozen"
_NAMESPACE = {kind: uuid.uuid5(uuid.NAMESPACE_URL, f"https://cairn.csi.io/local/{kind}") for kind in _PREFIX}
_LOCAL_ID = {
    kind: re.compile(rf"^{prefix}-[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$")
    for kind, prefix in _PREFIX.items()
}


class Layout:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    @classmethod
    def containing(cls, image: str) -> Layout:
        """The layout an image (or its temporary copy) belongs to."""
        return cls(os.path.dirname(os.path.dirname(os.path.abspath(image))))

    @property
    def freeze_journal(self) -> str:
        return os.path.join(self.root, _FREEZE_JOURNAL)

    def ensure(self) -> None:
        for folder in (*_FOLDER.values(), _FREEZE_JOURNAL):
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)

    @staticmethod
    def local_id(kind: Kind, name: str) -> str:
        return f"{_PREFIX[kind]}-{uuid.uuid5(_NAMESPACE[kind], name)}"

    @staticmethod
    def check_id(kind: Kind, local_id: str) -> None:
        """Refuse anything that is not an ID this backend issues (and so never builds a
        path from a string a client made up)."""
        if not _LOCAL_ID[kind].match(local_id):
            raise NotFound(f"{kind} {local_id!r} does not exist")

    def image(self, kind: Kind, local_id: str) -> str:
        self.check_id(kind, local_id)
        return os.path.join(self.root, _FOLDER[kind], f"{local_id}.img")

    def record_path(self, kind: Kind, local_id: str) -> str:
        self.check_id(kind, local_id)
        return os.path.join(self.root, _FOLDER[kind], f"{local_id}.json")

    def exists(self, kind: Kind, local_id: str) -> bool:
        return os.path.exists(self.image(kind, local_id)) and os.path.exists(self.record_path(kind, local_id))

    def read_record(self, kind: Kind, local_id: str) -> dict[str, Any] | None:
        """The record of a complete object, or None."""
        if not self.exists(kind, local_id):
            return None
        try:
            with open(self.record_path(kind, local_id), encoding="utf-8") as handle:
                record: dict[str, Any] = json.load(handle)
        except FileNotFoundError:
            return None  # deleted since the check
        return record

    def require_record(self, kind: Kind, local_id: str) -> dict[str, Any]:
        """The record of a complete object, or NotFound naming it."""
        record = self.read_record(kind, local_id)
        if record is None:
            raise NotFound(f"{kind} {local_id!r} does not exist")
        return record

    def write_record(self, kind: Kind, local_id: str, record: dict[str, Any]) -> None:
        path = self.record_path(kind, local_id)
        write_atomically(path, json.dumps(record, sort_keys=True).encode())

    def ids(self, kind: Kind) -> Iterator[str]:
        """Local IDs of complete objects, sorted."""
        folder = os.path.join(self.root, _FOLDER[kind])
        for entry in sorted(os.listdir(folder)):
            local_id = entry.removesuffix(".json")
            if entry.endswith(".json") and _LOCAL_ID[kind].match(local_id) and self.exists(kind, local_id):
                yield local_id

    def remove(self, kind: Kind, local_id: str) -> None:
        """Remove image, temporary image and record; what is missing is fine. The record
        goes last so an interrupted removal is finished by the next call or recovery."""
        image = self.image(kind, local_id)
        for path in (image, image + TEMP_SUFFIX, self.record_path(kind, local_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fsync_dir(os.path.dirname(image))

    def recover(self) -> None:
        """Remove what crashed creations left: temporary images and records whose image
        never landed. Only safe when no operation is in flight (start-up)."""
        for kind, folder in _FOLDER.items():
            directory = os.path.join(self.root, folder)
            for entry in sorted(os.listdir(directory)):
                path = os.path.join(directory, entry)
                orphan_record = entry.endswith(".json") and not os.path.exists(path.removesuffix(".json") + ".img")
                if entry.endswith(TEMP_SUFFIX) or orphan_record:
                    log.warning("removing what an interrupted %s creation left", kind, extra={"path": path})
                    os.unlink(path)
