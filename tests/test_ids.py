from __future__ import annotations

import pytest

from csi import ids
from csi.errors import NotFound

pytestmark = pytest.mark.unit


def test_round_trip() -> None:
    text = ids.encode("ceph-a", "pool/6f1c")
    assert text == "1:ceph-a:pool/6f1c"
    assert ids.decode(text) == ids.ObjectId("ceph-a", "pool/6f1c")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "vol-1",
        "2:local:x",
        "1:Local:x",
        "1:local:",
        "1::x",
        "1:local:has space",
        "1:-bad:x",
        "1:local:" + "x" * 130,
    ],
)
def test_garbage_names_no_object(garbage: str) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        ids.decode(garbage, "snapshot")


def test_ids_are_at_most_128_bytes() -> None:
    ids.encode("local", "x" * (128 - len("1:local:")))
    with pytest.raises(ValueError, match="longer than 128"):
        ids.encode("local", "x" * (129 - len("1:local:")))


def test_backend_names_are_checked() -> None:
    with pytest.raises(ValueError):
        ids.encode("Bad_Name", "x")


def test_a_node_local_id_carries_its_node_within_128_bytes() -> None:
    longest_backend = "b" * 32
    rest = "vol-12345678-1234-5678-1234-567812345678"
    short = ids.with_node(longest_backend, "worker-1", rest)
    assert ids.split_node(short) == ("worker-1", rest)
    assert ids.decode(ids.encode(longest_backend, short)).local_id == short
    long_name = "node-" + "x" * 240 + ".example.com"
    keyed = ids.with_node(longest_backend, long_name, rest)
    key, back = ids.split_node(keyed)
    assert back == rest and key == ids.node_key(long_name, 0) and key.startswith("h-")
    assert len(ids.encode(longest_backend, keyed).encode()) <= ids.MAX_ID_BYTES
    assert ids.with_node(longest_backend, long_name, rest) == keyed  # stable
    assert ids.split_node(rest) == (None, rest)
