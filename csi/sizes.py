"""Volume sizes: the default, rounding to whole MiB, and fitting a CSI capacity range."""

from __future__ import annotations

from csi.errors import OutOfRange
from csi.model import GiB, MiB

DEFAULT_VOLUME_BYTES = 1 * GiB
# Sizes travel as int64 in CSI; nothing larger can be answered.
MAX_BYTES = (1 << 63) - 1


def round_up(size: int, unit: int = MiB) -> int:
    return -(-size // unit) * unit


def choose_size(required: int, limit: int, minimum: int = 0) -> int:
    """The size for a capacity range: the required size (or the default when none is
    given, capped by the limit), at least ``minimum`` (a content source's size), rounded
    up to whole MiB; OutOfRange when that exceeds the limit."""
    size = round_up(max(required or min(DEFAULT_VOLUME_BYTES, limit or DEFAULT_VOLUME_BYTES), minimum, 1))
    if limit and size > limit:
        raise OutOfRange(f"no size of whole MiB fits the range {required}..{limit} bytes (needs at least {size})")
    if size > MAX_BYTES:
        raise OutOfRange(f"{required} bytes rounded to whole MiB exceeds the largest size CSI can carry")
    return size
