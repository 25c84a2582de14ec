"""The cluster tier's images. The driver's is built from the repository's Dockerfile (a
changed Dockerfile shows in the image built); the others are packed from static binaries
into archives laid out the way `ctr images import` reads them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from tests.cluster.build import images
from tests.cluster.build.oci import Image, pack, write_archive
from tests.support import require, require_root, require_tools

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "cairn-csi"


def read_archive(archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The archive's manifest entry and its image config."""
    with tarfile.open(archive) as tar:
        manifest = json.load(_member(tar, "manifest.json"))
        assert len(manifest) == 1, manifest
        return manifest[0], json.load(_member(tar, manifest[0]["Config"]))


def layer_file(archive: Path, pattern: str) -> bytes | None:
    """The content of the first file matching ``pattern`` in the archive's layers, upper first."""
    with tarfile.open(archive) as tar:
        manifest = json.load(_member(tar, "manifest.json"))
        for name in reversed(manifest[0]["Layers"]):
            with tarfile.open(fileobj=_member(tar, name), mode="r|") as layer:
                for entry in layer:
                    if entry.isfile() and re.fullmatch(pattern, entry.name.removeprefix("./")):
                        return _member(layer, entry).read()
    return None


def layer_entries(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        (name,) = json.load(_member(tar, "manifest.json"))[0]["Layers"]
        with tarfile.open(fileobj=_member(tar, name)) as layer:
            return {entry.name: entry for entry in layer.getmembers()}


def _member(tar: tarfile.TarFile, name: str | tarfile.TarInfo) -> IO[bytes]:
    member = tar.extractfile(name)
    assert member is not None, name
    return member


def chart_image() -> str:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return f"{values['repository']}:{values['tag'] or chart['appVersion']}"


# ---- The driver's image (image.sh)


def build_context(into: Path) -> Path:
    """A copy of what the Dockerfile copies, times kept (buildah's layer cache compares them)."""
    into.mkdir()
    for name in ("Dockerfile", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, into / name)
    shutil.copytree(ROOT / "csi", into / "csi", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return into


def test_the_driver_image_is_built_from_the_dockerfile(tmp_path: Path) -> None:
    require_root()
    require_tools("buildah", "mmdebstrap", "runc")
    context = build_context(tmp_path / "context")
    dockerfile = (context / "Dockerfile").read_text()
    label = uuid.uuid4().hex
    (context / "Dockerfile").write_text(f"{dockerfile}\nLABEL io.cairn.test.build={label}\n")

    started = time.monotonic()
    archive = images.driver_image(context)
    built = time.monotonic() - started
    try:
        entry, config = read_archive(archive)
        assert entry["RepoTags"] == [chart_image()]
        assert config["config"]["Labels"]["io.cairn.test.build"] == label
        entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
        assert entrypoint, "the Dockerfile has no ENTRYPOINT in JSON form"
        assert config["config"]["Entrypoint"] == json.loads(entrypoint.group(1))
        installed = layer_file(archive, r"opt/cairn/lib/python3[.0-9]*/site-packages/csi/__init__\.py")
        assert installed == (context / "csi" / "__init__.py").read_bytes()

        # Unchanged, it is not built again: the same archive, not rewritten.
        inode = archive.stat().st_ino
        started = time.monotonic()
        assert images.driver_image(context) == archive
        again = time.monotonic() - started
        assert archive.stat().st_ino == inode
    finally:
        archive.unlink(missing_ok=True)
    print(f"image.sh: changed Dockerfile built in {built:.1f} s, unchanged in {again:.1f} s ({archive.name})")


# ---- The packed images (oci.py, images.py)


def test_a_packed_image_is_one_reproducible_layer(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"\x7fELF pretend")
    program.chmod(0o755)
    image = Image("cairn.test/example:2", {"/usr/bin/program": program}, {"/bin/alias": "../usr/bin/program"}, ["/x"])

    write_archive(image, tmp_path / "one.tar")
    write_archive(image, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()

    entry, config = read_archive(tmp_path / "one.tar")
    assert entry["RepoTags"] == ["cairn.test/example:2"]
    assert config["config"]["Entrypoint"] == ["/x"] and "Cmd" not in config["config"]
    with tarfile.open(tmp_path / "one.tar") as tar:
        layer = _member(tar, entry["Layers"][0]).read()
    assert config["rootfs"]["diff_ids"] == [f"sha256:{hashlib.sha256(layer).hexdigest()}"]
    entries = layer_entries(tmp_path / "one.tar")
    assert set(entries) == {"bin", "bin/alias", "dev", "etc", "proc", "sys", "tmp", "usr", "usr/bin", "usr/bin/program"}
    assert entries["tmp"].mode == 0o1777 and entries["usr/bin/program"].mode == 0o755
    assert entries["bin/alias"].issym() and entries["bin/alias"].linkname == "../usr/bin/program"
    assert all(e.mtime == 0 and e.uid == 0 and e.gid == 0 for e in entries.values())


def test_the_cache_keeps_one_archive_per_image_keyed_on_content(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_bytes(b"one")
    image = Image("cairn.test/example:1", {"/program": program}, entrypoint=["/program"])
    first = pack(image, tmp_path)
    assert pack(image, tmp_path) == first
    program.write_bytes(b"two")
    second = pack(image, tmp_path)
    assert second != first and second.exists() and not first.exists()


def test_the_tier_images_are_named_as_the_chart_pins_them(tmp_path: Path) -> None:
    busybox = Path("/bin/busybox")
    require(busybox.is_file() and images.is_static(busybox), "busybox-static is not installed")
    require_tools("gcc")
    binaries = tmp_path / "bin"
    binaries.mkdir()
    for name in images.SIDECARS:  # any static binary stands in for a sidecar
        shutil.copy2(busybox, binaries / name)

    started = time.monotonic()
    archives = images.packed_images(binaries, tmp_path)
    packed = time.monotonic() - started

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pinned = {
        values["sidecars"]["provisioner"]["image"],
        values["sidecars"]["attacher"]["image"],
        values["sidecars"]["snapshotter"]["image"],
        values["snapshotController"]["image"],
    }
    configs = {read_archive(archive)[0]["RepoTags"][0]: read_archive(archive)[1]["config"] for archive in archives}
    assert set(configs) == pinned | {images.PAUSE, images.BUSYBOX}
    for reference in pinned:
        binary = reference.rpartition("/")[2].partition(":")[0]
        assert configs[reference]["Entrypoint"] == [f"/{binary}"]
    assert configs[images.PAUSE]["Entrypoint"] == ["/pause"]
    assert configs[images.BUSYBOX]["Cmd"] == ["sh"]
    busybox_archive = next(a for a in archives if a.name.startswith("cairn.test_busybox"))
    links = {name for name, entry in layer_entries(busybox_archive).items() if entry.issym()}
    assert {"bin/sh", "bin/dd", "bin/md5sum", "bin/mount", "bin/stat"} <= links
    print(f"packed {len(archives)} images in {packed:.1f} s")


def test_a_dynamic_binary_is_refused(tmp_path: Path) -> None:
    dynamic = Path(sys.executable).resolve()
    require(not images.is_static(dynamic), f"{dynamic} is static")
    with pytest.raises(images.BuildError, match="not a static executable"):
        images.require_static(dynamic)
