"""The backends this process serves, by name: what every ID routes through."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from csi.backends.base import Backend
from csi.errors import NotFound


class Registry:
    def __init__(self, backends: Iterable[Backend]) -> None:
        self._by_name: dict[str, Backend] = {b.name: b for b in backends}

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def find(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def route(self, name: str, what: str, object_id: str) -> Backend:
        """The backend an ID names; an ID naming no configured backend names nothing."""
        backend = self._by_name.get(name)
        if backend is None:
            raise NotFound(f"{what} {object_id!r} does not exist (backend {name!r} is not configured)")
        return backend
