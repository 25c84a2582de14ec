"""Where a directory volume lives on the export (``paths.py``): the ``subDir`` template and
its three variables, and every check that keeps a derived path inside the export and out
of the driver's own folder, whatever the request's metadata holds."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from csi.backends.nfs import paths
from csi.backends.nfs.paths import CONTROL_DIR, NAME_MAX, PATH_MAX, PV_NAME, PVC_NAME, PVC_NAMESPACE
from csi.errors import InvalidArgument

pytestmark = pytest.mark.unit

NS_NAME = "${pvc.metadata.namespace}/${pvc.metadata.name}"
CLAIM = {PVC_NAME: "data", PVC_NAMESPACE: "team-a", PV_NAME: "pvc-0d1e"}


def test_default_template_is_the_pv_name() -> None:
    assert paths.DEFAULT_TEMPLATE == "${pv.metadata.name}"
    assert paths.expand(paths.DEFAULT_TEMPLATE, CLAIM, "request-name") == "pvc-0d1e"


def test_pv_name_falls_back_to_the_request_name() -> None:
    assert paths.expand("${pv.metadata.name}", {}, "pvc-1234") == "pvc-1234"
    assert paths.expand("${pv.metadata.name}", {PV_NAME: ""}, "pvc-1234") == "pvc-1234"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${pvc.metadata.namespace}/${pvc.metadata.name}", "team-a/data"),
        ("${pvc.metadata.namespace}/${pvc.metadata.name}/${pv.metadata.name}", "team-a/data/pvc-0d1e"),
        ("volumes/${pvc.metadata.namespace}-${pvc.metadata.name}", "volumes/team-a-data"),
        ("k8s/${pv.metadata.name}", "k8s/pvc-0d1e"),
        ("fixed/folder", "fixed/folder"),
        ("${pvc.metadata.name}${pvc.metadata.name}", "datadata"),
        (".cairnish/${pv.metadata.name}", ".cairnish/pvc-0d1e"),  # only the driver's folder itself is kept out
    ],
)
def test_templates_expand(template: str, expected: str) -> None:
    paths.check_template(template)
    assert paths.expand(template, CLAIM, "request-name") == expected


def test_values_are_not_expanded_again() -> None:
    """A value that looks like a variable is taken literally (one pass)."""
    claim = {PVC_NAME: "${pv.metadata.name}", PVC_NAMESPACE: "ns"}
    assert paths.expand(NS_NAME, claim, "pv") == "ns/${pv.metadata.name}"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("${pvc.metadata.uid}", r"unknown variable \$\{pvc.metadata.uid\}"),
        ("${ pv.metadata.name }", "unknown variable"),
        ("${PV.METADATA.NAME}", "unknown variable"),
        ("${}", "unknown variable"),
        ("a/${pvc.metadata.labels}/b", "unknown variable"),
        ("/export/${pv.metadata.name}", "absolute"),
        ("../${pv.metadata.name}", r"'\.\.' component"),
        ("a/../${pv.metadata.name}", r"'\.\.' component"),
        ("${pv.metadata.name}/..", r"'\.\.' component"),
        ("./${pv.metadata.name}", r"'\.' or"),
        ("a/./${pv.metadata.name}", r"'\.' or"),
        ("a//${pv.metadata.name}", "empty"),
        ("${pv.metadata.name}/", "empty"),
        ("a\0b/${pv.metadata.name}", "NUL"),
        (".cairn", "driver's own folder"),
        (".cairn/${pv.metadata.name}", "driver's own folder"),
        ("x" * (NAME_MAX + 1) + "/${pv.metadata.name}", f"longer than {NAME_MAX} bytes"),
        ("é" * (NAME_MAX // 2 + 1), f"longer than {NAME_MAX} bytes"),  # bytes, not characters
        ("/".join(["y" * 200] * 6), f"longer than {PATH_MAX} bytes"),
    ],
)
def test_bad_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        paths.check_template(template)
    with pytest.raises(InvalidArgument, match=message):
        paths.expand(template, CLAIM, "pvc-1")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({PVC_NAME: ".."}, r"'\.\.' component"),
        ({PVC_NAME: "."}, r"'\.' or"),
        ({PVC_NAMESPACE: ".."}, r"'\.\.' component"),
        ({PVC_NAME: "a/b"}, "contains '/'"),
        ({PVC_NAME: "../../etc"}, "contains '/'"),
        ({PVC_NAMESPACE: "/"}, "contains '/'"),
        ({PVC_NAME: "a\0b"}, "NUL"),
        ({PVC_NAME: "n" * (NAME_MAX + 1)}, f"longer than {NAME_MAX} bytes"),
        ({PVC_NAMESPACE: ".cairn"}, "driver's own folder"),
    ],
)
def test_bad_values_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        paths.expand(NS_NAME, {**CLAIM, **values}, "pvc-1")


def test_values_that_make_a_path_too_long_are_refused() -> None:
    value = "v" * NAME_MAX  # each component is fine, the whole is not
    template = "/".join(["${pvc.metadata.name}"] * 5)
    paths.check_template(template)
    with pytest.raises(InvalidArgument, match=f"longer than {PATH_MAX} bytes"):
        paths.expand(template, {PVC_NAME: value}, "pvc-1")
    assert len(paths.expand(template, {PVC_NAME: "v" * 200}, "pvc-1")) == 5 * 200 + 4


def test_a_value_completing_the_driver_folder_name_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="driver's own folder"):
        paths.expand("${pvc.metadata.namespace}${pvc.metadata.name}/x", {PVC_NAMESPACE: ".cai", PVC_NAME: "rn"}, "p")


@pytest.mark.parametrize("missing", [PVC_NAME, PVC_NAMESPACE])
def test_missing_metadata_names_the_provisioner_flag(missing: str) -> None:
    claim = {k: v for k, v in CLAIM.items() if k != missing}
    with pytest.raises(InvalidArgument, match=f"needs {missing}.*--extra-create-metadata"):
        paths.expand(NS_NAME, claim, "pvc-1")
    with pytest.raises(InvalidArgument, match="--extra-create-metadata"):
        paths.expand(NS_NAME, {**claim, missing: ""}, "pvc-1")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "empty"),
        ("/abs", "absolute"),
        ("a/", "empty"),
        ("a//b", "empty"),
        ("..", r"'\.\.'"),
        ("a/..", r"'\.\.'"),
        (".", r"'\.'"),
        ("a\0", "NUL"),
        ("a\udc80b", "not valid UTF-8"),  # a lone surrogate (os.fsdecode makes them)
        ("z" * (NAME_MAX + 1), f"longer than {NAME_MAX}"),
        ("/".join(["z" * 100] * 11), f"longer than {PATH_MAX}"),
        (".cairn", "own folder"),
        (".cairn/backend/volumes", "own folder"),
    ],
)
def test_check_relative_refuses(path: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        paths.check_relative(path, "the thing")
    assert str(caught.value).startswith("the thing ")


def test_check_relative_returns_the_components() -> None:
    assert paths.check_relative("a/b c/..d/.e/" + "z" * NAME_MAX, "it") == ["a", "b c", "..d", ".e", "z" * NAME_MAX]
    assert paths.check_relative("a/.cairn", "it") == ["a", ".cairn"]  # only at the export's root


def test_check_relative_limits_are_inclusive() -> None:
    exact = "/".join(["q" * 203] * 5)  # 5 * 203 + 4 = 1019
    exact += "/" + "q" * (PATH_MAX - len(exact) - 1)
    assert len(exact.encode()) == PATH_MAX
    paths.check_relative(exact, "it")


# Any text, surrogates included: Python strings can hold lone surrogates (os.fsdecode makes
# them), and they must be refused like any other unusable name, not crash the encoder.
ANY_TEXT = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]) | st.sampled_from("/.\0$"))


def _assert_safe(path: str) -> None:
    parts = path.split("/")
    assert parts, path
    assert parts[0] != CONTROL_DIR
    assert len(path.encode()) <= PATH_MAX
    for part in parts:
        assert part not in ("", ".", "..")
        assert "/" not in part and "\0" not in part
        assert len(part.encode()) <= NAME_MAX


@settings(max_examples=500, deadline=None, database=None)
@given(name=ANY_TEXT, namespace=ANY_TEXT, volume_name=ANY_TEXT)
@example(name="..", namespace="ns", volume_name="pv")
@example(name="x", namespace=".cairn", volume_name="pv")
@example(name="a/../../b", namespace="ns", volume_name="pv")
@example(name="\udc80", namespace="ns", volume_name="pv")
def test_expand_never_leaves_the_export(name: str, namespace: str, volume_name: str) -> None:
    metadata = {PVC_NAME: name, PVC_NAMESPACE: namespace}
    for template in (
        NS_NAME,
        "${pvc.metadata.namespace}${pvc.metadata.name}",
        "${pv.metadata.name}",
        "k/${pvc.metadata.name}",
    ):
        try:
            path = paths.expand(template, metadata, volume_name)
        except InvalidArgument:
            continue
        _assert_safe(path)


_PIECES = st.sampled_from(
    ["${pvc.metadata.name}", "${pvc.metadata.namespace}", "${pv.metadata.name}", "/", ".", "..", ".cairn", "a", "${"]
)


@settings(max_examples=500, deadline=None, database=None)
@given(pieces=st.lists(_PIECES | ANY_TEXT, max_size=8), name=ANY_TEXT, namespace=ANY_TEXT, pv=ANY_TEXT)
def test_any_template_and_values_stay_inside(pieces: list[str], name: str, namespace: str, pv: str) -> None:
    template = "".join(pieces)
    try:
        path = paths.expand(template, {PVC_NAME: name, PVC_NAMESPACE: namespace, PV_NAME: pv}, "request")
    except InvalidArgument:
        return
    _assert_safe(path)
