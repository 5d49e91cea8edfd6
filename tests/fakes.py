"""Test doubles of the router's outside world, shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Sequence

from router import NotFound
from router.canary import Header
from router.service import IndexEntry, ServedModel, version_order


class StaticModelTable:
    """A fixed set of versions; a name without a version resolves to the newest."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self._by_key = {(m.name, m.version): m for m in models}
        self._default: dict[str, ServedModel] = {}
        for m in sorted(models, key=lambda m: version_order(m.version)):
            self._default[m.name] = m

    def resolve(self, name: str, version: str | None) -> ServedModel:
        if version:
            found = self._by_key.get((name, version))
            if found is None:
                if name in self._default:
                    raise NotFound(f"model {name!r} has no version {version!r}")
                raise NotFound(f"unknown model {name!r}")
            return found
        default = self._default.get(name)
        if default is None:
            raise NotFound(f"unknown model {name!r}")
        return default

    def route(
        self, name: str, version: str | None, tenant: str, header: Header | None = None
    ) -> tuple[ServedModel, ServedModel | None]:
        return self.resolve(name, version), None

    def index(self) -> list[IndexEntry]:
        ordered = sorted(self._by_key.values(), key=lambda m: (m.name, version_order(m.version)))
        return [IndexEntry(m.name, m.version, "READY") for m in ordered]

    def versions(self, name: str) -> list[str]:
        found = [v for (n, v) in self._by_key if n == name]
        return sorted(found, key=version_order)

    def serving(self, name: str | None = None) -> list[ServedModel]:
        found = [m for m in self._by_key.values() if name is None or m.name == name]
        return sorted(found, key=lambda m: (m.name, version_order(m.version)))
