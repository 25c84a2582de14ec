"""The layer contracts in pyproject.toml are enforced by `make lint`; this proves they
catch a violation: a copy of the package where the domain model imports a service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_parent, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (make test installs it)")
    shutil.copytree(ROOT / "csi", tmp_path / "csi", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_package_keeps_its_layers(package_copy: Path) -> None:
    result = lint(package_copy)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("model.py", "from csi import controller", "Layers of docs/design.md"),
        ("backends/local/controller.py", "import grpc", "Protobuf and gRPC stop at the service layer"),
        ("backends/local/node.py", "from csi.backends.rbd import journal", "Backends do not know each other"),
    ],
)
def test_a_violation_is_caught(package_copy: Path, module: str, line: str, contract: str) -> None:
    path = package_copy / "csi" / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    result = lint(package_copy)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout[-3000:]
