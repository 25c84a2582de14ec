"""A throw-away single-node Kubernetes for the cluster tier, run as plain processes
under one directory: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
containerd with runc, and a kubelet whose node is called ``localhost``.

What makes it fit a host without a pod network or an image registry:
- pods share the host's network: containerd runs runc through a small wrapper that drops
  the network namespace from each container's spec and points in-cluster clients at the
  API server on loopback (there is no Service network, kube-proxy or DNS);
- a stand-in CNI plugin hands out distinct 127.0.1.x "pod IPs", which route nowhere;
- images are imported from archives into containerd (``ctr images import``), never pulled.

Every process is started, and stopped, by its PID; what the kubelet and containerd leave
outside the directory (pod logs, shim sockets) is removed on stop, nothing else."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

NODE = "localhost"
POD_LOGS = Path("/var/log/pods")
CONTAINER_LOGS = Path("/var/log/containers")
SHIM_SOCKETS = Path("/run/containerd/s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# containerd 1.6 with the CRI plugin; runc through the host-network wrapper.
CONTAINERD = """version = 2
root = "{root}/containerd/root"
state = "{root}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{root}/containerd/containerd.sock"
[ttrpc]
  address = "{root}/containerd/containerd.sock.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{root}/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # the kubelet may not raise oom_score_adj where root lacks CAP_SYS_RESOURCE
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{root}/containerd/runc"
          BinaryName = "{root}/bin/runc-hostnet"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{root}/cni/bin"
      conf_dir = "{root}/cni/net.d"
"""

KUBELET = """apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{root}/containerd/containerd.sock
runtimeRequestTimeout: 2m
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {root}/pki/ca.crt}}
authorization: {{mode: Webhook}}
tlsCertFile: {root}/pki/kubelet-serving.crt
tlsPrivateKeyFile: {root}/pki/kubelet-serving.key
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
# kubelet 1.35 and later refuse a cgroup v1 host unless told otherwise
failCgroupV1: false
resolvConf: /etc/resolv.conf
volumePluginDir: {root}/kubelet-plugins
evictionHard: {{"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# Volumes in use are reported with the node status; the default 10 s holds every detach
# (and so every claim's deletion) that long after its pod is gone.
nodeStatusUpdateFrequency: 2s
"""

# The runtime wrapper: every container joins the host's network namespace, and in-cluster
# clients reach the API server on loopback.
RUNC_WRAPPER = """#!/usr/bin/python3
import json, os, sys

args = sys.argv[1:]
if "create" in args or "run" in args:
    bundle = os.getcwd()
    for i, arg in enumerate(args):
        if arg in ("--bundle", "-b") and i + 1 < len(args):
            bundle = args[i + 1]
        elif arg.startswith("--bundle="):
            bundle = arg.split("=", 1)[1]
    path = os.path.join(bundle, "config.json")
    with open(path) as handle:
        spec = json.load(handle)
    linux = spec.setdefault("linux", {{}})
    linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"]
    env = spec.get("process", {{}}).get("env", [])
    if any(e.startswith("KUBERNETES_SERVICE_HOST=") for e in env):
        env = [e for e in env if not e.startswith(("KUBERNETES_SERVICE_HOST=", "KUBERNETES_SERVICE_PORT="))]
        spec["process"]["env"] = env + ["KUBERNETES_SERVICE_HOST=127.0.0.1", "KUBERNETES_SERVICE_PORT={port}"]
    with open(path, "w") as handle:
        json.dump(spec, handle)
os.execv("{runc}", ["runc"] + args)
"""

# A stand-in pod network: lo up in the pod's namespace, and a distinct 127.0.1.x address
# reported as the pod IP (nothing is routed to it; pods use the host's network).
CNI = """#!/bin/sh
set -e
case "$CNI_COMMAND" in
VERSION) echo '{{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}}';;
ADD)
  cat >/dev/null
  mkdir -p {state}
  exec 9>{state}/lock; flock 9
  n=$(cat {state}/next 2>/dev/null || echo 10); echo $((n % 250 + 1)) > {state}/next
  nsenter --net="$CNI_NETNS" ip link set lo up 2>/dev/null || true
  printf '{{"cniVersion":"0.4.0","interfaces":[{{"name":"%s","sandbox":"%s"}}],"ips":[{{"version":"4","address":"127.0.1.%d/32","interface":0}}]}}\\n' "$CNI_IFNAME" "$CNI_NETNS" "$n";;
