"""Rollout state and the gateway's rollout controller against a SQLite file and PostgreSQL.

The controller is the real one, reading and writing the real database; its inputs
(per-version outcomes) are fed into the router's windows the way the request path
records them. The whole path through a gateway is in tests/e2e/test_rollout.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from router.canary import Windows
from router.metrics import RouterMetrics
from router.model_table import LiveModelTable
from router.service import ServedModel
from router.types import ModelSignature, TensorSpec
from serving.config.schema import GatewayConfig, ModelPolicy
from serving.registry import Registry, StageError, Stages, artifact_path
from serving.rollout import controller as rollout_controller
from serving.rollout.controller import RolloutController
from serving.rollout.rollouts import RolloutError, Rollouts, RolloutSpec
from serving.state import audit
from tests.integration.conftest import OpenEngine
from tests.integration.serving.registry.test_registry import cand, weights
from tests.integration.serving.registry.uploads import register_file, skip_smoke_tests

CONFIG = GatewayConfig(policies={"digits": ModelPolicy(required_approvals=1)})
SIG = ModelSignature((TensorSpec("pixels", "FP32", (64,)),), (TensorSpec("y", "FP32", (10,)),), 8)


def served(version: str) -> ServedModel:
    return ServedModel("digits", version, SIG, cast(Any, f"batcher-{version}"))


def approved(reg: Registry, tmp_path: Path, version: str) -> None:
    register_file(
        reg, "alice", cand(weights(tmp_path / f"{version}.st", int(version)), version=version)
    )
    Stages(reg).decide("bob", "digits", version, "approve", "looks fine")


@pytest.fixture
def store(open_db: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rollouts:
    skip_smoke_tests(monkeypatch)
    reg = Registry(open_db(), tmp_path / "state", CONFIG)
    for v in ("1", "2", "3"):
        approved(reg, tmp_path, v)
    stages = Stages(reg)
    stages.promote("carol", "digits", "1", "staging")
    stages.promote("carol", "digits", "1", "production")
    return Rollouts(stages)


def feed(windows: Windows, version: str, n: int, latency_s: float, errors: int = 0) -> None:
    for i in range(n):
        windows.record("digits", version, "500" if i < errors else "200", latency_s)


def events(store: Rollouts) -> list[tuple[str, str]]:
    return [
        (r.actor, r.action) for r in audit.read(store.engine) if r.action.startswith("rollout.")
    ]


def test_start_is_checked_and_operators_steer_it(store: Rollouts) -> None:
    reg = store.stages.registry
    with pytest.raises(RolloutError, match="already production"):
        store.start("carol", "digits", "1", RolloutSpec())
    with pytest.raises(RolloutError, match="no production"):
        store.start("carol", "other", "1", RolloutSpec())
    ro = store.start("carol", "digits", "2", RolloutSpec(steps=(10, 50)))
    assert (ro.state, ro.step, ro.weight, ro.baseline) == ("running", 0, 0.1, "1")
    assert reg.get("digits", "2").stage == "staging"  # deployed beside production
    with pytest.raises(RolloutError, match="in progress"):
        store.start("carol", "digits", "3", RolloutSpec())
    assert reg.get("digits", "3").stage == "approved"  # a refused start changes nothing

    assert store.command("carol", "digits", "pause").state == "paused"
    with pytest.raises(RolloutError, match="paused; cannot pause"):
        store.command("carol", "digits", "pause")
    assert store.command("carol", "digits", "resume").state == "running"
    # A writer holding an old revision loses to the operator instead of overwriting,
    # and a promotion it carried is not made either (one transaction).
    stale = ro
    assert not store.advance(stale, {"verdict": "pass"})
    assert not store.finish_promoted(stale, "rollout-controller", None, "late")
    assert reg.production("digits").version == "1"  # type: ignore[union-attr]
    assert reg.get("digits", "2").stage == "staging"
    # While it runs, production is changed only through the rollout.
    with pytest.raises(StageError, match="rollout of version 2 in progress"):
        store.stages.promote("carol", "digits", "3", "production")
    with pytest.raises(StageError, match="rollout of version 2 in progress"):
        store.stages.rollback("carol", "digits")
    done = store.command("carol", "digits", "abort", "wrong build")
    assert (done.state, done.weight, done.finished_at is not None) == ("aborted", 0.0, True)
    assert reg.get("digits", "2").stage == "archived"  # its replica is freed
    assert reg.production("digits").version == "1"  # type: ignore[union-attr]
    with pytest.raises(RolloutError, match="no rollout in progress"):
        store.command("carol", "digits", "resume")
    assert [e["action"] for e in store.history(done.id)] == ["start", "pause", "resume", "abort"]
    assert events(store) == [
        ("carol", "rollout.refused"),
        ("carol", "rollout.refused"),
        ("carol", "rollout.start"),
        ("carol", "rollout.refused"),
        ("carol", "rollout.pause"),
        ("carol", "rollout.resume"),
        ("carol", "rollout.abort"),
    ]
    assert ("carol", "model.refused") in {(r.actor, r.action) for r in audit.read(store.engine)}
    # An archived candidate can be tried again; an operator may promote at once.
    again = store.start("carol", "digits", "2", RolloutSpec())
    assert again.id != done.id and reg.get("digits", "2").stage == "staging"
    promoted = store.command("carol", "digits", "promote")
    assert (promoted.state, promoted.weight) == ("succeeded", 1.0)
    assert reg.production("digits").version == "2"  # type: ignore[union-attr]
    assert reg.get("digits", "1").stage == "archived"
    assert audit.verify(store.engine).ok


def test_controller_advances_promotes_and_survives_a_restart(store: Rollouts) -> None:
    reg = store.stages.registry
    spec = RolloutSpec(steps=(10, 50), interval_s=0.05, min_requests=20, max_p99_ratio=1.5)
    ro = store.start("carol", "digits", "2", spec)

    async def scenario() -> None:
        table, windows = LiveModelTable(), Windows()
        table.swap([served("1")], [served("2")])
        ctl = RolloutController(store, table, windows, RouterMetrics(None))
        await ctl.tick()
        assert table.splits["digits"].weight == 0.1 and windows.watched == {"digits"}
        feed(windows, "1", 10, 0.010)
        feed(windows, "2", 10, 0.010)
        await asyncio.sleep(0.06)
        await ctl.tick()  # too few requests: wait, and the window stays open
        assert store.get("digits").step == 0
        assert store.get("digits").last_analysis["verdict"] == "wait"  # type: ignore[index]
        feed(windows, "1", 30, 0.010)
        feed(windows, "2", 15, 0.011)
        await asyncio.sleep(0.06)
        await ctl.tick()
        after = store.get("digits")
        assert after.step == 1, after.last_analysis
        figures = after.last_analysis
        assert figures is not None and figures["candidate"]["requests"] == 25
        assert figures["production"]["requests"] == 40
        await ctl.tick()
        assert table.splits["digits"].weight == 0.5

        # A restarted gateway: a new controller and table pick up the same step.
        table2, windows2 = LiveModelTable(), Windows()
        table2.swap([served("1")], [served("2")])
        ctl2 = RolloutController(store, table2, windows2, RouterMetrics(None))
        await ctl2.tick()
        assert table2.splits["digits"].weight == 0.5
        store.command("carol", "digits", "pause")
        feed(windows2, "1", 30, 0.010)
        feed(windows2, "2", 30, 0.010)
        await asyncio.sleep(0.06)
        await ctl2.tick()  # paused: no analysis, weights held
        assert store.get("digits").state == "paused"
        assert table2.splits["digits"].weight == 0.5
        store.command("carol", "digits", "resume")
        await ctl2.tick()  # resumed: a fresh window
        feed(windows2, "1", 30, 0.010)
        feed(windows2, "2", 30, 0.010)
        await asyncio.sleep(0.06)
        await ctl2.tick()
        done = store.get("digits")
        assert done.state == "succeeded", done.last_analysis
        assert reg.production("digits").version == "2"  # type: ignore[union-attr]
        # Until the gateway's table serves the new production, all traffic goes to it.
        await ctl2.tick()
        assert table2.splits["digits"].weight == 1.0
        assert table2.route("digits", None, "t")[0].version == "2"
        table2.swap([served("2")], [])
        await ctl2.tick()
        assert table2.splits == {}

    asyncio.run(scenario())
    actions = [e["action"] for e in store.history(ro.id)]
    assert actions == ["start", "wait", "advance", "pause", "resume", "promote"]
    assert ("rollout-controller", "rollout.promote") in events(store)


def test_controller_rolls_a_bad_candidate_back_after_the_threshold(store: Rollouts) -> None:
    reg = store.stages.registry
    spec = RolloutSpec(steps=(20, 100), interval_s=0.05, min_requests=20, failure_threshold=2)
    ro = store.start("carol", "digits", "3", spec)

    async def scenario() -> None:
        table, windows = LiveModelTable(), Windows()
        table.swap([served("1")], [served("3")])
        metrics = RouterMetrics(None)
        ctl = RolloutController(store, table, windows, metrics)
        await ctl.tick()
        feed(windows, "1", 40, 0.010)
        feed(windows, "3", 20, 0.040)  # 4x production's p99
        await asyncio.sleep(0.06)
        await ctl.tick()
        first = store.get("digits")
        assert (first.state, first.failures) == ("running", 1)
        assert table.splits["digits"].weight == 0.2
        feed(windows, "1", 40, 0.010)
        feed(windows, "3", 20, 0.010, errors=5)  # now it fails on inputs
        await asyncio.sleep(0.06)
        await ctl.tick()
        assert table.splits == {}  # all traffic back on production at once
        assert table.route("digits", None, "t")[0].version == "1"
        sample = metrics.registry.get_sample_value
        labels = {"model": "digits", "candidate": "3"}
        assert sample("gpugate_rollout_state", {**labels, "state": "failed"}) == 1.0
        assert sample("gpugate_rollout_analyses_total", {**labels, "verdict": "fail"}) == 2.0

    asyncio.run(scenario())
    failed = store.get("digits")
    assert (failed.state, failed.failures, failed.weight) == ("failed", 2, 0.0)
    assert reg.get("digits", "3").stage == "archived"
    history = store.history(ro.id)
    assert [e["action"] for e in history] == ["start", "fail", "rollback"]
    assert "p99_ratio 4.0" in history[1]["reason"]
    assert "error_rate 0.25" in history[2]["reason"]
    last = [r for r in audit.read(store.engine) if r.action == "rollout.rollback"][-1]
    assert last.actor == "rollout-controller"
    figures = last.after["figures"]
    assert figures["candidate"]["errors"] == 5 and figures["verdict"] == "fail"
    assert json.loads(json.dumps(figures)) == figures


def test_one_live_rollout_per_model_even_when_two_writers_race(
    open_db: OpenEngine, store: Rollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = Rollouts(Stages(Registry(open_db(), store.stages.registry.state_dir, CONFIG)))
    store.start("carol", "digits", "2", RolloutSpec())
    # The second writer got past its check before the first committed (its look saw
    # nothing): the unique index refuses, and its stage change is undone with it.
    monkeypatch.setattr(other, "_live", lambda model: None)
    with pytest.raises(RolloutError, match="in progress"):
        other.start("dave", "digits", "3", RolloutSpec())
    assert store.get("digits").candidate == "2"
    assert store.stages.registry.get("digits", "3").stage == "approved"


def test_refused_promotions_fail_the_rollout_or_the_command(
    store: Rollouts, tmp_path: Path
) -> None:
    reg = store.stages.registry
    store.start(
        "carol", "digits", "2", RolloutSpec(steps=(50, 100), interval_s=0.05, min_requests=5)
    )
    # The candidate's stored bytes change: the promotion's digest guardrail refuses.
    stored = artifact_path(reg.state_dir, reg.get("digits", "2").digest)
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes() + b"tampered")
    with pytest.raises(RolloutError, match="promotion refused: refused by the digest"):
        store.command("carol", "digits", "promote")
    assert store.get("digits").state == "running"  # the operator's refusal changes nothing

    async def scenario() -> None:
        table, windows = LiveModelTable(), Windows()
        table.swap([served("1")], [served("2")])
        ctl = RolloutController(store, table, windows, RouterMetrics(None))
        await ctl.tick()
        feed(windows, "1", 10, 0.01)
        feed(windows, "2", 10, 0.01)
        await asyncio.sleep(0.06)
        await ctl.tick()
        assert table.splits == {}

    asyncio.run(scenario())
    ro = store.get("digits")
    assert ro.state == "failed" and reg.get("digits", "2").stage == "archived"
    assert "promotion refused" in store.history(ro.id)[-1]["reason"]
    assert reg.production("digits").version == "1"  # type: ignore[union-attr]


def test_a_candidate_that_never_serves_fails_the_rollout(
    store: Rollouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollout_controller, "NOT_SERVING_LIMIT_S", 0.1)
    store.start("carol", "digits", "3", RolloutSpec(interval_s=0.05, min_requests=1))

    async def scenario() -> None:
        table, windows = LiveModelTable(), Windows()
        table.swap([served("1")], [])  # its deploy failed: never in the table
        ctl = RolloutController(store, table, windows, RouterMetrics(None))
        await ctl.tick()
        assert store.get("digits").state == "running"
        assert table.route("digits", None, "t")[0].version == "1"
        await asyncio.sleep(0.15)
        await ctl.tick()
        await ctl.tick()

    asyncio.run(scenario())
    ro = store.get("digits")
    assert ro.state == "failed", store.history(ro.id)
    assert "digits:3 not served for 0.1s" in store.history(ro.id)[-1]["reason"]
    assert store.stages.registry.get("digits", "3").stage == "archived"
