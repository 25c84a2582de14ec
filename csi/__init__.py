"""Cairn: one CSI driver, many block-storage backends.

The package is layered; imports point downwards only (see docs/design.md):

    cli, __main__           flags and config to objects; picks concrete backends
    server                  gRPC server, interceptors, shutdown
    identity, controller,   the CSI services: validate, lock, call a backend, answer
    node
    scheduler, convert,     backend choice, protobuf <-> domain model, error -> gRPC code
    status
    backends/<kind>/        the storage backends (never import grpc)
    backends/base, mount,   backend Protocols, filesystems and mounts, loop devices,
    loopdev, ids, locks     ID codec, in-flight locks
    model, errors, proc,    domain dataclasses, exception tree, subprocess runner,
    config, log             driver configuration, logging
"""

__version__ = "0.1.0"
DRIVER_NAME = "cairn.csi.io"
