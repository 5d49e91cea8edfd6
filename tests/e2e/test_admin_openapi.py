"""A property-based run over the admin API's generated OpenAPI description (schemathesis,
every check it has) against a real `gpugate serve`, on SQLite and on PostgreSQL: no 5xx,
and every answer fits the description (status, content type, headers, body).

``GPUGATE_SCHEMATHESIS_EXAMPLES`` sets the examples per operation (default 5, a few
hundred requests in all; ``make schemathesis`` runs many more) and
``GPUGATE_SCHEMATHESIS_SEED`` replays a seed that a run printed. Each run prints its
figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Gateway, admin_token, start_gateway

pytestmark = pytest.mark.timeout(3600)

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("GPUGATE_SCHEMATHESIS_EXAMPLES", "5"))
SEED = os.environ.get("GPUGATE_SCHEMATHESIS_SEED")
OPERATIONS = 44


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    extra: tuple[str, ...] = ()
    if request.param == "postgres":
        extra = ("--database-url", request.getfixturevalue("postgres_schema").url)
    gw = start_gateway(tmp_path / "state", *extra)
    try:
        yield gw
    finally:
        gw.close()


def test_no_server_error_and_every_answer_fits_the_description(
    gateway: Gateway, tmp_path: Path
) -> None:
    reports = tmp_path / "schemathesis"
    command = [
        SCHEMATHESIS, "--config-file", str(CONFIG), "run",
        f"{gateway.url}/admin/openapi.json",
        "--header", f"Authorization: Bearer {admin_token(gateway)}",
        "--checks", "all",
        "--max-examples", str(EXAMPLES),
        "--report", "json", "--report-dir", str(reports),
        *(["--seed", SEED] if SEED else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3000, check=False)
    (found,) = reports.glob("*.json")
    run = json.loads(found.read_text())
    cases = run["test_cases"]
    print(
        f"schemathesis {run['schemathesis_version']} seed {run['seed']}: "
        f"{run['operations']['tested']}/{run['operations']['total']} operations, "
        f"{cases['generated']} test cases, {cases['with_failures']} with failures, "
        f"{len(run['errors'])} errors, {run['running_time']:.1f} s"
    )
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert run["operations"]["tested"] == run["operations"]["total"] == OPERATIONS
    assert cases["with_failures"] == 0 and run["errors"] == [] and run["complete"]
    assert gateway.proc.poll() is None  # and the gateway is still up
