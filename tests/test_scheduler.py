"""The scheduler's filters and weighers, with stand-in backends that only report
capacity, topology, capabilities and health (the scheduler reads nothing else)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from csi.backends.base import Backend, Capabilities, VolumeBackend
from csi.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from csi.model import NO_SECRETS, AccessMode, AccessType, Capability, Secrets, Segment
from csi.parameters import backend_parameters
from csi.registry import Registry
from csi.scheduler import PlacementRequest, Scheduler

pytestmark = pytest.mark.unit

RWO = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)
RWX_BLOCK = Capability(AccessType.BLOCK, AccessMode.MULTI_NODE_MULTI_WRITER)


@dataclass
class StandIn:
    free: int
    topology: tuple[Segment, ...] = ()
    parameter_keys: frozenset[str] = frozenset()
    multi_node: bool = False
    snapshots: bool = True
    problem: str | None = None
    silent: bool = False  # free_bytes times out, as a cluster that stopped answering does
    calls: list[str] = field(default_factory=list)

    def health(self) -> str | None:
        return self.problem

    @property
    def volume_parameters(self) -> frozenset[str]:
        return self.parameter_keys

    def free_bytes(self, segment: Segment | None = None, *, secrets: Secrets = NO_SECRETS) -> int:
        self.calls.append(secrets.get("userID", ""))
        if self.silent:
            raise DeadlineExceeded("the pool statistics did not come in time")
        return self.free


def backend(name: str, group: str | None = None, **kwargs: Any) -> Backend:
    stand_in = StandIn(**kwargs)
    modes = frozenset(m for m in AccessMode if stand_in.multi_node or not m.multi_node)
    capabilities = Capabilities(access={AccessType.MOUNT: modes, AccessType.BLOCK: modes}, snapshots=stand_in.snapshots)
    return Backend(name, "stand-in", group, capabilities, cast(VolumeBackend, stand_in), None)


def scheduler_of(*backends: Backend) -> Scheduler:
    return Scheduler(Registry(backends))


def request(parameters: dict[str, str], **kwargs: Any) -> PlacementRequest:
    return PlacementRequest(
        parameters=parameters, capabilities=kwargs.pop("caps", (RWO,)), required_bytes=kwargs.pop("size", 10), **kwargs
    )


def names(backends: list[Backend]) -> list[str]:
    return [b.name for b in backends]


def test_single_backend_needs_no_selector() -> None:
    scheduler = scheduler_of(backend("only", free=100))
    assert names(scheduler.place(request({}))) == ["only"]


def test_several_backends_need_a_selector() -> None:
    scheduler = scheduler_of(backend("a", free=100), backend("b", free=100))
    with pytest.raises(InvalidArgument, match=r"'backend' or 'group' is required.*a, b"):
        scheduler.place(request({}))


def test_unknown_backend_and_group_are_named() -> None:
    scheduler = scheduler_of(backend("a", free=100))
    with pytest.raises(InvalidArgument, match="backend 'nope' is not configured"):
        scheduler.place(request({"backend": "nope"}))
    with pytest.raises(InvalidArgument, match="group 'nope' is not configured"):
        scheduler.place(request({"group": "nope"}))


def test_group_members_weighed_by_free_space() -> None:
    scheduler = scheduler_of(backend("a", "g", free=50), backend("b", "g", free=500), backend("c", free=900))
    assert names(scheduler.place(request({"group": "g"}))) == ["b", "a"]


def test_capacity_filter() -> None:
    scheduler = scheduler_of(backend("a", "g", free=50), backend("b", "g", free=500))
    assert names(scheduler.place(request({"group": "g"}, size=100))) == ["b"]
    with pytest.raises(ResourceExhausted, match="no backend has 1000 bytes free"):
        scheduler.place(request({"group": "g"}, size=1000))


def test_capability_filter_says_why() -> None:
    scheduler = scheduler_of(backend("a", "g", free=50), backend("b", "g", free=500, multi_node=True))
    assert names(scheduler.place(request({"group": "g"}, caps=(RWX_BLOCK,)))) == ["b"]
    with pytest.raises(InvalidArgument, match="a: block access in mode MULTI_NODE_MULTI_WRITER is not offered"):
        scheduler.place(request({"backend": "a"}, caps=(RWX_BLOCK,)))


def test_topology_requisite_and_preferred() -> None:
    key = "topology.cairn.csi.io/node"
    scheduler = scheduler_of(
        backend("n1", "g", free=900, topology=({key: "n1"},)),
        backend("n2", "g", free=100, topology=({key: "n2"},)),
        backend("shared", "g", free=500),
    )
    assert names(scheduler.place(request({"group": "g"}, requisite=({key: "n2"},)))) == ["shared", "n2"]
    preferred = scheduler.place(request({"group": "g"}, requisite=({key: "n1"}, {key: "n2"}), preferred=({key: "n2"},)))
    assert names(preferred)[0] in ("n2", "shared") and names(preferred)[-1] == "n1"
    only_local = scheduler_of(backend("n1", free=900, topology=({key: "n1"},)))
    with pytest.raises(ResourceExhausted, match="topology"):
        only_local.place(request({}, requisite=({key: "n3"},)))


def test_backend_parameters_filter_candidates_and_reject_typos() -> None:
    scheduler = scheduler_of(
        backend("rbd", "g", free=10, parameter_keys=frozenset({"pool"})), backend("lvm", "g", free=900)
    )
    assert names(scheduler.place(request({"group": "g", "pool": "fast"}))) == ["rbd"]
    with pytest.raises(InvalidArgument, match="unknown parameter 'pol'"):
        scheduler.place(request({"group": "g", "pol": "fast"}))


def test_kubernetes_and_service_parameters_are_not_backend_parameters() -> None:
    params = {"csi.storage.k8s.io/pvc/name": "x", "fsType": "xfs", "backend": "a", "pool": "p"}
    assert backend_parameters(params) == {"pool": "p"}


def test_content_source_pins_the_backend() -> None:
    scheduler = scheduler_of(backend("a", "g", free=900), backend("b", "g", free=100))
    assert names(scheduler.place(request({"group": "g"}, source_backend="b"))) == ["b"]


def test_routing_an_id_to_an_unconfigured_backend_is_not_found() -> None:
    registry = Registry([backend("a", free=1)])
    with pytest.raises(NotFound, match="backend 'gone' is not configured"):
        registry.route("gone", "volume", "1:gone:x")


def test_free_space_is_asked_with_the_requests_secrets() -> None:
    only = backend("ceph", free=100)
    scheduler_of(only).place(request({}, secrets={"userID": "cairn", "userKey": "k"}))
    assert cast(StandIn, only.volumes).calls == ["cairn"]


def test_a_group_places_on_its_healthy_members_and_names_the_others() -> None:
    sick = backend("a", "g", free=1000, problem="pool 'p' does not exist")
    silent = backend("b", "g", free=1000, silent=True)
    well = backend("c", "g", free=10)
    scheduler = scheduler_of(sick, silent, well)
    assert names(scheduler.place(request({"group": "g"}))) == ["c"]
    assert cast(StandIn, sick.volumes).calls == [], "an unwell backend is not asked for its space"
    with pytest.raises(ResourceExhausted, match=r"c: 10 free.*a: pool 'p' does not exist.*b: the pool statistics"):
        scheduler.place(request({"group": "g"}, size=100))
    cast(StandIn, well.volumes).problem = "directory /x is not writable"
    with pytest.raises(Unavailable, match=r"no backend is healthy: a: pool.* \| b: .* \| c: directory /x"):
        scheduler.place(request({"group": "g"}))


def test_a_class_that_requires_snapshots_places_only_on_backends_that_take_them() -> None:
    scheduler = scheduler_of(backend("plain", "g", free=900, snapshots=False), backend("snappy", "g", free=100))
    assert names(scheduler.place(request({"group": "g", "requires": "snapshots"}))) == ["snappy"]
    assert names(scheduler.place(request({"group": "g"}))) == ["plain", "snappy"]
    assert names(scheduler.place(request({"group": "g"}, source_kind="snapshot"))) == ["snappy"]
    with pytest.raises(InvalidArgument, match="no backend of x offers snapshots, block"):
        scheduler_of(backend("x", free=1, snapshots=False)).place(request({"requires": "snapshots,block"}))
    with pytest.raises(InvalidArgument, match="unknown feature 'teleport'"):
        scheduler.place(request({"group": "g", "requires": "teleport"}))
