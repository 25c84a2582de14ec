"""The nfs backend's controller half (``NfsVolumes``) against a real NFSv4 server
(nfs-ganesha on loopback), each result checked on the exported directory itself.

Most tests run twice: through the user-space client (``libnfs.Client`` on ``/export``)
and through ``LocalTree`` on the exported directory (``exportRoot``). Covered: names that
would leave the export (planted symbolic links, ``..`` in templates or values), the
``subDir`` template with the claim's metadata, what a snapshot or clone of a directory
volume keeps, ``onDelete``, deletion on an export that squashes root, the start-up sweep
of what a crash left, free space, and expansion."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from csi.backends.nfs import controller
from csi.backends.nfs.common import NfsSettings
from csi.backends.nfs.controller import NfsVolumes
from csi.backends.nfs.fs import LocalTree, Tree, opened
from csi.backends.nfs.libnfs import Client
from csi.backends.nfs.paths import PVC_NAME, PVC_NAMESPACE
from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.model import AccessMode, AccessType, Capability, MiB, SourceRef, Volume, VolumeSpec
from tests.nfs import EXPORT, SQUASHED, NfsServer
from tests.support import require_tools

pytestmark = pytest.mark.integration

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
CONTROL_FOLDERS = ("snapshots", "tmp", "trash", "volumes")


@dataclass
class Nfs:
    """One nfs backend under test, with its own name (and folder of that name) on the export."""

    volumes: NfsVolumes
    name: str
    export: Path
    """The exported directory, as this host sees it."""
    through: str
    trees: list[Tree] = field(default_factory=list)

    @property
    def control(self) -> Path:
        return self.export / ".cairn" / self.name

    def spec(
        self,
        pv: str,
        size: int = 8 * MiB,
        source: SourceRef | None = None,
        metadata: dict[str, str] | None = None,
        parameters: dict[str, str] | None = None,
        **more_parameters: str,
    ) -> VolumeSpec:
        """A request as the controller service passes it, with StorageClass parameters."""
        return VolumeSpec(
            name=pv,
            required_bytes=size,
            limit_bytes=0,
            capabilities=(RWO,),
            parameters={**(parameters or {}), **more_parameters},
            source=source,
            metadata=metadata or {},
        )

    def folder(self, volume: Volume) -> Path:
        return self.export / volume.context["subDir"]

    def image(self, volume: Volume) -> Path:
        return self.control / "volumes" / f"{volume.local_id}.img"

    def control_contents(self) -> dict[str, list[str]]:
        return {folder: sorted(os.listdir(self.control / folder)) for folder in CONTROL_FOLDERS}

    def assert_control_empty(self) -> None:
        assert self.control_contents() == {folder: [] for folder in CONTROL_FOLDERS}


Make = Callable[..., Nfs]


@pytest.fixture(params=["client", "local"])
def through(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(nfs_server: NfsServer) -> Iterator[Make]:
    """Makes backends on the test server; removes everything they made afterwards."""
    made: list[Nfs] = []

    def build(
        through: str,
        layout: str = "directory",
        *,
        squashed: bool = False,
        owner: bool = False,
        sub_dir: str = "",
    ) -> Nfs:
        name = f"nfs-{uuid.uuid4().hex[:8]}"
        share, export = (SQUASHED, nfs_server.squashed_dir) if squashed else (EXPORT, nfs_server.export_dir)
        settings = NfsSettings(
            backend=name,
            server="127.0.0.1",
            share=share,
            port=nfs_server.port,
            layout=layout,
            sub_dir=sub_dir or f"{name}/${{pv.metadata.name}}",
        )
        trees: list[Tree] = []

        def client(uid: int = 0, gid: int = 0) -> Client:
            tree = Client("127.0.0.1", share, port=nfs_server.port, timeout=10, uid=uid, gid=gid)
            trees.append(tree)
            return tree

        tree: Tree = client() if through == "client" else LocalTree(str(export))
        trees.append(tree)
        volumes = NfsVolumes(settings, tree, owner_tree=client if owner else None)
        nfs = Nfs(volumes, name, export, through, trees)
        made.append(nfs)
        return nfs

    yield build
    for nfs in made:
        for tree in nfs.trees:
            tree.close()
        shutil.rmtree(nfs.control, ignore_errors=True)
        for path in [*nfs.export.glob(f"*{nfs.name}*"), *nfs.export.parent.glob(f"*{nfs.name}*")]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture
def nfs(make: Make, through: str) -> Nfs:
    return make(through)


def tree_under(root: Path) -> dict[str, os.stat_result]:
    """Every entry below ``root`` (``""`` for ``root`` itself), by relative path, not following links."""
    found = {"": root.lstat()}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = path.lstat()
    return found


# -- names that would leave the export ---------------------------------------------------


def test_planted_symbolic_links_are_refused(nfs: Nfs, tmp_path: Path) -> None:
    """A link planted on the export (by anyone who can write there) is never followed to
    place a volume: not to a folder of the server's host, not back up the tree."""
    outside = tmp_path / "outside"
    outside.mkdir()
    base = nfs.export / nfs.name
    base.mkdir()
    (base / "evil").symlink_to(outside)
    (base / "up").symlink_to("..")
    (base / "outer").symlink_to("../..")
    (base / "file").write_text("not a folder")
    for link in ("evil", "up", "outer", "file"):
        for template in (f"{nfs.name}/{link}/${{pv.metadata.name}}", f"{nfs.name}/{link}/deeper/${{pv.metadata.name}}"):
            with pytest.raises(InvalidArgument, match=f"'{nfs.name}/{link}' on the export is not a folder"):
                nfs.volumes.create_volume(nfs.spec("pv-escape", subDir=template))
    # A link in the last place is an existing name, not a place to rename a volume onto.
    with pytest.raises(AlreadyExists, match=f"'{nfs.name}/evil' already exists"):
        nfs.volumes.create_volume(nfs.spec("evil", subDir=f"{nfs.name}/${{pv.metadata.name}}"))
    assert list(outside.iterdir()) == []
    assert (base / "evil").is_symlink() and os.readlink(base / "evil") == str(outside)
    assert not (nfs.export / "pv-escape").exists() and not (nfs.export / "deeper").exists()
    assert not (nfs.export.parent / "pv-escape").exists() and not (nfs.export.parent / "deeper").exists()
    assert sorted(os.listdir(base)) == ["evil", "file", "outer", "up"]
    assert nfs.volumes.list_volumes() == []
    nfs.assert_control_empty()


