"""Where a process's time goes: py-spy (PyPI's ``py-spy``) samples every thread of the process
while a load runs, and the samples are condensed into a few lines of text.

py-spy reads the process's memory from outside (ptrace), so it needs root or
CAP_SYS_PTRACE, and a Python build it recognises. When it cannot attach, ``Sampled.problem``
says why and there is no summary: the benchmark goes on without one.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CALL_FRAMES = ("_unary_response_in_pool", "_stream_response_in_pool")
"""grpcio's frames that hold a call on a worker thread: a sample whose stack holds one is
time a worker spent on a call."""
PHASES = (
    ("_call_behavior", "in the handler (the driver's code, its interceptor, the status)"),
    ("unary_request", "waiting for the request message to reach the worker (grpc)"),
)
"""Where a call's sample is, by the grpcio frame it passes through; anything else under a
call frame is grpc serializing and sending the answer."""


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # installed in the same environment
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Sampled:
    """Samples of one run: each stack (outermost frame first) and how often it was seen."""

    pid: int
    rate: int
    stacks: Counter[tuple[str, ...]] = field(default_factory=Counter)
    problem: str | None = None
    version: str = ""


@contextlib.contextmanager
def sampled(pid: int, directory: Path, rate: int = 250) -> Iterator[Sampled]:
    """Sample process ``pid`` (every thread, idle or not) ``rate`` times a second for the
    duration of the block. Without ``problem``, the result holds the samples afterwards."""
    result = Sampled(pid, rate)
    binary = py_spy()
    if binary is None:
        result.problem = "py-spy is not installed (it is one of the dev dependencies: `make setup-test`)"
        yield result
        return
    result.version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    output, log = directory / "py-spy.raw", directory / "py-spy.log"
    argv = [
        binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--idle",
        "--nonblocking", "--output", str(output),
    ]  # fmt: skip
    with open(log, "wb") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while process.poll() is None and "Sampling process" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if process.poll() is not None:
            result.problem = f"py-spy could not sample pid {pid}: {_reason(log)}"
        yield result
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if result.problem is None:
        if output.exists():
            result.stacks = parse_raw(output.read_text(errors="replace"))
        else:
            result.problem = f"py-spy wrote no samples: {_reason(log)}"


def _reason(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return (errors or lines or ["(it printed nothing)"])[0]


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw format: one line per distinct stack, ``outer;...;inner count``."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks[tuple(frames.split(";"))] += int(count)
    return stacks


def without_line(frame: str) -> str:
    """``function (file.py:12)`` -> ``function (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})" if where else name


def _function(frame: str) -> str:
    return frame.split(" (", 1)[0]


def summary(result: Sampled, top: int = 12) -> list[str]:
    """A few lines: how the sampled time of the worker threads splits between the phases
    of a call, then, for the time in handlers, the innermost Python frames (self) and the
    functions it passed through (inclusive)."""
    if result.problem is not None:
        return [result.problem]
    total = sum(result.stacks.values())
    if not total:
        return ["py-spy took no samples"]
    phases: Counter[str] = Counter()
    in_handler: Counter[tuple[str, ...]] = Counter()
    for stack, count in result.stacks.items():
        functions = [_function(f) for f in stack]
        if not any(f in CALL_FRAMES for f in functions):
            continue
        for frame, phase in PHASES:
            if frame in functions:
                phases[phase] += count
                if frame == PHASES[0][0]:
                    in_handler[stack[functions.index(frame) + 1 :]] += count
                break
        else:
            phases["serializing and sending the answer (grpc)"] += count
    in_calls = sum(phases.values())
    lines = [
        f"{result.version or 'py-spy'}: {total} samples of every thread ({result.rate} a second), "
        f"{in_calls} ({in_calls / total:.0%}) of them on a call (the rest: idle workers, grpc's poller, "
        "the main thread). Of the time on calls:"
    ]
    lines += [f"  {count / in_calls:6.1%}  {phase}" for phase, count in phases.most_common()] if in_calls else []
    busy = sum(in_handler.values())
    if not busy:
        return lines
    leaves: Counter[str] = Counter()
    passed: Counter[str] = Counter()
    for stack, count in in_handler.items():
        leaves[stack[-1] if stack else "(the handler itself)"] += count
        for frame in {without_line(f) for f in stack}:
            passed[frame] += count
    lines.append(f"Of the time in handlers, the innermost Python frame (self), top {top}:")
    lines += [f"  {count / busy:6.1%}  {frame}" for frame, count in leaves.most_common(top)]
    lines.append(f"and the functions it passed through (inclusive), top {top}:")
    lines += [f"  {count / busy:6.1%}  {frame}" for frame, count in passed.most_common(top)]
    return lines
