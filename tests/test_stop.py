"""A stop is bounded: SIGTERM ends the process within its deadline, whatever still runs
(a call stuck in its backend, a companion that does not stop, an exit held up in a
library), and the log says what was cut short."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.server import Server, Services

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


class Stuck(pb_grpc.IdentityServicer):
    """Probe blocks until released, as a call does on a backend that does not answer."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        self.entered.set()
        self.release.wait()
        return pb.ProbeResponse()


class StuckCompanion:
    """A companion server whose stop never returns."""

    health_name = "stuck-companion"

    def __init__(self) -> None:
        self.release = threading.Event()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.release.wait()

    def serving(self) -> bool:
        return True


def test_a_companion_that_does_not_stop_is_left_behind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    companion = StuckCompanion()
    instance = Server(f"unix://{tmp_path}/s.sock", Services(Stuck(), None, None), companions=[companion])
    instance.start()
    started = time.monotonic()
    try:
        assert instance.stop(grace=0.2, step=0.3) is False
    finally:
        companion.release.set()
    assert time.monotonic() - started < 3
    assert "stopping stuck-companion did not end in time" in caplog.text
    assert not (tmp_path / "s.sock").exists()


def test_calls_still_running_after_the_grace_are_named_as_cut_short(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servicer = Stuck()
    instance = Server(f"unix://{tmp_path}/s.sock", Services(servicer, None, None), workers=2)
    instance.start()
    channel = grpc.insecure_channel(instance.endpoint.address)
    try:
        call = pb_grpc.IdentityStub(channel).Probe.future(pb.ProbeRequest(), timeout=30)
        assert servicer.entered.wait(10)
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            assert instance.stop(grace=0.3, step=0.3) is False
        assert time.monotonic() - started < 3
        assert call.exception() is not None, "the client learns its call was cut short"
        cut = [r for r in caplog.records if r.getMessage() == "calls cut short by the stop"]
        assert cut and "Probe request_id=" in str(getattr(cut[0], "calls", ""))
    finally:
        servicer.release.set()
        channel.close()


def test_a_finished_stop_is_complete_and_closes_the_backends(tmp_path: Path) -> None:
    closed: list[str] = []
    closers = [("closing backend a", lambda: closed.append("a")), ("closing backend b", lambda: closed.append("b"))]
    instance = Server(f"unix://{tmp_path}/s.sock", Services(Stuck(), None, None), closers=closers)
    instance.start()
    assert instance.stop(grace=1, step=1) is True
    assert closed == ["a", "b"]
    assert instance.stop() is True  # a second stop has nothing to do
    assert closed == ["a", "b"]


def test_a_stop_that_cut_a_call_short_closes_no_backend(tmp_path: Path) -> None:
    """A call still running may still write what a close would settle: the backend is
    left as after a crash, for its start-up to mend."""
    service, closed = Stuck(), []
    instance = Server(
        f"unix://{tmp_path}/s.sock", Services(service, None, None), closers=[("closing", lambda: closed.append(1))]
    )
    instance.start()
    channel = grpc.insecure_channel(f"unix://{tmp_path}/s.sock")
    pending = pb_grpc.IdentityStub(channel).Probe.future(pb.ProbeRequest())
    assert service.entered.wait(10)
    assert instance.stop(grace=0.2, step=0.2) is False
    assert closed == []
    service.release.set()
    pending.cancel()
    channel.close()


# A driver process stands in for the real one: the stop path is the one `cairn-csi` runs
# (``run_until_signalled``), around an Identity service whose Probe never returns.
PROGRAM = """
import sys, threading
from csi import log
from csi.cli import run_until_signalled
from csi.generated import csi_pb2_grpc as pb_grpc
from csi.server import Server, Services

class Stuck(pb_grpc.IdentityServicer):
    def Probe(self, request, context):
        print("in the call", file=sys.stderr, flush=True)
        threading.Event().wait()

endpoint, mode = sys.argv[1], sys.argv[2]
log.setup("info")
server = Server(endpoint, Services(Stuck(), None, None), workers=2)
server.start()
if mode == "exit held up":
    threading.Thread(target=threading.Event().wait, name="never-ends").start()
sys.exit(run_until_signalled(server, grace=0.5, step=0.5, deadline=3))
"""


def start_program(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path, Path]:
    script, socket, stderr = tmp_path / "program.py", tmp_path / "csi.sock", tmp_path / "stderr"
    script.write_text(PROGRAM)
    with open(stderr, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), f"unix://{socket}", mode], cwd=ROOT, stderr=out, text=True
        )
    deadline = time.monotonic() + 30
    # Not the socket: it appears before the signal handlers are in place, and a SIGTERM
    # in between would end the program the default way.
    while "serving until SIGTERM" not in stderr.read_text():
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "the program did not serve"
        time.sleep(0.05)
    return process, socket, stderr


def test_sigterm_ends_the_process_in_time_with_a_call_stuck_in_its_backend(tmp_path: Path) -> None:
    """An orderly exit would wait for the stuck call's thread forever."""
    process, socket, stderr = start_program(tmp_path, "call stuck")
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = pb_grpc.IdentityStub(channel).Probe.future(pb.ProbeRequest(), timeout=60)
        deadline = time.monotonic() + 10
        while "in the call" not in stderr.read_text():
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=20)
        finally:
            process.kill()
        took = time.monotonic() - started
        assert call.exception() is not None
    log = stderr.read_text()
    assert code == 0, log
    assert took < 3, f"the stop took {took:.1f}s"
    assert "calls cut short by the stop" in log and "Probe request_id=" in log
    assert "exiting without waiting for what the stop cut short" in log
    assert not socket.exists()


def test_an_exit_held_up_after_the_stop_ends_at_the_deadline_with_every_stack(tmp_path: Path) -> None:
    """A thread nobody stops (here one that never ends; in life, a library's) would hold
    an orderly exit up forever: at the deadline the process ends, naming where it hung."""
    process, _, stderr = start_program(tmp_path, "exit held up")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=20)
    finally:
        process.kill()
    took = time.monotonic() - started
    log = stderr.read_text()
    assert code == 1, log
    assert 2.5 < took < 8, f"ended after {took:.1f}s, not at the 3 s deadline"
    assert "Timeout (0:00:03)!" in log and "Thread " in log
