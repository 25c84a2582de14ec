"""Cairn: one CSI driver, many block-storage backends.

The package is layered; imports point downwards only (see docs/design.md):

    cli, __main__           flags and config to objects; picks concrete backends
    server, metrics,        gRPC server, interceptor, shutdown; Prometheus metrics;
    client, registration    the operator's client; registration with the kubelet
    identity, controller,   the CSI services: validate, lock, call a backend, answer
    node
    scheduler, convert,     backend choice, protobuf <-> domain model, error -> gRPC code,
    status, nodes           which nodes exist
    backends/<kind>/        the storage backends (never import grpc, nor each other)
    backends/base, mount,   backend Protocols, mounts, loop devices, ID codec, in-flight
    loopdev, ids, locks,    locks, the node's records, background checks
    nodestate, checks
    model, errors, proc,    domain dataclasses, exception tree, subprocess runner, files,
    files, config, log,     driver configuration, logging, sizes, filesystem facts,
    sizes, filesystems,     StorageClass keys of the services
    parameters

`make lint` enforces the layers (import-linter contracts in pyproject.toml).
"""

__version__ = "0.1.0"
DRIVER_NAME = "cairn.csi.io"
