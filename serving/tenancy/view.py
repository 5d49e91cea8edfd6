"""A tenant's own view, read with its API key (``GET /tenant``, ``gpugate tenant status``):
its settings, status, grants and caps, rate quotas, keys, this month's usage and the
models it may use with their model cards.

Every part comes from the code that serves it elsewhere: the keys as the admin API
lists them (:meth:`KeyRow.as_json`), the model cards as the admin API shows a version
(:meth:`Stages.cards`), the usage from the cost ledger's report (as ``GET /usage``).
The answer is bounded whatever the tenant holds: at most :data:`MAX_KEYS` keys,
:data:`MAX_MODELS` models (with their production version and at most
:data:`MAX_STAGING` staging versions each) and :data:`MAX_MODELS` per-model quotas and
usage rows; each list says how many there are in all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from router import DEFAULT_PRIORITY_LEVEL, Rate, Unauthenticated, Unavailable
from serving.costs import LedgerReports, ReportError
from serving.registry import Stages, VersionRow
from serving.state import utcnow
from serving.tenancy.keys import TenantKeyStore
from serving.tenancy.quotas import QuotaStore
from serving.tenancy.records import TenantNotFoundError, TenantRow, when
from serving.tenancy.tenants import TenantStore

log = logging.getLogger(__name__)

MAX_KEYS = 100  # the unrevoked first, newest first
MAX_MODELS = 100  # by name; also bounds the per-model quotas and usage rows
MAX_STAGING = 4  # per model, newest first
# How long one tenant's view is reused: at most one read of the state per tenant and
# gateway in that time, however often the tenant asks.
REUSE_S = 1.0
_MAX_CACHED = 4096


@dataclass(frozen=True)
class ServerCaps:
    """The server's in-flight caps, which a tenant without caps of its own has."""

    max_requests_in_flight: int
    max_bytes_in_flight: int


