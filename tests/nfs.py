"""A throw-away NFS server for the tests: nfs-ganesha in user space with its VFS backend,
NFSv4 only, on 127.0.0.1 at a free port, no rpcbind. Two exports of one directory tree:
``/export`` without squashing and ``/squashed`` with root squashed to nobody, to prove
deletion under root_squash. Started and stopped by PID; ready in under a second."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ceph import free_port

GANESHA = "ganesha.nfsd"
RUNNING_SERVER = "CAIRN_TEST_NFS_ROOT"
EXPORT = "/export"
SQUASHED = "/squashed"

CONF = """NFS_CORE_PARAM {{
    Protocols = 4;
    NFS_Port = {port};
    Bind_addr = 127.0.0.1;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Plugins_Dir = {plugins};
}}
NFSv4 {{
    Graceless = true;
    Lease_Lifetime = 10;
    RecoveryRoot = {root}/recovery;
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
LOG {{ Default_Log_Level = EVENT; }}
EXPORT_DEFAULTS {{ SecType = sys; }}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = {pseudo};
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
EXPORT {{
    Export_Id = 2;
    Path = {squashed};
    Pseudo = {squashed_pseudo};
    Access_Type = RW;
    Squash = Root_Squash;
    Anonymous_Uid = 65534;
    Anonymous_Gid = 65534;
    Protocols = 4;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
"""


def kernel_has_nfs() -> bool:
    """Whether this kernel has an NFS client (loading its module if it can)."""
    subprocess.run(["modprobe", "-q", "nfsv4"], check=False, capture_output=True)
    with open("/proc/filesystems", encoding="ascii") as listing:
        return any(line.split()[-1] in ("nfs", "nfs4") for line in listing)


def plugins_dir() -> str:
    for candidate in ("/usr/lib/x86_64-linux-gnu/ganesha", "/usr/lib/aarch64-linux-gnu/ganesha", "/usr/lib/ganesha"):
        if os.path.isdir(candidate):
            return candidate
    return "/usr/lib/x86_64-linux-gnu/ganesha"


@dataclass
class NfsServer:
    root: Path
    port: int = 0
    pid: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def export_dir(self) -> Path:
        """The directory ``/export`` serves, as the server's own filesystem sees it."""
        return self.root / "export"

    @property
    def squashed_dir(self) -> Path:
        return self.root / "squashed"

    @property
    def log(self) -> Path:
        return self.root / "ganesha.log"

    @classmethod
    def running(cls, root: Path) -> NfsServer:
        """A server another process started under ``root`` (the vm tier's guest uses the
        host's): found from its files, never stopped from here."""
        server = cls(root)
        server.port = int((root / "port").read_text())
        return server

    def start(self) -> NfsServer:
        for folder in (self.export_dir, self.squashed_dir, self.root / "recovery"):
            folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.squashed_dir, 0o777)
        self.port = free_port()
        conf = self.root / "ganesha.conf"
        conf.write_text(
            CONF.format(
                port=self.port,
                plugins=plugins_dir(),
                root=self.root,
                export=self.export_dir,
                pseudo=EXPORT,
                squashed=self.squashed_dir,
                squashed_pseudo=SQUASHED,
            )
        )
        (self.root / "port").write_text(str(self.port))
        self.resume()
        return self

    def resume(self) -> None:
        """Start ganesha on the written configuration (after ``stop``: the same port and
        directories); return once it listens."""
        self._process = subprocess.Popen(
            [GANESHA, "-F", "-L", str(self.log), "-f", str(self.root / "ganesha.conf"),
             "-p", str(self.root / "ganesha.pid")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.pid = self._process.pid
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"ganesha exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"ganesha did not listen on port {self.port} within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port and directories (a server reboot)."""
        self.stop()
        self.resume()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
