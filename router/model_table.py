"""A model table that the serving side replaces while requests are flowing.

Each request reads one immutable snapshot (one attribute read), so a swap is
atomic: a request resolves against the old table or the new one, never a mix.
Only production versions take tenant traffic; staging versions are deployed
and listed in the repository index as UNAVAILABLE, but do not resolve, except a
rollout's candidate (router.canary): it takes its share of the model's default
traffic and answers requests that name its version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from router._exceptions import NotFound
from router.canary import Header, Split, Splitter
from router.service import IndexEntry, ServedModel, version_order

STAGING_REASON = "staging: deployed, no tenant traffic"
CANARY_REASON = "canary: takes a share of the model's traffic"


@dataclass(frozen=True)
class _Snapshot:
    production: dict[str, ServedModel] = field(default_factory=dict)  # name -> served
    staging: dict[tuple[str, str], ServedModel] = field(default_factory=dict)


class LiveModelTable:
    """router.service.ModelTable whose contents :meth:`swap` replaces at once."""

    def __init__(self) -> None:
        self._snap = _Snapshot()
        self._splits: dict[str, Splitter] = {}  # model name -> its rollout's split

    def set_splits(self, splits: Mapping[str, Split]) -> None:
        """Replace the rollouts' splits; an unchanged split keeps its counters."""
        current = self._splits
        self._splits = {
            name: current[name]
            if name in current and current[name].split == split
            else Splitter(split)
            for name, split in splits.items()
        }

    @property
    def splits(self) -> Mapping[str, Split]:
        return {name: s.split for name, s in self._splits.items()}

    def _candidate(self, snap: _Snapshot, name: str) -> tuple[Splitter, ServedModel] | None:
        splitter = self._splits.get(name)
        if splitter is None:
            return None
        served = snap.staging.get((name, splitter.split.candidate))
        return None if served is None else (splitter, served)

    def swap(self, production: Iterable[ServedModel], staging: Iterable[ServedModel] = ()) -> None:
        prod: dict[str, ServedModel] = {}
        for m in production:
            if m.name in prod:
                raise ValueError(f"model {m.name!r} has two production versions")
            prod[m.name] = m
        self._snap = _Snapshot(prod, {(m.name, m.version): m for m in staging})

    def serves(self, name: str, version: str) -> bool:
        """Whether the version is in the table (production or staging)."""
        snap = self._snap
        served = snap.production.get(name)
        return (served is not None and served.version == version) or (name, version) in snap.staging

    @property
    def production(self) -> Mapping[str, ServedModel]:
        return self._snap.production

    def resolve(self, name: str, version: str | None) -> ServedModel:
        snap = self._snap
        served = snap.production.get(name)
        if served is None:
            raise NotFound(f"unknown model {name!r}")
        if version and version != served.version:
            canary = self._candidate(snap, name)
            if canary is not None and canary[1].version == version:
                return canary[1]
            if (name, version) in snap.staging:
                raise NotFound(f"model {name!r} version {version!r} is in staging (no traffic)")
            raise NotFound(f"model {name!r} has no version {version!r} serving")
        return served

    def route(
        self, name: str, version: str | None, tenant: str, header: Header | None = None
    ) -> tuple[ServedModel, ServedModel | None]:
        """The version that serves this request, and a version to mirror it to, if any.

        A request that names its version is never split or mirrored.
        """
        if version:
            return self.resolve(name, version), None
        snap = self._snap
        served = snap.production.get(name)
        if served is None:
            raise NotFound(f"unknown model {name!r}")
        canary = self._candidate(snap, name)
        if canary is None or canary[1] is served:
            return served, None
        splitter, candidate = canary
        if splitter.to_candidate(tenant, header):
            return candidate, None
        return served, candidate if splitter.mirror() else None

    def index(self) -> list[IndexEntry]:
        snap = self._snap
        canaries = {(n, s.split.candidate) for n, s in self._splits.items()}
        entries = [IndexEntry(m.name, m.version, "READY") for m in snap.production.values()]
        entries += [
            IndexEntry(m.name, m.version, "READY", CANARY_REASON)
            if (m.name, m.version) in canaries
            else IndexEntry(m.name, m.version, "UNAVAILABLE", STAGING_REASON)
            for m in snap.staging.values()
        ]
        return sorted(entries, key=lambda e: (e.name, version_order(e.version)))

    def versions(self, name: str) -> list[str]:
        served = self._snap.production.get(name)
        return [served.version] if served is not None else []

    def serving(self, name: str | None = None) -> list[ServedModel]:
        """Production versions and the rollouts' candidates: what :meth:`resolve` answers
        (staging takes no requests; a candidate only beside its model's production)."""
        snap = self._snap
        found = [m for m in snap.production.values() if name is None or m.name == name]
        for prod in list(found):
            canary = self._candidate(snap, prod.name)
            if canary is not None and canary[1] is not prod:
                found.append(canary[1])
        return sorted(found, key=lambda m: (m.name, version_order(m.version)))