@pytest.mark.parametrize(
    ("parameters", "metadata", "message"),
    [
        ({"subDir": "../${pv.metadata.name}"}, {}, r"'\.\.' component"),
        ({"subDir": "a/../../${pv.metadata.name}"}, {}, r"'\.\.' component"),
        ({"subDir": "/etc/${pv.metadata.name}"}, {}, "absolute"),
        ({"subDir": ".cairn/${pv.metadata.name}"}, {}, "driver's own folder"),
        ({"subDir": "${pvc.metadata.uid}"}, {}, "unknown variable"),
        (
            {"subDir": "${pvc.metadata.namespace}/${pvc.metadata.name}"},
            {PVC_NAMESPACE: "ns", PVC_NAME: ".."},
            r"'\.\.'",
        ),
        ({"subDir": "${pvc.metadata.namespace}/${pvc.metadata.name}"}, {PVC_NAMESPACE: "ns", PVC_NAME: "../x"}, "'/'"),
        ({"subDir": "${pvc.metadata.namespace}/${pvc.metadata.name}"}, {PVC_NAMESPACE: ".cairn", PVC_NAME: "x"}, "own"),
        ({"subDir": "${pvc.metadata.namespace}/${pvc.metadata.name}"}, {}, "--extra-create-metadata"),
    ],
)
def test_templates_and_values_leaving_the_export_are_refused(
    nfs: Nfs, parameters: dict[str, str], metadata: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        nfs.volumes.create_volume(nfs.spec("pv-bad", metadata=metadata, parameters=parameters))
    assert nfs.volumes.list_volumes() == []
    nfs.assert_control_empty()
    assert not (nfs.export / "pv-bad").exists() and not (nfs.export.parent / "pv-bad").exists()


def test_an_image_backend_takes_no_sub_dir(make: Make, through: str) -> None:
    nfs = make(through, "image")
    with pytest.raises(InvalidArgument, match="applies to directory volumes"):
        nfs.volumes.create_volume(nfs.spec("pv-image", subDir="x/${pv.metadata.name}"))
    nfs.assert_control_empty()


# -- the subDir template -----------------------------------------------------------------


def test_template_with_the_claims_metadata(nfs: Nfs) -> None:
    template = f"{nfs.name}/${{pvc.metadata.namespace}}/${{pvc.metadata.name}}"
    claim = {PVC_NAME: "data", PVC_NAMESPACE: "team-a"}
    first = nfs.volumes.create_volume(nfs.spec("pv-1", metadata=claim, subDir=template))
    folder = nfs.export / nfs.name / "team-a" / "data"
    assert first.context == {"subDir": f"{nfs.name}/team-a/data"}
    assert nfs.folder(first) == folder
    assert folder.is_dir() and not folder.is_symlink()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777  # mountPermissions' default
    (folder / "keep").write_text("first")
    assert nfs.volumes.create_volume(nfs.spec("pv-1", metadata=claim, subDir=template)) == first  # a retry

    with pytest.raises(AlreadyExists, match=f"'{nfs.name}/team-a/data' already exists"):
        nfs.volumes.create_volume(nfs.spec("pv-2", metadata=claim, subDir=template))
    assert (folder / "keep").read_text() == "first"
    assert os.listdir(folder) == ["keep"]
    assert nfs.volumes.list_volumes() == [first]
    assert nfs.volumes.get_volume(first.local_id) == first
    assert nfs.volumes.lookup_volume("pv-2") is None
    assert nfs.control_contents()["volumes"] == [f"{first.local_id}.json"]
    assert nfs.control_contents()["tmp"] == []

    nfs.volumes.delete_volume(first.local_id)
    assert not folder.exists()
    assert os.listdir(nfs.export / nfs.name / "team-a") == []  # the parents stay
    nfs.assert_control_empty()


def test_mount_permissions_parameter(nfs: Nfs) -> None:
    volume = nfs.volumes.create_volume(nfs.spec("pv-perm", mountPermissions="0750"))
    assert stat.S_IMODE(nfs.folder(volume).stat().st_mode) == 0o750
    nfs.volumes.delete_volume(volume.local_id)
    nfs.assert_control_empty()


# -- what a copy keeps ----------------------------------------------------------------------

FILE_MTIME = 1_600_000_000_123_456_789
NESTED_MTIME = 1_500_000_000_987_654_321
LINK_MTIME = 1_400_000_000_000_000_001
ROOT_MTIME = 1_650_000_000_555_555_555


def populate(root: Path) -> None:
    """Fill a volume's folder, as root on the server's own filesystem."""
    alpha = root / "alpha.txt"
    alpha.write_bytes(b"alpha\n" * 1000)
    alpha.chmod(0o640)
    os.chown(alpha, 1234, 5678)
    os.setxattr(alpha, "user.test", b"kept?")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    hard = root / "hard1"
    hard.write_bytes(b"shared inode")
    hard.chmod(0o600)
    os.chown(hard, 1000, 1000)
    os.link(hard, root / "hard2")
    (root / "link").symlink_to("alpha.txt")
    os.lchown(root / "link", 1234, 5678)
    nested = root / "nested"
    nested.mkdir()
    (nested / "inner").write_text("inside")
    os.link(hard, nested / "hard3")  # a hardlink across folders
    (nested / "up").symlink_to("../run.sh")
    with open(root / "sparse", "wb") as handle:
        handle.seek(MiB)
        handle.write(b"Z" * 4096)
    (root / "empty").touch()
    shared = root / "shared"  # setgid and sticky, with a setuid file
    shared.mkdir()
    (shared / "tool").write_text("#!/bin/sh\n")
    os.chown(shared / "tool", 1234, 5678)
    (shared / "tool").chmod(0o4755)
    os.chown(shared, 1234, 5678)
    shared.chmod(0o3775)
    for path in (alpha, script, hard, nested / "inner", root / "sparse"):
        os.utime(path, ns=(FILE_MTIME, FILE_MTIME))
    os.utime(root / "link", ns=(LINK_MTIME, LINK_MTIME), follow_symlinks=False)
    nested.chmod(0o700)
    os.chown(nested, 2000, 2000)
    os.utime(nested, ns=(NESTED_MTIME, NESTED_MTIME))


def assert_same_tree(source: Path, copy: Path, *, root_mode: bool = True, link_mtime: bool = True) -> None:
    """Everything below ``source`` is in ``copy`` with the same kind, mode, owner, mtime (to
    the nanosecond), size, content, link target and hardlink grouping, and holes stay holes."""
    before, after = tree_under(source), tree_under(copy)
    assert sorted(after) == sorted(before)
    for path, st in before.items():
        got = after[path]
        where = path or "the volume's folder"
        assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(st.st_mode), where
        if path or root_mode:
            assert stat.S_IMODE(got.st_mode) == stat.S_IMODE(st.st_mode), where
        assert (got.st_uid, got.st_gid) == (st.st_uid, st.st_gid), where
        if link_mtime or not stat.S_ISLNK(st.st_mode):
            assert got.st_mtime_ns == st.st_mtime_ns, where
        assert got.st_size == st.st_size, where
        assert got.st_nlink == st.st_nlink, where
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(copy / path) == os.readlink(source / path), where
        elif stat.S_ISREG(st.st_mode):
            assert (copy / path).read_bytes() == (source / path).read_bytes(), where
    groups = {"hard1", "hard2", "nested/hard3"}
    assert len({after[p].st_ino for p in groups}) == 1, "hardlinks must stay one file"
    assert after["hard1"].st_nlink == 3
    assert after["hard1"].st_ino not in {st.st_ino for p, st in after.items() if p not in groups}
    assert after["sparse"].st_size == MiB + 4096
    assert after["sparse"].st_blocks * 512 <= 64 * 1024, "the hole was written out"
    assert after["empty"].st_size == 0


def test_snapshot_restore_and_clone_keep_the_layout(nfs: Nfs) -> None:
    """Modes, owners, nanosecond mtimes (the Client sets times by its own SETATTR, which
    keeps nanoseconds), hardlinks (within and across folders), relative symbolic links
    (their target and owner), holes and nested folders' own attributes survive a
    snapshot, its restore and a clone. The new volume's folder itself takes the new
    volume's mountPermissions (it is a new volume), but keeps owner and mtime.

    A symbolic link's own mtime is kept through LocalTree only: nfs-ganesha 4.3 (VFS)
    answers NFS4_OK to a SETATTR of times on a symbolic link and changes nothing, so
    through the Client a copied link has the time of its copy (a server's limitation;
    the copy does not fail). Extended attributes: see the two tests below."""
    volume = nfs.volumes.create_volume(nfs.spec("pv-src"))
    source = nfs.folder(volume)
    populate(source)
    # The folder itself is changed through the tree: nfs-ganesha caches the attributes of
    # what it made, and would not see a change made behind its back on its filesystem.
    path = volume.context["subDir"]
    nfs.volumes.tree.lchown(path, 4321, 8765)
    nfs.volumes.tree.chmod(path, 0o750)  # a pod changed its volume's mode
    nfs.volumes.tree.lutimes(path, ROOT_MTIME, ROOT_MTIME)
    original = tree_under(source)
    assert (stat.S_IMODE(original[""].st_mode), original[""].st_uid, original[""].st_mtime_ns) == (
        0o750,
        4321,
        ROOT_MTIME,
    )

    snapshot = nfs.volumes.create_snapshot("snap-1", volume.local_id, {})
    data = nfs.control / "snapshots" / f"{snapshot.local_id}.data"
    link_mtime = nfs.through == "local"
    assert_same_tree(source, data, link_mtime=link_mtime)
    restored = nfs.volumes.create_volume(nfs.spec("pv-restored", source=SourceRef("snapshot", snapshot.local_id)))
    assert restored.source == SourceRef("snapshot", snapshot.local_id)
    assert_same_tree(source, nfs.folder(restored), root_mode=False, link_mtime=link_mtime)
    assert stat.S_IMODE(nfs.folder(restored).stat().st_mode) == 0o777  # mountPermissions of the new volume
    clone = nfs.volumes.create_volume(nfs.spec("pv-clone", source=SourceRef("volume", volume.local_id)))
    assert_same_tree(source, nfs.folder(clone), root_mode=False, link_mtime=link_mtime)
    assert_unchanged(original, source)

    for made in (restored, clone, volume):
        nfs.volumes.delete_volume(made.local_id)
    nfs.volumes.delete_snapshot(snapshot.local_id)
    assert not source.exists()
    nfs.assert_control_empty()


def assert_unchanged(before: dict[str, os.stat_result], root: Path) -> None:
    """The source is unchanged by being copied, but for access times."""
    after = tree_under(root)
    assert sorted(after) == sorted(before)
    for path, st in before.items():
        got = after[path]
        assert (got.st_mode, got.st_uid, got.st_gid, got.st_size, got.st_mtime_ns, got.st_ino, got.st_nlink) == (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
            st.st_nlink,
        ), path


ACL = "system.posix_acl_access"
# A POSIX ACL as the kernel stores it: version 2, then (tag, permissions, id) entries:
# owner rw-, user 1234 r--, owning group r--, mask r--, others ---.
ACL_VALUE = struct.pack(
    "<I" + "HHI" * 5,
    2,
    0x01,
    6,
    0xFFFFFFFF,
    0x02,
    4,
    1234,
    0x04,
    4,
    0xFFFFFFFF,
    0x10,
    4,
    0xFFFFFFFF,
    0x20,
    0,
    0xFFFFFFFF,
)


def _copy_with_xattr(nfs: Nfs) -> tuple[Path, Path, Path]:
    volume = nfs.volumes.create_volume(nfs.spec("pv-xattr"))
    source = nfs.folder(volume)
    (source / "file").write_text("with an attribute")
    os.setxattr(source / "file", "user.test", b"value")
    os.setxattr(source / "file", ACL, ACL_VALUE)
    os.setxattr(source, "user.folder", b"on the folder")
    snapshot = nfs.volumes.create_snapshot("snap-xattr", volume.local_id, {})
    clone = nfs.volumes.create_volume(nfs.spec("pv-xattr-clone", source=SourceRef("volume", volume.local_id)))
    return source, nfs.control / "snapshots" / f"{snapshot.local_id}.data", nfs.folder(clone)


def test_local_tree_copies_keep_extended_attributes(make: Make) -> None:
    nfs = make("local")
    source, snapshot, clone = _copy_with_xattr(nfs)
    assert os.getxattr(source / "file", "user.test") == b"value"
    for copy in (snapshot, clone):
        assert os.getxattr(copy / "file", "user.test") == b"value"
        assert os.getxattr(copy / "file", ACL) == ACL_VALUE, "the POSIX ACL was not kept"
        assert os.getxattr(copy, "user.folder") == b"on the folder"


def test_client_copies_drop_extended_attributes(make: Make) -> None:
    """Through the user-space client, extended attributes and ACLs cannot travel: libnfs
    4.0 speaks NFSv4.0/4.1, which has no xattr operations (those are NFSv4.2, RFC 8276),
    and the Client sets no ACL attribute. What happens: the copy has the data and no
    ``user.*`` attribute; nothing fails."""
    nfs = make("client")
    source, snapshot, clone = _copy_with_xattr(nfs)
    assert os.getxattr(source / "file", "user.test") == b"value"
    for copy in (snapshot, clone):
        assert (copy / "file").read_text() == "with an attribute"
        assert [a for a in os.listxattr(copy / "file") if a.startswith("user.")] == []
        assert [a for a in os.listxattr(copy) if a.startswith("user.")] == []


# -- onDelete ----------------------------------------------------------------------------------


def test_on_delete_retain_keeps_the_folder(nfs: Nfs) -> None:
    volume = nfs.volumes.create_volume(nfs.spec("pv-retain", onDelete="retain"))
    folder = nfs.folder(volume)
    (folder / "data").write_text("precious")
    nfs.volumes.delete_volume(volume.local_id)
    assert nfs.volumes.list_volumes() == []
    assert nfs.volumes.lookup_volume("pv-retain") is None
    with pytest.raises(NotFound):
        nfs.volumes.get_volume(volume.local_id)
    assert (folder / "data").read_text() == "precious"
    nfs.volumes.delete_volume(volume.local_id)  # idempotent
    assert (folder / "data").read_text() == "precious"
    nfs.assert_control_empty()


def test_on_delete_delete_removes_the_folder(nfs: Nfs) -> None:
    volume = nfs.volumes.create_volume(nfs.spec("pv-delete", onDelete="delete"))
    folder = nfs.folder(volume)
    (folder / "sub").mkdir()
    (folder / "sub" / "data").write_text("gone")
    nfs.volumes.delete_volume(volume.local_id)
    assert not folder.exists()
    assert os.listdir(folder.parent) == []
    assert nfs.volumes.list_volumes() == []
    nfs.assert_control_empty()


def _archive_twice(nfs: Nfs, first_name: str, second_name: str) -> tuple[Volume, Volume, list[str]]:
    """Create, archive, create again at the same path, archive again."""
    template = f"{nfs.name}/${{pvc.metadata.namespace}}/${{pvc.metadata.name}}"
    claim = {PVC_NAME: "data", PVC_NAMESPACE: "team-a"}
    made = []
    for pv, content in ((first_name, "first"), (second_name, "second")):
        volume = nfs.volumes.create_volume(nfs.spec(pv, metadata=claim, subDir=template, onDelete="archive"))
        assert volume.context == {"subDir": f"{nfs.name}/team-a/data"}
        (nfs.folder(volume) / "content").write_text(content)
        nfs.volumes.delete_volume(volume.local_id)
        assert not nfs.folder(volume).exists()
        assert nfs.volumes.lookup_volume(pv) is None
        made.append(volume)
    return made[0], made[1], sorted(os.listdir(nfs.export / nfs.name / "team-a"))


def test_on_delete_archive_renames_beside_without_collisions(nfs: Nfs) -> None:
    """A claim deleted and made again (a new PV name, so a new volume ID) at the same
    template result: each archive keeps its own data."""
    first, second, archives = _archive_twice(nfs, "pv-a", "pv-b")
    assert len(archives) == 2
    for volume, content in ((first, "first"), (second, "second")):
        (archive,) = [a for a in archives if volume.local_id in a]
        assert archive.startswith("archived-data-")
        assert (nfs.export / nfs.name / "team-a" / archive / "content").read_text() == content
    assert nfs.volumes.list_volumes() == []
    nfs.assert_control_empty()


def test_on_delete_archive_same_name_twice_in_one_second(nfs: Nfs, monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = time.gmtime(1_700_000_000)
    clock = types.SimpleNamespace(time=time.time, gmtime=lambda: frozen, strftime=time.strftime)
    monkeypatch.setattr(controller, "time", clock)  # both deletes in the same second, deterministically
    first, second, archives = _archive_twice(nfs, "pv-same", "pv-same")
    assert first.local_id == second.local_id
    assert len(archives) == 2
    contents = sorted((nfs.export / nfs.name / "team-a" / a / "content").read_text() for a in archives)
    assert contents == ["first", "second"]


def archives_of(nfs: Nfs, volume: Volume) -> list[Path]:
    """An image's archives: in the backend's ``archived`` folder, each beside its record."""
    found = sorted((nfs.control / "archived").glob(f"*{volume.local_id}*.img"))
    for image in found:
        assert json.loads(image.with_suffix(".json").read_text())["name"] == volume.name
    return found


def test_on_delete_archive_of_images_does_not_collide(make: Make, through: str) -> None:
    nfs = make(through, "image")
    archived = []
    for content in (b"first", b"second"):
        volume = nfs.volumes.create_volume(nfs.spec(f"{nfs.name}-img", onDelete="archive"))
        with open(nfs.image(volume), "r+b") as handle:
            handle.write(content)
        nfs.volumes.delete_volume(volume.local_id)
        assert not nfs.image(volume).exists()
        archived += [p for p in archives_of(nfs, volume) if p not in archived]
    assert len(archived) == 2
    assert sorted(p.read_bytes()[:6].rstrip(b"\0") for p in archived) == [b"first", b"second"]


def test_on_delete_archive_of_an_image_whose_name_holds_a_slash(make: Make, through: str) -> None:
    nfs = make(through, "image")
    volume = nfs.volumes.create_volume(nfs.spec(f"{nfs.name}-team/pv", onDelete="archive"))
    nfs.volumes.delete_volume(volume.local_id)
    assert not nfs.image(volume).exists()
    assert len(archives_of(nfs, volume)) == 1


def test_on_delete_archive_of_an_image_stays_inside_the_export(make: Make) -> None:
    nfs = make("local", "image")
    (nfs.export / f"archived-{nfs.name}").mkdir()  # any folder of that name, as a directory backend archives
    volume = nfs.volumes.create_volume(nfs.spec(f"{nfs.name}/../../{nfs.name}-outside", onDelete="archive"))
    nfs.volumes.delete_volume(volume.local_id)
    assert list(nfs.export.parent.glob(f"*{nfs.name}*")) == [], "written outside the export"


# -- deletion where root is squashed ---------------------------------------------------------------


def fill_as_pods(folder: Path) -> None:
    """What pods running as other users leave in a volume (written as root on the server)."""
    owned = folder / "u1000"
    owned.mkdir()
    for index in range(3):
        (owned / f"file{index}").write_text("pod data")
        os.chown(owned / f"file{index}", 1000, 1000)
        (owned / f"file{index}").chmod(0o644)
    (owned / "deeper").mkdir()
    (owned / "deeper" / "more").write_text("x")
    os.chown(owned / "deeper" / "more", 1000, 1000)
    os.chown(owned / "deeper", 1000, 1000)
    os.chown(owned, 1000, 1000)
    owned.chmod(0o755)
    locked = folder / "u1001-readonly"
    locked.mkdir()
    (locked / "file").write_text("locked in")
    os.chown(locked / "file", 1001, 1001)
    os.chown(locked, 1001, 1001)
    locked.chmod(0o500)
    (folder / "top").write_text("x")
    os.chown(folder / "top", 1000, 1000)


def squashed_entries(nfs: Nfs) -> set[str]:
    """What the test's backend has at the squashed export's root, but for its .cairn folder."""
    return {name for name in os.listdir(nfs.export) if nfs.name in name}


def squashed_backend(make: Make, owner: bool) -> tuple[Nfs, Volume, Path]:
    """A backend on /squashed (root is nobody there) and a volume pods filled."""
    nfs = make("client", squashed=True, owner=owner, sub_dir="${pv.metadata.name}")
    volume = nfs.volumes.create_volume(nfs.spec(f"{nfs.name}-vol"))
    folder = nfs.folder(volume)
    assert folder.stat().st_uid == 65534  # made as nobody
    assert stat.S_IMODE((nfs.control / "trash").stat().st_mode) == 0o711  # owners may pass through
    fill_as_pods(folder)
    assert squashed_entries(nfs) == {f"{nfs.name}-vol"}
    return nfs, volume, folder


def test_delete_under_root_squash_of_files_in_the_folder(make: Make) -> None:
    """Other users' files in the volume's own folder (nobody's, 0777): removed."""
    nfs = make("client", squashed=True, owner=True, sub_dir="${pv.metadata.name}")
    volume = nfs.volumes.create_volume(nfs.spec(f"{nfs.name}-vol"))
    folder = nfs.folder(volume)
    for uid in (1000, 1001, 0):
        (folder / f"file-{uid}").write_text("x")
        os.chown(folder / f"file-{uid}", uid, uid)
        (folder / f"file-{uid}").chmod(0o600)
    nfs.volumes.delete_volume(volume.local_id)
    assert squashed_entries(nfs) == set()
    nfs.assert_control_empty()


def test_delete_under_root_squash_as_each_owner(make: Make) -> None:
    """Through /squashed, root is nobody; the controller deletes other users' folders by
    acting as each folder's owner (``owner_tree``, as ``controller_for`` sets it up):
    a folder of uid 1000 (0755) with its files, a folder of uid 1001 without write
    permission for anyone (0500)."""
    nfs, volume, folder = squashed_backend(make, owner=True)
    nfs.volumes.delete_volume(volume.local_id)
    assert not folder.exists()
    assert squashed_entries(nfs) == set()
    assert nfs.volumes.list_volumes() == []
    nfs.assert_control_empty()


def test_delete_under_root_squash_of_folders_their_owner_cannot_read(make: Make) -> None:
    """Folders whose owner took every permission away from itself (0000, 0300): the owner
    may give them back, then remove what they hold. (trash/ made searchable as above.)"""
    nfs = make("client", squashed=True, owner=True, sub_dir="${pv.metadata.name}")
    volume = nfs.volumes.create_volume(nfs.spec(f"{nfs.name}-vol"))
    folder = nfs.folder(volume)
    for uid, mode in ((1002, 0o000), (1003, 0o300), (1004, 0o100)):
        locked = folder / f"u{uid}"
        (locked / "inner").mkdir(parents=True)
        (locked / "inner" / "file").write_text("x")
        (locked / "file").write_text("x")
        for path in (locked / "inner" / "file", locked / "inner", locked / "file", locked):
            os.chown(path, uid, uid)
        locked.chmod(mode)
    nfs.volumes.delete_volume(volume.local_id)
    assert squashed_entries(nfs) == set()
    nfs.assert_control_empty()


def test_delete_under_root_squash_of_a_folder_a_pod_took_over(make: Make) -> None:
    """A node that mounts without squashing ran an init container's ``chown 1000 /data``;
    the controller's access is squashed."""
    nfs, volume, folder = squashed_backend(make, owner=True)
    os.chown(folder, 1000, 1000)
    folder.chmod(0o755)
    nfs.volumes.delete_volume(volume.local_id)
    assert not folder.exists()
    assert squashed_entries(nfs) == set()
    nfs.assert_control_empty()


def test_delete_under_root_squash_without_owner_tree_fails_safely(make: Make) -> None:
    """Without ``owner_tree`` the squashed controller cannot remove other users' folders.
    The folder is moved out of sight into trash/ first, then its removal is refused: the
    delete fails with FAILED_PRECONDITION naming the refusal, and keeps failing on every
    retry (the record goes last), so the CO reports the volume it could not delete
    instead of forgetting data nobody removed. The volume is no longer usable (not
    listed, NOT_FOUND), and a controller with owner_tree finishes the job."""
    nfs, volume, folder = squashed_backend(make, owner=False)
    with pytest.raises(FailedPrecondition, match=r"refused .*Permission denied"):
        nfs.volumes.delete_volume(volume.local_id)
    assert not folder.exists(), "the volume must not be half there"
    assert nfs.volumes.list_volumes() == []
    with pytest.raises(NotFound):
        nfs.volumes.get_volume(volume.local_id)
    (trash,) = nfs.control_contents()["trash"]
    assert trash.startswith(volume.local_id)
    left = nfs.control / "trash" / trash
    assert sorted(os.listdir(left / "u1000")) == ["deeper", "file0", "file1", "file2"]  # nobody's to remove
    assert (left / "u1001-readonly" / "file").read_text() == "locked in"
    with pytest.raises(FailedPrecondition):
        nfs.volumes.delete_volume(volume.local_id)  # the CO's retry: still refused, not forgotten
    assert nfs.control_contents()["trash"] == [trash]
    nfs.volumes.recover()  # still nobody: nothing more it can do, and it does not fail
    assert nfs.control_contents()["trash"] == [trash]


def test_recover_with_owner_tree_empties_the_trash_under_root_squash(make: Make) -> None:
    nfs, volume, _ = squashed_backend(make, owner=False)
    with pytest.raises(FailedPrecondition):
        nfs.volumes.delete_volume(volume.local_id)
    helper = make("client", squashed=True, owner=True)  # its trees, for a restarted controller
    restarted = NfsVolumes(nfs.volumes.settings, helper.volumes.tree, owner_tree=helper.volumes.owner_tree)
    restarted.recover()
    assert squashed_entries(nfs) == set()
    nfs.assert_control_empty()


def test_a_retried_delete_with_owner_tree_empties_what_a_failed_one_left(make: Make) -> None:
    nfs, volume, _ = squashed_backend(make, owner=False)
    with pytest.raises(FailedPrecondition):
        nfs.volumes.delete_volume(volume.local_id)
    nfs.volumes.owner_tree = make("client", squashed=True, owner=True).volumes.owner_tree
    nfs.volumes.delete_volume(volume.local_id)
    assert nfs.control_contents()["trash"] == []


# -- crash leftovers ------------------------------------------------------------------------------
# Made through the backend's own tree: nfs-ganesha caches what it has seen, and would miss a
# rename made behind its back on its filesystem.


def put(tree: Tree, path: str, data: bytes) -> None:
    with opened(tree, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) as handle:
        handle.pwrite(data, 0)


def test_recover_sweeps_what_a_crash_left(nfs: Nfs) -> None:
    tree, control = nfs.volumes.tree, f".cairn/{nfs.name}"
    spec = nfs.spec("pv-crashed")
    volume = nfs.volumes.create_volume(spec)
    put(tree, f"{volume.context['subDir']}/half", b"written before the crash")
    # Crashed between writing the record and renaming the data into place:
    tree.rename(volume.context["subDir"], f"{control}/tmp/{volume.local_id}")
    # An interrupted creation of another object, a half-written record, a snapshot record
    # without data, a half-removed folder (with a folder of another user in it):
    other = f"{control}/tmp/vol-{uuid.uuid4()}"
    tree.mkdir(other, 0o700)
    tree.mkdir(f"{other}/sub", 0o755)
    put(tree, f"{other}/sub/file", b"x")
    put(tree, f"{control}/volumes/{volume.local_id}.json.tmp-deadbeef", b"{")
    put(tree, f"{control}/snapshots/snap-{uuid.uuid4()}.json", b'{"name": "s", "source": "vol-x", "size": 1}')
    tree.mkdir(f"{control}/trash/x", 0o755)
    tree.mkdir(f"{control}/trash/x/deep", 0o755)
    put(tree, f"{control}/trash/x/deep/file", b"x")
    tree.lchown(f"{control}/trash/x/deep", 1000, 1000)
    assert nfs.volumes.list_volumes() == [] and nfs.volumes.list_snapshots() == []  # half made: not there
    assert nfs.volumes.lookup_volume("pv-crashed") is None

    restarted = NfsVolumes(nfs.volumes.settings, tree)
    restarted.recover()
    nfs.assert_control_empty()
    assert not nfs.folder(volume).exists()
    assert restarted.list_volumes() == []

    again = restarted.create_volume(spec)
    assert again.local_id == volume.local_id
    assert nfs.folder(again).is_dir() and os.listdir(nfs.folder(again)) == []
    assert restarted.list_volumes() == [again]
    restarted.delete_volume(again.local_id)
    nfs.assert_control_empty()


def test_a_retry_remakes_a_volume_whose_data_never_landed(nfs: Nfs) -> None:
    spec = nfs.spec("pv-retry")
    volume = nfs.volumes.create_volume(spec)
    moved = f"{nfs.name}/moved-away"
    nfs.volumes.tree.rename(volume.context["subDir"], moved)  # a record without data, as after a crash
    assert nfs.volumes.lookup_volume("pv-retry") is None
    assert nfs.volumes.list_volumes() == []
    again = nfs.volumes.create_volume(spec)  # no recover() in between
    assert again == volume
    assert nfs.folder(again).is_dir()
    assert nfs.control_contents()["volumes"] == [f"{volume.local_id}.json"]
    assert (nfs.export / moved).is_dir()
    nfs.volumes.delete_volume(again.local_id)
    nfs.assert_control_empty()


# -- capacity and expansion -----------------------------------------------------------------------


def test_free_bytes_is_the_exports_free_space(nfs: Nfs) -> None:
    tolerance = 64 * MiB

    def available() -> int:
        st = os.statvfs(nfs.export)
        return st.f_bavail * st.f_frsize

    before = available()
    free = nfs.volumes.free_bytes()
    after = available()
    assert min(before, after) - tolerance <= free <= max(before, after) + tolerance
    st = os.statvfs(nfs.export)
    assert nfs.volumes.max_volume_bytes() == st.f_blocks * st.f_frsize  # a directory volume: the export's size


def test_expanding_an_image_grows_the_file(make: Make, through: str) -> None:
    nfs = make(through, "image")
    volume = nfs.volumes.create_volume(nfs.spec("pv-image", size=8 * MiB))
    image = nfs.image(volume)
    assert image.stat().st_size == 8 * MiB
    assert image.stat().st_blocks == 0, "a new image must be sparse"
    assert nfs.volumes.expand_volume(volume.local_id, 20 * MiB, 0) == 20 * MiB
    assert image.stat().st_size == 20 * MiB
    assert image.stat().st_blocks == 0
    assert nfs.volumes.get_volume(volume.local_id).capacity_bytes == 20 * MiB
    assert nfs.volumes.expand_volume(volume.local_id, 4 * MiB, 0) == 20 * MiB  # never shrinks
    assert image.stat().st_size == 20 * MiB
    nfs.volumes.delete_volume(volume.local_id)
    assert not image.exists()
    nfs.assert_control_empty()


def test_expanding_a_directory_records_the_advisory_size(nfs: Nfs) -> None:
    volume = nfs.volumes.create_volume(nfs.spec("pv-dir", size=8 * MiB))
    (nfs.folder(volume) / "data").write_text("unchanged")
    assert nfs.volumes.expand_volume(volume.local_id, 32 * MiB, 0) == 32 * MiB
    assert nfs.volumes.get_volume(volume.local_id).capacity_bytes == 32 * MiB
    record: dict[str, Any] = json.loads((nfs.control / "volumes" / f"{volume.local_id}.json").read_text())
    assert record["size"] == 32 * MiB
    assert (nfs.folder(volume) / "data").read_text() == "unchanged"
    nfs.volumes.delete_volume(volume.local_id)
    nfs.assert_control_empty()


def test_errno_of_a_refused_change_is_a_domain_error() -> None:
    """``_domain_error`` turns the export's permission refusals into FAILED_PRECONDITION."""
    for code in (errno.EACCES, errno.EPERM, errno.EROFS):
        error = controller._domain_error(OSError(code, os.strerror(code), "a/b"), "nfs://x/export")
        assert isinstance(error, FailedPrecondition) and "a/b" in str(error)


# -- static provisioning ------------------------------------------------------------------------


def test_a_static_folder_is_published_copied_and_never_removed(nfs: Nfs) -> None:
    """A folder an operator made, named by a PersistentVolume's handle
    (``1:<backend>:static:<subDir>``): published without a record, copied by a snapshot,
    left alone by expand and delete."""
    folder = nfs.export / nfs.name / "legacy" / "data"
    folder.mkdir(parents=True)
    (folder / "old").write_text("made before the driver")
    local_id = f"static:{nfs.name}/legacy/data"
    volume = nfs.volumes.get_volume(local_id)
    assert volume.context == {"subDir": f"{nfs.name}/legacy/data"}
    shared = Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER)
    context = nfs.volumes.publish_volume(local_id, "node-a", shared, False)
    assert "path" not in context and "server" not in context, "the node mounts what the handle names"
    nfs.volumes.publish_volume(local_id, "node-b", shared, False)
    nfs.volumes.unpublish_volume(local_id, "node-a")
    with pytest.raises(FailedPrecondition, match="did not make"):
        nfs.volumes.expand_volume(local_id, 64 * MiB, 0)
    snapshot = nfs.volumes.create_snapshot("snap-static", local_id, {})
    restored = nfs.volumes.create_volume(nfs.spec("pv-from-static", source=SourceRef("snapshot", snapshot.local_id)))
    assert (nfs.folder(restored) / "old").read_text() == "made before the driver"
    nfs.volumes.delete_volume(local_id)
    assert (folder / "old").read_text() == "made before the driver", "a static folder is never removed"
    assert nfs.volumes.list_volumes() == [restored], "static volumes are not listed: they have no record"
    nfs.volumes.delete_volume(restored.local_id)
    nfs.volumes.delete_snapshot(snapshot.local_id)
    nfs.assert_control_empty()


@pytest.mark.parametrize("handle", ["static:../outside", "static:/etc", "static:", "static:a//b", "static:.cairn/x"])
def test_a_static_handle_cannot_leave_the_export(nfs: Nfs, handle: str) -> None:
    with pytest.raises(NotFound):
        nfs.volumes.get_volume(handle)
    with pytest.raises(NotFound):
        nfs.volumes.publish_volume(handle, "node-a", RWO, False)
    nfs.volumes.delete_volume(handle)  # nothing to delete, and nothing deleted


def test_a_static_handle_through_a_planted_link_is_refused(nfs: Nfs, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (nfs.export / nfs.name).mkdir()
    (nfs.export / nfs.name / "link").symlink_to(outside)
    with pytest.raises(NotFound):
        nfs.volumes.get_volume(f"static:{nfs.name}/link")
    with pytest.raises(NotFound):
        nfs.volumes.get_volume(f"static:{nfs.name}/link/inner")


def test_static_attributes_must_agree_with_the_handle(nfs_server: NfsServer, tmp_path: Path) -> None:
    from csi.backends.base import AttachRequest
    from csi.backends.nfs.node import NfsConnector

    settings = NfsSettings(
        backend="nfs-static", server="127.0.0.1", share=EXPORT, port=nfs_server.port, node_mount_dir=str(tmp_path)
    )
    connector = NfsConnector(settings)
    shared = Capability(AccessType.MOUNT, AccessMode.MULTI_NODE_MULTI_WRITER)
    good = {"server": "127.0.0.1", "share": EXPORT, "subDir": "legacy/data"}
    attachment = connector.attach("static:legacy/data", AttachRequest(shared, volume_context=good))
    assert attachment.source == f"127.0.0.1:{EXPORT}/legacy/data"
    assert connector.sources("static:legacy/data") == [attachment.source]
    connector.detach("static:legacy/data")
    assert connector.sources("static:legacy/data") == []
    for key, wrong in (("server", "10.0.0.9"), ("share", "/other"), ("subDir", "elsewhere")):
        with pytest.raises(InvalidArgument, match=key):
            connector.attach("static:legacy/data", AttachRequest(shared, volume_context={**good, key: wrong}))


# -- reflinks with exportRoot --------------------------------------------------------------------


@pytest.fixture
def reflink_export(tmp_path: Path) -> Iterator[Path]:
    """An XFS filesystem with reflinks, where a server beside the controller exports it."""
    require_tools("mkfs.xfs", "losetup")
    image, target = tmp_path / "xfs.img", tmp_path / "export"
    target.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(512 * MiB)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True)
    device = loop.stdout.strip()
    try:
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(target)], check=True, capture_output=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_image_snapshots_share_extents_on_the_exported_filesystem(reflink_export: Path) -> None:
    settings = NfsSettings(backend="reflink", server="127.0.0.1", share=EXPORT, layout="image")
    volumes = NfsVolumes(settings, LocalTree(str(reflink_export)))
    volume = volumes.create_volume(VolumeSpec("pv-reflink", 128 * MiB, 0, (RWO,)))
    image = reflink_export / ".cairn" / "reflink" / "volumes" / f"{volume.local_id}.img"
    with open(image, "r+b") as handle:
        handle.write(os.urandom(96 * MiB))
        os.fsync(handle.fileno())

    def free() -> int:
        st = os.statvfs(reflink_export)
        return st.f_bavail * st.f_frsize

    before = free()
    snapshot = volumes.create_snapshot("snap-reflink", volume.local_id, {})
    clone = volumes.create_volume(
        VolumeSpec("pv-reflink-clone", 128 * MiB, 0, (RWO,), source=SourceRef("volume", volume.local_id))
    )
    assert before - free() < 16 * MiB, "a snapshot and a clone of 96 MiB of data took its room: not reflinked"
    copy = reflink_export / ".cairn" / "reflink" / "snapshots" / f"{snapshot.local_id}.data"
    assert copy.read_bytes() == image.read_bytes()
    volumes.delete_volume(clone.local_id)
    volumes.delete_snapshot(snapshot.local_id)
    volumes.delete_volume(volume.local_id)
