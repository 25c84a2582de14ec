"""What the benchmarks share: medians of timed rounds, a command runner, the report."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

MiB = 1 << 20


def parse_rounds() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per operation")
    rounds: int = parser.parse_args().rounds
    return rounds


def median_seconds(action: Callable[[int], None], rounds: int) -> float:
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        action(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


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
