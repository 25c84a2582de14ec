"""What both halves of the rbd backend share: settings, IDs, image names and credentials.

Nothing here imports librados or librbd: a node plugin maps images with the command-line
tools and never loads Ceph's Python modules.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from csi.errors import InvalidArgument, NotFound

Kind = Literal["volume", "snapshot"]
MAPPERS = ("krbd", "rbd-nbd", "rbd-fuse")
# librbd's image feature bits (RBD_FEATURE_*, part of its stable API; a test compares
# them with the Python module's), so settings are checked without loading librbd.
FEATURES = {"layering": 1, "exclusive-lock": 4, "object-map": 8, "fast-diff": 16, "deep-flatten": 32}
_LOCAL_ID = re.compile(
    r"^(?P<pool>[A-Za-z0-9_.-]+)/(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)


@dataclass(frozen=True)
class RbdSettings:
    monitors: tuple[str, ...]
    pool: str
    data_pool: str = ""
    image_features: str = "layering,exclusive-lock,object-map,fast-diff,deep-flatten"
    mapper: str = "krbd"
    max_clone_depth: int = 8
    fuse_dir: str = "/var/lib/cairn-csi/rbd-fuse"
    credentials_dir: str = ""
    map_options: str = ""


def split_id(local_id: str, kind: Kind) -> tuple[str, str]:
    match = _LOCAL_ID.match(local_id)
    if not match:
        raise NotFound(f"{kind} {local_id!r} does not exist")
    return match["pool"], match["uuid"]


def parse_features(text: str) -> int:
    mask = 0
    for feature in filter(None, (f.strip() for f in text.split(","))):
        if feature not in FEATURES:
            raise InvalidArgument(f"image feature {feature!r} is not supported (supported: {', '.join(FEATURES)})")
        mask |= FEATURES[feature]
    if not mask & FEATURES["layering"]:
        raise InvalidArgument("image features must include 'layering': snapshots and clones need it")
    return mask


def image_name(kind: Kind, image_uuid: str) -> str:
    return f"cairn-{'vol' if kind == 'volume' else 'snap'}-{image_uuid}"


USER_ID, USER_KEY = "userID", "userKey"


@dataclass(frozen=True)
class Credentials:
    user: str
    key: str = ""

    @classmethod
    def from_secrets(cls, secrets: Mapping[str, str]) -> Credentials | None:
        user, key = secrets.get(USER_ID, ""), secrets.get(USER_KEY, "")
        if not user and not key:
            return None
        if not user or not key:
            raise InvalidArgument(f"the secret must hold both {USER_ID!r} and {USER_KEY!r}")
        if "\0" in user or "\0" in key or len(user) > 256 or len(key) > 1024:
            raise InvalidArgument(f"the secret's {USER_ID!r} or {USER_KEY!r} is not a Ceph user and key")
        return cls(user, key)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.user}\0{self.key}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:  # never print the key
        return f"Credentials(user={self.user!r})"
