"""Input a client can send that once answered 500, against a real `gpugate serve` on SQLite
and on PostgreSQL: each is now a 4xx in the protocol's form, and the gateway stays up."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import DATABASES, Gateway, admin, admin_token, gateway_on

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=DATABASES)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway_on(request, tmp_path_factory.mktemp("bad-input") / "state") as gw:
        yield gw


def get(gw: Gateway, path: str, key: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://{gw.http_url}{path}")
    req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    "query",
    [
        "to=9999-12-31",
        "from=0001-01-01T00:00:00%2B01:00",
        "from=0001-01-01&to=9999-12-31",
        "from=2025-01-01&to=2026-12-01",  # 700 days
    ],
)
def test_usage_windows_past_a_year_are_refused(gateway: Gateway, query: str) -> None:
    status, body = get(gateway, f"/usage?{query}", gateway.demo_key)
    assert status == 400, body
    assert "366 days" in str(body["error"])


def test_usage_within_a_year_answers(gateway: Gateway) -> None:
    status, body = get(gateway, "/usage?from=2026-01-01&to=2026-12-31", gateway.demo_key)
    assert status == 200, body
    assert body["rows"] == [] or all("model" in r["group"] for r in body["rows"])  # type: ignore[union-attr,index]


@pytest.mark.parametrize(
    "query", ["to=9999-12-31", "from=0001-01-01T00:00:00%2B01:00", "from=0001-01-01&to=9999-12-31"]
)
def test_finance_reports_take_any_window(gateway: Gateway, query: str) -> None:
    status, body = get(gateway, f"/admin/costs?{query}", admin_token(gateway))
    assert status == 200, body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models/a%00/versions/1"),
        ("GET", "/models/a/versions/1%00"),
        ("GET", "/audit?model=a%00"),
        ("GET", "/audit?since=2026-01-01T00:00:00Z%00"),
        ("GET", "/costs?from=2026-01-01%00"),
        ("GET", "/models/a%01b/rollout"),
        ("DELETE", "/tenants/a%00"),
        ("GET", "/audit?model=" + "m" * 5000),
    ],
)
def test_control_characters_and_overlong_values_are_refused(
    gateway: Gateway, method: str, path: str
) -> None:
    status, body = admin(gateway, method, path, admin_token(gateway))
    assert status == 400, body
    assert body["error"]


def test_rollout_of_an_unknown_model_with_a_long_name_is_a_client_error(gateway: Gateway) -> None:
    name = "m" * 300
    status, body = admin(
        gateway, "POST", f"/models/{name}/rollout", admin_token(gateway), {"version": "1"}
    )
    assert 400 <= status < 500, body
    longest = "m" * 128  # the longest valid name: refused as unknown, and audited in full
    status, body = admin(
        gateway, "POST", f"/models/{longest}/rollout", admin_token(gateway), {"version": "9" * 128}
    )
    assert 400 <= status < 500, body
    status, records = admin(gateway, "GET", "/audit", admin_token(gateway))
    assert status == 200, records
    assert any(r["action"] == "rollout.refused" and longest in r["target"] for r in records)


def test_a_name_with_a_trailing_newline_is_not_a_second_tenant(gateway: Gateway) -> None:
    token = admin_token(gateway)
    status, body = admin(gateway, "POST", "/tenants", token, {"name": "acme", "weight": 1})
    assert status == 201, body
    status, body = admin(gateway, "POST", "/tenants", token, {"name": "acme\n", "weight": 1})
    assert status == 400, body
    status, tenants = admin(gateway, "GET", "/tenants", token)
    assert [t["tenant"] for t in tenants].count("acme") == 1
    assert not any(t["tenant"].startswith("acme") and t["tenant"] != "acme" for t in tenants)


def test_the_gateway_is_still_up(gateway: Gateway) -> None:
    assert gateway.proc.poll() is None
    assert gateway.index()
    assert not [line for line in gateway.lines if "Traceback" in line]


@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_times_past_the_utc_range_are_clamped_not_errors(gateway: Gateway, when: str) -> None:
    """Such a time is the last (or first) UTC instant: as an expiry it is refused as too far
    or past (400, not 500), and an audit filter from it answers."""
    token = admin_token(gateway)
    future = when.startswith("9999")
    name = "far" if future else "past"
    status, body = admin(gateway, "POST", "/users", token, {"name": name, "role": "auditor"})
    assert status == 201, body
    status, body = admin(gateway, "POST", f"/users/{name}/rotate", token, {"expires_at": when})
    assert status == 400 and ("days away" if future else "not in the future") in body["error"], body
    new = {"name": name + "2", "role": "auditor", "expires_at": when}
    status, body = admin(gateway, "POST", "/users", token, new)
    assert status == 400 and ("days away" if future else "not in the future") in body["error"], body
    status, records = admin(gateway, "GET", f"/audit?since={when.replace('+', '%2B')}", token)
    assert status == 200, records
    assert (records == []) == future  # after the last instant: nothing; before: all
