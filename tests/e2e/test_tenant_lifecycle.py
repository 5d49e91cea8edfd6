"""A tenant's life against a real `gpugate serve`, driven by the CLI and by unchanged
clients: several keys, a rotation with a grace while a client keeps sending (no request
fails), revocation, suspension (403 with the reason over HTTP and gRPC) and deletion
(keys dead, usage kept).

The tests share one gateway and one tenant and run in order.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Gateway, admin, admin_token, start_gateway, wait_for

pytestmark = pytest.mark.timeout(600)

X = load_digits(return_X_y=True)[0].astype(np.float32)
TENANT = "zed"
# The gateway's key cache TTL (serving.tenancy.TenantDirectory) plus slack for a loaded box.
WITHIN_TTL_S = 2.0 + 3.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("lifecycle"))
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """What the tests learn about the tenant's keys, in order."""
    return {}


def run(gw: Gateway, *args: str) -> Any:
    done = gw.cli(*args, "--json")
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def refused(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    done = gw.cli(*args)
    assert done.returncode == 1, (args, done.stdout, done.stderr)
    return done


class Http:
    """One keep-alive connection sending the JSON form of an inference request."""

    def __init__(self, gw: Gateway) -> None:
        self.conn = http.client.HTTPConnection(gw.http_url, timeout=30)
        row = X[:1]
        self.body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": list(row.shape),
                        "datatype": "FP32",
                        "data": row.ravel().tolist(),
                    }
                ]
            }
        )

    def infer(self, key: str) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.conn.request("POST", "/v2/models/digits/infer", self.body, headers)
        answer = self.conn.getresponse()
        return answer.status, json.loads(answer.read())

    def close(self) -> None:
        self.conn.close()


def status_of(gw: Gateway, key: str) -> int:
    client = Http(gw)
    try:
        return client.infer(key)[0]
    finally:
        client.close()


def grpc_infer(gw: Gateway, key: str) -> Any:
    client = tgrpc.InferenceServerClient(gw.grpc_url)
    inp = tgrpc.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(X[:1])
    return client.infer("digits", [inp], headers={"authorization": f"Bearer {key}"})


def until_status(gw: Gateway, key: str, status: int, timeout_s: float) -> float:
    """Seconds until ``key``'s requests get ``status``; fails past ``timeout_s``."""
    start = time.monotonic()
    wait_for(f"status {status}", lambda: status_of(gw, key) == status, timeout_s, 0.1)
    return time.monotonic() - start


def test_a_tenant_holds_several_labelled_keys(gateway: Gateway, keys: dict[str, Any]) -> None:
    made = run(gateway, "tenants", "create", TENANT)
    batch = run(gateway, "tenants", "keys", "create", TENANT, "--label", "batch")
    assert batch["label"] == "batch" and batch["api_key"].startswith("gg_")
    listed = run(gateway, "tenants", "keys", "list", TENANT)
    assert [(k["label"], k["status"]) for k in listed] == [
        ("default", "active"),
        ("batch", "active"),
    ]
    text = json.dumps(listed) + gateway.cli("tenants", "keys", "list", TENANT).stdout
    for secret in (made["api_key"], batch["api_key"]):
        assert secret not in text
    assert all(len(k["fingerprint"]) == 12 for k in listed)
    for key in (made["api_key"], batch["api_key"]):
        assert status_of(gateway, key) == 200
    keys.update(
        default=(listed[0]["key_id"], made["api_key"]), batch=(batch["key_id"], batch["api_key"])
    )
    # Nobody but an admin manages keys; an auditor may list them.
    auditor = run(gateway, "users", "create", "aud", "--role", "auditor")["token"]
    assert gateway.admin_cli("tenants", "keys", "list", TENANT, token=auditor).returncode == 0
    denied = gateway.admin_cli("tenants", "keys", "create", TENANT, token=auditor)
    assert denied.returncode == 1 and "may not tenants.keys.create; needs admin" in denied.stderr


