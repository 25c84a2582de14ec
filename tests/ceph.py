"""A throw-away single-host Ceph cluster for the tests: one monitor, one manager (pool
statistics come from it) and one memstore OSD, all under one directory, on loopback only,
with cephx on. The driver gets its own user, `client.cairn`, limited to the rbd profile
on the test pool, so the tests exercise credentials the way a cluster would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POOL = "cairn"
# Names the directory of a cluster already running (the host's, seen from a vm-tier guest).
RUNNING_CLUSTER = "CAIRN_TEST_CEPH_ROOT"
USER = "cairn"
DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool", "monmaptool", "rbd")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


CONF = """[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port}]
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
mon cluster log file = {root}/log/cluster.log
crash dir = {root}/crash
mon data = {root}/mon/$cluster-$id
mgr data = {root}/mgr/$cluster-$id
osd data = {root}/osd/$cluster-$id
log to stderr = false
err to stderr = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon osd initial require min compat client = mimic
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
mgr initial modules = iostat
mgr stats period = 1
mon mgr digest period = 1
paxos propose interval = 0.1
ms async op threads = 1
osd op num shards = 1
osd op num threads per shard = 2

[osd]
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 460
osd max object namespace len = 64
# a killed client's watch on an image expires after this (default 30 s); the crash tests
# wait for it before deleting what the killed process had open
osd client watch timeout = 5
osd min pg log entries = 100
osd max pg log entries = 500

