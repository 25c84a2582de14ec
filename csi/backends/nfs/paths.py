"""Where a directory volume lives on the export, from the ``subDir`` template, and the
checks that keep every name the driver derives inside the export.

A template may use ``${pvc.metadata.name}``, ``${pvc.metadata.namespace}`` and
``${pv.metadata.name}`` (the external-provisioner passes them with
``--extra-create-metadata``). Whatever the values, the result is a relative path of
plain components: no ``..`` or ``.``, no empty component, no NUL, no component longer
than NAME_MAX and no path longer than PATH_MAX/4, nothing under the driver's own folder.
Symbolic links planted on the export are refused where the driver walks (``walk_parents``
checks each existing component with lstat), so a name never resolves outside the export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from csi.errors import InvalidArgument

PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
VARIABLES = {
    "pvc.metadata.name": PVC_NAME,
    "pvc.metadata.namespace": PVC_NAMESPACE,
    "pv.metadata.name": PV_NAME,
}
DEFAULT_TEMPLATE = "${pv.metadata.name}"
CONTROL_DIR = ".cairn"
"""The driver's own folder at the export's root: records, snapshots, images, trash."""
NAME_MAX = 255
PATH_MAX = 1024
_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def check_template(template: str) -> None:
    """Refuse a template that names an unknown variable or could only make a bad path."""
    for variable in _VARIABLE.findall(template):
        if variable not in VARIABLES:
            known = ", ".join("${" + v + "}" for v in VARIABLES)
            raise InvalidArgument(f"subDir template {template!r}: unknown variable ${{{variable}}} (known: {known})")
    if not template.strip():
        raise InvalidArgument("subDir template is empty")
    check_relative(_VARIABLE.sub("x", template), f"subDir template {template!r}")


def expand(template: str, metadata: Mapping[str, str], volume_name: str) -> str:
    """The volume's path under the export. ``${pv.metadata.name}`` falls back to the
    request name (which the external-provisioner makes the PV's name)."""
    check_template(template)

    def value(match: re.Match[str]) -> str:
        key = VARIABLES[match.group(1)]
        found = metadata.get(key) or (volume_name if key == PV_NAME else "")
        if not found:
            raise InvalidArgument(
                f"subDir template {template!r} needs {key}, which the request does not carry "
                "(run the external-provisioner with --extra-create-metadata)"
            )
        if "/" in found:
            raise InvalidArgument(f"{key} {found!r} contains '/': it would add a folder to the path")
        return found

    path = _VARIABLE.sub(value, template)
    check_relative(path, f"subDir {path!r} (from template {template!r})")
    return path


def check_relative(path: str, what: str) -> list[str]:
    """The components of a safe relative path, or InvalidArgument naming ``what``."""
    if "\0" in path:
        raise InvalidArgument(f"{what} contains a NUL byte")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} is absolute: it must be relative to the export")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:  # a lone surrogate: no name on the export (NFSv4 names are UTF-8)
        raise InvalidArgument(f"{what} is not valid UTF-8") from None
    if size > PATH_MAX:
        raise InvalidArgument(f"{what} is longer than {PATH_MAX} bytes")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidArgument(f"{what} has an empty, '.' or '..' component: it must stay inside the export")
        if len(part.encode()) > NAME_MAX:
            raise InvalidArgument(f"{what} has a component longer than {NAME_MAX} bytes")
    if parts[0] == CONTROL_DIR:
        raise InvalidArgument(f"{what} is inside the driver's own folder {CONTROL_DIR}")
    return parts
