"""The local backend's controller half on real files: idempotency, conflicts, crash
recovery, snapshots and clones, expansion and publication."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.backends.local import CAPABILITIES
from csi.backends.local.controller import LocalVolumes
from csi.backends.local.layout import Layout
from csi.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, OutOfRange, ResourceExhausted
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, VolumeSpec
from tests.support import require_root

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def spec(name: str, size: int = 8 * MiB, limit: int = 0, source: SourceRef | None = None, **params: str) -> VolumeSpec:
    return VolumeSpec(
        name=name, required_bytes=size, limit_bytes=limit, capabilities=(RWO,), parameters=params, source=source
    )


@pytest.fixture
def volumes(tmp_path: Path) -> LocalVolumes:
    return LocalVolumes(str(tmp_path / "local"), "node-a")


def files(backend: LocalVolumes) -> list[str]:
    """The backend's objects' files (its journal aside)."""
    root = Path(backend.layout.root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "journal")


def test_create_is_idempotent_on_name(volumes: LocalVolumes) -> None:
    first = volumes.create_volume(spec("pvc-1"))
    again = volumes.create_volume(spec("pvc-1"))
    assert first == again
    assert first.capacity_bytes == 8 * MiB
    assert len(volumes.list_volumes()) == 1
    image = Path(volumes.layout.image("volume", first.local_id))
    assert image.stat().st_blocks == 0, "a new volume must be sparse"


def test_same_name_other_size_or_source_is_already_exists(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("pvc-1"))
    with pytest.raises(AlreadyExists, match="'pvc-1' exists with 8388608 bytes"):
        volumes.create_volume(spec("pvc-1", size=16 * MiB))
    snap = volumes.create_snapshot("snap-1", vol.local_id, {})
    with pytest.raises(AlreadyExists, match="another content source"):
        volumes.create_volume(spec("pvc-1", source=SourceRef("snapshot", snap.local_id)))


def test_preallocate_allocates_every_block(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("thick", preallocate="true"))
    image = Path(volumes.layout.image("volume", vol.local_id))
    assert image.stat().st_blocks * 512 >= 8 * MiB


def test_delete_is_idempotent_and_leaves_nothing(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("pvc-1"))
    volumes.delete_volume(vol.local_id)
    volumes.delete_volume(vol.local_id)
    assert files(volumes) == []
    with pytest.raises(NotFound):
        volumes.get_volume(vol.local_id)


def test_snapshot_survives_its_source_and_restores_its_content(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("pvc-1"))
    image = volumes.layout.image("volume", vol.local_id)
    with open(image, "r+b") as handle:
        handle.seek(3 * MiB)
        handle.write(b"precious")
    snap = volumes.create_snapshot("snap-1", vol.local_id, {})
    assert volumes.create_snapshot("snap-1", vol.local_id, {}) == snap
    volumes.delete_volume(vol.local_id)
    restored = volumes.create_volume(spec("pvc-2", size=16 * MiB, source=SourceRef("snapshot", snap.local_id)))
    assert restored.capacity_bytes == 16 * MiB
    with open(volumes.layout.image("volume", restored.local_id), "rb") as handle:
        handle.seek(3 * MiB)
        assert handle.read(8) == b"precious"


def test_snapshot_name_reused_for_another_volume_is_already_exists(volumes: LocalVolumes) -> None:
    a = volumes.create_volume(spec("a"))
    b = volumes.create_volume(spec("b"))
    volumes.create_snapshot("snap", a.local_id, {})
    with pytest.raises(AlreadyExists):
        volumes.create_snapshot("snap", b.local_id, {})


def test_clone_must_not_be_smaller_than_its_source(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("big", size=16 * MiB))
    clone = volumes.create_volume(spec("clone", size=MiB, source=SourceRef("volume", vol.local_id)))
    assert clone.capacity_bytes == 16 * MiB
    with pytest.raises(OutOfRange):
        volumes.create_volume(spec("clone2", size=MiB, limit=2 * MiB, source=SourceRef("volume", vol.local_id)))


def test_missing_source_is_not_found(volumes: LocalVolumes) -> None:
    missing = Layout.local_id("snapshot", "never-made")
    with pytest.raises(NotFound, match="source snapshot"):
        volumes.create_volume(spec("pvc", source=SourceRef("snapshot", missing)))
    assert files(volumes) == []


def test_crash_leftovers_are_cleaned_at_start_and_retry_finishes(tmp_path: Path) -> None:
    root = str(tmp_path / "local")
    backend = LocalVolumes(root, "node-a")
    local_id = Layout.local_id("volume", "pvc-crash")
    # A creation that died after writing the temporary image and the record, before
    # renaming the image into place:
    image = backend.layout.image("volume", local_id)
    Path(image + ".tmp").write_bytes(b"")
    record: dict[str, object] = {"name": "pvc-crash", "source": None, "parameters": {}, "published": {}, "created": 0}
    Path(backend.layout.record_path("volume", local_id)).write_text(json.dumps(record))
    assert backend.lookup_volume("pvc-crash") is None, "an unfinished volume must not be visible"
    retried = backend.create_volume(spec("pvc-crash"))
    assert retried.local_id == local_id
    assert files(backend) == [f"volumes/{local_id}.img", f"volumes/{local_id}.json"]
    # The same crash, abandoned: the next start removes both pieces.
    other = Layout.local_id("volume", "pvc-abandoned")
    Path(backend.layout.image("volume", other) + ".tmp").write_bytes(b"")
    Path(backend.layout.record_path("volume", other)).write_text(json.dumps({"name": "pvc-abandoned"}))
    LocalVolumes(root, "node-a")
    assert files(backend) == [f"volumes/{local_id}.img", f"volumes/{local_id}.json"]
    # A creation whose image rename reached the disk and whose record rename did not (a
    # folder's renames need not land in order), with the record's temporary file: never
    # acknowledged, so removed at the next start.
    torn = Layout.local_id("volume", "pvc-torn")
    Path(backend.layout.image("volume", torn)).write_bytes(b"")
    Path(backend.layout.record_path("volume", torn) + ".tmp").write_bytes(b"{}")
    assert backend.lookup_volume("pvc-torn") is None
    LocalVolumes(root, "node-a")
    assert files(backend) == [f"volumes/{local_id}.img", f"volumes/{local_id}.json"]


def test_failed_copy_leaves_nothing(volumes: LocalVolumes, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = volumes.create_volume(spec("src"))

    def broken_copy(source: str, target: str) -> None:
        Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("csi.backends.local.controller.copy_image", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        volumes.create_snapshot("snap", vol.local_id, {})
    assert files(volumes) == [f"volumes/{vol.local_id}.img", f"volumes/{vol.local_id}.json"]


def test_expand_grows_and_never_shrinks(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("pvc"))
    assert volumes.expand_volume(vol.local_id, 20 * MiB, 0) == 20 * MiB
    assert volumes.expand_volume(vol.local_id, 4 * MiB, 0) == 20 * MiB
    with pytest.raises(NotFound):
        volumes.expand_volume(Layout.local_id("volume", "nope"), MiB, 0)


def test_publication_rules(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("pvc"))
    context = volumes.publish_volume(vol.local_id, "node-a", RWO, False)
    assert os.path.exists(context["image"])
    assert volumes.publish_volume(vol.local_id, "node-a", RWO, False) == context
    with pytest.raises(AlreadyExists, match="already published read-write"):
        volumes.publish_volume(vol.local_id, "node-a", RWO, True)
    with pytest.raises(NotFound, match="local to node 'node-a'"):
        volumes.publish_volume(vol.local_id, "node-b", RWO, False)
    assert volumes.get_volume(vol.local_id).published_nodes == ("node-a",)
    with pytest.raises(FailedPrecondition, match="still published to node"):
        volumes.delete_volume(vol.local_id)
    volumes.unpublish_volume(vol.local_id, "node-a")
    volumes.unpublish_volume(vol.local_id, "node-a")
    volumes.delete_volume(vol.local_id)


def test_ids_from_clients_never_become_paths(volumes: LocalVolumes) -> None:
    for hostile in ("../../etc/passwd", "vol-../../x", "snap-" + "0" * 36):
        with pytest.raises(NotFound):
            volumes.get_volume(hostile)
    with pytest.raises(NotFound):
        volumes.delete_volume("../../../etc")


def test_multi_node_modes_are_refused_with_a_reason() -> None:
    reason = CAPABILITIES.unsupported(Capability(AccessType.BLOCK, AccessMode.MULTI_NODE_MULTI_WRITER))
    assert reason is not None and "one node" in reason
    assert CAPABILITIES.unsupported(Capability(AccessType.BLOCK, AccessMode.SINGLE_NODE_MULTI_WRITER)) is None


@pytest.fixture
def small(tmp_path: Path) -> Iterator[LocalVolumes]:
    """A local backend on a 24 MiB filesystem of its own."""
    require_root()
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(root)], check=True)
    volumes = LocalVolumes(str(root), "node-a")
    try:
        yield volumes
    finally:
        volumes.settle()
        subprocess.run(["umount", str(root)], check=True)


def test_a_full_backend_is_resource_exhausted_and_keeps_nothing(small: LocalVolumes) -> None:
    vol = small.create_volume(spec("data", size=16 * MiB))
    with open(small.layout.image("volume", vol.local_id), "r+b") as image:
        image.write(os.urandom(14 * MiB))
    before = files(small)
    with pytest.raises(ResourceExhausted, match="No space left on device"):
        small.create_snapshot("too-big", vol.local_id, {})  # cp runs out of room
    with pytest.raises(ResourceExhausted, match="no room to preallocate"):
        small.create_volume(spec("thick", size=16 * MiB, preallocate="true"))
    assert files(small) == before


def test_volume_condition_reports_what_is_wrong(volumes: LocalVolumes) -> None:
    vol = volumes.create_volume(spec("watched"))
    assert not volumes.get_volume(vol.local_id).condition.abnormal
    record = volumes.layout.require_record("volume", vol.local_id)
    record["published"]["node-z"] = False  # as a hand edit or an old driver might leave it
    volumes.layout.write_record("volume", vol.local_id, record)
    condition = volumes.get_volume(vol.local_id).condition
    assert condition.abnormal and "node-z, which cannot reach it" in condition.message
    assert volumes.list_volumes()[0].condition == condition


def test_free_space_is_the_owning_nodes_only(volumes: LocalVolumes) -> None:
    assert volumes.free_bytes({"topology.cairn.csi.io/node": "node-a"}) == volumes.free_bytes() > 0
    assert volumes.free_bytes({"topology.cairn.csi.io/node": "node-b"}) == 0


def test_a_delete_racing_a_create_of_the_same_volume_makes_the_create_aborted(
    volumes: LocalVolumes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteVolume of a volume's (deterministic) ID while its CreateVolume is under way
    removes the creation's temporary image: the create is ABORTED, for a retry, and
    leaves nothing."""
    from csi.backends.local import controller

    real = controller.truncate
    local_id = volumes.layout.local_id("volume", "raced")

    def deleted_first(path: str, size: int, what: str) -> None:
        volumes.delete_volume(local_id)
        real(path, size, what)

    monkeypatch.setattr(controller, "truncate", deleted_first)
    with pytest.raises(Aborted, match="was deleted while it was being created"):
        volumes.create_volume(spec("raced"))
    monkeypatch.setattr(controller, "truncate", real)
    assert not [f for f in files(volumes) if local_id in f]
    assert volumes.create_volume(spec("raced")).local_id == local_id
    volumes.delete_volume(local_id)