*) cat >/dev/null; exit 0;;
esac
"""

# containerd's CRI always runs a plugin called "loopback" as well.
LOOPBACK_CNI = """#!/bin/sh
case "$CNI_COMMAND" in
VERSION) echo '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}';;
ADD) cat >/dev/null; nsenter --net="$CNI_NETNS" ip link set lo up
  printf '{"cniVersion":"0.4.0","interfaces":[{"name":"lo","sandbox":"%s"}],"ips":[{"version":"4","address":"127.0.0.1/8","interface":0}]}\\n' "$CNI_NETNS";;
*) cat >/dev/null; exit 0;;
esac
"""


class ClusterError(RuntimeError):
    pass


def build_step(argv: list[str], timeout: float = 3600, env: dict[str, str] | None = None) -> str:
    """A build step; its output is shown when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


class Cluster:
    """One cluster under ``root``, run from the binaries in ``binaries``; ``pause`` is the
    sandbox image's name, which must be among the images imported before the kubelet."""

    def __init__(self, root: Path, binaries: Path, pause: str) -> None:
        self.root = root
        self.binaries = binaries
        self.pause = pause
        self.api_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}
        self._pod_logs_before: set[str] = set()
        self._started = time.monotonic()

    # -- paths -------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig" / "admin.yaml"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def log(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    # -- commands ----------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            [str(self.binaries / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def client_configuration(self) -> Any:
        """A ``kubernetes`` client configuration for this cluster's admin."""
        from kubernetes import client, config

        configuration = client.Configuration()
        loader: Any = config  # untyped
        loader.load_kube_config(
            config_file=str(self.kubeconfig), client_configuration=configuration, persist_config=False
        )
        return configuration

    def create(self, *objects: dict[str, Any]) -> None:
        self.feed("create", *objects)

    def feed(self, verb: str, *objects: dict[str, Any]) -> None:
        """``kubectl VERB -f -`` with ``objects`` on standard input (create, apply)."""
        manifest = yaml.safe_dump_all(objects)
        result = subprocess.run(
            [str(self.binaries / "kubectl"), f"--kubeconfig={self.kubeconfig}", verb, "-f", "-"],
            input=manifest,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"kubectl {verb}: {result.stderr.strip()}\n{manifest}")

    def ctr(self, *args: str, timeout: float = 300) -> str:
        result = subprocess.run(
            ["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def import_images(self, archives: Iterable[Path]) -> None:
        for archive in archives:
            self.ctr("images", "import", str(archive))

    # -- start -------------------------------------------------------------------------

    def start(self, images: Sequence[Path]) -> None:
        """Start everything; ``images`` are imported before the kubelet starts."""
        self.start_api()
        pki = self.root / "pki"
        for component, port in (("kube-controller-manager", free_port()), ("kube-scheduler", free_port())):
            config = self.root / "kubeconfig" / f"{component}.yaml"
            extra = (
                [
                    f"--service-account-private-key-file={pki}/sa.key",
                    f"--root-ca-file={pki}/ca.crt",
                    "--use-service-account-credentials=true",
                    f"--cluster-signing-cert-file={pki}/ca.crt",
                    f"--cluster-signing-key-file={pki}/ca.key",
                    "--kube-api-qps=100",
                    "--kube-api-burst=200",
                ]
                if component == "kube-controller-manager"
                else []
            )
            self._spawn(
                component,
                str(self.binaries / component),
                f"--kubeconfig={config}",
                f"--authentication-kubeconfig={config}",
                f"--authorization-kubeconfig={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.root}/{component}",
                "--leader-elect=false",
                "--v=1",
                *extra,
            )
        self._node(images)
        self._wait(
            "node Ready",
            lambda: (
                "True"
                in self.kubectl(
                    "get", "node", NODE, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False
                )
            ),
            timeout=180,
        )
        self._wait(
            "default ServiceAccount", lambda: bool(self.kubectl("get", "sa", "default", "-o", "name", check=False))
        )
        self.timings["start"] = time.monotonic() - self._started

    def start_api(self) -> None:
        """Start etcd and the API server alone: enough for clients of the API that need
        no node, no scheduler and no controllers."""
        self._started = time.monotonic()
        for sub in ("logs", "bin", "cni/bin", "cni/net.d", "containerd", "kubelet", "kubelet-plugins", "etcd"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._pod_logs_before = set(os.listdir(POD_LOGS)) if POD_LOGS.is_dir() else set()
        # etcd's data in memory: a throwaway cluster needs no durable store, and its fsyncs,
        # one per write, stall behind whatever else the host's disk is doing. stop()
        # unmounts it with the other mounts under the cluster's directory.
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0700", "tmpfs", str(self.root / "etcd")], check=True
        )
        self._pki()
        pki = self.root / "pki"
        etcd_port, etcd_peer = free_port(), free_port()
        self._spawn(
            "etcd",
            "etcd",
            "--name=cairn",
            f"--data-dir={self.root}/etcd/data",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=cairn=http://127.0.0.1:{etcd_peer}",
            "--initial-cluster-state=new",
        )
        self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"))
        self._spawn(
            "kube-apiserver",
            str(self.binaries / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--cert-dir={self.root}/apiserver",
            f"--tls-cert-file={pki}/apiserver.crt",
            f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt",
            f"--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt",
            f"--kubelet-client-key={pki}/apiserver-kubelet-client.key",
            # loopback node addresses are refused; the node is reached by its name
            "--kubelet-preferred-address-types=Hostname,InternalIP",
            f"--service-account-key-file={pki}/sa.pub",
            f"--service-account-signing-key-file={pki}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        )
        self._wait("kube-apiserver", lambda: self.kubectl("get", "--raw=/readyz", check=False) == "ok")

    def _node(self, images: Sequence[Path]) -> None:
        runc = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/runc"
        wrapper = self.root / "bin" / "runc-hostnet"
        wrapper.write_text(RUNC_WRAPPER.format(port=self.api_port, runc=runc))
        (self.root / "cni" / "bin" / "cairn-test-net").write_text(CNI.format(state=self.root / "cni" / "state"))
        (self.root / "cni" / "bin" / "loopback").write_text(LOOPBACK_CNI)
        for script in (wrapper, *(self.root / "cni" / "bin").iterdir()):
            script.chmod(0o755)
        (self.root / "cni" / "net.d" / "10-cairn-test.conflist").write_text(
            '{"cniVersion":"0.4.0","name":"cairn-test","plugins":[{"type":"cairn-test-net"}]}\n'
        )
        config = self.root / "containerd" / "config.toml"
        config.write_text(CONTAINERD.format(root=self.root, pause=self.pause))
        self._spawn("containerd", "containerd", f"--config={config}")
        self._wait("containerd", lambda: _answers(lambda: self.ctr("version")))
        self.import_images(images)
        kubelet_config = self.root / "kubelet-config.yaml"
        kubelet_config.write_text(KUBELET.format(root=self.root, port=free_port(), healthz=free_port()))
        self._spawn(
            "kubelet",
            str(self.binaries / "kubelet"),
            f"--kubeconfig={self.root}/kubeconfig/kubelet.yaml",
            f"--config={kubelet_config}",
            f"--root-dir={self.kubelet_dir}",
            f"--cert-dir={self.root}/kubelet-certs",
            f"--hostname-override={NODE}",
            "--v=2",
        )

    def _spawn(self, name: str, *argv: str) -> None:
        with open(self.log(name), "ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    tail = self.log(name).read_text(errors="replace")[-3000:]
                    raise ClusterError(f"{name} exited ({process.returncode}) waiting for {what}:\n{tail}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{what} not ready after {timeout:.0f} s")
            time.sleep(0.2)
        self.timings[what] = time.monotonic() - self._started

    # -- PKI ---------------------------------------------------------------------------

    def _pki(self) -> None:
        """A CA, the serving and client certificates, the service-account key and one
        kubeconfig per client, made with openssl."""
        pki = self.root / "pki"
        pki.mkdir(exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

        openssl("genrsa", "-out", "ca.key", "2048")
        openssl(
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-key",
            "ca.key",
            "-subj",
            "/CN=cairn-test-ca",
            "-days",
            "30",
            "-out",
            "ca.crt",
        )

        def sign(name: str, common_name: str, group: str = "", names: str = "") -> None:
            openssl("genrsa", "-out", f"{name}.key", "2048")
            subject = f"/O={group}/CN={common_name}" if group else f"/CN={common_name}"
            openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr")
            usage = (
                f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={names}\n"
                if names
                else "extendedKeyUsage=clientAuth\n"
            )
            (pki / f"{name}.ext").write_text(
                f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n{usage}"
            )
            openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            )  # fmt: skip

        sign(
            "apiserver",
            "kube-apiserver",
            names="IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local",
        )
        sign("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        sign("admin", "admin", "system:masters")
        sign("kube-controller-manager", "system:kube-controller-manager")
        sign("kube-scheduler", "system:kube-scheduler")
        sign("kubelet", f"system:node:{NODE}", "system:nodes")
        sign("kubelet-serving", NODE, names=f"IP:127.0.0.1,DNS:localhost,DNS:{NODE}")
        openssl("genrsa", "-out", "sa.key", "2048")
        openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        (self.root / "kubeconfig").mkdir(exist_ok=True)
        # Files, not embedded data: given data, the kubernetes Python client writes it to
        # temporary files that only an orderly exit removes, and the tests kill drivers.
        ca = str(pki / "ca.crt")
        for client, cert in (
            ("admin", "admin"),
            ("kube-controller-manager", "kube-controller-manager"),
            ("kube-scheduler", "kube-scheduler"),
            ("kubelet", "kubelet"),
        ):
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "cairn-test", "cluster": {"server": self.server, "certificate-authority": ca}}],
                "users": [
                    {
                        "name": client,
                        "user": {
                            "client-certificate": str(pki / f"{cert}.crt"),
                            "client-key": str(pki / f"{cert}.key"),
                        },
                    }
                ],
                "contexts": [{"name": "default", "context": {"cluster": "cairn-test", "user": client}}],
                "current-context": "default",
            }
            (self.root / "kubeconfig" / f"{client}.yaml").write_text(yaml.safe_dump(config))

    # -- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything this cluster started, containers first, and remove what it
        left outside its directory: mounts under it, its pods' logs, its shim sockets."""
        kubelet = self.processes.pop("kubelet", None)
        if kubelet is not None:
            _terminate(kubelet)
        if "containerd" in self.processes and self.containerd_socket.exists():
            self._remove_containers()
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "containerd", "etcd"):
            process = self.processes.pop(name, None)
            if process is not None:
                _terminate(process)
        for mount in sorted(_mounts_under(self.root), reverse=True):
            if subprocess.run(["umount", mount], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        if POD_LOGS.is_dir():
            for entry in set(os.listdir(POD_LOGS)) - self._pod_logs_before:
                shutil.rmtree(POD_LOGS / entry, ignore_errors=True)
        if CONTAINER_LOGS.is_dir():
            for link in CONTAINER_LOGS.iterdir():
                if link.is_symlink() and not link.exists():
                    link.unlink()
        for directory in (POD_LOGS, CONTAINER_LOGS, SHIM_SOCKETS, SHIM_SOCKETS.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: another cluster may be using it

    def _remove_containers(self) -> None:
        try:
            tasks = self.ctr("tasks", "ls", "-q", timeout=30).split()
            for task in tasks:
                subprocess.run(
                    ["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
            deadline = time.monotonic() + 30
            for task in tasks:
                while time.monotonic() < deadline:
                    done = subprocess.run(
                        ["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", "tasks", "delete", "-f", task],
                        capture_output=True,
                        check=False,
                        timeout=30,
                    )
                    if done.returncode == 0 or "not found" in done.stderr.decode(errors="replace"):
                        break
                    time.sleep(0.5)
            for container in self.ctr("containers", "ls", "-q", timeout=30).split():
                subprocess.run(
                    ["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", "containers", "rm", container],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
        except (ClusterError, subprocess.TimeoutExpired):
            pass


def _terminate(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _mounts_under(root: Path) -> list[str]:
    prefix = f"{root}/"
    mounts = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == str(root):
                mounts.append(point)
    return mounts


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=ssl.create_default_context()) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _answers(call: Callable[[], object]) -> bool:
    try:
        call()
        return True
    except (ClusterError, subprocess.TimeoutExpired):
        return False
