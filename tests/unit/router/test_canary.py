"""Canary routing, shadow comparison and rollout analysis, without a server."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest

from router._exceptions import NotFound
from router.canary import ShadowStats, Split, Splitter, VersionStats, Windows, bucket, compare
from router.model_table import CANARY_REASON, LiveModelTable
from router.service import ServedModel
from router.types import ModelSignature, TensorSpec
from serving.rollout.controller import analyse
from serving.rollout.rollouts import RolloutSpec

SIG = ModelSignature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (3,)),), 8)


def served(name: str, version: str) -> ServedModel:
    return ServedModel(name, version, SIG, cast(Any, f"batcher-{name}-{version}"))


def test_split_settings_are_checked() -> None:
    for bad in ({"weight": 1.5}, {"weight": -0.1}, {"weight": 0.5, "mirror": 2.0}):
        with pytest.raises(ValueError, match="within"):
            Split("2", **bad)
    with pytest.raises(ValueError, match="sticky"):
        Split("2", 0.5, sticky="cookie:x")
    with pytest.raises(ValueError, match="sticky"):
        Split("2", 0.5, sticky="header:")


@pytest.mark.parametrize("weight", [0.0, 0.05, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])
def test_spread_split_is_exact(weight: float) -> None:
    s = Splitter(Split("2", weight))
    picks = [s.to_candidate("t", None) for _ in range(5000)]
    assert abs(sum(picks) - 5000 * weight) <= 1
    # Spread evenly, not in runs: every window of 100 holds its share give or take one.
    for i in range(0, 5000, 100):
        assert abs(sum(picks[i : i + 100]) - 100 * weight) <= 1


def test_sticky_header_split_is_accurate_stable_and_monotone() -> None:
    headers = [f"user-{i}" for i in range(5000)]
    s10 = Splitter(Split("2", 0.10, sticky="header:x-user", salt="r1"))
    first = {h: s10.to_candidate("t", {"x-user": h}.get) for h in headers}
    share = sum(first.values()) / len(headers)
    assert abs(share - 0.10) <= 0.015
    # The same key always gets the same answer, in any order and from a new splitter.
    again = Splitter(Split("2", 0.10, sticky="header:x-user", salt="r1"))
    for h in reversed(headers):
        assert again.to_candidate("other-tenant", {"x-user": h}.get) is first[h]
    # Growing the weight only ever moves keys to the candidate.
    s50 = Splitter(Split("2", 0.50, sticky="header:x-user", salt="r1"))
    later = {h: s50.to_candidate("t", {"x-user": h}.get) for h in headers}
    assert all(later[h] for h in headers if first[h])
    assert abs(sum(later.values()) / len(headers) - 0.5) <= 0.025
    # Another rollout (salt) draws other keys.
    other = Splitter(Split("2", 0.10, sticky="header:x-user", salt="r2"))
    assert {h for h in headers if first[h]} != {
        h for h in headers if other.to_candidate("t", {"x-user": h}.get)
    }


def test_sticky_tenant_and_missing_header_fall_back_to_the_tenant() -> None:
    tenants = [f"tenant-{i}" for i in range(400)]
    by_tenant = Splitter(Split("2", 0.3, sticky="tenant", salt="s"))
    by_header = Splitter(Split("2", 0.3, sticky="header:x-user", salt="s"))
    for t in tenants:
        pick = by_tenant.to_candidate(t, {"x-user": "u"}.get)
        assert all(by_tenant.to_candidate(t, None) is pick for _ in range(3))
        assert by_header.to_candidate(t, {}.get) is pick  # no header: the tenant decides
        assert pick is (bucket("s", f"tenant:{t}") < 0.3)


def test_table_routes_by_split_and_named_versions_bypass_it() -> None:
    table = LiveModelTable()
    v1, v2 = served("m", "1"), served("m", "2")
    table.swap([v1], [v2])
    assert table.route("m", None, "t") == (v1, None)
    table.set_splits({"m": Split("2", 0.25, mirror=0.5)})
    picks = [table.route("m", None, "t") for _ in range(400)]
    assert sum(p[0] is v2 for p in picks) == 100
    # Half of what production serves is mirrored to the candidate; never a candidate's own.
    assert sum(p[1] is v2 for p in picks if p[0] is v1) == 150
    assert all(p[1] is None for p in picks if p[0] is v2)
    # Naming a version bypasses the split: production, or the candidate while it runs.
    assert all(table.route("m", "1", "t") == (v1, None) for _ in range(50))
    assert table.route("m", "2", "t") == (v2, None)
    assert table.resolve("m", "2") is v2
    assert [(e.version, e.state, e.reason) for e in table.index()] == [
        ("1", "READY", ""),
        ("2", "READY", CANARY_REASON),
    ]
    # An unchanged split keeps its counters; a candidate that left the table is skipped.
    table.set_splits({"m": Split("2", 0.25, mirror=0.5)})
    assert sum(table.route("m", None, "t")[0] is v2 for _ in range(400)) == 100
    table.swap([v1], [])
    assert all(table.route("m", None, "t") == (v1, None) for _ in range(20))
    with pytest.raises(NotFound):
        table.route("m", "2", "t")
    table.set_splits({})
    table.swap([v1], [v2])
    with pytest.raises(NotFound, match="staging"):
        table.route("m", "2", "t")


def test_windows_count_only_version_outcomes_of_watched_models() -> None:
    w = Windows()
    w.record("m", "1", "200", 0.01)  # not watched yet
    w.watched = frozenset({"m"})
    for code in ("200", "200", "500", "503", "504", "400", "401", "404", "429", "499"):
        w.record("m", "1", code, 0.02)
    w.record("m", "2", "200", 0.05)
    prod, cand, _ = w.current("m", ("1", "2"))
    assert (prod.requests, prod.errors, len(prod.latencies)) == (5, 3, 2)
    assert (cand.requests, cand.p99_ms) == (1, 50.0)
    prod, cand, _ = w.take("m", ("1", "2"))
    assert prod.requests == 5
    assert w.current("m", ("1", "2"))[0].requests == 0  # a new window


def test_a_deadline_expiry_counts_only_past_the_floor_and_a_cancel_never() -> None:
    w = Windows()
    w.watched = frozenset({"m", "n"})
    w.min_deadline_s = {"n": 0.25}  # "m" has the default floor, 1 s
    for deadline in (0.05, 0.5, 0.999):
        w.record("m", "2", "504", deadline, deadline)  # the client's short deadline
    w.record("m", "2", "504", 1.0, 1.0)  # at the floor: the version's error
    w.record("m", "2", "504", 30.0, 30.0)
    w.record("m", "2", "499", 0.01, 30.0)  # cancelled by the client, however long it had
    w.record("m", "2", "499", 0.01, 0.01)
    w.record("m", "2", "200", 0.02, 0.05)  # a success counts whatever its deadline
    w.record("n", "2", "504", 0.5, 0.5)  # past this model's own floor
    w.record("n", "2", "504", 0.1, 0.1)
    cand = w.current("m", ("1", "2"))[1]
    assert (cand.requests, cand.errors, cand.short_deadlines) == (3, 2, 3)
    assert cand.summary()["short_deadline_expiries"] == 3
    other = w.current("n", ("1", "2"))[1]
    assert (other.requests, other.errors, other.short_deadlines) == (1, 1, 1)


def test_shadow_comparison_for_classifiers_regressors_and_mismatches() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 3)).astype(np.float32)
    other = scores.copy()
    flip = np.arange(200) % 4 == 0  # a known quarter of rows change class
    other[flip] = np.roll(scores[flip], 1, axis=1)
    stats = ShadowStats()
    for i in range(0, 200, 10):
        compare({"y": scores[i : i + 10]}, {"y": other[i : i + 10]}, stats)
    changed = int((scores.argmax(1) != other.argmax(1)).sum())
    assert changed > 40
    assert stats.compared == 20 and stats.rows == 200
    assert stats.rows_agreed == 200 - changed
    assert stats.agreement == pytest.approx(1 - changed / 200)

    reg = ShadowStats()
    want = np.array([[1.0], [2.0], [4.0]], dtype=np.float32)
    compare({"v": want}, {"v": want * np.array([[1.0], [1.0005], [1.5]], dtype=np.float32)}, reg)
    assert (reg.rows, reg.rows_agreed) == (3, 2)
    assert reg.max_abs_diff == pytest.approx(2.0)
    assert reg.max_rel_diff == pytest.approx(0.5)

    ints, shape = ShadowStats(), ShadowStats()
    compare({"c": np.array([1, 2, 3])}, {"c": np.array([1, 0, 3])}, ints)
    assert (ints.rows, ints.rows_agreed) == (3, 2)
    compare({"y": scores[:4]}, {"y": scores[:3]}, shape)
    assert (shape.rows, shape.rows_agreed) == (4, 0)


def _stats(requests: int, errors: int, latency_s: float) -> VersionStats:
    s = VersionStats()
    for i in range(requests):
        s.add(i >= errors, latency_s)
    return s


def test_analysis_verdicts() -> None:
    spec = RolloutSpec(min_requests=50, max_error_rate=0.02, max_p99_ratio=1.5)
    vs = ("1", "2")
    good = analyse(spec, vs, 0.2, _stats(200, 0, 0.010), _stats(60, 1, 0.012), ShadowStats(), 5.0)
    assert good.verdict == "pass", good.reasons
    assert good.figures["p99_ratio"] == pytest.approx(1.2)
    assert good.figures["candidate"]["requests"] == 60

    slow = analyse(spec, vs, 0.2, _stats(200, 0, 0.010), _stats(60, 0, 0.030), ShadowStats(), 5.0)
    assert slow.verdict == "fail" and "p99_ratio" in slow.reasons[0]

    erring = analyse(spec, vs, 0.2, _stats(200, 0, 0.01), _stats(60, 3, 0.01), ShadowStats(), 5.0)
    assert erring.verdict == "fail" and "error_rate" in erring.reasons[0]

    few = analyse(spec, vs, 0.2, _stats(200, 0, 0.01), _stats(20, 0, 0.01), ShadowStats(), 5.0)
    assert few.verdict == "wait" and "20 of the 50" in few.reasons[0]
    # Errors decide early once no later successes could save the rate: 2 > 0.02 x 50.
    early = analyse(spec, vs, 0.2, _stats(200, 0, 0.01), _stats(20, 2, 0.01), ShadowStats(), 5.0)
    assert early.verdict == "fail"
    one = analyse(spec, vs, 0.2, _stats(200, 0, 0.01), _stats(20, 1, 0.01), ShadowStats(), 5.0)
    assert one.verdict == "wait"

    mirrored = RolloutSpec(min_requests=50, mirror_pct=20, min_agreement=0.95)
    shadow = ShadowStats(requests=60, compared=60, rows=60, rows_agreed=54)
    disagree = analyse(mirrored, vs, 0.2, _stats(300, 0, 0.01), _stats(60, 0, 0.01), shadow, 5.0)
    assert disagree.verdict == "fail" and "shadow_agreement 0.9" in disagree.reasons[0]
    shadow_ok = ShadowStats(requests=60, compared=60, rows=60, rows_agreed=60)
    agree = analyse(mirrored, vs, 0.2, _stats(300, 0, 0.01), _stats(60, 0, 0.01), shadow_ok, 5.0)
    assert agree.verdict == "pass" and agree.figures["shadow"]["agreement"] == 1.0

    # At a 0% step the candidate is judged on mirrored requests: errors and agreement,
    # never their latency (they wait behind every client by design).
    zero = RolloutSpec(steps=(0, 100), min_requests=50, mirror_pct=100, min_agreement=0.95)
    only = analyse(zero, vs, 0.0, _stats(300, 0, 0.01), VersionStats(), shadow_ok, 5.0)
    assert only.verdict == "pass", only.reasons
    assert {c["check"] for c in only.figures["checks"]} == {"error_rate", "shadow_agreement"}
    failing = ShadowStats(requests=60, compared=57, rows=57, rows_agreed=57, errors=3)
    bad = analyse(zero, vs, 0.0, _stats(300, 0, 0.01), VersionStats(), failing, 5.0)
    assert bad.verdict == "fail" and "error_rate 0.05" in bad.reasons[0]
    early = analyse(zero, vs, 0.0, _stats(300, 0, 0.01), VersionStats(), ShadowStats(), 5.0)
    assert early.verdict == "wait" and "0 of the 50 shadow" in early.reasons[0]


def test_rollout_spec_and_durations() -> None:
    assert RolloutSpec(steps=(10, 50)).steps == (10, 50, 100)
    for bad in ((50, 10), (), (5, 101), (100,)):
        with pytest.raises(ValueError):
            RolloutSpec(steps=bad)
    with pytest.raises(ValueError, match="add --mirror"):
        RolloutSpec(steps=(0, 100))
    assert RolloutSpec(steps=(0, 100), mirror_pct=10).steps == (0, 100)
    assert RolloutSpec(sticky="header:X-User").sticky == "header:x-user"
    assert RolloutSpec(sticky="none").sticky is None
    with pytest.raises(ValueError):
        RolloutSpec(sticky="cookie")
    with pytest.raises(ValueError):
        RolloutSpec(bogus=1)  # type: ignore[call-arg]


def test_latency_sample_covers_the_whole_window() -> None:
    from router import canary

    s = VersionStats()
    n = canary._MAX_SAMPLES * 3
    for i in range(n):
        s.add(True, 0.001 if i < n // 2 else 0.1)  # a slow second half
    assert len(s.latencies) == canary._MAX_SAMPLES and s.requests == n
    # A sample of only the first part would put p99 at 1 ms.
    assert s.p99_ms == pytest.approx(100.0)


def test_status_text_renders_every_kind_of_analysis() -> None:
    from serving.cli.rollout import describe

    vs = ("1", "2")
    spec = RolloutSpec(steps=(0, 50), mirror_pct=100, min_requests=5, min_agreement=0.9)
    shadow = ShadowStats(requests=6, compared=6, rows=6, rows_agreed=4, max_abs_diff=3.5)
    shadow_only = analyse(spec, vs, 0.0, _stats(10, 0, 0.01), VersionStats(), shadow, 3.0)
    live = analyse(
        RolloutSpec(), vs, 0.05, _stats(200, 0, 0.01), _stats(3, 2, 0.02), ShadowStats(), 60.0
    )
    for figures, verdict in ((shadow_only.figures, "fail"), (live.figures, "fail")):
        data = {
            "id": 7,
            "model": "m",
            "candidate": "2",
            "production": "1",
            "state": "running",
            "step": 1,
            "steps": 2,
            "weights": {"1": 1.0, "2": 0.0},
            "failures": 1,
            "settings": spec.model_dump(mode="json", exclude={"salt"}),
            "last_analysis": figures,
        }
        history = [
            {
                "at": "2026-11-23T00:00:00+00:00",
                "actor": "rollout-controller",
                "action": "fail",
                "step": 1,
                "weight": 0.0,
                "figures": figures,
                "reason": "failed analysis 1 of 2",
            },
        ]
        text = "\n".join(describe(data, history))
        assert f"last analysis: {verdict}" in text and "FAIL" in text
        assert "rollout 7 of m: 1 -> 2" in text and "history:" in text
    assert "shadow: 6 compared, agreement 66.67%" in "\n".join(
        describe({**data, "last_analysis": shadow_only.figures}, [])
    )
