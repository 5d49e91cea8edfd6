"""The gateway side of canary rollouts: the analysis rule and the controller that
applies it.

:class:`RolloutController` runs in the gateway that serves the traffic. Every
poll it reads the live rollouts (serving.rollout.rollouts), hands their weights to the
router's model table, and when an interval is due runs :func:`analyse` on the
router's per-version windows (router.canary) and records the verdict through
:class:`~serving.rollout.Rollouts`, which owns every state change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from router.canary import ShadowStats, VersionStats, Windows
from router.metrics import RouterMetrics
from router.model_table import LiveModelTable
from serving.registry import GuardrailRefused, RegistryError
from serving.rollout.rollouts import CONTROLLER, STATES, Rollout, Rollouts, RolloutSpec

log = logging.getLogger(__name__)

# A rollout whose candidate (or production) is not served for this long fails: a
# deploy that failed, or a production version changed under it.
NOT_SERVING_LIMIT_S = 300.0


# -- the analysis --------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    verdict: str  # pass | fail | wait
    figures: dict[str, Any]
    reasons: tuple[str, ...]


def analyse(
    spec: RolloutSpec,
    versions: tuple[str, str],
    weight: float,
    prod: VersionStats,
    cand: VersionStats,
    shadow: ShadowStats,
    window_s: float,
) -> Analysis:
    """Compare candidate with production over one window (pure; unit-tested).

    The candidate is judged on its live requests. At a 0% step it has none, and is
    judged on the mirrored ones instead: their errors, not their latency (shadow work
    waits behind every client by design, so its latency says nothing comparable).
    """
    n = spec.min_requests
    mirrored = spec.mirror_pct > 0
    shadow_only = weight <= 0.0
    requests, errors = (
        (shadow.requests, shadow.errors)
        if shadow_only
        else (
            cand.requests,
            cand.errors,
        )
    )
    rate = errors / requests if requests else 0.0
    short: list[str] = []
    if shadow_only:
        if shadow.requests < n:
            short.append(f"candidate answered {shadow.requests} of the {n} shadow requests needed")
    elif cand.requests < n:
        short.append(f"candidate served {cand.requests} of the {n} requests needed")
    if prod.requests < n:
        short.append(f"production served {prod.requests} of the {n} requests needed")
    if mirrored and not shadow_only and shadow.compared < n:
        short.append(f"{shadow.compared} of the {n} shadow comparisons needed")

    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, passed: bool) -> None:
        checks.append({"check": name, "value": value, "limit": limit, "passed": passed})

    # With too few requests only errors can decide: when no number of later successes
    # could bring the rate under the limit, a faulty candidate need not wait.
    limit = spec.max_error_rate
    if short:
        check("error_rate", round(rate, 6), limit, errors <= limit * max(n, requests))
    else:
        check("error_rate", round(rate, 6), limit, rate <= limit)
    prod_p99, cand_p99 = prod.p99_ms, cand.p99_ms
    ratio = round(cand_p99 / prod_p99, 4) if prod_p99 and cand_p99 is not None else None
    if not short:
        if not shadow_only:
            ok = ratio is not None and ratio <= spec.max_p99_ratio
            check("p99_ratio", ratio, spec.max_p99_ratio, ok)
        if mirrored:
            agreement = shadow.agreement
            ok = agreement is not None and agreement >= spec.min_agreement
            check("shadow_agreement", agreement, spec.min_agreement, ok)
    failed = tuple(
        f"{c['check']} {c['value']} beyond the limit {c['limit']}"
        for c in checks
        if not c["passed"]
    )
    verdict = "fail" if failed else ("wait" if short else "pass")
    figures = {
        "window_s": round(window_s, 3),
        "candidate_weight": weight,
        "production": {"version": versions[0], **prod.summary()},
        "candidate": {"version": versions[1], **cand.summary()},
        "p99_ratio": ratio,
        "shadow": shadow.summary() if mirrored else None,
        "checks": checks,
        "verdict": verdict,
    }
    return Analysis(verdict, figures, failed or tuple(short))


# -- the controller --------------------------------------------------------------


@dataclass
class _Tracked:
    rollout: Rollout
    window_start: float
    due: float  # when the next analysis runs
    unserved_since: float | None = None  # candidate or baseline not in the table


Taken = tuple[VersionStats, VersionStats, ShadowStats]


class Peers(Protocol):
    """The other gateway replicas, when there are several: one of them (the leader)
    analyses every rollout, on the outcomes of all of them."""

    def leads(self) -> bool:
        """Whether this gateway is the one that analyses and decides."""

    async def gather(self, model: str, versions: tuple[str, str]) -> list[Taken]:
        """Every gateway's window of ``versions`` since its last take (each is reset)."""


