"""What a reviewer reads beside a version's card: how it fares against the model's
production version under the model's policy, and what the guardrails refused.

The comparison runs the signature and metrics guardrails that a promotion to production
re-runs (serving.registry.stages), with the policy of the gateway's own config, so the
verdict shown is the one a promotion would meet now. Guardrail refusals are read from the
audit log, where every one is recorded (``model.refused`` with the ``check`` that
refused; a refused approval or stage change has no ``check``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

import serving.registry.guardrails as guardrails
from serving.registry.store import Registry
from serving.registry.versions import GuardrailRefused, VersionRow
from serving.state import audit

REFUSED = "model.refused"


def against_production(registry: Registry, row: VersionRow) -> dict[str, Any] | None:
    """``row`` against its model's production version now: each metric side by side (with
    the policy's rule, if any, and whether it passes it), whether the signature is
    compatible, and the overall verdict; None when the model has no production version or
    ``row`` is it."""
    production = registry.production(row.name)
    if production is None or production.version == row.version:
        return None
    policy = registry.policy(row.name)
    metrics = []
    for name in sorted(set(row.metrics) | set(production.metrics)):
        value, base = row.metrics.get(name), production.metrics.get(name)
        rule = policy.metrics.get(name)
        passes: bool | None = None  # no rule, or nothing to compare against
        if rule is not None and base is not None:
            passes = value is not None and guardrails.within_policy(value, base, rule)
        metrics.append(
            {
                "metric": name,
                "value": value,
                "production": base,
                "delta": value - base if value is not None and base is not None else None,
                "higher_is_better": rule.higher_is_better if rule is not None else None,
                "max_regression": rule.max_regression if rule is not None else None,
                "passes": passes,
            }
        )
    refusal = None
    compatible = True
    try:
        guardrails.check_signature(row.signature, production.signature)
    except GuardrailRefused as exc:
        compatible = False
        refusal = {"check": exc.check, "reason": exc.reason}
    if refusal is None:
        try:
            guardrails.check_metrics(row.metrics, production.metrics, policy)
        except GuardrailRefused as exc:
            refusal = {"check": exc.check, "reason": exc.reason}
    return {
        "production_version": production.version,
        "metrics": metrics,
        "signature_compatible": compatible,
        "passes": refusal is None,
        "refusal": refusal,
    }


def guardrail_refusals(
    engine: sa.Engine,
    *,
    targets: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """The guardrails' refusals in ``[since, until)``, oldest first; ``targets``: only
    those about these audit targets (``model:NAME:VERSION``; ``*`` ends a prefix)."""
    records = audit.read(engine, actions=[REFUSED], targets=targets, since=since, until=until)
    return [
        {
            "seq": r.seq,
            "at": r.at.isoformat(),
            "actor": r.actor,
            "target": r.target,
            "check": r.after["check"],
            "during": r.after.get("during"),
            "reason": r.reason,
        }
        for r in records
        if isinstance(r.after, dict) and isinstance(r.after.get("check"), str)
    ]
