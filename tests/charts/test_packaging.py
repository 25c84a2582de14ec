"""The image and the cluster files agree with what the README promises."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def readme_packages() -> set[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- host-packages: begin -->")[1].split("<!-- host-packages: end -->")[0]
    packages = set()
    for row in table.splitlines()[2:]:
        cells = row.split("|")
        if len(cells) > 2:
            packages |= set(re.findall(r"`([a-z0-9][a-z0-9.+-]*)`", cells[2]))
    return packages


def dockerfile_packages() -> set[str]:
    text = (ROOT / "Dockerfile").read_text()
    install = re.search(r"apt-get install -y --no-install-recommends(.*?)&&", text, re.S)
    assert install, "the Dockerfile installs no Debian packages"
    return set(install.group(1).replace("\\", " ").split())


def test_the_image_has_every_host_package_the_readme_lists() -> None:
    listed = readme_packages()
    assert {"util-linux", "e2fsprogs", "ceph-common", "nfs-common", "lvm2"} <= listed
    missing = listed - dockerfile_packages()
    assert not missing, f"the Dockerfile lacks {sorted(missing)}"


def test_the_image_runs_the_driver() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["/opt/cairn/bin/cairn-csi"\]$', text, re.M)


def test_kind_config_and_workflow() -> None:
    kind = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert kind["kind"] == "Cluster" and kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    workers = [n for n in kind["nodes"] if n["role"] == "worker"]
    values = yaml.safe_load((ROOT / "charts" / "cairn-csi" / "ci" / "local-values.yaml").read_text())
    assert len(workers) == 1 and values["backends"][0]["node"] == "kind-worker"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "kind.yaml").read_text())
    steps = " ".join(step.get("run", "") for step in workflow["jobs"]["e2e"]["steps"])
    for needed in (
        "kind create cluster --config kind-config.yaml",
        "helm install",
        "csi-sanity",
        "deploy/examples/pvc.yaml",
    ):
        assert needed in steps, needed
