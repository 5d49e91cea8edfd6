"""The SLO gate: per-tenant p99 latency and error rate, checked when Locust quits.

A tenant's figures cover all its stats entries (every protocol and model it
called), merged. A tenant with an SLO but no requests breaks it: nothing shows
the objective was met. Works on Locust's ``RequestStats`` (the master's in a
distributed run) and does not depend on how the entries were produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from locust_config import LoadConfig

SLO_EXIT_CODE = 3


@dataclass(frozen=True)
class TenantFigures:
    tenant: str
    requests: int
    failures: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def tenant_figures(stats: Any, tenant: str) -> TenantFigures:
    """Merge every stats entry whose name ends in ``[tenant]``."""
    from locust.stats import StatsEntry

    merged = StatsEntry(stats, f"[{tenant}]", "", use_response_times_cache=False)
    for (name, _method), entry in stats.entries.items():
        if name.endswith(f"[{tenant}]"):
            merged.extend(entry)
    p99 = float(merged.get_response_time_percentile(0.99)) if merged.num_requests else None
    return TenantFigures(tenant, merged.num_requests, merged.num_failures, p99)


def check_slos(config: LoadConfig, stats: Any) -> tuple[list[str], list[str]]:
    """(breaches, passes): one line each per tenant and figure with an SLO."""
    breaches: list[str] = []
    passes: list[str] = []
    for tenant in config.tenants:
        slo = tenant.slo
        if slo is None or (slo.p99_ms is None and slo.error_rate is None):
            continue
        fig = tenant_figures(stats, tenant.name)
        if fig.requests == 0:
            breaches.append(f"tenant {tenant.name}: no requests recorded, SLO cannot be met")
            continue
        if slo.p99_ms is not None:
            assert fig.p99_ms is not None
            line = (
                f"tenant {tenant.name}: p99 {fig.p99_ms:.0f} ms "
                f"{'>' if fig.p99_ms > slo.p99_ms else '<='} SLO {slo.p99_ms:g} ms "
                f"({fig.requests} requests)"
            )
            (breaches if fig.p99_ms > slo.p99_ms else passes).append(line)
        if slo.error_rate is not None:
            broken = fig.error_rate > slo.error_rate
            line = (
                f"tenant {tenant.name}: error rate {fig.error_rate:.2%} "
                f"{'>' if broken else '<='} SLO {slo.error_rate:.2%} "
                f"({fig.failures} of {fig.requests} failed)"
            )
            (breaches if broken else passes).append(line)
    return breaches, passes


def failures_covered(config: LoadConfig, stats: Any) -> bool:
    """True if every tenant with failed requests has an error-rate SLO (that then judged them)."""
    for tenant in config.tenants:
        if tenant_figures(stats, tenant.name).failures and (
            tenant.slo is None or tenant.slo.error_rate is None
        ):
            return False
    covered = {f"[{t.name}]" for t in config.tenants}
    # Failures under names of no configured tenant are never covered.
    return not any(
        entry.num_failures and not any(name.endswith(c) for c in covered)
        for (name, _method), entry in stats.entries.items()
    )
