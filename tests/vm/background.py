"""The vm tier's guest, started when the session starts and run beside the host's tests.

The guest spends ten minutes under software emulation, using about one core, while the
host's tests leave most of the machine idle (they wait on clusters, servers and
timeouts): run one after the other they add up, run together they overlap. The guest
gets a Ceph cluster and an NFS server of its own, so that nothing a host test does to
the session's servers (emptying the pool after each test, stopping the NFS server on
purpose) reaches the guest's tests, and the other way round. The vm test waits for the
guest's result and judges it; the session's end stops whatever is still running."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.ceph import RUNNING_CLUSTER, CephCluster
from tests.nfs import RUNNING_SERVER, NfsServer
from tests.vm import guest

GUEST_TIMEOUT = 3000.0
"""Seconds the guest may run. About 20 minutes beside a warm run; a cold run builds
Kubernetes on both cores meanwhile, which slows the emulated guest by a third or more."""
NAME = "node-suites"

# Python runs tens of times slower under emulation, so every suite runs in one guest and
# one pytest session: a boot and a session start (imports, fixtures) cost minutes each.
SUITES = (
    # Online growth only (ext4's is skipped on hosts without CAP_SYS_RESOURCE): the host
    # runs the rest of the local node suite on its own kernel.
    "tests/test_node.py::test_online_expansion_grows_the_filesystem",
    "tests/backends/rbd/test_node.py",  # once per kernel mapper
    "tests/backends/nfs/test_node.py",
    "tests/backends/nfs/test_quota.py",
    "tests/conformance/test_sanity.py",  # only its nfs and lvm runs: the host runs the others
    "tests/backends/lvm/test_node.py",  # device-mapper: activation, thin pools, snapshots
    "tests/backends/lvm/test_blocks.py",  # only its thin pool tests: the host reads the tools' output
    "tests/contract/test_snapshot_blocks.py",  # only its lvm-thin runs: the host runs the others
    "tests/backup/test_lvm_round_trip.py",  # backups of thin LVs, restores onto a thin pool
)
AT_LEAST = 2 + 2 * 4 + 1 + 13 + 4 + 1 + 2 + 3 + 2
# csi-sanity against lvm takes five minutes per run under emulation (hundreds of LVM
# commands): the guest runs it in filesystem mode; raw block passes too (run it with
# -k test_csi_sanity_lvm), and the lvm node suite covers raw block volumes every time.
# The rbd node suite's rbd-fuse-only test is the host's: the guest is there for krbd and
# rbd-nbd.
COMMAND = (
    "modprobe -a loop rbd nbd nfsv4 dm_mod dm_thin_pool && "
    f"{sys.executable} -m pytest -p no:cacheprovider -q -rs --durations=20 {' '.join(SUITES)} "
    "-k '(nfs or lvm or not test_sanity) and not test_csi_sanity_lvm[block] "
    "and (not test_snapshot_blocks or lvm-thin) and (not test_blocks or thin_pool) "
    "and not rbd_fuse_died'"
)
ENV = {"CAIRN_REQUIRE_ALL": "1", "PYTHONDONTWRITEBYTECODE": "1", "CAIRN_TEST_RBD_MAPPER": "krbd,rbd-nbd"}


@dataclass
class Run:
    """A guest running on a thread of its own: its result, or why there is none."""

    command: str
    env: dict[str, str]
    root: Path
    result: guest.GuestResult | None = None
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    _qemu: subprocess.Popen[bytes] | None = None
    _stopping: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        threading.Thread(target=self._run, name="vm-guest", daemon=True).start()

    def _run(self) -> None:
        ceph = CephCluster(self.root / "ceph")
        nfs = NfsServer(self.root / "nfs")
        try:
            ceph.root.mkdir(parents=True)
            nfs.root.mkdir(parents=True)
            ceph.start()
            nfs.start()
            env = {**self.env, RUNNING_CLUSTER: str(ceph.root), RUNNING_SERVER: str(nfs.root)}
            if not self._stopping:
                self.result = guest.run(
                    self.command,
                    env=env,
                    timeout=GUEST_TIMEOUT,
                    host_ports=[*ceph.client_ports(), nfs.port],
                    shares=[ceph.root, nfs.root],
                    on_start=self._started,
                )
        except Exception as exc:  # reported by the vm test, which owns the verdict
            self.error = f"{type(exc).__name__}: {exc}\n{ceph.log_tails()}"
        finally:
            with contextlib.suppress(Exception):
                nfs.stop()
            with contextlib.suppress(Exception):
                ceph.stop()
            self.done.set()

    def _started(self, qemu: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._qemu = qemu
            if self._stopping:
                qemu.kill()

    def wait(self) -> guest.GuestResult:
        """The guest's result once it has powered off; AssertionError naming what kept it
        from running."""
        self.done.wait(GUEST_TIMEOUT + 600)
        assert self.result is not None, f"the guest did not run: {self.error or 'no result in time'}"
        return self.result

    def stop(self) -> None:
        """Stop the guest if it still runs (the session ended early), and wait for its
        servers to be gone."""
        with self._lock:
            self._stopping = True
            if self._qemu is not None and self._qemu.poll() is None:
                self._qemu.kill()
        self.done.wait(120)


RUNS: dict[str, Run] = {}


@contextlib.contextmanager
def started(root: Path) -> Iterator[Run]:
    """The node suites' guest, running from now until the block ends (stopped there if
    it still runs)."""
    run = Run(COMMAND, dict(ENV), root)
    RUNS[NAME] = run
    run.start()
    try:
        yield run
    finally:
        run.stop()
        RUNS.pop(NAME, None)
