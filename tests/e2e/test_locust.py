"""``loadtests/locustfile.py`` against a real ``gpugate serve``, run the way an SRE runs it.

Each test starts ``locust --headless`` as a subprocess for a few seconds with two
tenants created through the CLI, HTTP (JSON and binary) and gRPC users, and reads
what Locust wrote: the exit code, its log and the ``--csv`` stats.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
LOCUST = str(Path(sys.executable).with_name("locust"))
TENANTS = ("lt-alpha", "lt-beta")


@pytest.fixture(scope="module")
def keys(gateway: Gateway) -> dict[str, str]:
    out = {}
    for name in TENANTS:
        done = gateway.cli("tenants", "create", name, "--weight", "1", "--json")
        assert done.returncode == 0, done.stderr
        out[name] = json.loads(done.stdout)["api_key"]
    return out


def run_locust(
    gateway: Gateway,
    tmp_path: Path,
    env: dict[str, str],
    *,
    users: int = 6,
    seconds: int = 4,
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, str]]]:
    prefix = tmp_path / "run"
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GPUGATE_LOCUST", "LOCUST_"))
    }
    full_env |= {"GPUGATE_LOCUST_GRPC": gateway.grpc_url, **env}
    proc = subprocess.run(
        [
            LOCUST,
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{seconds}s",
            "--host",
            f"http://{gateway.http_url}",
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    stats_file = Path(f"{prefix}_stats.csv")
    rows = list(csv.DictReader(stats_file.open())) if stats_file.exists() else []
    return proc, rows


def tenants_env(keys: dict[str, str]) -> str:
    return ",".join(f"{name}:{key}" for name, key in keys.items())


def test_two_tenants_over_http_and_grpc_with_zero_failures(
    gateway: Gateway, keys: dict[str, str], tmp_path: Path
) -> None:
    proc, rows = run_locust(
        gateway,
        tmp_path,
        {
            "GPUGATE_LOCUST_TENANTS": tenants_env(keys),
            "GPUGATE_LOCUST_ROWS": "3",
            "GPUGATE_LOCUST_SLO": "p99_ms=10000,error_rate=0",
        },
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    by_name = {(r["Type"], r["Name"]): r for r in rows}
    for tenant in TENANTS:
        for kind, method in (("grpc", "grpc"), ("http-json", "POST"), ("http-binary", "POST")):
            row = by_name.get((method, f"{kind} infer digits [{tenant}]"))
            assert row is not None, (kind, tenant, sorted(by_name))
            assert int(row["Request Count"]) > 0, row
            assert int(row["Failure Count"]) == 0, row
            assert float(row["99%"]) > 0, row
        assert f"SLO met: tenant {tenant}: p99" in log
        assert f"SLO met: tenant {tenant}: error rate 0.00%" in log
    total = by_name[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0 and int(total["Request Count"]) > 20, total
    assert "SLO broken" not in log


def test_slo_gate_fails_a_run_whose_slo_is_impossibly_low(
    gateway: Gateway, keys: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "tenants.yaml"
    config.write_text(
        "model: digits\n"
        "tenants:\n"
        "  - {name: lt-alpha, api_key_env: LT_ALPHA_KEY, mix: {grpc: 1}}\n"
        "  - name: lt-beta\n"
        "    api_key_env: LT_BETA_KEY\n"
        "    mix: {http_binary: 1}\n"
        "    slo: {p99_ms: 0.01, error_rate: 0.5}\n"
    )
    proc, rows = run_locust(
        gateway,
        tmp_path,
        {
            "GPUGATE_LOCUST_CONFIG": str(config),
            "LT_ALPHA_KEY": keys["lt-alpha"],
            "LT_BETA_KEY": keys["lt-beta"],
        },
        users=2,
        seconds=3,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-4000:]
    assert "SLO broken: tenant lt-beta: p99" in log and "> SLO 0.01 ms" in log, log[-4000:]
    assert "SLO met: tenant lt-beta: error rate 0.00%" in log
    assert "lt-alpha" not in "".join(line for line in log.splitlines() if "SLO" in line)
    names = {r["Name"] for r in rows}
    assert {"grpc infer digits [lt-alpha]", "http-binary infer digits [lt-beta]"} <= names


def test_noisy_neighbour_shape_reports_the_light_tenant_alone_and_beside(
    gateway: Gateway, keys: dict[str, str], tmp_path: Path
) -> None:
    proc, rows = run_locust(
        gateway,
        tmp_path,
        {
            "GPUGATE_LOCUST_TENANTS": tenants_env(keys),
            "GPUGATE_LOCUST_SHAPE": "noisy-neighbour",
            "GPUGATE_LOCUST_NOISY_TENANT": "lt-alpha",
            "GPUGATE_LOCUST_MIX": "grpc=1,http_binary=1",
        },
        users=8,
        seconds=6,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "noisy-neighbour: lt-beta p99 alone" in log, log[-4000:]
    assert "beside the noisy tenant" in log
    # The light tenant keeps its fixed two users (one per transport) throughout.
    assert '"lt_beta_grpc": 1, "lt_beta_http": 1' in log
    counts = {r["Name"]: int(r["Request Count"]) for r in rows}
    assert counts["grpc infer digits [lt-alpha]"] > counts["grpc infer digits [lt-beta]"] > 0
    # Set no rate, the light tenant keeps the shape's modest one: 2 users x 5/s x 6 s.
    light = sum(n for name, n in counts.items() if name.endswith("[lt-beta]"))
    assert 0 < light <= 2 * 5 * 6 + 2, counts


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("tenants:\n  - {name: a, api_key: k, colour: red}\n")
    proc = subprocess.run(
        [LOCUST, "-f", str(LOCUSTFILE), "--headless", "-t", "1s"],
        cwd=tmp_path,
        env={**os.environ, "GPUGATE_LOCUST_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "gpugate loadtest: error:" in proc.stderr and "colour" in proc.stderr
