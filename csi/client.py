"""A small CSI client for people: call the driver over its socket and print readable
answers. Operators use it to look at a running driver; the demo drives it.

    cairn-csi client --endpoint unix:///run/cairn/csi.sock info
    cairn-csi client create pvc-1 --size 1Gi [--param backend=local] [--from-snapshot ID]
    cairn-csi client stage VOLUME_ID /staging/path [--fs xfs] [--block]
    cairn-csi client publish-node VOLUME_ID /target/path --staging /staging/path [--ro]
    cairn-csi client orphans [--kubeconfig FILE]
    cairn-csi client backups --config FILE REPOSITORY [list|verify|gc [--grace SECONDS]]

``backups`` reads the repository itself (with the driver's config file and the files its
credentials name), not through the driver: CSI has no calls for it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from csi.generated import csi_pb2 as pb
from csi.generated import csi_pb2_grpc as pb_grpc

Mode = pb.VolumeCapability.AccessMode.Mode
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}


def parse_size(text: str) -> int:
    """``1Gi``, ``512Mi``, ``10G`` or a number of bytes."""
    match = re.fullmatch(r"(\d+)\s*([kmgt]i?)?b?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1Gi, 512Mi or bytes)")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


def human(size: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def key_values(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def capability(args: argparse.Namespace) -> pb.VolumeCapability:
    mode = Mode.Value(args.access_mode)
    if args.block:
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode={"mode": mode})
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=args.fs or ""), access_mode={"mode": mode})


class Client:
    def __init__(self, endpoint: str, timeout: float) -> None:
        address = (
            endpoint if "://" in endpoint and not endpoint.startswith("tcp://") else endpoint.removeprefix("tcp://")
        )
        if endpoint.startswith("/"):
            address = f"unix://{endpoint}"
        self.channel = grpc.insecure_channel(address)
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.controller = pb_grpc.ControllerStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)
        self.timeout = timeout

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, timeout=self.timeout)

    def node_id(self) -> str:
        return str(self.call(self.node.NodeGetInfo, pb.NodeGetInfoRequest()).node_id)


def show(**fields: object) -> None:
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
        print(f"{key.replace('_', ' '):<{width}}  {value}")


def show_volume(volume: pb.Volume) -> None:
    source = volume.content_source.snapshot.snapshot_id or volume.content_source.volume.volume_id
    show(
        volume_id=volume.volume_id,
        capacity=f"{human(volume.capacity_bytes)} ({volume.capacity_bytes} bytes)",
        source=source or "-",
        context=dict(volume.volume_context),
        topology="; ".join(", ".join(f"{k}={v}" for k, v in t.segments.items()) for t in volume.accessible_topology)
        or "-",
    )


def show_snapshot(snapshot: pb.Snapshot) -> None:
    show(
        snapshot_id=snapshot.snapshot_id,
        source_volume=snapshot.source_volume_id,
        size=f"{human(snapshot.size_bytes)} ({snapshot.size_bytes} bytes)",
        created=snapshot.creation_time.ToDatetime().isoformat() + "Z",
        ready=snapshot.ready_to_use,
    )


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    info = client.call(client.identity.GetPluginInfo, pb.GetPluginInfoRequest())
    probe = client.call(client.identity.Probe, pb.ProbeRequest())
    node = client.call(client.node.NodeGetInfo, pb.NodeGetInfoRequest())
    capacity = client.call(client.controller.GetCapacity, pb.GetCapacityRequest())
    show(
        driver=f"{info.name} {info.vendor_version}",
        ready=probe.ready.value if probe.HasField("ready") else True,
        node=node.node_id,
        topology=dict(node.accessible_topology.segments),
        free=human(capacity.available_capacity),
    )


def cmd_create(client: Client, args: argparse.Namespace) -> None:
    request = pb.CreateVolumeRequest(
        name=args.name,
        capacity_range=pb.CapacityRange(required_bytes=args.size),
        volume_capabilities=[capability(args)],
        parameters=key_values(args.param),
    )
    if args.from_snapshot:
        request.volume_content_source.snapshot.snapshot_id = args.from_snapshot
    if args.from_volume:
        request.volume_content_source.volume.volume_id = args.from_volume
    show_volume(client.call(client.controller.CreateVolume, request).volume)


def cmd_delete(client: Client, args: argparse.Namespace) -> None:
    client.call(client.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=args.volume_id))
    print(f"deleted volume {args.volume_id}")


def cmd_list(client: Client, args: argparse.Namespace) -> None:
    response = client.call(client.controller.ListVolumes, pb.ListVolumesRequest())
    for entry in response.entries:
        nodes = ", ".join(entry.status.published_node_ids) or "-"
        print(f"{entry.volume.volume_id}  {human(entry.volume.capacity_bytes):>10}  published: {nodes}")


def cmd_expand(client: Client, args: argparse.Namespace) -> None:
    request = pb.ControllerExpandVolumeRequest(
        volume_id=args.volume_id, capacity_range=pb.CapacityRange(required_bytes=args.size)
    )
    response = client.call(client.controller.ControllerExpandVolume, request)
    show(capacity=human(response.capacity_bytes), node_expansion_required=response.node_expansion_required)


def cmd_snapshot(client: Client, args: argparse.Namespace) -> None:
    request = pb.CreateSnapshotRequest(name=args.name, source_volume_id=args.volume_id)
    show_snapshot(client.call(client.controller.CreateSnapshot, request).snapshot)


def cmd_delete_snapshot(client: Client, args: argparse.Namespace) -> None:
    client.call(client.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=args.snapshot_id))
    print(f"deleted snapshot {args.snapshot_id}")


def cmd_snapshots(client: Client, args: argparse.Namespace) -> None:
    for entry in client.call(client.controller.ListSnapshots, pb.ListSnapshotsRequest()).entries:
        print(f"{entry.snapshot.snapshot_id}  of {entry.snapshot.source_volume_id}  {human(entry.snapshot.size_bytes)}")


def cmd_publish(client: Client, args: argparse.Namespace) -> None:
    request = pb.ControllerPublishVolumeRequest(
        volume_id=args.volume_id,
        node_id=args.node or client.node_id(),
        volume_capability=capability(args),
        readonly=args.ro,
    )
    show(publish_context=dict(client.call(client.controller.ControllerPublishVolume, request).publish_context))


def cmd_unpublish(client: Client, args: argparse.Namespace) -> None:
    request = pb.ControllerUnpublishVolumeRequest(volume_id=args.volume_id, node_id=args.node or client.node_id())
    client.call(client.controller.ControllerUnpublishVolume, request)
    print(f"unpublished volume {args.volume_id}")


def cmd_stage(client: Client, args: argparse.Namespace) -> None:
    request = pb.NodeStageVolumeRequest(
        volume_id=args.volume_id,
        staging_target_path=args.staging_path,
        volume_capability=capability(args),
        volume_context=key_values(args.context),
    )
    client.call(client.node.NodeStageVolume, request)
    print(f"staged volume {args.volume_id} at {args.staging_path}")


def cmd_unstage(client: Client, args: argparse.Namespace) -> None:
    request = pb.NodeUnstageVolumeRequest(volume_id=args.volume_id, staging_target_path=args.staging_path)
    client.call(client.node.NodeUnstageVolume, request)
    print(f"unstaged volume {args.volume_id}")


def cmd_mount(client: Client, args: argparse.Namespace) -> None:
    request = pb.NodePublishVolumeRequest(
        volume_id=args.volume_id,
        staging_target_path=args.staging,
        target_path=args.target_path,
        volume_capability=capability(args),
        readonly=args.ro,
    )
    client.call(client.node.NodePublishVolume, request)
    print(f"published volume {args.volume_id} at {args.target_path}")


def cmd_umount(client: Client, args: argparse.Namespace) -> None:
    request = pb.NodeUnpublishVolumeRequest(volume_id=args.volume_id, target_path=args.target_path)
    client.call(client.node.NodeUnpublishVolume, request)
    print(f"unpublished volume {args.volume_id} from {args.target_path}")


def cmd_stats(client: Client, args: argparse.Namespace) -> None:
    request = pb.NodeGetVolumeStatsRequest(volume_id=args.volume_id, volume_path=args.path)
    response = client.call(client.node.NodeGetVolumeStats, request)
    for usage in response.usage:
        unit = pb.VolumeUsage.Unit.Name(usage.unit).lower()
        print(f"{unit:>6}: total {usage.total}  used {usage.used}  available {usage.available}")
    condition = response.volume_condition
    print(f"health: {'ABNORMAL' if condition.abnormal else 'ok'} ({condition.message})")


def _all(call: Callable[[str], Any], field: str) -> list[Any]:
    """Every entry of a paginated listing."""
    entries: list[Any] = []
    token = ""
    while True:
        response = call(token)
        entries += list(getattr(response, field))
        token = response.next_token
        if not token:
            return entries


def cmd_orphans(client: Client, args: argparse.Namespace) -> None:
    from csi import kube, orphans

    configuration = kube.configuration(kubeconfig=True, config_file=args.kubeconfig, purpose="finding orphans")
    references = orphans.References.connect(configuration)

    def listed() -> tuple[list[str], list[str]]:
        volumes = _all(
            lambda token: client.call(client.controller.ListVolumes, pb.ListVolumesRequest(starting_token=token)),
            "entries",
        )
        try:
            snapshots = _all(
                lambda token: client.call(
                    client.controller.ListSnapshots, pb.ListSnapshotsRequest(starting_token=token)
                ),
                "entries",
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            snapshots = []
        return [e.volume.volume_id for e in volumes], [e.snapshot.snapshot_id for e in snapshots]

    found = sorted(orphans.unreferenced(listed, references, settle=args.settle), key=lambda o: (o.kind, o.id))
    names = {"volume": "PersistentVolume", "snapshot": "VolumeSnapshotContent"}
    for orphan in found:
        print(f"{orphan.kind:<8}  {orphan.id}  (no {names[orphan.kind]} names it)")
    on_nodes = references.node_orphans()
    for backend, node, local_id in on_nodes:
        print(f"{'on node':<8}  {node}: {local_id} of backend {backend} (no NodeVolume names it)")
    print(f"{len(found) + len(on_nodes)} orphan(s); nothing was deleted", file=sys.stderr)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def cmd_backups(client: Client, args: argparse.Namespace) -> None:
    import time

    from csi import config
    from csi.backup.configured import build_repositories

    driver_config = config.load(args.config)
    entries = [r for r in driver_config.repositories if r.name == args.repository]
    if not entries:
        known = ", ".join(r.name for r in driver_config.repositories) or "none"
        raise SystemExit(f"error: no backup repository {args.repository!r} in {args.config} (configured: {known})")
    repository = build_repositories(entries)[args.repository]
    if args.action == "list":
        print(f"{'BACKUP':<42}  {'CREATED':<20}  {'SIZE':>10}  {'READ':>10}  {'NEW':>10}  VOLUME (NAME)")
        for m in repository.manifests():
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.created_at))
            print(
                f"{m.backup_id:<42}  {created:<20}  {_size(m.size):>10}  {_size(m.read_bytes):>10}  "
                f"{_size(m.new_bytes):>10}  {m.volume_id} ({m.name})"
            )
    elif args.action == "verify":
        verified = repository.verify()
        print(verified)
        if verified.problems:
            for problem in verified.problems:
                print(f"problem: {problem}", file=sys.stderr)
            raise SystemExit(1)
    else:
        print(repository.collect(grace=args.grace))


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], None]] = {
    "info": cmd_info,
    "create": cmd_create,
    "delete": cmd_delete,
    "list": cmd_list,
    "expand": cmd_expand,
    "snapshot": cmd_snapshot,
    "delete-snapshot": cmd_delete_snapshot,
    "snapshots": cmd_snapshots,
    "publish": cmd_publish,
    "unpublish": cmd_unpublish,
    "stage": cmd_stage,
    "unstage": cmd_unstage,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "stats": cmd_stats,
    "orphans": cmd_orphans,
    "backups": cmd_backups,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cairn-csi client", description="Call a Cairn CSI driver over its socket.")
    p.add_argument("--endpoint", default="unix:///var/lib/cairn-csi/csi.sock", help="unix:///path or tcp://host:port")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each call")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, *positional: str, cap: bool = False) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        for arg in positional:
            cmd.add_argument(arg)
        if cap:
            cmd.add_argument("--block", action="store_true", help="raw block access instead of a filesystem")
            cmd.add_argument("--fs", help="filesystem: ext4 (default) or xfs")
            cmd.add_argument("--access-mode", default="SINGLE_NODE_WRITER", choices=list(Mode.keys())[1:])
        return cmd

    command("info", "driver, node, readiness and free space")
    create = command("create", "create a volume", "name", cap=True)
    create.add_argument("--size", type=parse_size, default=parse_size("1Gi"))
    create.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="StorageClass parameter")
    create.add_argument("--from-snapshot", metavar="SNAPSHOT_ID")
    create.add_argument("--from-volume", metavar="VOLUME_ID")
    command("delete", "delete a volume", "volume_id")
    command("list", "list volumes")
    command("expand", "grow a volume", "volume_id").add_argument("size", type=parse_size)
    command("snapshot", "snapshot a volume", "name", "volume_id")
    command("delete-snapshot", "delete a snapshot", "snapshot_id")
    command("snapshots", "list snapshots")
    for name, help_text in (("publish", "ControllerPublish to a node"), ("unpublish", "ControllerUnpublish")):
        cmd = command(name, help_text, "volume_id", cap=name == "publish")
        cmd.add_argument("--node", help="node ID (default: the driver's own node)")
        if name == "publish":
            cmd.add_argument("--ro", action="store_true")
    stage = command("stage", "NodeStage: attach, format if blank, mount", "volume_id", "staging_path", cap=True)
    stage.add_argument("--context", action="append", default=[], metavar="KEY=VALUE", help="volume context entry")
    command("unstage", "NodeUnstage: unmount and detach", "volume_id", "staging_path")
    mount_cmd = command("mount", "NodePublish into a target path", "volume_id", "target_path", cap=True)
    mount_cmd.add_argument("--staging", required=True, help="the staging path used with stage")
    mount_cmd.add_argument("--ro", action="store_true")
    command("umount", "NodeUnpublish from a target path", "volume_id", "target_path")
    command("stats", "NodeGetVolumeStats", "volume_id", "path")
    orphans_cmd = command("orphans", "volumes and snapshots no Kubernetes object names (reports; deletes nothing)")
    orphans_cmd.add_argument("--kubeconfig", help="the cluster's kubeconfig (default: in-cluster, else ~/.kube/config)")
    orphans_cmd.add_argument(
        "--settle", type=float, default=5.0, help="seconds between the two reads that must both find an orphan"
    )
    backups = command("backups", "list, verify or collect a backup repository (reads it directly)", "repository")
    backups.add_argument("action", nargs="?", default="list", choices=("list", "verify", "gc"))
    backups.add_argument("--config", required=True, help="the driver's config file, which names the repository")
    backups.add_argument(
        "--grace", type=float, default=3600.0, help="gc: keep unreferenced chunks younger than this many seconds"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    client = Client(args.endpoint, args.timeout)
    try:
        COMMANDS[args.command](client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.channel.close()
    return 0
