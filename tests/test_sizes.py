from __future__ import annotations

import pytest

from csi.errors import OutOfRange
from csi.model import GiB, MiB
from csi.sizes import choose_size

pytestmark = pytest.mark.unit


def test_sizes() -> None:
    assert choose_size(0, 0) == 1 * GiB
    assert choose_size(0, 100 * MiB) == 100 * MiB
    assert choose_size(1, 0) == MiB
    assert choose_size(MiB + 1, 0) == 2 * MiB
    assert choose_size(MiB, 0, minimum=4 * MiB) == 4 * MiB
    with pytest.raises(OutOfRange):
        choose_size(MiB + 1, MiB + 100)
