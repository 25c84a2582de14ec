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

import hashlib
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


# A node-local backend names the node that holds a volume in its local ID, so every call
# routes to that node without a lookup: ``<node key>@<rest>``. Node names may be long (a
# DNS subdomain, up to 253 bytes) and IDs may not: a name that does not fit the room left
# becomes a digest key, which the backend resolves against the nodes it knows.
NODE_SEPARATOR = "@"
_NODE_KEY = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def local_id_room(backend: str) -> int:
    """Bytes a local ID of ``backend`` may take within MAX_ID_BYTES."""
    return MAX_ID_BYTES - len(f"{VERSION}:{backend}:".encode())


def node_key(node: str, room: int) -> str:
    """``node`` itself when it fits ``room`` bytes and the ID alphabet, else a stable
    digest key (``h-`` and 16 hex digits)."""
    if len(node.encode()) <= room and _NODE_KEY.match(node):
        return node
    return "h-" + hashlib.sha256(node.encode()).hexdigest()[:16]


def with_node(backend: str, node: str, rest: str) -> str:
    """A local ID of ``backend`` that carries the node holding the object."""
    room = local_id_room(backend) - len(rest.encode()) - len(NODE_SEPARATOR)
    if room < 18:
        raise ValueError(f"local ID {rest!r} leaves no room for a node key in an ID of backend {backend!r}")
    return f"{node_key(node, room)}{NODE_SEPARATOR}{rest}"


def split_node(local_id: str) -> tuple[str | None, str]:
    """(node key, rest) of a local ID made by ``with_node``; (None, local_id) otherwise."""
    key, separator, rest = local_id.partition(NODE_SEPARATOR)
    if separator and _NODE_KEY.match(key):
        return key, rest
    return None, local_id
