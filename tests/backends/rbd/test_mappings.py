"""How the node half finds an image's kernel mappings without starting the rbd tool: a
sysfs tree laid out as the kernel's documented ABI (Documentation/ABI/testing/sysfs-bus-rbd)
stands in for one with the rbd and nbd modules loaded, which this host lacks; the rbd
node suite runs the rest against a real cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.backends.rbd import node

pytestmark = pytest.mark.unit


def device(root: Path, number: int, pool: str, name: str, snap: str = "-", namespace: str = "") -> None:
    folder = root / "bus" / str(number)
    folder.mkdir(parents=True)
    for attribute, value in (("pool", pool), ("name", name), ("current_snap", snap), ("pool_ns", namespace)):
        (folder / attribute).write_text(value + "\n")


def test_krbd_mappings_are_read_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "SYSFS_RBD", str(tmp_path / "bus"))
    assert node._krbd_device("cairn", "cairn-vol-a") is None, "no rbd module: nothing mapped"
    device(tmp_path, 0, "cairn", "cairn-vol-a", snap="snap-1")
    device(tmp_path, 1, "other", "cairn-vol-a")
    device(tmp_path, 2, "cairn", "cairn-vol-a", namespace="tenant")
    assert node._krbd_device("cairn", "cairn-vol-a") is None, "a snapshot, another pool, a namespace"
    device(tmp_path, 7, "cairn", "cairn-vol-a")
    assert node._krbd_device("cairn", "cairn-vol-a") == "/dev/rbd7"
    assert node._krbd_device("cairn", "cairn-vol-b") is None


def test_the_rbd_tool_is_asked_only_while_an_nbd_device_is_connected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "SYSFS_BLOCK", str(tmp_path))
    (tmp_path / "loop0").mkdir()
    (tmp_path / "nbd0").mkdir()
    assert not node._nbd_connected(), "an nbd device without a daemon"
    (tmp_path / "nbd3").mkdir()
    (tmp_path / "nbd3" / "pid").write_text("4242\n")
    assert node._nbd_connected()
