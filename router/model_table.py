"""A model table that the serving side replaces while requests are flowing.

Each request reads one immutable snapshot (one attribute read), so a swap is
atomic: a request resolves against the old table or the new one, never a mix.
Only production versions take tenant traffic; staging versions are deployed
and listed in the repository index as UNAVAILABLE, but do not resolve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from router._exceptions import NotFound
from router.service import IndexEntry, ServedModel, version_order

STAGING_REASON = "staging: deployed, no tenant traffic"


@dataclass(frozen=True)
class _Snapshot:
    production: dict[str, ServedModel] = field(default_factory=dict)  # name -> served
    staging: dict[tuple[str, str], ServedModel] = field(default_factory=dict)


class LiveModelTable:
    """router.service.ModelTable whose contents :meth:`swap` replaces at once."""

    def __init__(self) -> None:
        self._snap = _Snapshot()

    def swap(self, production: Iterable[ServedModel], staging: Iterable[ServedModel] = ()) -> None:
        prod: dict[str, ServedModel] = {}
        for m in production:
            if m.name in prod:
                raise ValueError(f"model {m.name!r} has two production versions")
            prod[m.name] = m
        self._snap = _Snapshot(prod, {(m.name, m.version): m for m in staging})

    @property
    def production(self) -> Mapping[str, ServedModel]:
        return self._snap.production

    def resolve(self, name: str, version: str | None) -> ServedModel:
        snap = self._snap
        served = snap.production.get(name)
        if served is None:
            raise NotFound(f"unknown model {name!r}")
        if version and version != served.version:
            if (name, version) in snap.staging:
                raise NotFound(f"model {name!r} version {version!r} is in staging (no traffic)")
            raise NotFound(f"model {name!r} has no version {version!r} serving")
        return served

    def index(self) -> list[IndexEntry]:
        snap = self._snap
        entries = [IndexEntry(m.name, m.version, "READY") for m in snap.production.values()]
        entries += [
            IndexEntry(m.name, m.version, "UNAVAILABLE", STAGING_REASON)
            for m in snap.staging.values()
        ]
        return sorted(entries, key=lambda e: (e.name, version_order(e.version)))

    def versions(self, name: str) -> list[str]:
        served = self._snap.production.get(name)
        return [served.version] if served is not None else []
