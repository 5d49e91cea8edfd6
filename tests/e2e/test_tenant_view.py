"""A tenant's own view (`GET /tenant`, `gpugate tenant status`) against a real `gpugate
serve` on SQLite and on PostgreSQL: a tenant made with the CLI, with two keys and a rate
quota, sends real inference with its keys and reads its settings, keys (never a secret),
this month's usage (the same as `GET /usage`) and the demo model's card; suspended, it
still reads its view, and learns why; an unknown or revoked key is refused 401.

The tests share one gateway per database and run in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import DATABASES, GPUGATE, Gateway, gateway_on, wait_for

pytestmark = pytest.mark.timeout(600)

TENANT = "viewer"
REASON = "invoice 7 unpaid"
PIXELS = [float(i % 17) for i in range(64)]


@pytest.fixture(scope="module", params=DATABASES)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway_on(request, tmp_path_factory.mktemp("tenant-view") / "state") as gw:
        yield gw


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    """The tenant's keys, by label, as the CLI printed them (filled by the first test)."""
    return {}


def admin_json(gw: Gateway, *args: str) -> Any:
    done = gw.cli(*args, "--json")
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def call(gw: Gateway, method: str, path: str, key: str | None, body: Any = None) -> tuple[int, str]:
    """(status, body text) of one data-plane call with ``key`` as the bearer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{gw.http_url}{path}", data=data, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def infer(gw: Gateway, key: str) -> int:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS}]}
    return call(gw, "POST", "/v2/models/digits/infer", key, body)[0]


def view(gw: Gateway, key: str) -> tuple[dict[str, Any], str]:
    status, text = call(gw, "GET", "/tenant", key)
    assert status == 200, text
    return json.loads(text), text


def status_cmd(gw: Gateway, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """``gpugate tenant status`` against the gateway; ``key`` through $GPUGATE_KEY."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUGATE_KEY", "GPUGATE_TOKEN")}
    if key is not None:
        env["GPUGATE_KEY"] = key
    return subprocess.run(
        [GPUGATE, "tenant", "status", "--url", gw.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def assert_no_secret(text: str, secrets: dict[str, str]) -> None:
    for label, key in secrets.items():
        assert key not in text, f"the {label} key's secret is in the answer"
        assert hashlib.sha256(key.encode()).hexdigest() not in text, f"the {label} key's hash"


def test_view_shows_settings_keys_usage_and_models(gateway: Gateway, keys: dict[str, str]) -> None:
    made = admin_json(gateway, "tenants", "create", TENANT, "--weight", "2", "--models", "digits")
    keys["default"] = made["api_key"]
    second = admin_json(gateway, "tenants", "keys", "create", TENANT, "--label", "ci")
    keys["ci"] = second["api_key"]
    admin_json(gateway, "tenants", "quota", TENANT, "--requests-per-s", "50")
    # Past the key cache's negative TTL, the new keys work at once.
    statuses = [infer(gateway, keys["default"]) for _ in range(5)]
    statuses += [infer(gateway, keys["ci"]) for _ in range(3)]
    assert statuses == [200] * 8

    got, text = view(gateway, keys["ci"])
    assert_no_secret(text, keys)
    assert got["tenant"] == TENANT and got["weight"] == 2.0 and got["source"] == "cli"
    assert got["status"] == "active" and got["suspended_reason"] is None
    assert got["priorities"] == [2] and got["models"] == ["digits"]
    assert got["max_requests_in_flight"] == {"limit": 512, "server_default": True}
    assert got["max_bytes_in_flight"] == {"limit": 256 * 2**20, "server_default": True}
    assert got["quotas"] == {
        "total": 1,
        "quotas": [{"model": None, "requests": {"per_s": 50.0, "burst": 50.0}, "rows": None}],
    }
    listed = got["keys"]
    assert listed["total"] == 2
    assert sorted(k["label"] for k in listed["keys"]) == ["ci", "default"]
    fingerprints = {k["label"]: k["fingerprint"] for k in listed["keys"]}
    for label, key in keys.items():
        assert hashlib.sha256(key.encode()).hexdigest().startswith(fingerprints[label])
    assert all(k["status"] == "active" and k["revoked_at"] is None for k in listed["keys"])
    assert {k["key_id"] for k in listed["keys"]} == {made_id(gateway, "default"), second["key_id"]}

    status, usage_text = call(gateway, "GET", "/usage", keys["default"])
    assert status == 200, usage_text
    totals = json.loads(usage_text)["totals"]
    usage = got["usage"]
    assert usage["requests"] == totals["requests"] == 8
    assert usage["rows"] == totals["rows"] == 8
    for field in ("used_ns", "gpu_seconds", "gpu_hours", "cost"):
        assert usage[field] == totals[field], field
    assert usage["used_ns"] > 0 and usage["currency"] == totals["currency"]
    assert [m["model"] for m in usage["by_model"]] == ["digits"]
    assert usage["by_model"][0]["requests"] == 8

    cards = got["model_cards"]
    assert cards["total"] == 1 and [m["model"] for m in cards["models"]] == ["digits"]
    digits = cards["models"][0]
    production = digits["production"]
    assert production["name"] == "digits" and production["version"] == "1"
    assert production["stage"] == "production" and digits["staging"] == []
    assert [t["name"] for t in production["signature"]["inputs"]] == ["pixels"]
    assert [t["name"] for t in production["signature"]["outputs"]] == ["logits"]
    assert isinstance(production["metrics"], dict) and isinstance(production["approvals"], list)
    # The same card as the admin API's version.
    shown = admin_json(gateway, "models", "show", "digits", "1")
    assert shown["signature"] == production["signature"]
    assert shown["metrics"] == production["metrics"]
    assert len(shown["approvals"]) == len(production["approvals"])


def made_id(gw: Gateway, label: str) -> int:
    listed = admin_json(gw, "tenants", "keys", "list", TENANT)
    return int(next(k["key_id"] for k in listed if k["label"] == label))


def test_cli_status_shows_the_same_view(gateway: Gateway, keys: dict[str, str]) -> None:
    done = status_cmd(gateway, "--key", keys["default"], "--json")
    assert done.returncode == 0, done.stderr
    assert_no_secret(done.stdout + done.stderr, keys)
    got = json.loads(done.stdout)
    expected, _ = view(gateway, keys["default"])
    for part in ("tenant", "status", "quotas", "usage", "model_cards", "priorities"):
        assert got[part] == expected[part], part
    assert [k["key_id"] for k in got["keys"]["keys"]] == [
        k["key_id"] for k in expected["keys"]["keys"]
    ]

    human = status_cmd(gateway, key=keys["ci"])  # the key from $GPUGATE_KEY
    assert human.returncode == 0, human.stderr
    assert_no_secret(human.stdout, keys)
    assert f"tenant {TENANT}: active" in human.stdout
    assert "rate quota, every model: 50 requests/s (burst 50)" in human.stdout
    assert "8 requests, 8 rows" in human.stdout
    assert "digits: production version 1" in human.stdout
    assert " ci " in human.stdout and " default " in human.stdout

    nokey = status_cmd(gateway)
    assert nokey.returncode == 1 and "GPUGATE_KEY" in nokey.stderr


def test_unknown_or_missing_key_is_refused_401(gateway: Gateway) -> None:
    for key in ("gg_not-a-key-of-anyone", None):
        status, text = call(gateway, "GET", "/tenant", key)
        assert status == 401, text
        assert set(json.loads(text)) == {"error"}
    done = status_cmd(gateway, "--key", "gg_not-a-key-of-anyone")
    assert done.returncode == 1 and "unknown API key" in done.stderr


def test_a_suspended_tenant_reads_its_view_and_why(gateway: Gateway, keys: dict[str, str]) -> None:
    admin_json(gateway, "tenants", "suspend", TENANT, "--reason", REASON)
    wait_for("inference refused 403", lambda: infer(gateway, keys["default"]) == 403, 30)
    got = wait_for(
        "the view to say suspended",
        lambda: (v := view(gateway, keys["default"])[0])["status"] == "suspended" and v,
        30,
    )
    assert got["suspended_reason"] == REASON and got["suspended_at"]
    assert got["usage"]["requests"] == 8  # the refused requests cost nothing
    human = status_cmd(gateway, "--key", keys["ci"])
    assert human.returncode == 0, human.stderr
    assert f"tenant {TENANT}: suspended since" in human.stdout and REASON in human.stdout

    ci_id = made_id(gateway, "ci")
    admin_json(gateway, "tenants", "keys", "revoke", TENANT, str(ci_id))
    wait_for(
        "the revoked key refused", lambda: call(gateway, "GET", "/tenant", keys["ci"])[0] == 401, 30
    )
    got = wait_for(
        "the view to list the key as revoked",
        lambda: (
            (v := view(gateway, keys["default"])[0])["keys"]["keys"][-1]["status"] == "revoked"
            and v
        ),
        30,
    )
    assert [k["label"] for k in got["keys"]["keys"]] == ["default", "ci"]  # unrevoked first
