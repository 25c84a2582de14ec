"""Pack files into docker-archive tars that `ctr images import` loads, without a container
engine: images that hold nothing but static binaries (the cluster tier's sidecars, its pod
sandbox and its busybox; see images.py for those).

    python3 tests/cluster/build/oci.py OUT.tar NAME:TAG [--entrypoint JSON] [--cmd JSON]
                                       [--link PATH=TARGET ...] SRC=DEST ...

From Python: ``pack(Image(...))`` returns the archive in the cache, written if needed.

An image is one layer: the files, the symbolic links, the directories above them and the
mount points a runtime expects, laid out as `docker save` does (manifest.json naming the
config, the layer and the tag, which is what `ctr images import` reads). Every entry is
owned by root and dated at the epoch, so the same inputs give the same bytes. Archives are
cached in ``$CAIRN_CACHE/images`` (default /var/cache/cairn) under a key made of the
inputs' content and of this file.

Standard library only: it runs with any python3, inside or outside the project's venv.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
MOUNT_POINTS = ("dev", "etc", "proc", "sys", "tmp")
EPOCH = "1970-01-01T00:00:00Z"


class PackError(Exception):
    """An input cannot go into an image: a missing file, a path outside the image, a
    reference without a tag."""


@dataclass(frozen=True)
class Image:
    """What goes into one image. ``files`` maps a path in the image to a file on this host,
    ``links`` a path in the image to the target of a symbolic link."""

    reference: str
    files: Mapping[str, Path]
    links: Mapping[str, str] = field(default_factory=dict)
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = DEFAULT_ENV


def default_cache() -> Path:
    return Path(os.environ.get("CAIRN_CACHE", "/var/cache/cairn"))


# ---- Writing an archive


def write_archive(image: Image, out: Path) -> None:
    """Write ``image`` to ``out`` in the layout of `docker save`: manifest.json naming the
    config and the layer, and the tag in RepoTags (which is what `ctr images import` reads)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent) as layer:
        _write_layer(image, layer)
        layer.seek(0)
        diff_id = _sha256_of(layer)
        config = json.dumps(_config(image, diff_id), sort_keys=True).encode()
        config_name = f"{hashlib.sha256(config).hexdigest()}.json"
        layer_name = f"{diff_id}/layer.tar"
        manifest = [{"Config": config_name, "RepoTags": [image.reference], "Layers": [layer_name]}]
        repository, tag = split_reference(image.reference)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
            _add_bytes(archive, config_name, config)
            layer.seek(0, io.SEEK_END)
            layer_info = _entry(layer_name, tarfile.REGTYPE, 0o644)
            layer_info.size = layer.tell()
            layer.seek(0)
            archive.addfile(layer_info, layer)
            _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
            _add_bytes(archive, "repositories", json.dumps({repository: {tag: diff_id}}).encode())


def split_reference(reference: str) -> tuple[str, str]:
    """``registry/name:tag`` into its repository and tag; a tag is required."""
    repository, _, tag = reference.rpartition(":")
    if not repository or not tag or "/" in tag:
        raise PackError(f"{reference!r} names no tag (NAME:TAG)")
    return repository, tag


def _write_layer(image: Image, layer: IO[bytes]) -> None:
    files = {_relative(name): source for name, source in image.files.items()}
    links = {_relative(name): target for name, target in image.links.items()}
    if files.keys() & links.keys():
        raise PackError(f"paths both a file and a link: {sorted(files.keys() & links.keys())}")
    directories = {str(parent) for path in [*files, *links] for parent in PurePosixPath(path).parents}
    directories = (directories - {"."}) | set(MOUNT_POINTS)
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted(directories):
            tar.addfile(_entry(directory, tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755))
        for path in sorted(files.keys() | links.keys()):
            if path in links:
                link = _entry(path, tarfile.SYMTYPE, 0o777)
                link.linkname = links[path]
                tar.addfile(link)
                continue
            with files[path].open("rb") as content:
                status = os.fstat(content.fileno())
                entry = _entry(path, tarfile.REGTYPE, status.st_mode & 0o7777)
                entry.size = status.st_size
                tar.addfile(entry, content)