class RolloutController:
    """Runs in the gateway: applies rollouts' weights and runs their analyses.

    Every gateway replica applies the weights to its own traffic. With ``peers``, only
    the leader analyses and decides (a verdict, a step, a rollback): before each
    analysis it gathers the other gateways' windows into its own, so the verdict
    judges every gateway's traffic.
    """

    def __init__(
        self,
        store: Rollouts,
        table: LiveModelTable,
        windows: Windows,
        metrics: RouterMetrics,
        poll_s: float = 0.5,
        peers: Peers | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self.windows = windows
        self.metrics = metrics
        self.poll_s = poll_s
        self.peers = peers
        self._tracked: dict[int, _Tracked] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.tick()
            except Exception:
                # E.g. the database is down: the weights in force stay; say so once.
                if not failing:
                    log.exception("rollout controller pass failed; retrying every %ss", self.poll_s)
                failing = True
            else:
                if failing:
                    log.warning("rollout controller recovered")
                failing = False
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> None:
        """One pass: read the rows, analyse what is due, apply the weights."""
        rows = await asyncio.to_thread(self.store.by_ids, list(self._tracked))
        now = time.monotonic()
        decided = False
        for ro in rows:
            tracked = self._tracked.get(ro.id)
            if tracked is None or (tracked.rollout.state, tracked.rollout.step) != (
                ro.state,
                ro.step,
            ):
                # New to this gateway (a start, or a restart), a new step or a new state:
                # a fresh window.
                self._take(ro)
                tracked = self._tracked[ro.id] = _Tracked(ro, now, now + ro.spec.interval_s)
            tracked.rollout = ro
            try:
                decided |= await self._step(tracked, now)
            except Exception:
                # One rollout's trouble (e.g. its promotion's database write) must not
                # hold the others' weights; it is retried on the next pass.
                log.exception("rollout %s of %s: pass failed", ro.id, ro.model)
        if decided:  # apply a new step or a rollback now, not a poll later
            rows = await asyncio.to_thread(self.store.by_ids, list(self._tracked))
        self._apply(rows)
        self._tracked = {
            rid: t
            for rid, t in self._tracked.items()
            if t.rollout.live or not self._settled(t.rollout)
        }

    async def _step(self, tracked: _Tracked, now: float) -> bool:
        ro = tracked.rollout
        if not ro.live:
            return False
        leads = self.peers is None or self.peers.leads()
        if not self._serving(ro):
            # Nothing to compare yet: start the window when both versions serve.
            self._take(ro)
            tracked.window_start, tracked.due = now, now + ro.spec.interval_s
            if tracked.unserved_since is None:
                tracked.unserved_since = now
            elif now - tracked.unserved_since > NOT_SERVING_LIMIT_S and leads:
                missing = [
                    f"{ro.model}:{v}"
                    for v in (ro.baseline, ro.candidate)
                    if not self.table.serves(ro.model, v)
                ]
                why = f"{', '.join(missing)} not served for {NOT_SERVING_LIMIT_S:g}s"
                await asyncio.to_thread(
                    self.store.finish_back, ro, CONTROLLER, "rollback", "failed", None, why
                )
                return True
            return False
        tracked.unserved_since = None
        if ro.state == "running" and now >= tracked.due:
            if not leads:  # the leader gathers this gateway's window when it analyses
                tracked.due = now + ro.spec.interval_s
                return False
            return await self._analyse(tracked, now)
        return False

    def _serving(self, ro: Rollout) -> bool:
        return self.table.serves(ro.model, ro.candidate) and self.table.serves(
            ro.model, ro.baseline
        )

    def _settled(self, ro: Rollout) -> bool:
        """A finished rollout needs no split once the table agrees with it."""
        if ro.state != "succeeded":
            return True
        production = self.table.production.get(ro.model)
        return production is not None and production.version == ro.candidate

    def _take(self, ro: Rollout) -> tuple[VersionStats, VersionStats, ShadowStats]:
        return self.windows.take(ro.model, (ro.baseline, ro.candidate))

    async def _analyse(self, tracked: _Tracked, now: float) -> bool:
        """Run a due analysis and write its verdict; True if the weights may change."""
        ro = tracked.rollout
        versions = (ro.baseline, ro.candidate)
        if self.peers is not None:
            for taken in await self.peers.gather(ro.model, versions):
                self.windows.merge(ro.model, versions, taken)
        prod, cand, shadow = self.windows.current(ro.model, versions)
        result = analyse(
            ro.spec, versions, ro.weight, prod, cand, shadow, now - tracked.window_start
        )
        self.metrics.rollout_analyses.labels(ro.model, ro.candidate, result.verdict).inc()
        if ro.spec.mirror_pct > 0 and shadow.agreement is not None:
            self.metrics.shadow_agreement.labels(ro.model, ro.candidate).set(shadow.agreement)
        reason = "; ".join(result.reasons)
        store, figures = self.store, result.figures
        tracked.due = now + ro.spec.interval_s
        if result.verdict == "wait":
            # Too few requests: the window stays open for another interval.
            await asyncio.to_thread(store.verdict, ro, "wait", figures, reason, ro.failures)
            return False
        self._take(ro)
        tracked.window_start = now
        if result.verdict == "pass":
            if ro.step + 1 >= len(ro.spec.steps) - 1:  # the next step is 100%
                why = "analysis passed at every step"
                try:
                    await asyncio.to_thread(store.finish_promoted, ro, CONTROLLER, figures, why)
                except (GuardrailRefused, RegistryError) as exc:
                    await asyncio.to_thread(
                        store.finish_back,
                        ro,
                        CONTROLLER,
                        "rollback",
                        "failed",
                        figures,
                        f"promotion refused: {exc}",
                    )
            else:
                await asyncio.to_thread(store.advance, ro, figures)
            return True
        failures = ro.failures + 1
        if failures >= ro.spec.failure_threshold:
            why = f"{failures} failed analyses in a row: {reason}"
            await asyncio.to_thread(
                store.finish_back, ro, CONTROLLER, "rollback", "failed", figures, why, failures
            )
        else:
            why = f"failed analysis {failures} of {ro.spec.failure_threshold}: {reason}"
            await asyncio.to_thread(store.verdict, ro, "fail", figures, why, failures)
        return True

    def _apply(self, rows: Sequence[Rollout]) -> None:
        latest = {ro.model: ro for ro in rows}  # rows come ordered by id
        splits = {
            model: ro.split()
            for model, ro in latest.items()
            if ro.live or (ro.state == "succeeded" and not self._settled(ro))
        }
        self.table.set_splits(splits)
        self.windows.watched = frozenset(m for m, ro in latest.items() if ro.live)
        self.windows.min_deadline_s = {
            m: ro.spec.min_deadline_ms / 1000 for m, ro in latest.items() if ro.live
        }
        m = self.metrics
        for ro in latest.values():
            m.rollout_step.labels(ro.model, ro.candidate).set(ro.step + 1 if ro.live else 0)
            m.rollout_weight.labels(ro.model, ro.candidate).set(ro.weight)
            m.rollout_weight.labels(ro.model, ro.baseline).set(1 - ro.weight)
            for state in STATES:
                m.rollout_state.labels(ro.model, ro.candidate, state).set(state == ro.state)
