"""Risk: what waits on a person, what the guardrails refused, which rollouts failed,
which tenants near the end of their budget, and whether the audit chain is intact."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from serving.budgets import BudgetStore
from serving.registry import Registry, Stages, guardrail_refusals
from serving.rollout import Rollouts
from serving.state import audit

# A rollout that sent its traffic back: by the controller's analysis, or an operator.
FAILED_STATES = ("failed", "aborted")
# Budgets at or past this share of their amount this period are listed.
BUDGET_WATCH_PERCENT = 80


def approvals_waiting(stages: Stages, now: datetime) -> list[dict[str, Any]]:
    """Versions awaiting approval (stage ``registered``), oldest first, with the approvals
    they have and the number their model's policy requires."""
    registry: Registry = stages.registry
    rows = sorted(registry.list(stage="registered"), key=lambda v: (v.created_at, v.name))
    waiting = []
    for card in stages.cards(rows):
        registered = datetime.fromisoformat(card["created_at"])
        waiting.append(
            {
                "name": card["name"],
                "version": card["version"],
                "author": card["author"],
                "registered_at": card["created_at"],
                "age_s": max(0, int((now - registered).total_seconds())),
                "approvals": sum(1 for a in card["approvals"] if a["decision"] == "approve"),
                "required": registry.policy(card["name"]).required_approvals,
            }
        )
    return waiting


def refusals(engine: sa.Engine, start: datetime, end: datetime) -> dict[str, Any]:
    """The guardrails' refusals in ``[start, end)``: how many, and how many per check."""
    found = guardrail_refusals(engine, since=start, until=end)
    by_check: dict[str, int] = {}
    for r in found:
        by_check[r["check"]] = by_check.get(r["check"], 0) + 1
    return {"count": len(found), "by_check": dict(sorted(by_check.items()))}


def failed_rollouts(rollouts: Rollouts, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Rollouts that ended failed or aborted in ``[start, end)``, oldest first, each with
    the reason of its last event."""
    failed = []
    for ro in rollouts.finished(start, end, FAILED_STATES):
        history = rollouts.history(ro.id)
        failed.append(
            {
                "id": ro.id,
                "model": ro.model,
                "candidate": ro.candidate,
                "production": ro.baseline,
                "state": ro.state,
                "created_by": ro.created_by,
                "finished_at": ro.finished_at.isoformat() if ro.finished_at else None,
                "reason": history[-1]["reason"] if history else "",
            }
        )
    return failed


def budgets_near_end(budgets: BudgetStore, now: datetime) -> list[dict[str, Any]]:
    """Tenants whose spend this period is at or past :data:`BUDGET_WATCH_PERCENT` of
    their budget, the most spent first; spend as ``GET /admin/tenants/{name}/budget``
    shows it."""
    watched = []
    for tenant, budget in budgets.all():
        spend = budgets.spend(tenant, budget, now)
        if spend.spent * 100 < budget.amount * BUDGET_WATCH_PERCENT:
            continue
        watched.append(
            {
                "tenant": tenant,
                "percent": round(spend.percent, 3),
                "unit": budgets.pricing.currency if budget.unit == "currency" else "device_hours",
                "spent": budget.display(spend.spent),
                "amount": budget.display(budget.amount),
                "exhausted": spend.exhausted,
                "action": budget.action,
            }
        )
    return sorted(watched, key=lambda w: (-w["percent"], w["tenant"]))


def audit_chain(engine: sa.Engine) -> dict[str, Any]:
    """``audit.verify``'s result, and the newest record this host anchored."""
    result = audit.verify(engine)
    anchor = audit.last_anchor(engine)
    return {
        "ok": result.ok,
        "records": result.records,
        "problem": result.problem,
        "first_bad_seq": result.first_bad_seq,
        "anchored_seq": result.anchored_seq,
        "warnings": list(result.warnings),
        "last_anchor": {"seq": anchor.seq, "at": anchor.at} if anchor is not None else None,
        "checked_at": datetime.now(UTC).isoformat(),
    }


class ChainCheck:
    """:func:`audit_chain`, run again only when the chain's head has moved or the last
    run is ``every_s`` old. Verifying reads and re-MACs the whole log; the overview is
    every role's landing page, and reloading it must not make the gateway do that each
    time. A rewrite that leaves the head alone is found within ``every_s``;
    ``GET /admin/audit/verify`` always verifies afresh. Thread-safe: callers that arrive
    during a run wait for its result instead of starting their own."""

    def __init__(self, engine: sa.Engine, every_s: float = 60.0) -> None:
        self.engine = engine
        self.every_s = every_s
        self.runs = 0
        self._lock = threading.Lock()
        self._last: tuple[tuple[int, str] | None, float, dict[str, Any]] | None = None

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            head = audit.head_of(self.engine)
            last = self._last
            if last is not None and last[0] == head and time.monotonic() - last[1] < self.every_s:
                return last[2]
            result = audit_chain(self.engine)
            self.runs += 1
            self._last = (head, time.monotonic(), result)
            return result