class TenantViews:
    """Reads tenants' own views (``router.http_server.TenantViewSource``), on a thread.

    Concurrent asks for one tenant share one read, and an answer is reused for
    :data:`REUSE_S`, so a tenant polling its view costs the state database at most one
    read a second on each gateway.
    """

    def __init__(
        self,
        tenants: TenantStore,
        keys: TenantKeyStore,
        quotas: QuotaStore,
        stages: Stages,
        reports: LedgerReports,
        caps: ServerCaps,
        *,
        budget: Callable[[str], dict[str, Any] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tenants = tenants
        self._keys = keys
        self._quotas = quotas
        self._stages = stages
        self._reports = reports
        self._caps = caps
        self._budget = budget  # the tenant's budget summary (serving.budgets), if any
        self._clock = clock
        self._recent: dict[str, tuple[float, asyncio.Task[dict[str, Any]]]] = {}

    @classmethod
    def open(
        cls,
        engine: sa.Engine,
        stages: Stages,
        reports: LedgerReports,
        caps: ServerCaps,
        budget: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> TenantViews:
        return cls(
            TenantStore(engine),
            TenantKeyStore(engine),
            QuotaStore(engine),
            stages,
            reports,
            caps,
            budget=budget,
        )

    async def view(self, tenant: str) -> dict[str, Any]:
        now = self._clock()
        found = self._recent.get(tenant)
        if found is None or found[0] <= now or _failed(found[1]):
            if len(self._recent) >= _MAX_CACHED:
                self._recent = {t: e for t, e in self._recent.items() if e[0] > now}
            task = asyncio.create_task(self._read(tenant), name="gpugate-tenant-view")
            found = (now + REUSE_S, task)
            self._recent[tenant] = found
        # shield: a caller that goes away must not cancel the read others wait on.
        return await asyncio.shield(found[1])

    async def _read(self, tenant: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self.read, tenant)
        except TenantNotFoundError:
            # Deleted a moment ago, while its key was still in the router's cache.
            raise Unauthenticated("unknown API key") from None
        except sa.exc.SQLAlchemyError:
            log.exception("cannot read the view of tenant %s", tenant)
            raise Unavailable("cannot read the tenant's view now: state database") from None

    def read(self, name: str) -> dict[str, Any]:
        """The tenant's view (blocking). TenantNotFoundError for a deleted tenant."""
        row = self._tenants.get(name)
        if row.deleted_at is not None:
            raise TenantNotFoundError(f"tenant {name!r} is deleted")
        return {
            **self._settings(row),
            "quotas": self._quota_list(name),
            "keys": self._key_list(name),
            "usage": self._usage(name),
            "budget": self._budget(name) if self._budget is not None else None,
            "model_cards": self._models(row),
            "as_of": utcnow().isoformat(),
        }

    def _settings(self, row: TenantRow) -> dict[str, Any]:
        own = row.admission
        return {
            "tenant": row.name,
            "weight": row.weight,
            "source": row.source,
            "status": row.status,
            "suspended_at": when(row.suspended_at),
            "suspended_reason": row.suspension,
            "priorities": sorted({DEFAULT_PRIORITY_LEVEL, *own.priorities}),
            "max_requests_in_flight": _cap(
                own.max_requests_in_flight, self._caps.max_requests_in_flight
            ),
            "max_bytes_in_flight": _cap(own.max_bytes_in_flight, self._caps.max_bytes_in_flight),
            "models": list(row.models),
        }

    def _quota_list(self, name: str) -> dict[str, Any]:
        rows = self._quotas.list(name)  # the one over every model first
        shown = rows[: MAX_MODELS + 1]
        return {
            "total": len(rows),
            "quotas": [
                {
                    "model": r.model or None,
                    "requests": _rate(Rate.of(r.requests_per_s, r.requests_burst)),
                    "rows": _rate(Rate.of(r.rows_per_s, r.rows_burst)),
                }
                for r in shown
            ],
        }

    def _key_list(self, name: str) -> dict[str, Any]:
        keys, total = self._keys.newest(name, MAX_KEYS)
        now = utcnow()
        return {"total": total, "keys": [k.as_json(now) for k in keys]}

    def _usage(self, name: str) -> dict[str, Any]:
        try:
            report = self._reports.report(None, None, "model", tenant=name)
        except ReportError as exc:
            return {"error": str(exc)}
        totals = report["totals"]
        return {
            "from": report["from"],
            "to": report["to"],
            "currency": report["currency"],
            **{k: totals[k] for k in _USAGE_FIELDS},
            "models_total": len(report["rows"]),
            "by_model": [
                {"model": r["model"], **{k: r[k] for k in _USAGE_FIELDS}}
                for r in report["rows"][:MAX_MODELS]
            ],
        }

    def _models(self, row: TenantRow) -> dict[str, Any]:
        every = "*" in row.models
        rows = self._stages.registry.in_service(None if every else row.models)
        by_model: dict[str, list[VersionRow]] = {} if every else {m: [] for m in row.models}
        for v in rows:
            by_model.setdefault(v.name, []).append(v)
        names = sorted(by_model)[:MAX_MODELS]
        chosen: list[tuple[str, VersionRow | None, list[VersionRow]]] = []
        for m in names:
            production = next((v for v in by_model[m] if v.stage == "production"), None)
            staging = [v for v in reversed(by_model[m]) if v.stage == "staging"][:MAX_STAGING]
            chosen.append((m, production, staging))
        wanted = [v for _, p, s in chosen for v in ([p] if p else []) + s]
        cards = {(c["name"], c["version"]): c for c in self._stages.cards(wanted)}
        return {
            "total": len(by_model),
            "models": [
                {
                    "model": m,
                    "production": cards[(p.name, p.version)] if p else None,
                    "staging": [cards[(v.name, v.version)] for v in s],
                }
                for m, p, s in chosen
            ],
        }


_USAGE_FIELDS = ("requests", "rows", "used_ns", "gpu_seconds", "gpu_hours", "cost")


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _cap(own: int | None, server: int) -> dict[str, Any]:
    return {"limit": server if own is None else own, "server_default": own is None}


def _rate(rate: Rate | None) -> dict[str, float] | None:
    return None if rate is None else {"per_s": rate.per_s, "burst": rate.burst}
