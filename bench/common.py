"""What the benchmarks share: timed rounds (medians, p50 and p99), calls kept in flight by a
thread pool, a command runner, the reports."""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


def parse_rounds() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per operation")
    rounds: int = parser.parse_args().rounds
    return rounds


@dataclass(frozen=True)
class Timing:
    """Seconds taken by each round of one operation."""

    samples: tuple[float, ...]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        return self.percentile(0.99)

    def percentile(self, fraction: float) -> float:
        """Nearest rank: the smallest sample that at least ``fraction`` of the samples do not
        exceed (with fewer than 100 samples, p99 is the slowest round)."""
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


Action = Callable[[int], float | None]
"""Round ``i`` of an operation. It returns the seconds of the part it timed itself (when
it prepares or cleans up around the operation), or None to be timed whole."""


def _run_timed(action: Action, i: int) -> float:
    started = time.perf_counter()
    own = action(i)
    if own is None:
        return time.perf_counter() - started
    if not isinstance(own, float):
        raise TypeError(f"a timed action returned {type(own).__name__}, not its seconds or None")
    return own


def timed(action: Action, rounds: int) -> Timing:
    return Timing(tuple(_run_timed(action, i) for i in range(rounds)))


def median_seconds(action: Callable[[int], None], rounds: int) -> float:
    return timed(action, rounds).p50


def interleaved(actions: Mapping[str, Action], rounds: int, warmup: int = 2) -> dict[str, Timing]:
    """Time each action ``rounds`` times, round by round (round ``i`` of every action, then
    round ``i + 1``), so a change of load on the machine meanwhile falls on all of them
    alike. ``warmup`` rounds of each (numbered after the timed ones) run first, untimed."""
    for i in range(rounds, rounds + warmup):
        for action in actions.values():
            action(i)
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for i in range(rounds):
        for name, action in actions.items():
            samples[name].append(_run_timed(action, i))
    return {name: Timing(tuple(values)) for name, values in samples.items()}


@dataclass(frozen=True)
class Load:
    """``count`` calls made with ``in_flight`` of them at a time."""

    count: int
    in_flight: int
    seconds: float
    calls: Timing
    """Seconds of each call, as its caller saw it."""

    @property
    def per_second(self) -> float:
        return self.count / self.seconds


def in_flight(call: Callable[[int], None], count: int, calls_in_flight: int) -> Load:
    """Make ``call(0)`` .. ``call(count - 1)`` from a pool of ``calls_in_flight`` threads, so
    that many are in flight at any time until the last ones. An exception is raised here."""

    def one(i: int) -> float:
        started = time.perf_counter()
        call(i)
        return time.perf_counter() - started

    with futures.ThreadPoolExecutor(max_workers=calls_in_flight) as pool:
        started = time.perf_counter()
        each = list(pool.map(one, range(count)))
        elapsed = time.perf_counter() - started
    return Load(count, calls_in_flight, elapsed, Timing(tuple(each)))


def grpc_create_delete(driver: Any, capability: Any, size: int) -> Callable[[int], None]:
    """Round ``i``: CreateVolume ``b-<i>`` of ``size`` bytes, then DeleteVolume, over gRPC."""
    from csi.generated import csi_pb2 as pb

    def create_delete(i: int) -> None:
        request = pb.CreateVolumeRequest(
            name=f"b-{i}", volume_capabilities=[capability], capacity_range={"required_bytes": size}
        )
        volume = driver.controller.CreateVolume(request).volume
        driver.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id))

    return create_delete


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def report(title: str, results: dict[str, tuple[float, float]]) -> None:
    print(title)
    print(f"{'operation':<16}{'cairn':>12}{'raw':>12}{'ratio':>9}")
    for name, (cairn, raw) in results.items():
        print(f"{name:<16}{cairn * 1000:>10.2f}ms{raw * 1000:>10.2f}ms{cairn / raw:>8.1f}x")


def duration(seconds: float) -> str:
    """``seconds`` in a unit that keeps three or four digits: 0.412ms, 41.2ms, 4.12s."""
    if seconds < 0.01:
        return f"{seconds * 1000:.3f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s"


def ratio(cairn: float, reference: float) -> str:
    return f"{cairn / reference:.1f}x" if reference > 0 else "-"


def report_spread(title: str, references: Sequence[str], results: Mapping[str, Sequence[Timing | None]]) -> None:
    """One line per operation: the driver's p50 and p99, then for each reference (a name of
    ``references``; None where it has no figure) its p50 and p99 and the driver's ratio to
    it at each."""
    print(title)
    head = f"{'operation':<24}{'cairn p50':>11}{'p99':>10}"
    for name in references:
        head += f" | {name + ' p50':>11}{'p99':>10}{'x p50':>7}{'x p99':>7}"
    print(head)
    for operation, (cairn, *others) in results.items():
        assert cairn is not None
        line = f"{operation:<24}{duration(cairn.p50):>11}{duration(cairn.p99):>10}"
        for other in others:
            if other is None:
                line += f" | {'-':>11}{'':>10}{'':>7}{'':>7}"
            else:
                line += f" | {duration(other.p50):>11}{duration(other.p99):>10}"
                line += f"{ratio(cairn.p50, other.p50):>7}{ratio(cairn.p99, other.p99):>7}"
        print(line.rstrip())