def test_rotation_with_a_grace_fails_no_request(gateway: Gateway, keys: dict[str, Any]) -> None:
    old_id, old_key = keys["batch"]
    current = {"key": old_key}
    outcomes: list[tuple[float, str, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        conn = Http(gateway)
        try:
            while not stop.is_set():
                key = current["key"]
                status, body = conn.infer(key)
                outcomes.append((time.monotonic(), key, status, body.get("error", "")))
        finally:
            conn.close()

    sender = threading.Thread(target=client)
    sender.start()
    try:
        time.sleep(0.5)
        rotated = run(gateway, "tenants", "keys", "rotate", TENANT, str(old_id), "--grace", "3s")
        rotated_at = time.monotonic()
        new_key = rotated["api_key"]
        assert rotated["label"] == "batch" and rotated["old_key"]["status"] == "active"
        grace_ends = datetime.fromisoformat(rotated["old_key"]["expires_at"])
        time.sleep(1.0)  # the client switches inside the grace
        current["key"] = new_key
        time.sleep(1.0)
    finally:
        stop.set()
        sender.join(timeout=30)
    failures = [o for o in outcomes if o[2] != 200]
    by_key = Counter(("old" if o[1] == old_key else "new", o[0] > rotated_at) for o in outcomes)
    print(f"rotation: {len(outcomes)} requests, {len(failures)} failed, by key: {dict(by_key)}")
    assert failures == []
    assert by_key[("old", True)] > 0 and by_key[("new", True)] > 0  # both keys worked at once

    # After the grace the old key is refused (401), at its expiry even though cached.
    left = (grace_ends - datetime.now(grace_ends.tzinfo)).total_seconds()
    waited = until_status(gateway, old_key, 401, left + WITHIN_TTL_S)
    assert waited <= max(left, 0) + 1.0, (waited, left)
    assert status_of(gateway, new_key) == 200
    listed = {k["key_id"]: k for k in run(gateway, "tenants", "keys", "list", TENANT)}
    assert listed[old_id]["status"] == "expired"
    assert listed[rotated["key_id"]]["status"] == "active"
    keys["batch"] = (rotated["key_id"], new_key)


def test_a_revoked_key_is_refused_within_the_ttl(gateway: Gateway, keys: dict[str, Any]) -> None:
    key_id, key = keys["default"]
    assert status_of(gateway, key) == 200  # cached as valid
    revoked = run(gateway, "tenants", "keys", "revoke", TENANT, str(key_id), "--reason", "leak")
    assert revoked["status"] == "revoked"
    until_status(gateway, key, 401, WITHIN_TTL_S)
    assert status_of(gateway, keys["batch"][1]) == 200  # the tenant's other key works


def test_a_suspended_tenant_is_refused_with_the_reason(
    gateway: Gateway, keys: dict[str, Any]
) -> None:
    _, key = keys["batch"]
    reason = "invoice 1042 unpaid"
    row = run(gateway, "tenants", "suspend", TENANT, "--reason", reason)
    assert (row["status"], row["suspended_reason"]) == ("suspended", reason)
    until_status(gateway, key, 403, WITHIN_TTL_S)
    client = Http(gateway)
    try:
        status, body = client.infer(key)
    finally:
        client.close()
    assert (status, body) == (403, {"error": f"tenant '{TENANT}' is suspended: {reason}"})
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(gateway, key)
    assert info.value.status() == str(grpc.StatusCode.PERMISSION_DENIED)
    assert reason in (info.value.message() or "")
    listed = {t["tenant"]: t for t in run(gateway, "tenants", "list")}
    assert listed[TENANT]["status"] == "suspended"

    resumed = run(gateway, "tenants", "resume", TENANT)
    assert resumed["status"] == "active"
    until_status(gateway, key, 200, WITHIN_TTL_S)
    assert grpc_infer(gateway, key).as_numpy("logits").shape == (1, 10)


def test_a_deleted_tenant_keeps_its_usage_and_its_name(
    gateway: Gateway, keys: dict[str, Any]
) -> None:
    token = admin_token(gateway)

    def requests_on_record() -> int:
        status, report = admin(gateway, "GET", f"/costs?tenant={TENANT}", token)
        assert status == 200, report
        return sum(r["requests"] for r in report["rows"] if r.get("tenant") == TENANT)

    used = wait_for("the tenant's usage in the ledger", requests_on_record, 60)
    _, key = keys["batch"]
    done = gateway.cli("tenants", "delete", TENANT)
    assert done.returncode == 0, done.stderr
    until_status(gateway, key, 401, WITHIN_TTL_S)

    assert TENANT not in {t["tenant"] for t in run(gateway, "tenants", "list")}
    everyone = {t["tenant"]: t for t in run(gateway, "tenants", "list", "--all")}
    assert everyone[TENANT]["status"] == "deleted"
    assert {k["status"] for k in run(gateway, "tenants", "keys", "list", TENANT)} == {"revoked"}
    # Its usage stays on record under its name.
    assert requests_on_record() >= used > 0
    again = refused(gateway, "tenants", "create", TENANT)
    assert f"tenant '{TENANT}' was deleted at " in again.stderr
    assert "choose another name" in again.stderr
    assert "no tenant 'zed'" in refused(gateway, "tenants", "keys", "create", TENANT).stderr

    # Restoring is explicit: a new key; the old keys stay dead.
    restored = run(gateway, "tenants", "restore", TENANT)
    until_status(gateway, restored["api_key"], 200, WITHIN_TTL_S)
    assert status_of(gateway, key) == 401
