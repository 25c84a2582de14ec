# The Cairn driver image: the driver plus every host tool a backend's node side needs.
# Build: docker build -t ghcr.io/cairn-csi/cairn-csi:0.1.0 .
FROM debian:bookworm-slim

# One line per backend, matching the README's "What each backend needs on the host".
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates kmod \
        util-linux mount e2fsprogs xfsprogs coreutils \
        ceph-common rbd-nbd rbd-fuse python3-rbd python3-rados \
        nfs-common libnfs13 quota \
        lvm2 thin-provisioning-tools \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY csi /src/csi
# --system-site-packages: python3-rbd and python3-rados come from Debian.
RUN python3 -m venv --system-site-packages /opt/cairn \
    && /opt/cairn/bin/pip install --no-cache-dir /src \
    && rm -rf /src

ENTRYPOINT ["/opt/cairn/bin/cairn-csi"]