def _relative(path: str) -> str:
    relative = str(PurePosixPath("/", path)).lstrip("/")
    if not relative or ".." in PurePosixPath(relative).parts:
        raise PackError(f"{path!r} is not a path in an image")
    return relative


def _entry(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    entry.mode = mode
    entry.mtime = 0
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = "root"
    return entry


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    entry = _entry(name, tarfile.REGTYPE, 0o644)
    entry.size = len(data)
    archive.addfile(entry, io.BytesIO(data))


def _config(image: Image, diff_id: str) -> dict[str, object]:
    settings: dict[str, object] = {"Env": list(image.env), "WorkingDir": "/"}
    if image.entrypoint:
        settings["Entrypoint"] = list(image.entrypoint)
    if image.cmd:
        settings["Cmd"] = list(image.cmd)
    return {
        "architecture": _architecture(),
        "os": "linux",
        "created": EPOCH,
        "config": settings,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created": EPOCH, "created_by": "tests/cluster/build/oci.py"}],
    }


def _architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _sha256_of(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


# ---- The cache


def pack(image: Image, cache: Path | None = None) -> Path:
    """The archive of ``image`` in the cache, written unless one with the same inputs is
    there already; older archives of the same reference are removed."""
    for source in image.files.values():
        if not source.is_file():
            raise PackError(f"{source} is not a file")
    directory = (cache or default_cache()) / "images"
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", image.reference)
    archive = directory / f"{stem}-{cache_key(image)}.tar"
    if not archive.exists():
        partial = archive.with_name(f"{archive.name}.{os.getpid()}.partial")
        try:
            write_archive(image, partial)
            partial.rename(archive)
        finally:
            partial.unlink(missing_ok=True)
        for older in directory.glob(f"{stem}-*.tar"):
            if older != archive and re.fullmatch(r"[0-9a-f]{16}", older.stem[len(stem) + 1 :]):
                older.unlink(missing_ok=True)
    return archive


def cache_key(image: Image) -> str:
    """Digest of everything that shapes the archive: this file, the settings, and the
    content and mode of every file."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    settings = [image.reference, list(image.entrypoint), list(image.cmd), list(image.env)]
    digest.update(json.dumps(settings).encode())
    digest.update(json.dumps(sorted((_relative(name), target) for name, target in image.links.items())).encode())
    for name, source in sorted(image.files.items(), key=lambda item: _relative(item[0])):
        with source.open("rb") as content:
            file_digest = _sha256_of(content)
        digest.update(f"{_relative(name)} {source.stat().st_mode & 0o7777:o} {file_digest}\n".encode())
    return digest.hexdigest()[:16]


# ---- Command line


def _pairs(items: Sequence[str], what: str) -> Iterator[tuple[str, str]]:
    for item in items:
        left, separator, right = item.partition("=")
        if not separator or not left or not right:
            raise PackError(f"{item!r} is not {what}")
        yield left, right


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the archive to write")
    parser.add_argument("reference", help="the image's NAME:TAG")
    parser.add_argument("--entrypoint", type=_json_list, default=[], help='JSON list, e.g. ["/pause"]')
    parser.add_argument("--cmd", type=_json_list, default=[], help="JSON list")
    parser.add_argument("--link", action="append", default=[], metavar="PATH=TARGET", help="a symbolic link")
    parser.add_argument("files", nargs="+", metavar="SRC=DEST", help="a host file and its path in the image")
    arguments = parser.parse_args(argv)
    try:
        image = Image(
            reference=arguments.reference,
            files={dest: Path(src) for src, dest in _pairs(arguments.files, "SRC=DEST")},
            links=dict(_pairs(arguments.link, "PATH=TARGET")),
            entrypoint=arguments.entrypoint,
            cmd=arguments.cmd,
        )
        write_archive(image, arguments.out)
    except (PackError, OSError) as error:
        print(f"oci.py: {error}", file=sys.stderr)
        return 1
    print(arguments.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
