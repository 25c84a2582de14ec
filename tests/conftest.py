from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import Driver, leftovers, scrub


@contextmanager
def running_driver(root: Path) -> Iterator[Driver]:
    """A running driver on the embedded local backend; afterwards it must stop cleanly
    on SIGTERM, remove its socket, and leave no loop device or mount behind."""
    instance = Driver(root).start()
    try:
        yield instance
    finally:
        code = instance.stop()
        left = leftovers(root)
        scrub(root)
        assert code == 0, f"driver exited with {code}:\n{instance.log.read_text()[-4000:]}"
        assert not instance.socket.exists(), "driver left its socket behind"
        assert not left, f"test left behind: {left}"


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    with running_driver(tmp_path) as instance:
        yield instance


@pytest.fixture(scope="module")
def shared_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    """One driver for a module of tests that create nothing lasting."""
    with running_driver(tmp_path_factory.mktemp("driver")) as instance:
        yield instance
