"""Waiting for the end of processes this one did not start (``proc.Exits``), on real
processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from csi import proc


def detached_sleep(tmp_path: Path) -> int:
    """The pid of a ``sleep`` that is no child of this process (its shell exited)."""
    pid_file = tmp_path / "pid"
    subprocess.run(["sh", "-c", f'sleep 60 >/dev/null 2>&1 & echo $! > "{pid_file}"'], check=True)
    return int(pid_file.read_text())


def test_a_wait_ends_when_the_process_does(tmp_path: Path) -> None:
    pid = detached_sleep(tmp_path)
    try:
        with proc.Exits([pid]) as exits:
            assert not exits.wait(0.2), "the process runs: the wait must time out"
            os.kill(pid, signal.SIGKILL)
            assert exits.wait(30)
        assert proc.start_time(pid) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_process_that_ended_before_is_no_wait(tmp_path: Path) -> None:
    pid = detached_sleep(tmp_path)
    os.kill(pid, signal.SIGKILL)
    while proc.start_time(pid) is not None:
        pass
    with proc.Exits([pid]) as exits:
        assert exits.wait(0)


def test_every_process_is_waited_for(tmp_path: Path) -> None:
    first, second = detached_sleep(tmp_path), detached_sleep(tmp_path)
    try:
        with proc.Exits([first, second]) as exits:
            os.kill(first, signal.SIGKILL)
            assert not exits.wait(0.2), "one of the two still runs"
            os.kill(second, signal.SIGKILL)
            assert exits.wait(30)
    finally:
        for pid in (first, second):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