[client]
keyring = {root}/client.admin.keyring
admin socket = {root}/run/$name.$pid.asok
rados osd op timeout = 60
rados mon op timeout = 60
"""


@dataclass
class CephCluster:
    root: Path
    port: int = 0
    admin_key: str = ""
    user_key: str = ""

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def monitors(self) -> list[str]:
        return [f"127.0.0.1:{self.port}"]

    @classmethod
    def running(cls, root: Path) -> CephCluster:
        """A cluster another process started under ``root`` (the vm tier's guest uses the
        host's): found from its configuration and keyrings, never stopped from here."""
        cluster = cls(root)
        mon_host = next(line for line in cluster.conf.read_text().splitlines() if line.startswith("mon host"))
        cluster.port = int(mon_host.rsplit(":", 1)[1].rstrip("]"))
        cluster.admin_key = cluster._run(
            "ceph-authtool", "-p", "-n", "client.admin", str(root / "client.admin.keyring")
        )
        cluster.user_key = cluster.ceph("auth", "get-key", f"client.{USER}")
        return cluster

    def client_ports(self) -> list[int]:
        """The TCP ports a client talks to: the monitor's and each OSD's public ones."""
        ports = {self.port}
        for osd in json.loads(self.ceph("osd", "dump", "--format", "json"))["osds"]:
            for address in osd.get("public_addrs", {}).get("addrvec", []):
                ports.add(int(address["addr"].rsplit(":", 1)[1]))
        return sorted(ports)

    def _run(self, *argv: str, timeout: float = 120) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}\n{self.log_tails()}"
            )
        return result.stdout.strip()

    def ceph(self, *args: str) -> str:
        return self._run("ceph", "-c", str(self.conf), *args)

    def rbd(self, *args: str) -> str:
        return self._run("rbd", "-c", str(self.conf), *args)

    def start(self) -> CephCluster:
        self.port = free_port()
        for folder in ("run", "log", "crash", "mon/ceph-a", "mgr/ceph-x", "osd/ceph-0"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(CONF.format(fsid=fsid, port=self.port, root=self.root))
        mon_keyring, admin_keyring = self.root / "mon.keyring", self.root / "client.admin.keyring"
        self._run(
            "ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"
        )
        self._run(
            "ceph-authtool", "--create-keyring", str(admin_keyring), "--gen-key", "-n", "client.admin",
            "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
        )  # fmt: skip
        self._run("ceph-authtool", str(mon_keyring), "--import-keyring", str(admin_keyring))
        monmap = self.root / "monmap"
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{self.port}]", str(monmap))
        self._run(
            "ceph-mon",
            "-c",
            str(self.conf),
            "--mkfs",
            "-i",
            "a",
            "--monmap",
            str(monmap),
            "--keyring",
            str(mon_keyring),
        )
        self._run("ceph-mon", "-c", str(self.conf), "-i", "a")
        self.ceph("config", "set", "mgr", "mgr/devicehealth/enable_monitoring", "false", "--force")
        self.ceph(
            "auth",
            "get-or-create",
            "mgr.x",
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "-o",
            str(self.root / "mgr/ceph-x/keyring"),
        )
        self._run("ceph-mgr", "-c", str(self.conf), "-i", "x")
        osd_key = self._run("ceph-authtool", "--gen-print-key")
        secret = self.root / "osd-secret.json"
        secret.write_text(json.dumps({"cephx_secret": osd_key}))
        osd_uuid = str(uuid.uuid4())  # the OSD must be made with the UUID it was registered under
        osd_id = self.ceph("osd", "new", osd_uuid, "-i", str(secret))
        self._run(
            "ceph-authtool",
            "--create-keyring",
            str(self.root / f"osd/ceph-{osd_id}/keyring"),
            "--name",
            f"osd.{osd_id}",
            "--add-key",
            osd_key,
        )
        self._run("ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._run("ceph-osd", "-c", str(self.conf), "-i", osd_id)
        self._wait(
            "the OSD to come up",
            lambda: any(o["up"] for o in json.loads(self.ceph("osd", "dump", "--format", "json"))["osds"]),
        )
        self.ceph("osd", "pool", "create", POOL, "8", "8", "replicated")
        self.rbd("pool", "init", POOL)
        self.user_key = self.ceph(
            "auth", "get-or-create-key", f"client.{USER}", "mon", "profile rbd", "osd", f"profile rbd pool={POOL}", "mgr", f"profile rbd pool={POOL}"
        )  # fmt: skip
        self.admin_key = self._run("ceph-authtool", "-p", "-n", "client.admin", str(admin_keyring))
        self._wait_for_statistics()
        return self

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}\n{self.log_tails()}")

    def _wait_for_statistics(self) -> None:
        """Pool statistics (GetCapacity) come from the manager once it is active."""

        def reported() -> bool:
            status = json.loads(self.ceph("status", "--format", "json"))
            pgs = status.get("pgmap", {})
            return bool(
                status.get("mgrmap", {}).get("available")
                and pgs.get("num_pgs", 0) > 0
                and pgs.get("bytes_avail", 0) > 0
            )

        self._wait("the manager's pool statistics", reported)

    def stop(self) -> None:
        """Kill the daemons this cluster started (found by their pid files and checked by
        their command line), then leave the directory to the test's tmp_path."""
        for pid_file in (self.root / "run").glob("*.pid"):
            pid = int(pid_file.read_text().strip() or 0)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(self.conf) in cmdline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

    def log_tails(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


RGW_NAME = "client.rgw.cairn"
RGW_THREADS = 8


@dataclass
class RadosGateway:
    """A RADOS gateway (radosgw, the beast frontend) on a free loopback port in front of
    ``cluster``: an S3-compatible server for the backup store's tests. Its key, log,
    admin socket and data live under ``root``, apart from the cluster's, so it starts
    only when a test asks for it and stops (by its PID) without touching the cluster.
    The gateway makes its pools on first start; the cluster's defaults (8 PGs a pool,
    size one) keep them small enough for the single memstore OSD."""

    cluster: CephCluster
    root: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "radosgw.log"

    def admin(self, *args: str) -> str:
        """radosgw-admin as the cluster's admin (it works on the pools, not through the gateway)."""
        return self.cluster._run(
            "radosgw-admin", "-c", str(self.cluster.conf), "--log-file", str(self.root / "radosgw-admin.log"), *args
        )

    def start(self, timeout: float = 180) -> RadosGateway:
        self.root.mkdir(parents=True, exist_ok=True)
        keyring = self.root / "keyring"
        self.cluster.ceph(
            "auth", "get-or-create", RGW_NAME, "mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw", "-o", str(keyring)
        )  # fmt: skip
        self.port = free_port()
        argv = [
            "radosgw", "-f", "-c", str(self.cluster.conf), "-n", RGW_NAME, "--keyring", str(keyring),
            f"--rgw_frontends=beast endpoint=127.0.0.1:{self.port}",
            f"--rgw_thread_pool_size={RGW_THREADS}",
            "--rgw_enable_apis=s3",
            "--rgw_dynamic_resharding=false",
            "--rgw_run_sync_thread=false",
            f"--rgw_data={self.root}",
            f"--log_file={self.log}",
            f"--admin_socket={self.root / 'radosgw.asok'}",
            f"--pid_file={self.root / 'radosgw.pid'}",
        ]  # fmt: skip
        output = (self.root / "radosgw.out").open("wb")
        with output:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_until_serving(timeout)
        return self

    def _wait_until_serving(self, timeout: float) -> None:
        """Until the gateway answers HTTP (after it has made its pools and zone)."""
        import urllib.error
        import urllib.request

        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"radosgw exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.endpoint, timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # it answered, if only to refuse
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"radosgw did not serve on {self.endpoint} within {timeout:g}s\n{self.log_tail()}")

    def create_user(self, uid: str) -> tuple[str, str]:
        """An S3 user with a fresh key pair: (access key, secret key)."""
        access_key, secret_key = uuid.uuid4().hex[:20].upper(), uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.admin(
            "user", "create", f"--uid={uid}", f"--display-name={uid}", f"--access-key={access_key}", f"--secret={secret_key}"
        )  # fmt: skip
        return access_key, secret_key

    def stop(self) -> None:
        """Kill the gateway this object started, by its PID (as the cluster's daemons are:
        a graceful stop waits seconds for its background threads, and nothing it holds
        outlives the test)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for log in (self.root / "radosgw.out", self.log):
            if log.exists():
                parts.append(f"== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)
