"""End to end: ``loadtests/bench.py --quick`` runs every system and writes its JSON.

Starts real servers (``gpugate serve`` and the plain Ray Serve peer, each with
its own local Ray), so it takes a minute or two. Triton runs too if its venv
(``.venv-triton``) was built before; ``--quick`` never builds it, so on a fresh
machine Triton is reported as skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "loadtests" / "bench.py"


@pytest.mark.timeout(400)
def test_bench_quick_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json-out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    report = json.loads(out.read_text())

    assert report["settings"]["quick"] is True
    assert report["in_process"]["rows_per_s"] > 0
    assert report["in_process"]["forward_1row_ms"] > 0
    assert report["problems"] == []

    rows = report["rows"]
    for system, protocol in (("gpugate", "grpc"), ("gpugate", "http"), ("rayserve", "grpc")):
        mine = [r for r in rows if r["system"] == system and r["protocol"] == protocol]
        assert sorted(r["concurrency"] for r in mine) == [1, 8], (system, protocol)
        for r in mine:
            assert r["req_per_s"] > 0, r
            assert r["requests"] > 0, r
            assert r["errors"] == 0, r
            assert r["p50_ms"] is not None and r["p99_ms"] >= r["p50_ms"], r
        if system == "gpugate":
            assert all(r["ratio_vs_peer"] is not None for r in mine)
            # Where the time goes, from the gateway's statistics extension.
            for r in mine:
                stages = r["stage_ms"]
                assert set(stages) == {
                    "success",
                    "queue",
                    "compute_input",
                    "compute_infer",
                    "compute_output",
                }, r
                assert all(v > 0 for v in stages.values()), r
                assert stages["compute_infer"] < stages["success"] <= r["mean_ms"], r

    for name in ("gpugate", "rayserve"):
        system = report["systems"][name]
        assert system["probe_matches_reference"] is True, system
        assert system["exit_code"] == 0, system
    assert "gpugate/grpc" in report["p50_minus_forward_ms_at_c1"]
    assert "gateway p50 minus forward time" in proc.stdout
    assert "where a request's time goes" in proc.stdout

    if "triton" in report["skipped"]:
        assert "not built" in report["skipped"]["triton"]
        assert "SKIPPED: triton" in proc.stdout
    else:
        assert report["systems"]["triton"]["probe_matches_reference"] is True
        assert {(r["protocol"], r["concurrency"]) for r in rows if r["system"] == "triton"} == {
            ("grpc", 1),
            ("grpc", 8),
            ("http", 1),
            ("http", 8),
        }

    # The noisy-neighbour table: the light tenant measured alone and beside the heavy one.
    noisy = {r["system"]: r for r in report["noisy_neighbour"]}
    assert {"gpugate", "rayserve"} <= set(noisy)
    for r in noisy.values():
        for phase in ("light_alone", "light_beside"):
            assert r[phase]["requests"] > 0 and r[phase]["errors"] == 0, r
            assert r[phase]["p99_ms"] >= r[phase]["p50_ms"] > 0, r
        assert r["heavy"]["requests"] > 0, r
        assert r["p99_ratio"] == r["light_beside"]["p99_ms"] / r["light_alone"]["p99_ms"]
    assert "noisy neighbour (gRPC)" in proc.stdout
