"""Volume and snapshot ID codec.

An ID says where the object lives, so every RPC routes without a lookup::

    1:<backend>:<local-id>

``1`` is the format version, ``backend`` the configured backend name and ``local-id``
the backend's own identity for the object. IDs are at most 128 bytes (the limit
Kubernetes and the CSI spec recommend). A string that does not parse names no object
Cairn ever made, so decoding raises NotFound, which is what the spec asks of an RPC given
an ID that does not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from csi.config import BACKEND_NAME
from csi.errors import NotFound

VERSION = "1"
MAX_ID_BYTES = 128
_LOCAL_ID = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True)
class ObjectId:
    backend: str
    local_id: str

    def __str__(self) -> str:
        return encode(self.backend, self.local_id)


def encode(backend: str, local_id: str) -> str:
    if not BACKEND_NAME.match(backend):
        raise ValueError(f"invalid backend name {backend!r}")
    if not _LOCAL_ID.match(local_id):
        raise ValueError(f"invalid local ID {local_id!r}")
    text = f"{VERSION}:{backend}:{local_id}"
    if len(text.encode()) > MAX_ID_BYTES:
        raise ValueError(f"ID {text!r} is longer than {MAX_ID_BYTES} bytes")
    return text


def decode(text: str, what: str = "volume") -> ObjectId:
    """Parse an ID; raise NotFound naming the ``what`` when it is not one of ours."""
    parts = text.split(":", 2)
    if (
        len(text.encode()) > MAX_ID_BYTES
        or len(parts) != 3
        or parts[0] != VERSION
        or not BACKEND_NAME.match(parts[1])
        or not _LOCAL_ID.match(parts[2])
    ):
        raise NotFound(f"{what} {text!r} does not exist (not a Cairn {what} ID)")
    return ObjectId(parts[1], parts[2])
