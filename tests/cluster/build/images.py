"""Every image the cluster tier imports into containerd, as docker-archive tars in the cache
(``$CAIRN_CACHE``, default /var/cache/cairn), built or reused:

- the Cairn driver, from the repository's Dockerfile (image.sh, with buildah);
- the CSI sidecars built from source by binaries.sh, named exactly as the chart pins them;
- the pod sandbox, ``PAUSE`` (pause.c compiled with `gcc -static`);
- ``BUSYBOX`` for test pods: Debian's static busybox with a link for each applet they use.

    python3 -m tests.cluster.build.images BIN_DIR    prints one archive path a line

Standard library only, like oci.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.cluster.build.oci import Image, PackError, default_cache, pack

HERE = Path(__file__).resolve().parent
CHART_VALUES = HERE.parents[2] / "charts" / "cairn-csi" / "values.yaml"

SIDECARS = ("csi-provisioner", "csi-attacher", "csi-snapshotter", "snapshot-controller")
PAUSE = "cairn.test/pause:1"
BUSYBOX = "cairn.test/busybox:1"
BUSYBOX_APPLETS = (
    # What the tier's test pods run.
    "sh", "cat", "echo", "sleep", "dd", "sync", "ls", "mkdir", "rm", "cmp", "md5sum", "head",
    "tail", "wc", "mount", "df", "stat", "test", "true",
    # Small helpers a test pod reaches for.
    "[", "false", "touch", "grep", "env", "umount", "cp", "mv", "sha256sum", "printf", "kill",
    "ps", "date", "find", "du", "tee", "sed", "cut", "tr", "seq", "truncate", "blockdev",
    "hostname", "id", "uname", "xargs", "sort", "readlink",
)  # fmt: skip


class BuildError(RuntimeError):
    """An image of the tier cannot be made; the message says which and why."""


def is_static(binary: Path) -> bool:
    """A 64-bit ELF executable that asks for no program interpreter (no dynamic loader)."""
    with binary.open("rb") as elf:
        header = elf.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        order = "<" if header[5] == 1 else ">"
        (program_headers,) = struct.unpack_from(order + "Q", header, 0x20)
        entry_size, count = struct.unpack_from(order + "HH", header, 0x36)
        for index in range(count):
            elf.seek(program_headers + index * entry_size)
            (kind,) = struct.unpack(order + "I", elf.read(4))
            if kind == 3:  # PT_INTERP
                return False
    return True


def require_static(binary: Path) -> Path:
    if not binary.is_file():
        raise BuildError(f"{binary} does not exist")
    if not is_static(binary):
        raise BuildError(f"{binary} is not a static executable: an image without libc cannot run it")
    return binary


def chart_reference(binary: str, values: Path = CHART_VALUES) -> str:
    """The image the chart's values.yaml pins for a sidecar, e.g.
    registry.k8s.io/sig-storage/csi-provisioner:v6.4.0."""
    found = re.findall(rf"^\s*image:\s*(\S+/{re.escape(binary)}:\S+)\s*$", values.read_text(), re.M)
    if len(found) != 1:
        raise BuildError(f"{values} pins {len(found)} images for {binary}, expected one")
    return str(found[0])


def sidecar_image(bin_dir: Path, binary: str) -> Image:
    """A sidecar's image: its binary at the root, run as the entrypoint."""
    return Image(
        reference=chart_reference(binary),
        files={f"/{binary}": require_static(bin_dir / binary)},
        entrypoint=[f"/{binary}"],
    )


def pause_image(cache: Path | None = None) -> Image:
    """The pod sandbox: pause.c compiled statically, cached on its source and compiler."""
    source = HERE / "pause.c"
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildError("gcc is not installed: it compiles the pause image's binary")
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source.read_bytes() + version.encode()).hexdigest()[:16]
    binary = (cache or default_cache()) / "images" / "build" / f"pause-{key}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
        compiled = subprocess.run(
            [gcc, "-static", "-Os", "-s", "-o", str(partial), str(source)], capture_output=True, text=True, check=False
        )
        if compiled.returncode != 0:
            raise BuildError(f"gcc -static failed (is libc6-dev installed?):\n{compiled.stderr[-2000:]}")
        partial.rename(binary)
    return Image(reference=PAUSE, files={"/pause": require_static(binary)}, entrypoint=["/pause"])


def busybox_image(busybox: Path = Path("/bin/busybox")) -> Image:
    """Debian's static busybox (package busybox-static) with a link in /bin for each applet
    the tier's test pods use; `sh` by default."""
    require_static(busybox)
    listed = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    missing = sorted(set(BUSYBOX_APPLETS) - set(listed))
    if missing:
        raise BuildError(f"{busybox} lacks the applets {', '.join(missing)}")
    return Image(
        reference=BUSYBOX,
        files={"/bin/busybox": busybox},
        links={f"/bin/{applet}": "busybox" for applet in BUSYBOX_APPLETS},
        cmd=["sh"],
    )


def packed_images(bin_dir: Path, cache: Path | None = None) -> list[Path]:
    """The sidecars, the pause image and busybox, packed into the cache."""
    images = [sidecar_image(bin_dir, binary) for binary in SIDECARS]
    images += [pause_image(cache), busybox_image()]
    try:
        return [pack(image, cache) for image in images]
    except PackError as error:
        raise BuildError(str(error)) from error


def driver_image(context: Path | None = None, cache: Path | None = None) -> Path:
    """The Cairn image built by image.sh from ``context`` (default: this clone)."""
    env = dict(os.environ)
    if cache is not None:
        env["CAIRN_CACHE"] = str(cache)
    argv = [str(HERE / "image.sh"), *([str(context)] if context else [])]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise BuildError(f"image.sh failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def build_all(bin_dir: Path, cache: Path | None = None) -> list[Path]:
    """Every archive the tier imports before the kubelet starts: the driver's image first."""
    return [driver_image(cache=cache), *packed_images(bin_dir, cache)]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        archives = build_all(Path(arguments[0]))
    except BuildError as error:
        print(f"images: {error}", file=sys.stderr)
        return 1
    print(f"images: ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    for archive in archives:
        print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
